package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// binary is the kiss-onion binary built for this test run.
var binary string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "kiss-onion-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	binary = filepath.Join(dir, "kiss-onion")
	build := exec.Command("go", "build", "-o", binary, "../cmd/kiss-onion")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build kiss-onion:", err)
		return 1
	}
	for _, tool := range []string{"nix", "nix-store", "nix-build"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "e2e tests need %s (apt-get install nix-bin): %v\n", tool, err)
			return 1
		}
	}
	if _, err := os.Stat(busybox); err != nil {
		fmt.Fprintf(os.Stderr, "e2e tests build with %s (apt-get install busybox-static): %v\n", busybox, err)
		return 1
	}
	// What kiss-onion keeps in the user's cache directory when not told
	// otherwise (prune's metadata) goes into this run's directory, not the
	// real one; the go command keeps its own build cache.
	if goCache, err := exec.Command("go", "env", "GOCACHE").Output(); err == nil {
		os.Setenv("GOCACHE", strings.TrimSpace(string(goCache)))
	}
	// SeaweedFS's weed is found (built once per machine) before the
	// user's cache directory moves.
	if _, err := s3test.Weed(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e tests run SeaweedFS:", err)
		return 1
	}
	os.Setenv("XDG_CACHE_HOME", filepath.Join(dir, "xdg-cache"))
	stop, err := startTorNetwork(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if err := stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stop the tor network:", err)
		code = 1
	}
	return code
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// proc is a kiss-onion process started by a test, stopped at cleanup.
type proc struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs kiss-onion with args in the background.
func start(t testing.TB, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(binary, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("kiss-onion %s output:\n%s", strings.Join(args, " "), p.out)
		}
	})
	return p
}

// stop sends SIGTERM and waits; SIGKILL after 15 s.
func (p *proc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// kill sends SIGKILL and waits.
func (p *proc) kill() {
	p.cmd.Process.Kill()
	<-p.done
}

// server is a `kiss-onion serve --tor off` with a read and a write listener.
type server struct {
	*proc
	cacheDir, stateDir string
	readURL, writeURL  string
}

// startServer starts serve on fresh listeners over cacheDir (a new one when
// empty), with extra flags.
func startServer(t testing.TB, cacheDir string, extra ...string) *server {
	t.Helper()
	if cacheDir == "" {
		cacheDir = filepath.Join(t.TempDir(), "cache")
	}
	s := &server{cacheDir: cacheDir, stateDir: filepath.Join(t.TempDir(), "state")}
	r, w := freeAddr(t), freeAddr(t)
	s.readURL, s.writeURL = "http://"+r, "http://"+w
	args := append([]string{"serve", "--tor", "off", "--cache-dir", cacheDir, "--state-dir", s.stateDir, "--listen", r, "--listen-write", w}, extra...)
	s.proc = start(t, args...)
	waitHTTP(t, s.proc, s.readURL+"/nix-cache-info")
	waitHTTP(t, s.proc, s.writeURL+"/nix-cache-info")
	return s
}

// waitHTTP polls url until it answers 200, failing if p exits first.
func waitHTTP(t testing.TB, p *proc, url string) {
	t.Helper()
	waitReady(t, p, "serving "+url, 30*time.Second, func() bool { return answers(url, true) })
}

// answers reports whether url answers (with 200, when ok200 is set).
func answers(url string, ok200 bool) bool {
	resp, err := http.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return !ok200 || resp.StatusCode == 200
}

// waitReady polls ready until it holds, failing the test when p exits
// first or limit passes; what says what p was to do.
func waitReady(t testing.TB, p *proc, what string, limit time.Duration, ready func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !ready() {
		select {
		case <-p.done:
			t.Fatalf("kiss-onion exited before %s: %v\n%s", what, p.err, p.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("not %s after %v:\n%s", what, limit, p.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// runKissOnion runs the binary to completion and returns its output and
// exit code.
func runKissOnion(t testing.TB, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("run kiss-onion %v: %v", args, err)
	}
	return string(out), 0
}

// visibleFile returns the content of a cache file that an upload was
// acknowledged for. A narinfo is acknowledged before it is visible and
// becomes visible once durable, moments later (serve/doc.go), so the last
// one of a nix copy may not be there yet when nix exits.
func visibleFile(t testing.TB, cacheDir, rel string) ([]byte, error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, err := os.ReadFile(filepath.Join(cacheDir, rel))
		if err == nil || !errors.Is(err, fs.ErrNotExist) || time.Now().After(deadline) {
			return b, err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func httpDo(t testing.TB, method, url string, body io.Reader) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// slowPut starts a PUT of 256 MiB of zeros to url, written a MiB at a
// time, and returns once at least sentMiB have been handed to the
// connection; cut ends the body with an error and waits for the request.
func slowPut(t testing.TB, url string, sentMiB int) (cut func()) {
	t.Helper()
	pr, pw := io.Pipe()
	sent := make(chan struct{})
	go func() {
		chunk := make([]byte, 1<<20)
		for i := 0; i < 256; i++ {
			if _, err := pw.Write(chunk); err != nil {
				return
			}
			if i+1 == sentMiB {
				close(sent)
			}
		}
		pw.Close()
	}()
	req, _ := http.NewRequest("PUT", url, pr)
	req.ContentLength = 256 << 20
	errc := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		errc <- err
	}()
	select {
	case <-sent:
	case <-time.After(time.Minute):
		t.Fatal("the upload did not get going")
	}
	return func() {
		pr.CloseWithError(io.ErrClosedPipe)
		<-errc
	}
}
