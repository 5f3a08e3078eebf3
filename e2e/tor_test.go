package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/onion/testnet"
)

// torNet is the private Tor network on 127.0.0.1 that every onion test of
// this binary shares, and torNetConf a torrc file of the lines that join it
// (for serve --tor-config).
var (
	torNet     *testnet.Network
	torNetConf string
)

func startTorNetwork(dir string) (stop func() error, err error) {
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if lv, err := logrus.ParseLevel(os.Getenv("KISS_ONION_TEST_LOG")); err == nil {
		log.SetLevel(lv)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	began := time.Now()
	torNet, err = testnet.Start(ctx, filepath.Join(dir, "testnet"), logrus.NewEntry(log))
	if err != nil {
		return nil, fmt.Errorf("start the private tor network: %w", err)
	}
	fmt.Fprintf(os.Stderr, "private tor network ready in %v\n", time.Since(began).Round(time.Millisecond))
	torNetConf = filepath.Join(dir, "testnet.torrc")
	if err := os.WriteFile(torNetConf, []byte(strings.Join(torNet.TorrcLines(), "\n")+"\n"), 0o644); err != nil {
		torNet.Close()
		return nil, err
	}
	return torNet.Close, nil
}

// torClient starts a client tor on the network whose ClientOnionAuthDir is
// authDir ("" for none), stopped at cleanup.
func torClient(t testing.TB, authDir string) *testnet.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := torNet.StartClient(ctx, t.TempDir(), authDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// socksError is a SOCKS5 refusal: tor's extended error codes say why an
// onion could not be reached (0xF4: client authorization missing, 0xF5:
// wrong client authorization, 0xF0: descriptor not found).
type socksError struct{ code byte }

func (e *socksError) Error() string { return fmt.Sprintf("SOCKS5 reply %#x", e.code) }

// socksConnect opens a connection to host:80 through the SOCKS5 proxy at
// socks, letting the proxy resolve the name, as curl's socks5h does.
func socksConnect(socks, host string, timeout time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", socks, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(timeout))
	req := []byte{5, 1, 0}
	if _, err := c.Write(req); err != nil {
		c.Close()
		return nil, err
	}
	r := bufio.NewReader(c)
	var hello [2]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil || hello[1] != 0 {
		c.Close()
		return nil, fmt.Errorf("SOCKS5 greeting: %v %v", hello, err)
	}
	conn := append([]byte{5, 1, 0, 3, byte(len(host))}, host...)
	conn = append(conn, 0, 80)
	if _, err := c.Write(conn); err != nil {
		c.Close()
		return nil, err
	}
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("SOCKS5 reply: %w", err)
	}
	if head[1] != 0 {
		c.Close()
		return nil, &socksError{code: head[1]}
	}
	skip := 0
	switch head[3] {
	case 1:
		skip = 4 + 2
	case 4:
		skip = 16 + 2
	case 3:
		n, _ := r.ReadByte()
		skip = int(n) + 2
	}
	if _, err := io.CopyN(io.Discard, r, int64(skip)); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// onionHTTP makes an HTTP request to an onion through a client tor and
// returns the status and body.
func onionHTTP(socks, method, rawURL string, body io.Reader) (int, string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return 0, "", err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return socksConnect(socks, u.Hostname(), 2*time.Minute)
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(method, rawURL, body)
	if err != nil {
		return 0, "", err
	}
	resp, err := (&http.Client{Transport: tr, Timeout: 3 * time.Minute}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// waitOnion polls an onion's nix-cache-info through a client tor until it
// answers 200 (a new descriptor takes a few seconds to spread).
func waitOnion(t testing.TB, socks, onionURL string) {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute)
	for {
		code, _, err := onionHTTP(socks, "GET", onionURL+"/nix-cache-info", nil)
		if err == nil && code == 200 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not reachable through %s after 4 minutes: %d %v", onionURL, socks, code, err)
		}
		time.Sleep(time.Second)
	}
}

// waitOnionFresh is waitOnion with a new client tor for each try, for an
// onion that just moved to a new tor: a client that fetched the previous
// descriptor keeps trying its dead introduction points for minutes. It
// returns the last client, which reached the onion.
func waitOnionFresh(t testing.TB, authDir, onionURL string) *testnet.Client {
	t.Helper()
	deadline := time.Now().Add(4 * time.Minute)
	for {
		c := torClient(t, authDir)
		tryUntil := time.Now().Add(30 * time.Second)
		for time.Now().Before(tryUntil) {
			code, _, err := onionHTTP(c.SocksAddr(), "GET", onionURL+"/nix-cache-info", nil)
			if err == nil && code == 200 {
				return c
			}
			time.Sleep(time.Second)
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s not reachable by a fresh client after 4 minutes", onionURL)
		}
	}
}

// refusedCode tries an onion through a client tor until tor refuses it with
// a SOCKS error, and returns the code. A connection that succeeds fails
// the test: the client must not get in.
func refusedCode(t testing.TB, socks, onionAddr string) byte {
	t.Helper()
	c, err := socksConnect(socks, onionAddr, 3*time.Minute)
	if err == nil {
		c.Close()
		t.Fatalf("client tor at %s reached %s", socks, onionAddr)
	}
	var se *socksError
	if !errors.As(err, &se) {
		t.Fatalf("connecting to %s: %v, want a SOCKS refusal", onionAddr, err)
	}
	return se.code
}

func readAddr(t testing.TB, stateDir, role string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, role+".onion"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}
