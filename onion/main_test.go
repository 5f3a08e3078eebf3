package onion

import (
	"bufio"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/onion/testnet"
	"github.com/sirupsen/logrus"
)

// testNet is the private Tor network every test of the package shares; nil
// only in a helper process.
var testNet *testnet.Network

// helperEnv, when set, makes the test binary a helper process (see
// TestTorDiesWithItsOwner): it starts no network.
const helperEnv = "KISS_ONION_ONION_HELPER"

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Getenv(helperEnv) != "" {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "kiss-onion-testnet-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	log := logrus.New()
	log.SetLevel(testLogLevel())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	began := time.Now()
	testNet, err = testnet.Start(ctx, dir, logrus.NewEntry(log))
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "private tor network ready in %v\n", time.Since(began).Round(time.Millisecond))
	code := m.Run()
	if err := testNet.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// testLogLevel is KISS_ONION_TEST_LOG (e.g. "debug"), or warn.
func testLogLevel() logrus.Level {
	if lv, err := logrus.ParseLevel(os.Getenv("KISS_ONION_TEST_LOG")); err == nil {
		return lv
	}
	return logrus.WarnLevel
}

func needNet(t *testing.T) {
	t.Helper()
	if testNet == nil {
		t.Fatal("the private tor network is not running (a helper process?)")
	}
}

// testLog returns a logger writing into t.Log until the test ends.
func testLog(t *testing.T) *logrus.Entry {
	w := &testWriter{t: t}
	t.Cleanup(w.stop) // registered first: runs after every other cleanup
	l := logrus.New()
	l.SetOutput(w)
	l.SetLevel(testLogLevel())
	return logrus.NewEntry(l)
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// startTor starts a product tor on the test network, closed at the end of
// the test.
func startTor(t *testing.T, socks bool) *Tor {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tr, err := Start(ctx, Config{
		DataDir:    filepath.Join(t.TempDir(), "tor"),
		TorrcLines: testNet.TorrcLines(),
		Socks:      socks,
		Log:        testLog(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tr.Close(); err != nil {
			t.Errorf("close tor: %v", err)
		}
	})
	return tr
}

// startClient starts a plain client tor; each key in keys is written to
// its ClientOnionAuthDir for the onion at address.
func startClient(t *testing.T, address string, keys ...*ecdh.PrivateKey) *testnet.Client {
	t.Helper()
	dir := t.TempDir()
	authDir := ""
	if len(keys) > 0 {
		authDir = filepath.Join(dir, "auth")
		if err := os.Mkdir(authDir, 0o700); err != nil {
			t.Fatal(err)
		}
		for i, k := range keys {
			line := fmt.Sprintf("%s:descriptor:x25519:%s\n", strings.TrimSuffix(address, ".onion"), base32NoPad.EncodeToString(k.Bytes()))
			if err := os.WriteFile(filepath.Join(authDir, fmt.Sprintf("key%d.auth_private", i)), []byte(line), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := testNet.StartClient(ctx, filepath.Join(dir, "tor"), authDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// serveHTTP serves body on a unix socket and returns its path.
func serveHTTP(t *testing.T, body string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "http.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func newClientKey(t *testing.T) *ecdh.PrivateKey {
	t.Helper()
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func pub(k *ecdh.PrivateKey) [32]byte { return [32]byte(k.PublicKey().Bytes()) }

// socksError is a SOCKS5 server's refusal: its reply code. With tor's
// ExtendedErrors, 0xF0-0xF7 say why an onion was unreachable.
type socksError byte

func (e socksError) Error() string { return fmt.Sprintf("socks reply %#02x", byte(e)) }

// Onion reply codes of tor's ExtendedErrors (tor's socks-extensions).
const (
	replyMissingAuth socksError = 0xF4 // client authorization missing
	replyBadAuth     socksError = 0xF5 // client authorization wrong
)

// socksGet fetches http://host/ through the SOCKS5 proxy at socks, which
// resolves the name (as socks5h:// does). A refusal comes back as a
// socksError.
func socksGet(socks, host string) (string, error) {
	conn, err := net.DialTimeout("tcp", socks, 10*time.Second)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(3 * time.Minute))
	// Greeting: version 5, one method, "no authentication".
	if _, err := conn.Write([]byte{5, 1, 0}); err != nil {
		return "", err
	}
	var greet [2]byte
	if _, err := io.ReadFull(conn, greet[:]); err != nil {
		return "", fmt.Errorf("socks greeting: %w", err)
	}
	if greet != [2]byte{5, 0} {
		return "", fmt.Errorf("socks greeting: got %x", greet)
	}
	// CONNECT to a domain name (type 3), port 80.
	req := []byte{5, 1, 0, 3, byte(len(host))}
	req = append(req, host...)
	req = binary.BigEndian.AppendUint16(req, 80)
	if _, err := conn.Write(req); err != nil {
		return "", err
	}
	var head [4]byte
	if _, err := io.ReadFull(conn, head[:]); err != nil {
		return "", fmt.Errorf("socks reply: %w", err)
	}
	if head[1] != 0 {
		return "", socksError(head[1])
	}
	skip := map[byte]int{1: 4 + 2, 4: 16 + 2}[head[3]]
	if head[3] == 3 {
		var l [1]byte
		if _, err := io.ReadFull(conn, l[:]); err != nil {
			return "", err
		}
		skip = int(l[0]) + 2
	}
	if _, err := io.ReadFull(conn, make([]byte, skip)); err != nil {
		return "", fmt.Errorf("socks reply: %w", err)
	}
	fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", host)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", fmt.Errorf("read http response: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("http status %s", resp.Status)
	}
	return string(body), nil
}

// pollGet fetches http://host/ through socks until done says the outcome
// is final, or timeout. It returns the last outcome.
func pollGet(t *testing.T, socks, host string, timeout time.Duration, done func(body string, err error) bool) (string, error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		body, err := socksGet(socks, host)
		if done(body, err) || time.Now().After(deadline) {
			return body, err
		}
		t.Logf("not yet: %v", err)
		time.Sleep(time.Second) // between two attempts only, the wait is the poll's deadline
	}
}

// reachable polls until the GET succeeds.
func reachable(body string, err error) bool { return err == nil }

// refused polls until the proxy refuses with code.
func refused(code socksError) func(string, error) bool {
	return func(body string, err error) bool {
		var se socksError
		return err == nil || (errors.As(err, &se) && se == code)
	}
}
