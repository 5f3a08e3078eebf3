// Command gateway benchmarks `kiss-onion proxy` against a stock Tor client:
// the time for the real nix to substitute a closure of store paths from
// the cache's read onion (a) through the gateway (closure queries and NARs
// fetched ahead, with 4, 6 or 8 circuits; and without them) and (b) with
// ALL_PROXY=socks5h:// through a plain client tor, on one private Tor
// network; also serve's loopback listener (no Tor: the floor), and a
// second, fresh store through the warm gateway (its LAN cache). Every
// round has a closure of its own (same shape, new contents), so that no
// gateway has it in store; each way in also downloads the round's NARs,
// 16 at a time, which is what its circuits carry. Run by hand, never in
// CI; see README.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/gateway"
	"github.com/kiss-onion/kiss-onion/onion/testnet"
)

var (
	binary  = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	workDir = flag.String("dir", "/tmp/kiss-onion-gateway-bench", "work directory (the built closure and its cache are reused)")
	nPaths  = flag.Int("paths", 100, "store paths in the closure")
	bigMiB  = flag.Int("big-mib", 5, "size of every 20th path, in MiB (the rest are 1-32 KiB)")
	circs   = flag.String("circuits", "4,6,8", "the gateway's circuit counts to measure, with closure queries and prefetch")
	rounds  = flag.Int("rounds", 3, "rounds (each variant once a round)")
	maxJobs = flag.Int("max-jobs", 16, "nix's max-jobs (Nix 2.8 substitutes at most this many paths at once)")
	only    = flag.String("only", "", "run only these variants (comma-separated names)")
	base    = flag.String("base", "", "another kiss-onion binary (main's, say) whose gateway, closure + prefetch at the default circuits, runs beside in the same rounds")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// variant is one way for nix to reach the onion.
type variant struct {
	name       string
	substitute string   // the substituter URL nix gets
	env        []string // more environment for nix
	client     *http.Client
	warm       bool // substitute a second time, into another fresh store (the gateway's LAN cache)
	times      []time.Duration
	rates      []float64 // MiB/s of the raw NAR downloads
	warmTimes  []time.Duration
}

func run() error {
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*workDir, 0o755); err != nil {
		return err
	}
	cacheDir := filepath.Join(*workDir, fmt.Sprintf("cache-%d-%d", *nPaths, *bigMiB))
	tops := make([]string, *rounds)
	narSets := make([][]string, *rounds)
	var closureBytes []int64
	for r := range tops {
		top, err := buildClosure(r)
		if err != nil {
			return err
		}
		store := filepath.Join(*workDir, "store")
		if out, err := nixCmd(store, "nix", "copy", "--to", "file://"+cacheDir+"?compression=zstd", top).CombinedOutput(); err != nil {
			return fmt.Errorf("nix copy: %v\n%s", err, out)
		}
		tops[r] = top
		var size int64
		if narSets[r], size, err = closureNars(store, cacheDir, top); err != nil {
			return err
		}
		closureBytes = append(closureBytes, size)
	}
	nars, bytes := len(narSets[0]), closureBytes[0]
	fmt.Fprintf(os.Stderr, "closures: %d paths, %d NARs, %.1f MiB each\n", *nPaths+1, nars, float64(bytes)/(1<<20))

	run := filepath.Join(*workDir, "run")
	os.RemoveAll(run)
	defer os.RemoveAll(run)
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	began := time.Now()
	network, err := testnet.Start(ctx, filepath.Join(run, "testnet"), logrus.NewEntry(log))
	if err != nil {
		return err
	}
	defer network.Close()
	fmt.Fprintf(os.Stderr, "private tor network ready in %v\n", time.Since(began).Round(time.Millisecond))
	torrc := filepath.Join(run, "testnet.torrc")
	if err := os.WriteFile(torrc, []byte(strings.Join(network.TorrcLines(), "\n")+"\n"), 0o644); err != nil {
		return err
	}

	// The cache, behind its onions.
	state := filepath.Join(run, "state")
	bundle := filepath.Join(run, "reader.bundle")
	if out, err := exec.Command(bin, "keys", "add", "reader", "--role", "reader", "--state-dir", state, "--out", bundle).CombinedOutput(); err != nil {
		return fmt.Errorf("keys add: %v\n%s", err, out)
	}
	local := freeAddr()
	serve, err := startProc(filepath.Join(run, "serve.log"), bin, "serve", "--tor", "public", "--tor-config", torrc,
		"--cache-dir", cacheDir, "--state-dir", state, "--listen", local, "--log-level", "warn")
	if err != nil {
		return err
	}
	defer serve.stop()
	readOnion, err := waitFile(filepath.Join(state, "read.onion"), 3*time.Minute)
	if err != nil {
		return err
	}
	onionURL := "http://" + readOnion

	// The ways in.
	type gw struct {
		name string
		args []string
		warm bool
		bin  string
	}
	var gws []gw
	if *base != "" {
		b, err := filepath.Abs(*base)
		if err != nil {
			return err
		}
		def := strconv.Itoa(gateway.DefaultCircuits)
		gws = append(gws, gw{"base binary: gateway, closure + prefetch (" + def + " circuits)", []string{"--circuits", def}, false, b})
	}
	for _, c := range strings.Split(*circs, ",") {
		c = strings.TrimSpace(c)
		gws = append(gws, gw{"gateway, closure + prefetch (" + c + " circuits)", []string{"--circuits", c}, c == strconv.Itoa(gateway.DefaultCircuits), bin})
		gws = append(gws, gw{"gateway, no prefetch (" + c + " circuits)", []string{"--circuits", c, "--prefetch=false"}, false, bin})
	}
	var variants []*variant
	for _, g := range gws {
		if !selected(g.name) {
			continue
		}
		addr := freeAddr()
		p, err := startProc(filepath.Join(run, "proxy-"+strconv.Itoa(len(variants))+".log"), g.bin,
			append([]string{"proxy", "--bundle", bundle, "--listen", addr, "--tor-config", torrc,
				"--state-dir", filepath.Join(run, "proxy-"+strconv.Itoa(len(variants))), "--log-level", "warn"}, g.args...)...)
		if err != nil {
			return err
		}
		defer p.stop()
		if err := waitGateway("http://"+addr, 4*time.Minute); err != nil {
			return fmt.Errorf("%s: %w", g.name, err)
		}
		variants = append(variants, &variant{name: g.name, substitute: "http://" + addr, client: &http.Client{}, warm: g.warm})
	}
	if selected("nix with ALL_PROXY through a stock tor") {
		client, err := network.StartClient(ctx, filepath.Join(run, "client"), bundle)
		if err != nil {
			return err
		}
		defer client.Close()
		if err := waitSocks(client.SocksAddr(), onionURL, 4*time.Minute); err != nil {
			return err
		}
		proxy, _ := url.Parse("socks5://" + client.SocksAddr())
		variants = append(variants, &variant{name: "nix with ALL_PROXY through a stock tor", substitute: onionURL,
			env:    []string{"ALL_PROXY=socks5h://" + client.SocksAddr()},
			client: &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxy), MaxIdleConnsPerHost: 32}}})
	}
	if selected("loopback") {
		variants = append(variants, &variant{name: "loopback, no Tor (the floor)", substitute: "http://" + local, client: &http.Client{}})
	}
	fmt.Fprintf(os.Stderr, "all ways in reach the onion %v after the network was ready\n", time.Since(began).Round(time.Millisecond))

	for r := 0; r < *rounds; r++ {
		// Rotate who goes first, so that no one always meets a cold cache.
		order := slices.Clone(variants)
		for i := 0; i < r%len(order); i++ {
			order = append(order[1:], order[0])
		}
		for _, v := range order {
			d, err := substitute(v, tops[r], r)
			if err != nil {
				return fmt.Errorf("%s: %w", v.name, err)
			}
			v.times = append(v.times, d)
			if v.warm {
				w, err := substitute(v, tops[r], r)
				if err != nil {
					return fmt.Errorf("%s, warm: %w", v.name, err)
				}
				v.warmTimes = append(v.warmTimes, w)
			}
			// Through a prefetching gateway the NARs now come from its
			// store: what its circuits carry is measured without it.
			rate := 0.0
			if !strings.Contains(v.name, "closure + prefetch") {
				if rate, err = download(v, narSets[r]); err != nil {
					return fmt.Errorf("%s: %w", v.name, err)
				}
			}
			v.rates = append(v.rates, rate)
			fmt.Fprintf(os.Stderr, "round %d: %-48s %6.2f s (%5.2f MiB/s), NARs at %5.2f MiB/s\n", r+1, v.name, d.Seconds(),
				float64(closureBytes[r])/(1<<20)/d.Seconds(), rate)
		}
	}

	fmt.Printf("\nnix-store --realise of a %d-path closure (%d NARs, %.1f MiB zstd of random data) from the read onion,\n", *nPaths+1, nars, float64(bytes)/(1<<20))
	fmt.Printf("private Tor network on this machine, Nix max-jobs = %d, %d rounds, a new closure each (best / median):\n\n", *maxJobs, *rounds)
	fmt.Printf("| %-48s | %8s | %8s | %11s | %18s |\n|---|---:|---:|---:|---:|\n", "way in", "best", "median", "median rate", "NARs, 16 at once")
	for _, v := range variants {
		best, med := bestMedian(v.times)
		rates := slices.Clone(v.rates)
		slices.Sort(rates)
		raw := "-"
		if r := rates[len(rates)/2]; r > 0 {
			raw = fmt.Sprintf("%.2f MiB/s", r)
		}
		fmt.Printf("| %-48s | %6.2f s | %6.2f s | %5.2f MiB/s | %15s |\n", v.name, best.Seconds(), med.Seconds(),
			float64(bytes)/(1<<20)/med.Seconds(), raw)
		if v.warm {
			best, med := bestMedian(v.warmTimes)
			fmt.Printf("| %-48s | %6.2f s | %6.2f s | %5.2f MiB/s | |\n", "  the same, second store (warm LAN cache)", best.Seconds(), med.Seconds(),
				float64(bytes)/(1<<20)/med.Seconds())
		}
	}
	return nil
}

func bestMedian(d []time.Duration) (best, median time.Duration) {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[0], s[len(s)/2]
}

// closureNars returns the NAR files of top's closure in cacheDir, and
// their bytes.
func closureNars(store, cacheDir, top string) ([]string, int64, error) {
	out, err := nixCmd(store, "nix-store", "-qR", top).Output()
	if err != nil {
		return nil, 0, fmt.Errorf("nix-store -qR: %v", err)
	}
	var nars []string
	var size int64
	for _, p := range strings.Fields(string(out)) {
		info, err := os.ReadFile(filepath.Join(cacheDir, strings.TrimPrefix(p, "/nix/store/")[:32]+".narinfo"))
		if err != nil {
			return nil, 0, err
		}
		for _, l := range strings.Split(string(info), "\n") {
			if u, ok := strings.CutPrefix(l, "URL: "); ok {
				nars = append(nars, "/"+u)
				if fi, err := os.Stat(filepath.Join(cacheDir, u)); err == nil {
					size += fi.Size()
				}
			}
		}
	}
	return nars, size, nil
}

// download fetches the NARs through v, 16 at a time, as a client with no
// dependency order would, and returns the rate in MiB/s.
func download(v *variant, nars []string) (float64, error) {
	work := make(chan string, len(nars))
	for _, n := range nars {
		work <- n
	}
	close(work)
	var total atomic.Int64
	errs := make(chan error, 16)
	began := time.Now()
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for p := range work {
				resp, err := v.client.Get(v.substitute + p)
				if err != nil {
					errs <- err
					return
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 {
					errs <- fmt.Errorf("GET %s: %d %v", p, resp.StatusCode, err)
					return
				}
				total.Add(n)
			}
		})
	}
	wg.Wait()
	select {
	case err := <-errs:
		return 0, err
	default:
	}
	return float64(total.Load()) / (1 << 20) / time.Since(began).Seconds(), nil
}

func selected(name string) bool {
	if *only == "" {
		return true
	}
	for _, o := range strings.Split(*only, ",") {
		if strings.Contains(name, strings.TrimSpace(o)) {
			return true
		}
	}
	return false
}

// substitute realises top into a fresh store through v and returns the time.
func substitute(v *variant, top string, round int) (time.Duration, error) {
	dir := filepath.Join(*workDir, "run", fmt.Sprintf("dst-%d-%d", round, rand.Int()))
	defer func() {
		exec.Command("chmod", "-R", "u+w", dir).Run()
		os.RemoveAll(dir)
	}()
	cmd := nixCmd(filepath.Join(dir, "store"), "nix-store", "--realise", top,
		"--option", "substituters", v.substitute, "--option", "max-jobs", strconv.Itoa(*maxJobs))
	cmd.Env = append(cmd.Env, v.env...)
	began := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(began)
	if err != nil {
		return 0, fmt.Errorf("nix-store --realise: %v\n%s", err, out)
	}
	return d, nil
}

// nixCmd runs a nix program on the chroot store at store, with a fresh
// narinfo cache.
func nixCmd(store, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, append([]string{"--store", store}, args...)...)
	xdg := filepath.Join(*workDir, "xdg", strconv.Itoa(rand.Int()))
	cmd.Env = append(os.Environ(),
		"NIX_CONFIG=experimental-features = nix-command\nbuild-users-group =\nsandbox-paths = /bin/busybox\nsubstituters =\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0\nconnect-timeout = 60",
		"XDG_CACHE_HOME="+xdg, "HOME="+xdg)
	return cmd
}

// buildClosure builds (once) round's closure: N store paths, each
// referencing up to three earlier ones: most of a few KiB, every 20th of
// -big-mib MiB. Rounds have the same shape and new contents.
func buildClosure(round int) (string, error) {
	marker := filepath.Join(*workDir, fmt.Sprintf("closure-%d-%d-r%d", *nPaths, *bigMiB, round))
	if b, err := os.ReadFile(marker); err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	r := rand.New(rand.NewSource(1))
	var b strings.Builder
	b.WriteString("let\n  bb = \"/bin/busybox\";\n  mk = name: kib: refs: derivation { inherit name; system = builtins.currentSystem; builder = bb; args = [ \"sh\" \"-c\" (\"${bb} mkdir $out; ${bb} dd if=/dev/urandom of=$out/data bs=1024 count=${kib} 2>/dev/null; echo \" + builtins.concatStringsSep \" \" refs + \" > $out/refs\") ]; };\n")
	for i := 0; i < *nPaths; i++ {
		kib := 1 + r.Intn(32)
		if i%20 == 10 {
			kib = *bigMiB << 10
		}
		var refs []string
		for j := 0; j < 3 && i > 0; j++ {
			refs = append(refs, fmt.Sprintf("\"${p%d}\"", r.Intn(i)))
		}
		fmt.Fprintf(&b, "  p%d = mk \"p%d-%d-r%d\" \"%d\" [ %s ];\n", i, i, *bigMiB, round, kib, strings.Join(refs, " "))
	}
	fmt.Fprintf(&b, "in mk \"top-r%d\" \"1\" [ ", round)
	for i := 0; i < *nPaths; i++ {
		fmt.Fprintf(&b, "\"${p%d}\" ", i)
	}
	b.WriteString("]\n")
	expr := filepath.Join(*workDir, fmt.Sprintf("closure-r%d.nix", round))
	if err := os.WriteFile(expr, []byte(b.String()), 0o644); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "building round %d's closure of %d paths\n", round+1, *nPaths+1)
	out, err := nixCmd(filepath.Join(*workDir, "store"), "nix-build", expr, "--no-out-link", "-j", "2").Output()
	if err != nil {
		return "", fmt.Errorf("nix-build: %v", err)
	}
	top := strings.TrimSpace(string(out))
	return top, os.WriteFile(marker, []byte(top), 0o644)
}

// proc is a process the benchmark started, its output in a log file.
type proc struct{ cmd *exec.Cmd }

func startProc(logFile, name string, args ...string) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &proc{cmd: cmd}, nil
}

func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitFile(path string, limit time.Duration) (string, error) {
	deadline := time.Now().Add(limit)
	for {
		if b, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(b))) > 0 {
			return strings.TrimSpace(string(b)), nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s not written after %v", path, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitGateway polls a gateway's health until the onion is reachable.
func waitGateway(u string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		var h struct {
			Reachable bool   `json:"reachable"`
			LastError string `json:"last_error"`
		}
		resp, err := http.Get(u + "/-/health")
		if err == nil {
			json.NewDecoder(resp.Body).Decode(&h)
			resp.Body.Close()
			if h.Reachable {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gateway %s: onion not reachable after %v: %v %s", u, limit, err, h.LastError)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitSocks polls the onion's nix-cache-info through a SOCKS proxy.
func waitSocks(socks, onionURL string, limit time.Duration) error {
	proxy, _ := url.Parse("socks5://" + socks)
	c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxy)}, Timeout: time.Minute}
	deadline := time.Now().Add(limit)
	for {
		resp, err := c.Get(onionURL + "/nix-cache-info")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not reachable through %s after %v: %v", onionURL, socks, limit, err)
		}
		time.Sleep(time.Second)
	}
}
