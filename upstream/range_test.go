package upstream

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/serve"
)

// slowUpstream serves an upstream cache whose NARs send their first half
// at once and the rest when release is closed.
func slowUpstream(t *testing.T, up *upstreamCache, release chan struct{}) *httptest.Server {
	files := http.FileServer(http.Dir(up.dir))
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			files.ServeHTTP(w, r)
			return
		}
		b, err := os.ReadFile(filepath.Join(up.dir, r.URL.Path))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		w.Write(b[:len(b)/2])
		w.(http.Flusher).Flush()
		<-release
		w.Write(b[len(b)/2:])
	}))
	t.Cleanup(slow.Close)
	return slow
}

// readers returns how many clients read the spool of the NAR at url.
func (f *Fetcher) readers(url string) int {
	f.mu.Lock()
	n := f.byURL[url]
	f.mu.Unlock()
	if n == nil {
		return 0
	}
	n.mu.Lock()
	sp := n.spool
	n.mu.Unlock()
	if sp == nil {
		return 0
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.refs - 1 // the download holds one
}

// TestRangeWhileDownloading: a Range GET of a NAR still downloading gets
// the bytes it asked for, waiting for those not yet arrived, on either
// role; an unsatisfiable one is a 416, several ranges get the whole file.
func TestRangeWhileDownloading(t *testing.T) {
	const size = 64 << 10 // upstreamCache.add's NARs, uncompressed
	for _, role := range []serve.Role{serve.Read, serve.Write} {
		for _, tt := range []struct {
			name       string
			rng        string
			status     int
			start, end int64 // the bytes expected, end exclusive
		}{
			{"arrived", "bytes=0-99", 206, 0, 100},
			{"straddling", "bytes=1000-40000", 206, 1000, 40001},
			{"not arrived", "bytes=50000-50099", 206, 50000, 50100},
			{"to the end", "bytes=40000-", 206, 40000, size},
			{"suffix", "bytes=-100", 206, size - 100, size},
			{"past the end", fmt.Sprintf("bytes=%d-", size+5), 416, 0, 0},
			{"several", "bytes=0-1,5-6", 200, 0, size},
			{"no range", "", 200, 0, size},
		} {
			t.Run(role.String()+"/"+tt.name, func(t *testing.T) {
				key := testKey(t, "upstream-1")
				up := newUpstreamCache(t)
				p := up.add("p", nil, "none", &key)
				release := make(chan struct{})
				released := false
				f := newFetcher(t, key.PublicKey(), slowUpstream(t, up, release).URL)
				defer func() {
					// The download ends, and is stored, before the cache
					// directory goes.
					if !released {
						close(release)
					}
					for deadline := time.Now().Add(10 * time.Second); f.pending(p.hash) != nil && time.Now().Before(deadline); {
						time.Sleep(5 * time.Millisecond)
					}
				}()
				c, err := serve.New(serve.Config{Dir: filepath.Join(t.TempDir(), "cache"), Upstream: f, Log: quietLog()})
				if err != nil {
					t.Fatal(err)
				}
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				srv := c.NewServer(role, quietLog())
				go srv.Serve(ln)
				defer srv.Shutdown(context.Background())
				base := "http://" + ln.Addr().String() + "/"
				if resp, err := http.Get(base + p.hash + ".narinfo"); err != nil || resp.StatusCode != 200 {
					t.Fatalf("narinfo: %v %v", resp, err)
				} else {
					resp.Body.Close()
				}

				type result struct {
					resp *http.Response
					body []byte
					err  error
				}
				got := make(chan result, 1)
				go func() {
					req, _ := http.NewRequest(http.MethodGet, base+p.narURL, nil)
					if tt.rng != "" {
						req.Header.Set("Range", tt.rng)
					}
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						got <- result{err: err}
						return
					}
					b, err := io.ReadAll(resp.Body)
					resp.Body.Close()
					got <- result{resp, b, err}
				}()
				var r result
				if tt.status != 416 {
					// The client reads the download: then let it end.
					deadline := time.Now().Add(10 * time.Second)
					for f.readers(p.narURL) == 0 {
						if time.Now().After(deadline) {
							t.Fatal("the NAR was not read from its download")
						}
						time.Sleep(5 * time.Millisecond)
					}
					close(release)
					released = true
				}
				r = <-got
				if r.err != nil {
					t.Fatal(r.err)
				}
				if r.resp.StatusCode != tt.status {
					t.Fatalf("status %d, want %d", r.resp.StatusCode, tt.status)
				}
				if e := r.resp.Header.Get("Etag"); e != "" {
					t.Errorf("answered from the cache (Etag %s), not from the download", e)
				}
				if tt.status == 416 {
					if cr := r.resp.Header.Get("Content-Range"); cr != fmt.Sprintf("bytes */%d", size) {
						t.Errorf("Content-Range %q", cr)
					}
					return
				}
				if !bytes.Equal(r.body, p.nar[tt.start:tt.end]) {
					t.Errorf("%d bytes, not bytes %d-%d of the NAR", len(r.body), tt.start, tt.end-1)
				}
				if tt.status == 206 {
					want := fmt.Sprintf("bytes %d-%d/%d", tt.start, tt.end-1, size)
					if cr := r.resp.Header.Get("Content-Range"); cr != want {
						t.Errorf("Content-Range %q, want %q", cr, want)
					}
				}
			})
		}
	}
}
