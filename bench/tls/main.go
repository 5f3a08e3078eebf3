// Command tls measures what the TLS door adds to a narinfo GET: the same
// kiss-onion serve answers on a plain listener (--listen) and on the TLS
// door (--listen-tls, a reader's client certificate), alternating between
// them in one run. See ../README.md.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/gateway"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

var (
	binary  = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	nPaths  = flag.Int("paths", 50, "store paths (narinfos) in the cache")
	rounds  = flag.Int("rounds", 20, "rounds of each measurement (the median counts)")
	workDir = flag.String("dir", "", "work directory (default: a new temporary one)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	dir := *workDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "kiss-onion-bench-tls-"); err != nil {
			return err
		}
		defer os.RemoveAll(dir)
	}
	hashes, err := makeCache(dir)
	if err != nil {
		return err
	}
	plain, door := freeAddr(), freeAddr()
	state := filepath.Join(dir, "state")
	srv := exec.Command(bin, "serve", "--tor", "off", "--cache-dir", filepath.Join(dir, "cache"), "--state-dir", state, "--listen", plain, "--listen-tls", door, "--log-level", "warn")
	srv.Stderr = os.Stderr
	if err := srv.Start(); err != nil {
		return err
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := tlsca.LoadDoor(tlsca.Dir(state)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("serve did not open its TLS door")
		}
	}
	bundle := filepath.Join(dir, "reader.bundle")
	if out, err := exec.Command(bin, "keys", "add", "reader", "--role", "reader", "--tls", "--out", bundle, "--state-dir", state).CombinedOutput(); err != nil {
		return fmt.Errorf("keys add: %v\n%s", err, out)
	}
	b, err := clientauth.LoadBundle(bundle)
	if err != nil {
		return err
	}
	conf, err := gateway.ClientTLSConfig(b.TLS)
	if err != nil {
		return err
	}
	targets := []struct {
		name, base string
		tls        *tls.Config
	}{{"plain", "http://" + plain, nil}, {"tls", "https://" + door, conf}}
	fmt.Printf("%d narinfos, %d rounds, median of the per-request mean of each round\n\n", len(hashes), *rounds)
	fmt.Printf("%-42s %12s %12s %10s\n", "narinfo GET", "plain", "tls", "added")
	for _, keepAlive := range []bool{true, false} {
		got := make([][]time.Duration, len(targets))
		for range *rounds {
			for i, t := range targets { // alternating
				d, err := getAll(t.base, t.tls, keepAlive, hashes)
				if err != nil {
					return fmt.Errorf("%s: %w", t.name, err)
				}
				got[i] = append(got[i], d)
			}
		}
		what := "one keep-alive connection"
		if !keepAlive {
			what = "a new connection each (TLS handshake)"
		}
		p, s := median(got[0]), median(got[1])
		fmt.Printf("%-42s %12v %12v %10v\n", what, p.Round(time.Microsecond), s.Round(time.Microsecond), (s - p).Round(time.Microsecond))
	}
	return nil
}

// getAll GETs every narinfo once, in order, and returns the mean time of
// a request.
func getAll(base string, conf *tls.Config, keepAlive bool, hashes []string) (time.Duration, error) {
	tr := &http.Transport{TLSClientConfig: conf, DisableKeepAlives: !keepAlive, DisableCompression: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	// The first request opens the connection: not counted.
	if err := get(client, base+"/nix-cache-info"); err != nil {
		return 0, err
	}
	began := time.Now()
	for _, h := range hashes {
		if err := get(client, base+"/"+h+".narinfo"); err != nil {
			return 0, err
		}
	}
	return time.Since(began) / time.Duration(len(hashes)), nil
}

func get(c *http.Client, url string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// makeCache adds small files to a Nix store of its own and copies them to
// a flat cache with the real nix; it returns the narinfos' hashes.
func makeCache(dir string) ([]string, error) {
	store := filepath.Join(dir, "store")
	var files []string
	for i := range *nPaths {
		f := filepath.Join(dir, "files", fmt.Sprintf("f%d", i))
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(f, []byte(fmt.Sprintf("bench %d %d\n", i, time.Now().UnixNano())), 0o644); err != nil {
			return nil, err
		}
		files = append(files, f)
	}
	out, err := exec.Command("nix-store", append([]string{"--store", store, "--add"}, files...)...).Output()
	if err != nil {
		return nil, fmt.Errorf("nix-store --add: %w", err)
	}
	paths := strings.Fields(string(out))
	cp := exec.Command("nix", append([]string{"--experimental-features", "nix-command", "copy", "--store", store, "--to", "file://" + filepath.Join(dir, "cache") + "?compression=none"}, paths...)...)
	if out, err := cp.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nix copy: %v\n%s", err, out)
	}
	var hashes []string
	for _, p := range paths {
		hashes = append(hashes, strings.TrimPrefix(p, "/nix/store/")[:32])
	}
	return hashes, nil
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}
