package upstream

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/s3store"
	"github.com/kiss-onion/kiss-onion/serve"
)

// newBucketCache returns a serve.Cache on a prefix of a real SeaweedFS
// bucket fetching from upstream through f, and the store to look at its
// objects with.
func newBucketCache(t *testing.T, srv *s3test.Server, prefix string, f *Fetcher) (*serve.Cache, *s3store.Store) {
	t.Helper()
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
		Bucket: srv.Bucket, Prefix: prefix, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	c, err := serve.New(serve.Config{Bucket: st, BucketLocks: bucketlock.New(st, quietLog()), Upstream: f, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, st
}

// object returns the bucket's object name, nil when it is not there.
func object(t *testing.T, st *s3store.Store, name string) []byte {
	t.Helper()
	rc, _, err := st.Get(context.Background(), name, 0, -1)
	if err != nil {
		return nil
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOnABucket runs the fetcher on caches kept in one real SeaweedFS.
func TestOnABucket(t *testing.T) {
	srv := s3test.Start(t)
	t.Run("fetches into the bucket", func(t *testing.T) { testFetchesIntoABucket(t, srv) })
	t.Run("front ends share the keep marker", func(t *testing.T) { testKeepMarkerOnABucket(t, srv) })
}

// testFetchesIntoABucket: on a cache kept in a bucket, a reader gets a
// closure that only upstream has, byte for byte, and the closure then
// sits in the bucket as upstream has it; a tampered NAR leaves nothing
// there.
func testFetchesIntoABucket(t *testing.T, srv *s3test.Server) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	data := up.add("data", []string{lib.base}, "zstd", &key)
	app := up.add("app", []string{lib.base, data.base}, "none", &key)
	bad := up.add("bad", nil, "none", &key)
	os.WriteFile(filepath.Join(up.dir, bad.narURL), bytes.Repeat([]byte{1}, len(bad.nar)), 0o644)

	f := newFetcher(t, key.PublicKey(), up.srv.URL)
	f.cfg.SpoolDir = t.TempDir()
	c, st := newBucketCache(t, srv, "up", f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := c.NewServer(serve.Read, quietLog())
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Shutdown(context.Background()) })
	get := func(rel string) (int, []byte) {
		resp, err := http.Get("http://" + ln.Addr().String() + "/" + rel)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}

	if code, _ := get(app.hash + ".narinfo"); code != http.StatusOK {
		t.Fatalf("narinfo of a path upstream has: %d", code)
	}
	for _, p := range []path{lib, data, app} {
		want, _ := os.ReadFile(filepath.Join(up.dir, p.narURL))
		if code, b := get(p.narURL); code != http.StatusOK || !bytes.Equal(b, want) {
			t.Errorf("NAR of %s: %d, %d bytes (want %d)", p.base, code, len(b), len(want))
		}
	}
	// The fetch ends with app's narinfo; Fetch joins it.
	if err := f.Fetch(context.Background(), app.hash, c); err != nil {
		t.Fatal(err)
	}
	for _, p := range []path{lib, data, app} {
		want, _ := os.ReadFile(filepath.Join(up.dir, p.hash+".narinfo"))
		if got := object(t, st, p.hash+".narinfo"); !bytes.Equal(got, want) {
			t.Errorf("%s: narinfo in the bucket %q, want upstream's", p.base, got)
		}
		want, _ = os.ReadFile(filepath.Join(up.dir, p.narURL))
		if got := object(t, st, p.narURL); !bytes.Equal(got, want) {
			t.Errorf("%s: NAR in the bucket has %d bytes, not upstream's %d", p.base, len(got), len(want))
		}
	}

	if code, _ := get(bad.hash + ".narinfo"); code == http.StatusOK {
		// The narinfo is answered once checked; its NAR is cut off on
		// the way, before its last byte.
		resp, err := http.Get("http://" + ln.Addr().String() + "/" + bad.narURL)
		if err == nil {
			_, err = io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && err == nil {
				t.Errorf("a tampered NAR was served whole")
			}
		}
	}
	if err := f.Fetch(context.Background(), bad.hash, c); err == nil {
		t.Error("a tampered NAR was fetched")
	}
	for _, name := range []string{bad.hash + ".narinfo", bad.narURL} {
		if object(t, st, name) != nil {
			t.Errorf("%s of a tampered path is in the bucket", name)
		}
	}
}

// testKeepMarkerOnABucket: front ends on one bucket share one keep
// marker: each takes in what the others wrote, a read through one keeps
// a path that another fetched, and the later read of a path wins.
func testKeepMarkerOnABucket(t *testing.T, srv *s3test.Server) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	app := up.add("app", []string{lib.base}, "xz", &key)
	other := up.add("other", nil, "xz", &key)
	now := time.Now()
	newF := func() *Fetcher {
		f, err := New(Config{URLs: []string{up.srv.URL}, Keys: []nixcache.PublicKey{key.PublicKey()}, Keep: time.Hour,
			SpoolDir: t.TempDir(), Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		f.now = func() time.Time { return now }
		return f
	}
	fa, fb := newF(), newF()
	a, st := newBucketCache(t, srv, "keep", fa)
	b, _ := newBucketCache(t, srv, "keep", fb)
	marker := func() []string {
		t.Helper()
		roots, err := nixcache.ParseMarker(object(t, st, KeepMarker), "/nix/store")
		if err != nil {
			t.Fatalf("keep marker does not parse: %v", err)
		}
		slices.Sort(roots)
		return roots
	}
	names := func(ps ...path) []string {
		var out []string
		for _, p := range ps {
			out = append(out, p.base)
		}
		slices.Sort(out)
		return out
	}

	if err := fa.Fetch(context.Background(), app.hash, a); err != nil {
		t.Fatal(err)
	}
	if got, want := marker(), names(lib, app); !slices.Equal(got, want) {
		t.Fatalf("marker after A fetched app: %v, want %v", got, want)
	}
	// B fetches another path, and takes in A's.
	if err := fb.Fetch(context.Background(), other.hash, b); err != nil {
		t.Fatal(err)
	}
	if got, want := marker(), names(lib, app, other); !slices.Equal(got, want) {
		t.Fatalf("marker after B fetched other: %v, want %v", got, want)
	}
	// app is read through B only; other is read no more.
	now = now.Add(50 * time.Minute)
	fb.Used(app.narURL)
	now = now.Add(15 * time.Minute)
	if err := fb.keeper.flush(fb.keeper.store(b)); err != nil {
		t.Fatal(err)
	}
	if got, want := marker(), names(lib, app); !slices.Equal(got, want) {
		t.Errorf("marker after B's flush, app read 15 minutes ago, other 65: %v, want %v (lib as app references it)", got, want)
	}
	// A, which last saw app read an hour and five minutes ago, takes in
	// B's later read rather than dropping app.
	now = now.Add(5 * time.Minute)
	if err := fa.keeper.flush(fa.keeper.store(a)); err != nil {
		t.Fatal(err)
	}
	if got, want := marker(), names(lib, app); !slices.Equal(got, want) {
		t.Errorf("marker after A's flush: %v, want %v", got, want)
	}
	// Past the keep time since B's read, either front end empties it.
	now = now.Add(time.Hour)
	if err := fa.keeper.flush(fa.keeper.store(a)); err != nil {
		t.Fatal(err)
	}
	if got := marker(); len(got) != 0 {
		t.Errorf("marker past the keep time: %v", got)
	}
}
