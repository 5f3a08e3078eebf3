package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
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

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
)

// origin is a real cache (serve) behind a relay that counts the requests
// that reach it and can be told to break things.
type origin struct {
	dir      string
	write    string // the write role's URL
	mu       sync.Mutex
	requests map[string]int   // by path
	sent     map[string]int64 // body bytes, by path
	corrupt  atomic.Bool      // flip a byte of every NAR
	noQuery  atomic.Bool      // answer closure queries 404, as an older serve
	down     atomic.Bool      // refuse everything, as a dead onion
}

func newOrigin(t *testing.T) (*origin, http.Handler) {
	t.Helper()
	o := &origin{dir: filepath.Join(t.TempDir(), "cache"), requests: map[string]int{}, sent: map[string]int64{}}
	c, err := serve.New(serve.Config{Dir: o.dir, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	start := func(role serve.Role) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := c.NewServer(role, nil)
		go srv.Serve(ln)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv.Shutdown(ctx)
		})
		return "http://" + ln.Addr().String()
	}
	read, _ := url.Parse(start(serve.Read))
	o.write = start(serve.Write)
	rp := httputil.NewSingleHostReverseProxy(read)
	rp.ModifyResponse = func(resp *http.Response) error {
		if o.corrupt.Load() && strings.HasPrefix(resp.Request.URL.Path, "/nar/") {
			b, _ := io.ReadAll(resp.Body)
			b[len(b)/2] ^= 1
			resp.Body = io.NopCloser(bytes.NewReader(b))
		}
		return nil
	}
	relay := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/nix-cache-info" {
			o.mu.Lock()
			o.requests[r.URL.Path]++
			o.mu.Unlock()
		}
		switch {
		case o.down.Load():
			hj, _ := w.(http.Hijacker)
			conn, _, _ := hj.Hijack()
			conn.Close()
			return
		case o.noQuery.Load() && strings.HasPrefix(r.URL.Path, "/kiss-onion/"):
			http.NotFound(w, r)
			return
		}
		rp.ServeHTTP(&countingWriter{ResponseWriter: w, o: o, path: r.URL.Path}, r)
	})
	return o, relay
}

// countingWriter counts the body bytes sent for a path.
type countingWriter struct {
	http.ResponseWriter
	o    *origin
	path string
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.o.mu.Lock()
	w.o.sent[w.path] += int64(n)
	w.o.mu.Unlock()
	return n, err
}

func (w *countingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (o *origin) sentBytes(path string) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.sent[path]
}

func (o *origin) count(path string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.requests[path]
}

func (o *origin) total(prefix string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for p, c := range o.requests {
		if strings.HasPrefix(p, prefix) {
			n += c
		}
	}
	return n
}

// testPath is a path pushed to the origin.
type testPath struct {
	hash, name, nar string
	content         []byte
}

// push uploads a chain of n paths, each referring to the next, with NARs
// of size bytes, and returns them root first.
func (o *origin) push(t *testing.T, tag byte, n, size int) []testPath {
	t.Helper()
	paths := make([]testPath, n)
	for i := range paths {
		content := bytes.Repeat([]byte{tag, byte(i)}, size/2)
		sum := sha256.Sum256(content)
		hash := nixcache.Base32(sum[:20])[:32]
		paths[i] = testPath{hash: hash, name: fmt.Sprintf("p%c%d", tag, i), nar: "nar/" + nixcache.Base32(sum[:]) + ".nar", content: content}
	}
	for i := n - 1; i >= 0; i-- {
		p := paths[i]
		refs := ""
		if i+1 < n {
			refs = paths[i+1].hash + "-" + paths[i+1].name
		}
		info := fmt.Sprintf("StorePath: /nix/store/%s-%s\nURL: %s\nCompression: none\nFileSize: %d\nNarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: %d\nReferences: %s\n",
			p.hash, p.name, p.nar, len(p.content), len(p.content), refs)
		for _, put := range []struct {
			path string
			body []byte
		}{{p.nar, p.content}, {p.hash + ".narinfo", []byte(info)}} {
			req, _ := http.NewRequest("PUT", o.write+"/"+put.path, bytes.NewReader(put.body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 201 {
				t.Fatalf("PUT %s: %s", put.path, resp.Status)
			}
		}
	}
	return paths
}

// newTestPrefetcher serves a Prefetcher in front of a Forwarder to o.
func newTestPrefetcher(t *testing.T, relay http.Handler, cfg PrefetchConfig) (*Prefetcher, string) {
	t.Helper()
	f, _, _ := newTestForwarder(t, relay, ForwarderConfig{Circuits: 2, KeepWarm: -1})
	warmedUp(t, f)
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(t.TempDir(), "store")
	}
	cfg.Log = testLog()
	p, err := NewPrefetcher(f, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	srv := httptest.NewServer(p)
	t.Cleanup(srv.Close)
	return p, srv.URL
}

func TestPrefetcherAnswersAClosureFromOneQuery(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'a', 5, 64<<10)
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{Ahead: true})

	for _, p := range paths {
		status, body := get(t, gw+"/"+p.hash+".narinfo")
		want, _ := os.ReadFile(filepath.Join(o.dir, p.hash+".narinfo"))
		if status != 200 || body != string(want) {
			t.Fatalf("narinfo of %s: %d %q, want the cache's %q", p.name, status, body, want)
		}
	}
	absent := strings.Repeat("0", 32)
	if status, _ := get(t, gw+"/"+absent+".narinfo"); status != 404 {
		t.Errorf("narinfo of a path the cache lacks: %d", status)
	}
	if n := o.total("/kiss-onion/closure/"); n != 2 {
		t.Errorf("%d closure queries for a closure and a missing path, want 2", n)
	}
	if n := o.total("/") - o.total("/kiss-onion/") - o.total("/nar/"); n != 0 {
		t.Errorf("%d narinfo requests reached the cache, want none", n)
	}
	// Every NAR comes, ahead of any request, and then as often as asked,
	// from one download each.
	for _, p := range paths {
		waitFor(t, "the NARs fetched ahead", func() bool { return o.count("/"+p.nar) == 1 })
	}
	var wg sync.WaitGroup
	for range 3 {
		for _, p := range paths {
			wg.Go(func() {
				if status, body := get(t, gw+"/"+p.nar); status != 200 || body != string(p.content) {
					t.Errorf("NAR of %s: %d, %d bytes, not the cache's", p.name, status, len(body))
				}
			})
		}
	}
	wg.Wait()
	for _, p := range paths {
		if n := o.count("/" + p.nar); n != 1 {
			t.Errorf("NAR of %s fetched %d times", p.name, n)
		}
	}
}

func TestPrefetcherJoinsADownloadInFlight(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'b', 1, 8<<20)
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{})
	if status, _ := get(t, gw+"/"+paths[0].hash+".narinfo"); status != 200 {
		t.Fatal(status)
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if status, body := get(t, gw+"/"+paths[0].nar); status != 200 || body != string(paths[0].content) {
				t.Errorf("NAR: %d, %d bytes", status, len(body))
			}
		})
	}
	wg.Wait()
	// Its narinfo gave its size: it came in parts, each byte once.
	if n := o.sentBytes("/" + paths[0].nar); n != int64(len(paths[0].content)) {
		t.Errorf("8 clients at once: %d bytes of the NAR crossed, want %d (once)", n, len(paths[0].content))
	}
}

func TestPrefetcherRefusesACorruptNar(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'c', 1, 256<<10)
	p, gw := newTestPrefetcher(t, relay, PrefetchConfig{})
	o.corrupt.Store(true)
	resp, err := http.Get(gw + "/" + paths[0].nar)
	if err == nil {
		b, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		if rerr == nil && resp.StatusCode == 200 {
			t.Fatalf("a corrupt NAR was served whole (%d bytes)", len(b))
		}
	}
	if p.store.has(paths[0].nar) {
		t.Error("the corrupt NAR was kept")
	}
	o.corrupt.Store(false)
	if status, body := get(t, gw+"/"+paths[0].nar); status != 200 || body != string(paths[0].content) {
		t.Errorf("after the corruption: %d, %d bytes", status, len(body))
	}
}

func TestPrefetcherAfterAPrune(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'd', 2, 4<<10)
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{})
	if status, _ := get(t, gw+"/"+paths[0].hash+".narinfo"); status != 200 {
		t.Fatal(status)
	}
	// The cache prunes the reference between the closure answer and
	// Nix's requests: its narinfo is still answered (Nix may have it from
	// the same answer), its NAR gets a clean 404.
	for _, f := range []string{paths[1].hash + ".narinfo", paths[1].nar} {
		if err := os.Remove(filepath.Join(o.dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	if status, body := get(t, gw+"/"+paths[1].nar); status != 404 {
		t.Errorf("NAR pruned: %d %q, want 404", status, body)
	}
	if status, _ := get(t, gw+"/"+paths[0].nar); status != 200 {
		t.Errorf("NAR kept: %d", status)
	}
}

func TestPrefetcherWithAnOlderServe(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'f', 3, 1<<10)
	o.noQuery.Store(true)
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{Ahead: true})
	for _, p := range paths {
		want, _ := os.ReadFile(filepath.Join(o.dir, p.hash+".narinfo"))
		if status, body := get(t, gw+"/"+p.hash+".narinfo"); status != 200 || body != string(want) {
			t.Errorf("narinfo of %s: %d %q", p.name, status, body)
		}
		if status, body := get(t, gw+"/"+p.nar); status != 200 || body != string(p.content) {
			t.Errorf("NAR of %s: %d", p.name, status)
		}
	}
	if n := o.total("/kiss-onion/"); n != 1 {
		t.Errorf("%d closure queries to a serve that answers none, want 1", n)
	}
}

func TestPrefetcherStaysWithinItsSize(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'g', 12, 256<<10) // 3 MiB
	dir := filepath.Join(t.TempDir(), "store")
	const limit = 1 << 20
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{Dir: dir, Size: limit, Ahead: true})
	for _, p := range paths {
		if status, _ := get(t, gw+"/"+p.hash+".narinfo"); status != 200 {
			t.Fatal(status)
		}
		if status, body := get(t, gw+"/"+p.nar); status != 200 || body != string(p.content) {
			t.Errorf("NAR of %s: %d", p.name, status)
		}
		// A file is not pushed out while it is read: the bound holds
		// again once the gateway has closed it, a moment after the
		// client got the last byte.
		waitFor(t, "the store within its size", func() bool { return dirSize(t, dir) <= limit })
	}
}

func TestLANCacheServesWhileTheOnionIsAway(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'h', 3, 16<<10)
	dir := filepath.Join(t.TempDir(), "lan")
	p, gw := newTestPrefetcher(t, relay, PrefetchConfig{Dir: dir, Keep: true, Ahead: true, NarInfoTTL: time.Millisecond})
	get(t, gw+"/"+paths[0].hash+".narinfo")
	for _, tp := range paths {
		waitFor(t, "the closure kept", func() bool {
			_, err := os.Stat(filepath.Join(dir, tp.hash+".narinfo"))
			return err == nil && p.store.has(tp.nar)
		})
	}
	o.down.Store(true)
	for _, tp := range paths {
		want, _ := os.ReadFile(filepath.Join(o.dir, tp.hash+".narinfo"))
		if status, body := get(t, gw+"/"+tp.hash+".narinfo"); status != 200 || body != string(want) {
			t.Errorf("onion away: narinfo of %s: %d %q", tp.name, status, body)
		}
		if status, body := get(t, gw+"/"+tp.nar); status != 200 || body != string(tp.content) {
			t.Errorf("onion away: NAR of %s: %d", tp.name, status)
		}
	}
	if status, _ := get(t, gw+"/"+strings.Repeat("1", 32)+".narinfo"); status != 404 {
		t.Errorf("onion away, a path never fetched: %d, want 404", status)
	}
}

func dirSize(t *testing.T, dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func TestPrefetcherResumesWithARange(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'j', 2, 64<<10)
	_, gw := newTestPrefetcher(t, relay, PrefetchConfig{})
	resp, err := http.Get(gw + "/" + paths[0].nar)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.Header.Get("Accept-Ranges") != "bytes" {
		t.Errorf("a NAR without Accept-Ranges: Nix 2.8 would not resume it")
	}
	// paths[0] is in the store, whole; paths[1] was never asked for.
	for _, p := range paths {
		req, _ := http.NewRequest("GET", gw+"/"+p.nar, nil)
		req.Header.Set("Range", "bytes=100-199")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusPartialContent || string(b) != string(p.content[100:200]) {
			t.Errorf("%s: Range bytes=100-199: %d, %d bytes", p.name, resp.StatusCode, len(b))
		}
	}
	if n := o.count("/" + paths[0].nar); n != 1 {
		t.Errorf("a range of a NAR in the store went to the cache: %d requests in all", n)
	}
	if n := o.count("/" + paths[1].nar); n != 1 {
		t.Errorf("a range of a NAR not in the store: %d requests to the cache, want 1", n)
	}
}
