package upstream

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/kiss-onion/kiss-onion/bucketlock"
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

// TestFetchesIntoABucket: on a cache kept in a bucket, a reader gets a
// closure that only upstream has, byte for byte, and the closure then
// sits in the bucket as upstream has it; a tampered NAR leaves nothing
// there.
func TestFetchesIntoABucket(t *testing.T) {
	srv := s3test.Start(t)
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
