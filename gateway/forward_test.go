package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// fakeSocks is a SOCKS5 server in the manner of tor: it requires the
// username/password method, connects every name to origin, and remembers
// the usernames it saw. While refuse is non-zero it answers with that code.
type fakeSocks struct {
	origin string
	ln     net.Listener
	refuse atomic.Int32
	hang   atomic.Bool // never answer the connect request, as tor with no network

	mu     sync.Mutex
	users  map[string]int    // connections per username
	routes map[string]string // origins by host name, when not origin
}

// routeTo connects host to addr rather than to origin.
func (s *fakeSocks) routeTo(host, addr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.routes == nil {
		s.routes = map[string]string{}
	}
	s.routes[host] = addr
}

func newFakeSocks(t *testing.T, origin string) *fakeSocks {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &fakeSocks{origin: origin, ln: ln, users: map[string]int{}}
	t.Cleanup(func() { ln.Close(); s.hang.Store(false) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.handle(c)
		}
	}()
	return s
}

func (s *fakeSocks) addr() string { return s.ln.Addr().String() }

func (s *fakeSocks) handle(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	head := make([]byte, 2)
	if _, err := io.ReadFull(r, head); err != nil {
		return
	}
	methods := make([]byte, head[1])
	io.ReadFull(r, methods)
	if !strings.Contains(string(methods), "\x02") {
		c.Write([]byte{5, 0xFF})
		return
	}
	c.Write([]byte{5, 2})
	ver, _ := r.ReadByte()
	if ver != 1 {
		return
	}
	n, _ := r.ReadByte()
	user := make([]byte, n)
	io.ReadFull(r, user)
	n, _ = r.ReadByte()
	io.ReadFull(r, make([]byte, n))
	c.Write([]byte{1, 0})
	req := make([]byte, 4)
	if _, err := io.ReadFull(r, req); err != nil {
		return
	}
	origin := s.origin
	switch req[3] {
	case 3:
		n, _ := r.ReadByte()
		host := make([]byte, int(n)+2)
		io.ReadFull(r, host)
		s.mu.Lock()
		if o, ok := s.routes[string(host[:n])]; ok {
			origin = o
		}
		s.mu.Unlock()
	case 1:
		io.ReadFull(r, make([]byte, 6))
	}
	for s.hang.Load() {
		time.Sleep(10 * time.Millisecond)
	}
	if code := s.refuse.Load(); code != 0 {
		c.Write([]byte{5, byte(code), 0, 1, 0, 0, 0, 0, 0, 0})
		return
	}
	up, err := net.Dial("tcp", origin)
	if err != nil {
		c.Write([]byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0})
		return
	}
	defer up.Close()
	s.mu.Lock()
	s.users[string(user)]++
	s.mu.Unlock()
	c.Write([]byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 80})
	go io.Copy(up, r)
	io.Copy(c, up)
}

func (s *fakeSocks) userCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.users)
}

// newTestForwarder forwards to a made-up onion that the fake SOCKS server
// maps to origin.
func newTestForwarder(t *testing.T, origin http.Handler, cfg ForwarderConfig) (*Forwarder, *fakeSocks, *httptest.Server) {
	o := httptest.NewServer(origin)
	t.Cleanup(o.Close)
	socks := newFakeSocks(t, o.Listener.Addr().String())
	cfg.Target = "http://" + strings.Repeat("a", 56) + ".onion"
	cfg.SocksAddr = socks.addr
	cfg.Log = testLog()
	f, err := NewForwarder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	gw := httptest.NewServer(f)
	t.Cleanup(gw.Close)
	return f, socks, gw
}

func TestForwarderPassesRequestsThrough(t *testing.T) {
	nar := strings.Repeat("0123456789abcdef", 1<<14) // 256 KiB
	var put atomic.Value
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method == http.MethodPut:
			b, _ := io.ReadAll(r.Body)
			put.Store(fmt.Sprintf("%s %s %d %s", r.URL.Path, r.Header.Get("Content-Encoding"), len(b), r.Host))
			w.WriteHeader(http.StatusCreated)
		case r.URL.Path == "/nix-cache-info":
			io.WriteString(w, "StoreDir: /nix/store\n")
		case r.URL.Path == "/nar/x.nar.zst":
			if r.Header.Get("Accept-Encoding") != "" {
				t.Errorf("the onion got Accept-Encoding %q", r.Header.Get("Accept-Encoding"))
			}
			w.Header().Set("Content-Type", "application/x-nix-nar")
			w.Header().Set("ETag", `"abc"`)
			http.ServeContent(w, r, "", time.Unix(0, 0), strings.NewReader(nar))
		default:
			http.NotFound(w, r)
		}
	})
	_, _, gw := newTestForwarder(t, origin, ForwarderConfig{})

	for _, tc := range []struct {
		name       string
		method     string
		path       string
		header     map[string]string
		body       string
		wantStatus int
		wantBody   string
		wantHeader map[string]string
	}{
		{name: "a GET streams the whole file", method: "GET", path: "/nar/x.nar.zst", wantStatus: 200, wantBody: nar,
			wantHeader: map[string]string{"ETag": `"abc"`, "Content-Length": strconv.Itoa(len(nar)), "Content-Encoding": "", "Accept-Ranges": "bytes"}},
		{name: "a Range passes through", method: "GET", path: "/nar/x.nar.zst", header: map[string]string{"Range": "bytes=16-31"},
			wantStatus: 206, wantBody: "0123456789abcdef", wantHeader: map[string]string{"Content-Range": fmt.Sprintf("bytes 16-31/%d", len(nar))}},
		{name: "If-None-Match passes through", method: "GET", path: "/nar/x.nar.zst", header: map[string]string{"If-None-Match": `"abc"`}, wantStatus: 304},
		{name: "a missing path stays 404", method: "GET", path: "/0123456789abcdfghijklmnpqrsvwxyz.narinfo", wantStatus: 404},
		{name: "HEAD works", method: "HEAD", path: "/nix-cache-info", wantStatus: 200},
		{name: "a PUT body streams up with its Content-Encoding", method: "PUT", path: "/nar/y.nar", body: nar,
			header: map[string]string{"Content-Encoding": "zstd"}, wantStatus: 201},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			req, _ := http.NewRequest(tc.method, gw.URL+tc.path, body)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			// A client that would accept gzip must not get it.
			req.Header.Set("Accept-Encoding", "")
			resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tc.wantStatus {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.wantStatus, got)
			}
			if tc.wantBody != "" && string(got) != tc.wantBody {
				t.Errorf("body of %d bytes differs from the %d sent", len(got), len(tc.wantBody))
			}
			for k, v := range tc.wantHeader {
				if resp.Header.Get(k) != v {
					t.Errorf("%s: %q, want %q", k, resp.Header.Get(k), v)
				}
			}
		})
	}
	want := fmt.Sprintf("/nar/y.nar zstd %d %s.onion", len(nar), strings.Repeat("a", 56))
	if got, _ := put.Load().(string); got != want {
		t.Errorf("the onion got the PUT as %q, want %q", got, want)
	}
}

func TestForwarderSpreadsOverIsolatedCircuits(t *testing.T) {
	release := make(chan struct{})
	var waiting atomic.Int32
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/nar/") {
			waiting.Add(1)
			<-release
		}
		io.WriteString(w, "ok")
	})
	f, socks, gw := newTestForwarder(t, origin, ForwarderConfig{Circuits: 4, KeepWarm: -1})
	// Warmed up: every circuit connected, and the onion answered on each
	// (requests prefer circuits it answered on).
	waitFor(t, "the circuits warmed up", func() bool {
		if socks.userCount() != 4 {
			return false
		}
		for _, c := range f.circuits {
			if c.lastOK.Load() == 0 {
				return false
			}
		}
		return true
	})
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			resp, err := http.Get(fmt.Sprintf("%s/nar/%d.nar", gw.URL, i))
			if err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
	waitFor(t, "8 downloads in flight", func() bool { return waiting.Load() == 8 })
	for _, c := range f.circuits {
		if n := c.inflight.Load(); n != 2 {
			t.Errorf("circuit %d has %d requests in flight, want 2 (8 over 4)", c.n, n)
		}
	}
	if h := f.Health(); h.InFlight != 8 || !h.Reachable {
		t.Errorf("health %+v, want 8 in flight and reachable", h)
	}
	close(release)
	wg.Wait()
	if n := socks.userCount(); n != 4 {
		t.Errorf("%d distinct SOCKS users, want 4", n)
	}
}

func TestForwarderAnswers502UntilTheOnionIsReachable(t *testing.T) {
	defer shorten(&probeEvery, 50*time.Millisecond)()
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "StoreDir: /nix/store\n") })
	o := httptest.NewServer(origin)
	defer o.Close()
	socks := newFakeSocks(t, o.Listener.Addr().String())
	socks.refuse.Store(0xF0)
	f, err := NewForwarder(ForwarderConfig{Target: "http://" + strings.Repeat("b", 56) + ".onion", SocksAddr: socks.addr, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gw := httptest.NewServer(f)
	defer gw.Close()

	status, body := get(t, gw.URL+"/nix-cache-info")
	if status != 502 || !strings.Contains(body, "descriptor not found") || !strings.HasPrefix(body, errorPrefix) {
		t.Errorf("while unreachable: %d %q, want 502 naming the reason", status, body)
	}
	// A write gets a 4xx: Nix 2.8 would retry a 5xx with an empty body.
	req, _ := http.NewRequest("PUT", gw.URL+"/nar/x.nar", strings.NewReader("nar"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 421 || !strings.Contains(string(b), "descriptor not found") {
		t.Errorf("PUT while unreachable: %d %q, want 421 naming the reason", resp.StatusCode, b)
	}
	if got := resp.Header.Get(ErrorHeader); got != "unreachable" {
		t.Errorf("PUT while unreachable: %s = %q, want \"unreachable\": a client must tell the gateway's refusal from the cache's", ErrorHeader, got)
	}
	var h Health
	status, body = get(t, gw.URL+HealthPath)
	if err := json.Unmarshal([]byte(body), &h); err != nil || status != 503 || h.Reachable || !strings.Contains(h.LastError, "0xf0") {
		t.Errorf("health while unreachable: %d %s (%v)", status, body, err)
	}

	socks.refuse.Store(0)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.WaitReachable(ctx); err != nil {
		t.Fatal(err)
	}
	if status, body := get(t, gw.URL+"/nix-cache-info"); status != 200 {
		t.Errorf("after recovery: %d %q", status, body)
	}
	status, body = get(t, gw.URL+HealthPath)
	h = Health{}
	if err := json.Unmarshal([]byte(body), &h); err != nil || status != 200 || !h.Reachable || h.Since.IsZero() {
		t.Errorf("health after recovery: %d %s", status, body)
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// shorten sets *d to v and returns what puts it back.
func shorten(d *time.Duration, v time.Duration) func() {
	old := *d
	*d = v
	return func() { *d = old }
}

// testLog discards the log unless the test is verbose.
func testLog() *logrus.Entry {
	l := logrus.New()
	l.SetLevel(logrus.DebugLevel)
	if !testing.Verbose() {
		l.SetOutput(io.Discard)
	}
	return logrus.NewEntry(l)
}
