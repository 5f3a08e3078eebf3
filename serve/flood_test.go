package serve

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
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

	"github.com/sirupsen/logrus"
)

// startTuned is startServer with the server adjusted before it serves.
func startTuned(t testing.TB, c *Cache, role Role, tune func(*Server)) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := c.NewServer(role, nil)
	tune(srv)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	tr := &http.Transport{}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		if err := <-done; err != nil {
			t.Errorf("the %s server: %v", role, err)
		}
	})
	return &testServer{URL: "http://" + ln.Addr().String(), Listener: ln, client: &http.Client{Transport: tr}}
}

// capped serves role of tc's cache with a cap of n connections and a
// budget of its own.
func capped(t testing.TB, tc *testCache, role Role, n int) *testServer {
	return startTuned(t, tc.Cache, role, func(s *Server) {
		s.MaxConns = n
		s.budget = &connBudget{max: 1000}
	})
}

// dial connects to srv and sends what it is given.
func dial(t testing.TB, srv *testServer, send string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if send != "" {
		if _, err := io.WriteString(c, send); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// roundTrip sends a request on c and reads the answer.
func roundTrip(c net.Conn, request string) (*http.Response, string, error) {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, request); err != nil {
		return nil, "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b), err
}

const getInfo = "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n"

// eventually retries get until it answers want, for a few seconds: the
// server learns of a closed connection a moment after the client.
func eventually(t *testing.T, srv *testServer, path string, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, body := do(t, srv, "GET", path, nil)
		if resp.StatusCode == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %d %s, want %d", path, resp.StatusCode, strings.TrimSpace(body), want)
		}
		srv.client.Transport.(*http.Transport).CloseIdleConnections()
		time.Sleep(50 * time.Millisecond)
	}
}

func TestConnectionCapRefusesPastItAndAdmitsAgain(t *testing.T) {
	tc := newTestCache(t, nil)
	for _, tt := range []struct {
		role       Role
		status     int
		retryAfter string
	}{
		{Read, 503, "1"}, // Nix retries a read
		{Write, 400, ""}, // Nix 2.8 would retry a 5xx PUT with an empty body
	} {
		t.Run(tt.role.String(), func(t *testing.T) {
			srv := capped(t, tc, tt.role, 3)
			// Three connections in the middle of a request head: busy.
			var busy []net.Conn
			for range 3 {
				busy = append(busy, dial(t, srv, "GET /nix-cache-info HTTP/1.1\r\n"))
			}
			time.Sleep(300 * time.Millisecond) // the server reads their first bytes
			resp, body, err := roundTrip(dial(t, srv, ""), getInfo)
			if err != nil {
				t.Fatalf("no answer past the cap: %v", err)
			}
			if resp.StatusCode != tt.status || !strings.Contains(body, "too many connections") || !resp.Close ||
				resp.Header.Get("Retry-After") != tt.retryAfter || resp.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
				t.Errorf("past the cap: %d %v %q; want %d, plain text, Connection: close, Retry-After %q",
					resp.StatusCode, resp.Header, body, tt.status, tt.retryAfter)
			}
			busy[0].Close()
			eventually(t, srv, "/nix-cache-info", 200)
		})
	}
}

func TestIdleConnectionsMakeRoomForNewOnes(t *testing.T) {
	tc := newTestCache(t, nil)
	tc.upload(t, hashA, "a")
	for _, role := range []Role{Read, Write} {
		for _, tt := range []struct {
			name string
			open func(t *testing.T, srv *testServer) net.Conn
		}{
			{"keep-alive after a request", func(t *testing.T, srv *testServer) net.Conn {
				c := dial(t, srv, "")
				if resp, _, err := roundTrip(c, getInfo); err != nil || resp.StatusCode != 200 {
					t.Fatalf("request under the cap: %v %v", resp, err)
				}
				return c
			}},
			{"silent since it connected", func(t *testing.T, srv *testServer) net.Conn {
				return dial(t, srv, "")
			}},
		} {
			t.Run(role.String()+"/"+tt.name, func(t *testing.T) {
				srv := capped(t, tc, role, 3)
				var idle []net.Conn
				for range 3 {
					idle = append(idle, tt.open(t, srv))
					time.Sleep(20 * time.Millisecond) // in order
				}
				if resp, body := do(t, srv, "GET", "/"+hashA+".narinfo", nil); resp.StatusCode != 200 {
					t.Fatalf("a new client with the cap full of idle connections: %d %s", resp.StatusCode, body)
				}
				// The one that waited longest made room.
				idle[0].SetReadDeadline(time.Now().Add(2 * time.Second))
				if _, err := idle[0].Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("the longest idle connection: read %v, want it closed", err)
				}
				idle[2].SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				if _, err := idle[2].Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Errorf("the newest idle connection: read %v, want it open", err)
				}
			})
		}
	}
}

func TestTricklingUploadIsCutOff(t *testing.T) {
	tc := newTestCache(t, nil) // uploads idle for 300 ms are cut off
	srv := startTuned(t, tc.Cache, Write, func(s *Server) {
		s.uploadGrace = 300 * time.Millisecond
		s.uploadMinRate = 2000
	})
	content := []byte(strings.Repeat("x", 3000))
	for _, tt := range []struct {
		name   string
		chunk  int // bytes every 100 ms: never idle for 300 ms
		status int
	}{
		{"a trickle under the minimum rate", 10, 400},
		{"a steady upload over the minimum rate", 400, 201},
	} {
		t.Run(tt.name, func(t *testing.T) {
			url := narName([]byte(tt.name+string(content)), "")
			body := tt.name + string(content)
			c := dial(t, srv, fmt.Sprintf("PUT /%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", url, len(body)))
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for rest := body; rest != ""; {
					n := min(tt.chunk, len(rest))
					if _, err := io.WriteString(c, rest[:n]); err != nil {
						return
					}
					rest = rest[n:]
					select {
					case <-stop:
						return
					case <-time.After(100 * time.Millisecond):
					}
				}
			}()
			start := time.Now()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			close(stop)
			wg.Wait()
			if err != nil {
				t.Fatalf("no answer in %v: %v", time.Since(start).Round(time.Millisecond), err)
			}
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.status {
				t.Fatalf("answer %d %s, want %d", resp.StatusCode, b, tt.status)
			}
			if tt.status == 400 && !strings.Contains(string(b), "too slow") {
				t.Errorf("refusal %q does not say the upload was too slow", b)
			}
			if tt.status == 400 {
				tmp, _ := os.ReadDir(filepath.Join(tc.dir, ".tmp"))
				if len(tmp) != 0 {
					t.Errorf("partial upload left in .tmp: %v", tmp)
				}
			}
		})
	}
}

func TestUnsupportedHTTPVersionGets505(t *testing.T) {
	tc := newTestCache(t, nil)
	for _, srv := range []struct {
		role string
		*testServer
	}{{"read", tc.read}, {"write", tc.write}} {
		for _, tt := range []struct {
			proto string
			want  int
		}{
			{"HTTP/9.9", 505},
			{"HTTP/2.0", 505}, // HTTP/2 is not spoken in plain text here
			{"HTTP/3.0", 505},
			{"HTTP/0.9", 505},
			{"HTTP/1.0", 200},
			{"HTTP/1.1", 200},
			{"FTP/1.1", 400},
			{"HTTP/1.10", 400},
		} {
			t.Run(srv.role+"/"+tt.proto, func(t *testing.T) {
				if got := raw(t, srv.testServer, "GET /nix-cache-info "+tt.proto+"\r\nHost: x\r\n\r\n"); got != tt.want {
					t.Errorf("request line in %s: %d, want %d", tt.proto, got, tt.want)
				}
			})
		}
	}
}

// floodChildEnv makes the test binary the server of TestFloodWithLowDescriptorLimit.
const floodChildEnv = "KISS_ONION_FLOOD_CHILD"

// floodServe is the child: with RLIMIT_NOFILE at 256, as `ulimit -n 256`
// sets it, it serves a cache on two loopback listeners, prints their
// addresses and serves until its stdin closes. Like `kiss-onion serve`,
// it exits at once if a server stops.
func floodServe(t *testing.T) {
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: 256, Max: 256}); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "flood")
	if err != nil {
		t.Fatal(err)
	}
	l := logrus.New()
	l.SetOutput(os.Stderr)
	c, err := New(Config{Dir: dir, WantMassQuery: true, Log: logrus.NewEntry(l)})
	if err != nil {
		t.Fatal(err)
	}
	var servers []*Server
	for _, role := range []Role{Read, Write} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := c.NewServer(role, nil)
		servers = append(servers, srv)
		go func() {
			if err := srv.Serve(ln); err != nil {
				fmt.Fprintf(os.Stderr, "%s listener: %v\n", role, err)
				os.RemoveAll(dir)
				os.Exit(3)
			}
		}()
		fmt.Printf("%s http://%s\n", role, ln.Addr())
	}
	io.Copy(io.Discard, os.Stdin)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, srv := range servers {
		srv.Shutdown(ctx)
	}
	os.RemoveAll(dir)
	os.Exit(0)
}

func TestFloodWithLowDescriptorLimit(t *testing.T) {
	if os.Getenv(floodChildEnv) == "1" {
		floodServe(t)
		return
	}
	const (
		partialHead = "GET /nix-cache-info HTTP/1.1\r\n"
	)
	narinfo := "/" + hashA + ".narinfo"
	for _, tt := range []struct {
		name  string
		flood func(t *testing.T, read, write *testServer) []net.Conn
		// then, with the flood's connections open: what a new client gets
		during int
	}{
		{"300 keep-alive connections to the read port", func(t *testing.T, read, write *testServer) []net.Conn {
			return open(t, read, 300, getInfo)
		}, 200},
		{"245 idle connections to the write port, then a read", func(t *testing.T, read, write *testServer) []net.Conn {
			return open(t, write, 245, getInfo)
		}, 200},
		{"300 silent connections to each port", func(t *testing.T, read, write *testServer) []net.Conn {
			return append(open(t, read, 300, ""), open(t, write, 300, "")...)
		}, 200},
		{"300 connections busy sending a request head", func(t *testing.T, read, write *testServer) []net.Conn {
			return open(t, read, 300, partialHead)
		}, 503},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestFloodWithLowDescriptorLimit$")
			cmd.Env = append(os.Environ(), floodChildEnv+"=1")
			stdin, _ := cmd.StdinPipe()
			stdout, _ := cmd.StdoutPipe()
			var stderr strings.Builder
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			defer func() {
				stdin.Close()
				select {
				case err := <-exited:
					if err != nil {
						t.Errorf("the server exited with %v:\n%s", err, tail(stderr.String()))
					}
				case <-time.After(15 * time.Second):
					cmd.Process.Kill()
					t.Error("the server did not stop")
				}
			}()
			urls := map[string]*testServer{}
			sc := bufio.NewScanner(stdout)
			for len(urls) < 2 && sc.Scan() {
				role, url, _ := strings.Cut(sc.Text(), " ")
				urls[role] = &testServer{URL: url, client: &http.Client{Transport: &http.Transport{}}}
				urls[role].Listener = addrOnly(strings.TrimPrefix(url, "http://"))
			}
			go func() { io.Copy(io.Discard, stdout); exited <- cmd.Wait() }()
			read, write := urls["read"], urls["write"]
			if read == nil || write == nil {
				t.Fatalf("the server did not start:\n%s", tail(stderr.String()))
			}
			content := []byte("nar of " + hashA)
			if resp, body := do(t, write, "PUT", "/"+narName(content, ""), content); resp.StatusCode != 201 {
				t.Fatalf("PUT NAR: %d %s", resp.StatusCode, body)
			}
			if resp, body := do(t, write, "PUT", narinfo, []byte(narInfo(hashA, "a", narName(content, "")))); resp.StatusCode != 201 {
				t.Fatalf("PUT narinfo: %d %s", resp.StatusCode, body)
			}
			write.client.Transport.(*http.Transport).CloseIdleConnections()

			flood := tt.flood(t, read, write)
			select {
			case err := <-exited:
				exited <- err
				t.Fatalf("the server exited under the flood:\n%s", tail(stderr.String()))
			case <-time.After(200 * time.Millisecond):
			}
			if tt.during == 503 {
				// Refusals of the flood wait for their requests and so
				// hold their few places for a moment; the new client's
				// then waits for its request too.
				time.Sleep(2*lingerTime + 200*time.Millisecond)
			}
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
			resp, err := client.Get(read.URL + narinfo)
			if err != nil {
				t.Fatalf("a new reader under the flood: %v\n%s", err, tail(stderr.String()))
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.during {
				t.Errorf("a new reader under the flood: %d %s, want %d", resp.StatusCode, body, tt.during)
			}
			if resp.StatusCode == 503 && !strings.Contains(string(body), "too many connections") {
				t.Errorf("refusal %q does not say why", body)
			}
			for _, c := range flood {
				c.Close()
			}
			eventually(t, read, narinfo, 200)
			eventually(t, write, narinfo, 200)
		})
	}
}

// open opens n connections to srv, sending each what it is given and, if
// that is a whole request, reading the answer. The server may close or
// refuse any of them.
func open(t *testing.T, srv *testServer, n int, send string) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for range n {
		c, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatalf("connection %d of %d: %v", len(conns)+1, n, err)
		}
		conns = append(conns, c)
		if send == "" {
			continue
		}
		if strings.HasSuffix(send, "\r\n\r\n") {
			roundTrip(c, send)
		} else {
			io.WriteString(c, send)
		}
	}
	return conns
}

// addrOnly is a listener that only has an address, for testServer.
type addrOnly string

func (a addrOnly) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (a addrOnly) Close() error              { return nil }
func (a addrOnly) Addr() net.Addr            { return a }
func (a addrOnly) Network() string           { return "tcp" }
func (a addrOnly) String() string            { return string(a) }

func tail(s string) string {
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return s
}
