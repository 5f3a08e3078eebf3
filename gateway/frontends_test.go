package gateway

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kiss-onion/kiss-onion/serve"
)

// frontRelay is a front end as the gateway sees it: a real serve's read
// role behind a relay that can be killed, or cut NARs mid-way.
type frontRelay struct {
	next    http.Handler
	srv     *httptest.Server
	down    atomic.Bool // close every connection at once, as a killed front end
	cutNars atomic.Bool // send half of each whole NAR, then close, as one killed mid-way
	// stallNars sends half of each whole NAR, then nothing, keeping the
	// connection: a front end whose machine or network is cut off.
	stallNars atomic.Bool

	mu       sync.Mutex
	requests map[string]int // by method and path, Range requests apart
}

func newFrontRelay(t *testing.T, cacheDir string) *frontRelay {
	t.Helper()
	c, err := serve.New(serve.Config{Dir: cacheDir, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	read := c.NewServer(serve.Read, nil)
	go read.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		read.Shutdown(ctx)
	})
	r := &frontRelay{requests: map[string]int{}}
	u, _ := url.Parse("http://" + ln.Addr().String())
	r.next = httputil.NewSingleHostReverseProxy(u)
	r.srv = httptest.NewServer(r)
	t.Cleanup(r.srv.Close)
	return r
}

func (r *frontRelay) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	key := req.Method + " " + req.URL.Path
	if req.Header.Get("Range") != "" {
		key += " range"
	}
	if req.URL.Path != "/nix-cache-info" {
		r.mu.Lock()
		r.requests[key]++
		r.mu.Unlock()
	}
	if r.down.Load() {
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close()
		return
	}
	cut, stall := r.cutNars.Load(), r.stallNars.Load()
	if !(cut || stall) || !strings.HasPrefix(req.URL.Path, "/nar/") || req.Header.Get("Range") != "" {
		r.next.ServeHTTP(w, req)
		return
	}
	rec := httptest.NewRecorder()
	r.next.ServeHTTP(rec, req)
	body := rec.Body.Bytes()
	conn, buf, _ := w.(http.Hijacker).Hijack()
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: application/x-nix-nar\r\n\r\n", rec.Code, http.StatusText(rec.Code), len(body))
	buf.Write(body[:len(body)/2])
	buf.Flush()
	if stall {
		// Until the gateway gives up on it, or the test ends.
		io.Copy(io.Discard, conn)
	}
}

func (r *frontRelay) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for k, c := range r.requests {
		if strings.HasPrefix(k, prefix) {
			n += c
		}
	}
	return n
}

// newTestFrontends starts n front ends over one cache (o's directory)
// and a Forwarder spread over them through a fake tor.
func newTestFrontends(t *testing.T, n int, cfg ForwarderConfig) (*Forwarder, []*frontRelay, *fakeSocks) {
	t.Helper()
	o, _ := newOrigin(t)
	socks := newFakeSocks(t, "127.0.0.1:1")
	var relays []*frontRelay
	var targets []string
	for i := range n {
		r := newFrontRelay(t, o.dir)
		host := strings.Repeat(string(rune('a'+i)), 56) + ".onion"
		socks.routeTo(host, r.srv.Listener.Addr().String())
		relays = append(relays, r)
		targets = append(targets, "http://"+host)
	}
	cfg.Target, cfg.Frontends = targets[0], targets[1:]
	cfg.SocksAddr, cfg.Log = socks.addr, testLog()
	if cfg.Circuits == 0 {
		cfg.Circuits = 2 * n
	}
	f, err := NewForwarder(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	waitFor(t, "every front end reachable", func() bool {
		h := f.Health()
		for _, fh := range h.Frontends {
			if !fh.Reachable || fh.InFlight > 0 {
				return false
			}
		}
		return len(h.Frontends) == n
	})
	t.Cleanup(func() { testOrigins.Delete(t.Name()) })
	testOrigins.Store(t.Name(), o)
	return f, relays, socks
}

// testOrigins holds each test's origin, for pushing paths.
var testOrigins sync.Map

func testOrigin(t *testing.T) *origin {
	o, _ := testOrigins.Load(t.Name())
	return o.(*origin)
}

// pushVisible pushes paths through o's serve and waits until they are
// visible in the cache directory: a serve shows another's upload once it
// is there for good, a moment after the 201.
func pushVisible(t *testing.T, o *origin, tag byte, n, size int) []testPath {
	t.Helper()
	paths := o.push(t, tag, n, size)
	waitFor(t, "the pushed paths visible", func() bool {
		for _, p := range paths {
			if _, err := os.Stat(filepath.Join(o.dir, p.hash+".narinfo")); err != nil {
				return false
			}
		}
		return true
	})
	return paths
}

func TestFrontendsSpreadAndFailOver(t *testing.T) {
	defer shorten(&probeEvery, 50*time.Millisecond)()
	f, relays, _ := newTestFrontends(t, 2, ForwarderConfig{KeepWarm: -1})
	paths := pushVisible(t, testOrigin(t), 'f', 8, 1000)
	reg := prometheus.NewRegistry()
	if err := f.RegisterMetrics(reg, "read"); err != nil {
		t.Fatal(err)
	}
	gw := httptest.NewServer(f)
	t.Cleanup(gw.Close)
	if h := f.Health(); h.Circuits != 4 || len(h.Frontends[0].Frontends) != 0 || h.Frontends[0].Circuits != 2 {
		t.Errorf("circuits: %+v", h)
	}
	getAll := func(what string) {
		t.Helper()
		for _, p := range paths {
			if code, body := get(t, gw.URL+"/"+p.hash+".narinfo"); code != 200 || !strings.Contains(body, p.nar) {
				t.Fatalf("%s: narinfo %s: %d %q", what, p.hash, code, body)
			}
		}
	}
	getAll("both up")
	for i, r := range relays {
		if r.count("GET /") == 0 {
			t.Errorf("front end %d got no request: the requests were not spread", i)
		}
	}

	relays[1].down.Store(true)
	before := relays[0].count("GET /")
	getAll("front end 1 down")
	if relays[0].count("GET /")-before != len(paths) {
		t.Errorf("front end 0 answered %d of %d requests while 1 was down", relays[0].count("GET /")-before, len(paths))
	}
	h := f.Health()
	if !h.Reachable || h.Frontends[1].Forwarding || h.Frontends[1].Reachable || !h.Frontends[0].Reachable {
		t.Errorf("health with front end 1 down: %+v", h)
	}
	if got := frontendGauge(t, reg, "1"); got != 0 {
		t.Errorf("frontend_reachable{frontend=1} = %v with it down", got)
	}
	if got := frontendGauge(t, reg, "0"); got != 1 {
		t.Errorf("frontend_reachable{frontend=0} = %v", got)
	}

	relays[1].down.Store(false)
	waitFor(t, "front end 1 probed back", func() bool { return f.Health().Frontends[1].Reachable })
	before = relays[1].count("GET /")
	getAll("both up again")
	if relays[1].count("GET /") == before {
		t.Error("front end 1 got no request once it was back")
	}

	for _, r := range relays {
		r.down.Store(true)
	}
	// The gateway answers itself once every front end failed: the first
	// request finds them down, the next ones are answered at once.
	get(t, gw.URL+"/"+paths[0].hash+".narinfo")
	waitFor(t, "no front end forwards", func() bool { return !f.Health().Forwarding })
	resp, err := http.Get(gw.URL + "/" + paths[0].hash + ".narinfo")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get(ErrorHeader) != "unreachable" {
		t.Errorf("every front end down: %s, %s=%q; want the gateway's 404", resp.Status, ErrorHeader, resp.Header.Get(ErrorHeader))
	}
}

// frontendGauge returns kiss_onion_gateway_frontend_reachable{frontend=front} of reg.
func frontendGauge(t *testing.T, reg *prometheus.Registry, front string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "kiss_onion_gateway_frontend_reachable" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "frontend" && l.GetValue() == front {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no kiss_onion_gateway_frontend_reachable{frontend=%q}", front)
	return 0
}

func TestFrontendsResumeACutNar(t *testing.T) {
	tests := []struct {
		name     string
		prefetch bool
	}{
		{"forwarded", false},
		{"through the prefetch store", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, relays, _ := newTestFrontends(t, 2, ForwarderConfig{KeepWarm: -1})
			paths := pushVisible(t, testOrigin(t), 'r', 3, 3<<20)
			// Either front end cuts a whole NAR half-way; a Range is
			// answered in full.
			for _, r := range relays {
				r.cutNars.Store(true)
			}
			gw := serveForwarder(t, f, tt.prefetch)
			for _, p := range paths[:2] {
				resp, err := http.Get(gw.URL + "/" + p.nar)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 || !bytes.Equal(body, p.content) {
					t.Fatalf("GET %s: %s, %d of %d bytes, %v", p.nar, resp.Status, len(body), len(p.content), err)
				}
			}
			ranges := 0
			for _, r := range relays {
				ranges += r.countRanges()
			}
			if ranges < 2 {
				t.Errorf("%d Range requests reached the front ends for 2 cut NARs", ranges)
			}
			if n := f.metrics.resumes.Load(); n != 2 {
				t.Errorf("%d downloads resumed, want 2", n)
			}

			// Cut everywhere, Range requests too: the download fails, and
			// Nix does not get a short body for a whole one.
			for _, r := range relays {
				r.down.Store(true)
			}
			relays[0].down.Store(false)
			resp, err := http.Get(gw.URL + "/" + paths[2].nar)
			if err == nil {
				body, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 && rerr == nil {
					t.Errorf("a NAR cut on every front end came whole: %d of %d bytes", len(body), len(paths[2].content))
				}
			}
		})
	}
}

// TestFrontendsTakeAStalledNarElsewhere: a front end that stops sending
// in the middle of a NAR, without closing anything, is given up on, and
// the download completes from the other one, byte for byte.
func TestFrontendsTakeAStalledNarElsewhere(t *testing.T) {
	defer shorten(&stallAfter, 300*time.Millisecond)()
	defer shorten(&probeEvery, 50*time.Millisecond)()
	for _, prefetch := range []bool{false, true} {
		t.Run(fmt.Sprintf("prefetch=%v", prefetch), func(t *testing.T) {
			f, relays, _ := newTestFrontends(t, 2, ForwarderConfig{KeepWarm: -1})
			paths := pushVisible(t, testOrigin(t), 's', 4, 1<<20)
			relays[0].stallNars.Store(true)
			gw := serveForwarder(t, f, prefetch)
			// Without giving up on the stalled front end, a NAR would wait
			// for the store's idle minute, or for ever.
			client := &http.Client{Timeout: 30 * time.Second}
			for _, p := range paths {
				resp, err := client.Get(gw.URL + "/" + p.nar)
				if err != nil {
					t.Fatal(err)
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 || !bytes.Equal(body, p.content) {
					t.Fatalf("GET %s: %s, %d of %d bytes, %v", p.nar, resp.Status, len(body), len(p.content), err)
				}
			}
			if relays[0].count("GET /nar/") == 0 {
				t.Fatal("no NAR request went to the stalling front end: the test tested nothing")
			}
			if n := f.metrics.resumes.Load(); n == 0 {
				t.Errorf("no download resumed on the other front end")
			}
		})
	}
}

// serveForwarder serves f over HTTP, through a Prefetcher when prefetch
// is set.
func serveForwarder(t *testing.T, f *Forwarder, prefetch bool) *httptest.Server {
	t.Helper()
	var h http.Handler = f
	if prefetch {
		p, err := NewPrefetcher(f, PrefetchConfig{Dir: filepath.Join(t.TempDir(), "store"), Log: testLog()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		h = p
	}
	gw := httptest.NewServer(h)
	t.Cleanup(gw.Close)
	return gw
}

// countRanges counts the Range requests r got.
func (r *frontRelay) countRanges() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for k, c := range r.requests {
		if strings.HasSuffix(k, " range") {
			n += c
		}
	}
	return n
}

// A write whose front end cannot be reached goes to another one, body
// and all, since no byte of it was sent.
func TestFrontendsRetryAnUnsentUpload(t *testing.T) {
	o, _ := newOrigin(t)
	socks := newFakeSocks(t, "127.0.0.1:1")
	a, b := strings.Repeat("a", 56)+".onion", strings.Repeat("b", 56)+".onion"
	socks.routeTo(a, "127.0.0.1:1") // refused: a front end whose tor is gone
	socks.routeTo(b, strings.TrimPrefix(o.write, "http://"))
	f, err := NewForwarder(ForwarderConfig{Target: "http://" + a, Frontends: []string{"http://" + b}, SocksAddr: socks.addr, Circuits: 2, KeepWarm: -1, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.Close)
	gw := httptest.NewServer(f)
	t.Cleanup(gw.Close)
	for i := range 4 {
		body := fmt.Sprintf("/nix/store/%s-x\n", strings.Repeat("0", 32))
		req, _ := http.NewRequest("PUT", fmt.Sprintf("%s/gcroots/m%d", gw.URL, i), strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		msg, _ := io.ReadAll(bufio.NewReader(resp.Body))
		resp.Body.Close()
		// 409: the marker names a path the cache lacks; what matters is
		// that the cache, not the gateway, answered.
		if resp.Header.Get(ErrorHeader) != "" || resp.StatusCode >= 500 {
			t.Fatalf("PUT %d: %s %q", i, resp.Status, msg)
		}
	}
	// A's probe, under way from the start, finds it down in its own time.
	waitFor(t, "front end A found down and B reachable", func() bool {
		h := f.Health()
		return !h.Frontends[0].Forwarding && h.Frontends[1].Reachable
	})
}

func TestFrontendsRefuseATargetTwice(t *testing.T) {
	u := "http://" + strings.Repeat("a", 56) + ".onion"
	if _, err := NewForwarder(ForwarderConfig{Target: u, Frontends: []string{u}}); err == nil || !strings.Contains(err.Error(), "listed twice") {
		t.Errorf("NewForwarder = %v", err)
	}
}
