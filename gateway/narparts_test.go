package gateway

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSplit(t *testing.T) {
	const M = 1 << 20
	tests := []struct {
		name     string
		size     int64
		circuits int
		want     int // parts
	}{
		{"size unknown", -1, 6, 0},
		{"empty", 0, 6, 0},
		{"under two parts", 2*M - 1, 6, 1},
		{"two parts", 2 * M, 6, 2},
		{"as many as circuits", 5*M + 3, 6, 5},
		{"bounded by the circuits", 40 * M, 6, 6},
		{"bounded by maxParts", 400 * M, 32, maxParts},
		{"one circuit", 40 * M, 1, 1},
		{"no circuit count", 40 * M, 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parts := split(tt.size, tt.circuits, minPart)
			if len(parts) != tt.want {
				t.Fatalf("%d parts, want %d: %v", len(parts), tt.want, parts)
			}
			var at int64
			for i, p := range parts {
				if p.start != at || p.end <= p.start || p.got != 0 {
					t.Fatalf("part %d is %+v after byte %d", i, p, at)
				}
				if len(parts) > 1 && p.end-p.start < minPart {
					t.Errorf("part %d has %d bytes, under %d", i, p.end-p.start, minPart)
				}
				if d := (p.end - p.start) - (parts[0].end - parts[0].start); d < -1 || d > 1 {
					t.Errorf("part %d has %d bytes, the first %d", i, p.end-p.start, parts[0].end-parts[0].start)
				}
				at = p.end
			}
			if len(parts) > 0 && at != tt.size {
				t.Errorf("the parts end at %d, the file at %d", at, tt.size)
			}
		})
	}
}

// partsRelay stands between the gateway and a real serve, and does to
// the Range requests for NARs what a test asks.
type partsRelay struct {
	next    http.Handler
	noRange atomic.Bool // drop the Range header: the whole file, 200
	cutAll  atomic.Bool // send half of every range, then close
	// hold: ranges from byte 0 wait until release is closed, the others
	// until releaseRest is.
	hold           atomic.Bool
	release        chan struct{}
	releaseRest    chan struct{}
	once, onceRest sync.Once

	mu     sync.Mutex
	ranges []string        // Range headers of the NAR requests, as they came
	cut    map[string]bool // ranges to send half of, then close, once
	held   int
}

func (r *partsRelay) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	rng := req.Header.Get("Range")
	if !strings.HasPrefix(req.URL.Path, "/nar/") || rng == "" {
		r.next.ServeHTTP(w, req)
		return
	}
	r.mu.Lock()
	r.ranges = append(r.ranges, rng)
	cut := r.cut[rng] || r.cutAll.Load()
	delete(r.cut, rng)
	hold := r.hold.Load()
	if hold {
		r.held++
	}
	r.mu.Unlock()
	switch {
	case hold && strings.HasPrefix(rng, "bytes=0-"):
		<-r.release
	case hold:
		<-r.releaseRest
	}
	if r.noRange.Load() {
		req.Header.Del("Range")
	}
	if !cut {
		r.next.ServeHTTP(w, req)
		return
	}
	rec := httptest.NewRecorder()
	r.next.ServeHTTP(rec, req)
	body := rec.Body.Bytes()
	conn, buf, _ := w.(http.Hijacker).Hijack()
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Range: %s\r\n\r\n", rec.Code, http.StatusText(rec.Code), len(body), rec.Header().Get("Content-Range"))
	buf.Write(body[:len(body)/2])
	buf.Flush()
}

// letFirst and letRest let the held ranges go.
func (r *partsRelay) letFirst() { r.once.Do(func() { close(r.release) }) }
func (r *partsRelay) letRest()  { r.onceRest.Do(func() { close(r.releaseRest) }) }

func (r *partsRelay) heldCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.held
}

func (r *partsRelay) seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.ranges...)
}

// newPartsGateway serves a Prefetcher, over a Forwarder of circuits
// circuits, in front of a real serve behind a partsRelay.
func newPartsGateway(t *testing.T, circuits int) (*origin, *partsRelay, *Prefetcher, string) {
	t.Helper()
	o, relay := newOrigin(t)
	pr := &partsRelay{next: relay, cut: map[string]bool{}, release: make(chan struct{}), releaseRest: make(chan struct{})}
	f, _, _ := newTestForwarder(t, pr, ForwarderConfig{Circuits: circuits, KeepWarm: -1})
	warmedUp(t, f)
	p, err := NewPrefetcher(f, PrefetchConfig{Dir: filepath.Join(t.TempDir(), "store"), Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	t.Cleanup(func() { pr.letFirst(); pr.letRest() }) // before the servers close
	return o, pr, p, srv.URL
}

// ranges returns the Range headers of a file of size bytes in n parts.
func ranges(size int64, n int) []string {
	var out []string
	for _, p := range split(size, n, minPart) {
		out = append(out, fmt.Sprintf("bytes=%d-%d", p.start, p.end-1))
	}
	return out
}

func TestNarInParts(t *testing.T) {
	defer shorten(&partRetryWait, 50*time.Millisecond)()
	const size = 4<<20 + 1234
	cutPart := split(size, 4, minPart)[2]
	tests := []struct {
		name  string
		setup func(r *partsRelay)
		// ranges: the Range requests that reach the relay, in any order
		// (the cache sees as many requests); nil when the parts stop.
		ranges []string
		once   bool // each byte of the NAR left the cache once
	}{
		{"over every circuit", nil, ranges(size, 4), true},
		{"a part cut mid-way resumes where it broke", func(r *partsRelay) {
			r.cut[ranges(size, 4)[2]] = true
		}, append(ranges(size, 4), fmt.Sprintf("bytes=%d-%d", cutPart.start+(cutPart.end-cutPart.start)/2, cutPart.end-1)), false},
		// The whole file from the first part's answer; the other parts
		// stop.
		{"a cache that answers 200 to a Range", func(r *partsRelay) { r.noRange.Store(true) }, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, r, p, gw := newPartsGateway(t, 4)
			paths := pushVisible(t, o, 'p', 1, size)
			nar := paths[0]
			if tt.setup != nil {
				tt.setup(r)
			}
			if status, _ := get(t, gw+"/"+nar.hash+".narinfo"); status != 200 {
				t.Fatal(status)
			}
			r.letFirst()
			r.letRest()
			var wg sync.WaitGroup
			for range 3 {
				wg.Go(func() {
					if status, body := get(t, gw+"/"+nar.nar); status != 200 || body != string(nar.content) {
						t.Errorf("GET the NAR: %d, %d bytes, not the cache's", status, len(body))
					}
				})
			}
			wg.Wait()
			if !p.store.has(nar.nar) {
				t.Error("the NAR was not kept")
			}
			got := r.seen()
			if tt.ranges != nil && !sameSet(got, tt.ranges) {
				t.Errorf("Range requests %q, want %q", got, tt.ranges)
			}
			if n := o.count("/" + nar.nar); tt.ranges != nil && n != len(tt.ranges) {
				t.Errorf("%d requests for the NAR reached the cache, want %d", n, len(tt.ranges))
			}
			if n := o.sentBytes("/" + nar.nar); tt.once && n != int64(len(nar.content)) {
				t.Errorf("%d bytes of the NAR crossed, want %d: each once", n, len(nar.content))
			}
		})
	}
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	count := map[string]int{}
	for _, s := range a {
		count[s]++
	}
	for _, s := range b {
		if count[s]--; count[s] < 0 {
			return false
		}
	}
	return true
}

// The parts of a NAR go over different circuits at once, and a reader
// gets only the bytes from the start on: parts that came before the
// first one wait for it.
func TestNarPartsOutOfOrder(t *testing.T) {
	const size = 4 << 20
	o, r, p, gw := newPartsGateway(t, 4)
	nar := pushVisible(t, o, 'q', 1, size)[0]
	r.hold.Store(true)
	if status, _ := get(t, gw+"/"+nar.hash+".narinfo"); status != 200 {
		t.Fatal(status)
	}
	type result struct {
		status int
		body   string
	}
	// Circuit 0 seems busy: the least busy circuits are the others.
	busy := []int32{5, 0, 0, 0}
	p.next.circuits[0].inflight.Add(busy[0])
	done := make(chan result, 1)
	go func() {
		status, body := get(t, gw+"/"+nar.nar)
		done <- result{status, body}
	}()
	// All four go out at once, one on each circuit, the busiest too.
	waitFor(t, "the four parts asked for", func() bool { return r.heldCount() == 4 })
	for _, c := range p.next.circuits {
		if n := c.inflight.Load() - busy[c.n]; n != 1 {
			t.Errorf("circuit %d carries %d of the parts, want 1", c.n, n)
		}
	}
	p.next.circuits[0].inflight.Add(-busy[0])
	// The last three come first.
	r.letRest()
	var d *download
	waitFor(t, "the last three parts written", func() bool {
		p.store.mu.Lock()
		d = p.store.downloads[nar.nar]
		p.store.mu.Unlock()
		if d == nil {
			return false
		}
		d.mu.Lock()
		defer d.mu.Unlock()
		for _, pt := range d.parts[1:] {
			if pt.start+pt.got != pt.end {
				return false
			}
		}
		return len(d.parts) == 4
	})
	d.mu.Lock()
	written := d.written
	d.mu.Unlock()
	if written != 0 {
		t.Errorf("%d bytes given out before the first part came", written)
	}
	select {
	case res := <-done:
		t.Fatalf("the reader finished before the first part came: %d, %d bytes", res.status, len(res.body))
	default:
	}
	r.letFirst()
	if res := <-done; res.status != 200 || res.body != string(nar.content) {
		t.Errorf("GET the NAR: %d, %d bytes, not the cache's", res.status, len(res.body))
	}
}

// A part that never comes whole fails the download: nothing is kept, and
// no reader takes a short or corrupt body for the NAR.
func TestNarPartsFail(t *testing.T) {
	defer shorten(&partRetryWait, 10*time.Millisecond)()
	tests := []struct {
		name  string
		spoil func(o *origin, r *partsRelay)
	}{
		{"every attempt cut", func(o *origin, r *partsRelay) { r.cutAll.Store(true) }},
		{"corrupt", func(o *origin, r *partsRelay) { o.corrupt.Store(true) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, r, p, gw := newPartsGateway(t, 4)
			nar := pushVisible(t, o, 's', 1, 3<<20)[0]
			if status, _ := get(t, gw+"/"+nar.hash+".narinfo"); status != 200 {
				t.Fatal(status)
			}
			r.letFirst()
			r.letRest()
			tt.spoil(o, r)
			resp, err := http.Get(gw + "/" + nar.nar)
			if err == nil {
				body, rerr := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 && rerr == nil {
					t.Errorf("a NAR that never came whole was served: %d bytes, the cache's: %v", len(body), bytes.Equal(body, nar.content))
				}
			}
			if p.store.has(nar.nar) {
				t.Error("the NAR was kept")
			}
			if len(r.seen()) < 3 {
				t.Errorf("Range requests %q, want the NAR in parts", r.seen())
			}
		})
	}
}
