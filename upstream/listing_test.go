package upstream

import (
	"bytes"
	"compress/gzip"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/andybalholm/brotli"
)

// TestListingsComeAlong: a path's listing comes with its NAR when the
// upstream has one, decoded from its Content-Encoding; one that is not a
// listing, or none, leaves the path stored without one.
func TestListingsComeAlong(t *testing.T) {
	const listing = `{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{"hello":{"type":"regular","size":5,"executable":true,"narOffset":400}}}}}}`
	brotlied := func(s string) []byte {
		var b bytes.Buffer
		w := brotli.NewWriter(&b)
		w.Write([]byte(s))
		w.Close()
		return b.Bytes()
	}
	gzipped := func(s string) []byte {
		var b bytes.Buffer
		w := gzip.NewWriter(&b)
		w.Write([]byte(s))
		w.Close()
		return b.Bytes()
	}
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	// The listings the upstream serves, by store hash.
	var mu sync.Mutex
	type served struct {
		encoding string
		body     []byte
	}
	listings := map[string]served{}
	files := http.FileServer(http.Dir(up.dir))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".ls"); ok {
			mu.Lock()
			l, ok := listings[h]
			mu.Unlock()
			if !ok {
				http.NotFound(w, r)
				return
			}
			if l.encoding != "" {
				w.Header().Set("Content-Encoding", l.encoding)
			}
			w.Header().Set("Content-Type", "application/json")
			w.Write(l.body)
			return
		}
		files.ServeHTTP(w, r)
	}))
	defer srv.Close()
	f := newFetcher(t, key.PublicKey(), srv.URL)
	c, dir := newCache(t)
	for _, tt := range []struct {
		name     string
		encoding string
		body     []byte // nil: no listing upstream
		want     string // "": none stored
	}{
		{"plain", "", []byte(listing), listing},
		{"identity", "identity", []byte(listing), listing},
		{"brotli", "br", brotlied(listing), listing},
		{"gzip", "gzip", gzipped(listing), listing},
		{"none upstream", "", nil, ""},
		{"not a listing", "", []byte(`{"hello":"world"}`), ""},
		{"not JSON", "", []byte("<html>"), ""},
		{"an unknown encoding", "lz4", []byte(listing), ""},
		{"compressed, not said", "", brotlied(listing), ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := up.add("p", nil, "xz", &key)
			if tt.body != nil {
				mu.Lock()
				listings[p.hash] = served{tt.encoding, tt.body}
				mu.Unlock()
			}
			if err := f.Fetch(context.Background(), p.hash, c); err != nil {
				t.Fatal(err)
			}
			if ni, nar := stored(dir, p); !ni || !nar {
				t.Fatalf("path not stored: narinfo %v, NAR %v", ni, nar)
			}
			got, err := os.ReadFile(filepath.Join(dir, p.hash+".ls"))
			switch {
			case tt.want == "" && err == nil:
				t.Errorf("listing stored: %q", got)
			case tt.want != "" && err != nil:
				t.Errorf("listing not stored: %v", err)
			case tt.want != "" && string(got) != tt.want:
				t.Errorf("listing stored as %q", got)
			}
		})
	}
}
