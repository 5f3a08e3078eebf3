package upstream

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/sirupsen/logrus"
	"github.com/ulikunitz/xz"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
)

// testKey returns a fresh signing key named name.
func testKey(t *testing.T, name string) nixcache.SecretKey {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := nixcache.ParseSecretKey(name + ":" + base64.StdEncoding.EncodeToString(priv))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// upstreamCache is a file:// cache directory served over HTTP, filled by
// hand the way nix copy --to file:// fills one.
type upstreamCache struct {
	t        *testing.T
	dir      string
	srv      *httptest.Server
	requests sync.Map // path -> *atomic.Int64
}

func newUpstreamCache(t *testing.T) *upstreamCache {
	u := &upstreamCache{t: t, dir: t.TempDir()}
	files := http.FileServer(http.Dir(u.dir))
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := u.requests.LoadOrStore(r.URL.Path, new(atomic.Int64))
		n.(*atomic.Int64).Add(1)
		files.ServeHTTP(w, r)
	}))
	t.Cleanup(u.srv.Close)
	os.MkdirAll(filepath.Join(u.dir, "nar"), 0o755)
	os.WriteFile(filepath.Join(u.dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644)
	return u
}

func (u *upstreamCache) count(path string) int64 {
	n, ok := u.requests.Load(path)
	if !ok {
		return 0
	}
	return n.(*atomic.Int64).Load()
}

// path is a store path put into an upstream cache.
type path struct {
	hash, base string
	narURL     string
	nar        []byte
}

var nextHash atomic.Int64

// add stores a path named name with the given references (base names),
// its NAR compressed with compression, signed by key (unsigned when nil).
func (u *upstreamCache) add(name string, refs []string, compression string, key *nixcache.SecretKey) path {
	u.t.Helper()
	nar := make([]byte, 64<<10)
	rand.Read(nar)
	var file []byte
	var ext string
	switch compression {
	case "none":
		file, ext = nar, ""
	case "xz":
		var b bytes.Buffer
		w, _ := xz.NewWriter(&b)
		w.Write(nar)
		w.Close()
		file, ext = b.Bytes(), ".xz"
	case "zstd":
		enc, _ := zstd.NewWriter(nil)
		file, ext = enc.EncodeAll(nar, nil), ".zst"
	}
	h := fmt.Sprintf("%032d", nextHash.Add(1))
	h = strings.NewReplacer("0", "a", "1", "b", "2", "c", "3", "d", "4", "f", "5", "g", "6", "h", "7", "i", "8", "j", "9", "k").Replace(h)
	p := path{hash: h, base: h + "-" + name, nar: nar}
	fileSum := sha256.Sum256(file)
	narSum := sha256.Sum256(nar)
	p.narURL = "nar/" + nixcache.Base32(fileSum[:]) + ".nar" + ext
	ni := fmt.Sprintf("StorePath: /nix/store/%s\nURL: %s\nCompression: %s\nFileHash: sha256:%s\nFileSize: %d\nNarHash: sha256:%s\nNarSize: %d\nReferences: %s\n",
		p.base, p.narURL, compression, nixcache.Base32(fileSum[:]), len(file), nixcache.Base32(narSum[:]), len(nar), strings.Join(refs, " "))
	if key != nil {
		parsed, err := nixcache.ParseNarInfo([]byte(ni))
		if err != nil {
			u.t.Fatal(err)
		}
		fp, err := parsed.Fingerprint("/nix/store")
		if err != nil {
			u.t.Fatal(err)
		}
		ni += "Sig: " + key.Sign(fp) + "\n"
	}
	os.WriteFile(filepath.Join(u.dir, p.narURL), file, 0o644)
	os.WriteFile(filepath.Join(u.dir, h+".narinfo"), []byte(ni), 0o644)
	return p
}

func newCache(t *testing.T) (*serve.Cache, string) {
	dir := filepath.Join(t.TempDir(), "cache")
	c, err := serve.New(serve.Config{Dir: dir, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	return c, dir
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

func newFetcher(t *testing.T, key nixcache.PublicKey, urls ...string) *Fetcher {
	f, err := New(Config{URLs: urls, Keys: []nixcache.PublicKey{key}, Timeout: 2 * time.Second, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// stored reports whether the cache directory holds p's narinfo and NAR.
func stored(dir string, p path) (narinfo, nar bool) {
	_, err1 := os.Stat(filepath.Join(dir, p.hash+".narinfo"))
	_, err2 := os.Stat(filepath.Join(dir, p.narURL))
	return err1 == nil, err2 == nil
}

// TestFetchesAClosure: a path and its references come from upstream, each
// with its NAR, for each compression, and keep the upstream's signature.
func TestFetchesAClosure(t *testing.T) {
	for _, compression := range []string{"none", "xz", "zstd"} {
		t.Run(compression, func(t *testing.T) {
			key := testKey(t, "upstream-1")
			up := newUpstreamCache(t)
			lib := up.add("lib", nil, compression, &key)
			data := up.add("data", []string{lib.base}, compression, &key)
			app := up.add("app", []string{lib.base, data.base}, compression, &key)
			c, dir := newCache(t)
			f := newFetcher(t, key.PublicKey(), up.srv.URL)
			if err := f.Fetch(context.Background(), app.hash, c); err != nil {
				t.Fatal(err)
			}
			for _, p := range []path{lib, data, app} {
				if ni, nar := stored(dir, p); !ni || !nar {
					t.Errorf("%s: narinfo stored %v, NAR stored %v", p.base, ni, nar)
				}
				got, _ := os.ReadFile(filepath.Join(dir, p.hash+".narinfo"))
				want, _ := os.ReadFile(filepath.Join(up.dir, p.hash+".narinfo"))
				if !bytes.Equal(got, want) {
					t.Errorf("%s: narinfo changed on the way:\n%s", p.base, got)
				}
			}
		})
	}
}

// TestRefusesWhatIsNotTrusted: an unsigned path, one signed by another key,
// one whose NAR was tampered with (with or without a matching FileHash),
// and one whose reference is refused leave nothing in the cache.
func TestRefusesWhatIsNotTrusted(t *testing.T) {
	key := testKey(t, "upstream-1")
	other := testKey(t, "other-1")
	for _, tt := range []struct {
		name   string
		setup  func(up *upstreamCache) (top path, all []path)
		absent bool // the error says not found (a 404 to a reader)
	}{
		{"unsigned", func(up *upstreamCache) (path, []path) {
			p := up.add("x", nil, "xz", nil)
			return p, []path{p}
		}, true},
		{"foreign-signed", func(up *upstreamCache) (path, []path) {
			p := up.add("x", nil, "xz", &other)
			return p, []path{p}
		}, true},
		{"tampered-nar", func(up *upstreamCache) (path, []path) {
			p := up.add("x", nil, "none", &key)
			os.WriteFile(filepath.Join(up.dir, p.narURL), bytes.Repeat([]byte{1}, len(p.nar)), 0o644)
			return p, []path{p}
		}, false},
		{"tampered-nar-and-filehash", func(up *upstreamCache) (path, []path) {
			p := up.add("x", nil, "none", &key)
			bad := bytes.Repeat([]byte{1}, len(p.nar))
			ni, _ := os.ReadFile(filepath.Join(up.dir, p.hash+".narinfo"))
			sum := sha256.Sum256(bad)
			oldHash := strings.TrimPrefix(strings.TrimSuffix(p.narURL, ".nar"), "nar/")
			// Compression none: FileHash is NarHash, which stays as signed.
			for _, field := range []string{"URL: nar/", "FileHash: sha256:"} {
				ni = bytes.Replace(ni, []byte(field+oldHash), []byte(field+nixcache.Base32(sum[:])), 1)
			}
			p.narURL = "nar/" + nixcache.Base32(sum[:]) + ".nar"
			os.WriteFile(filepath.Join(up.dir, p.narURL), bad, 0o644)
			os.WriteFile(filepath.Join(up.dir, p.hash+".narinfo"), ni, 0o644)
			return p, []path{p}
		}, false},
		{"truncated-xz", func(up *upstreamCache) (path, []path) {
			p := up.add("x", nil, "xz", &key)
			b, _ := os.ReadFile(filepath.Join(up.dir, p.narURL))
			os.WriteFile(filepath.Join(up.dir, p.narURL), b[:len(b)/2], 0o644)
			return p, []path{p}
		}, false},
		{"unsigned-reference", func(up *upstreamCache) (path, []path) {
			lib := up.add("lib", nil, "xz", nil)
			app := up.add("app", []string{lib.base}, "xz", &key)
			return app, []path{lib, app}
		}, true},
		{"missing-reference", func(up *upstreamCache) (path, []path) {
			lib := up.add("lib", nil, "xz", &key)
			os.Remove(filepath.Join(up.dir, lib.hash+".narinfo"))
			app := up.add("app", []string{lib.base}, "xz", &key)
			return app, []path{lib, app}
		}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			up := newUpstreamCache(t)
			top, all := tt.setup(up)
			c, dir := newCache(t)
			f := newFetcher(t, key.PublicKey(), up.srv.URL)
			err := f.Fetch(context.Background(), top.hash, c)
			if err == nil {
				t.Fatal("fetched")
			}
			if got := errors.Is(err, fs.ErrNotExist); got != tt.absent {
				t.Errorf("error %q: not found %v, want %v", err, got, tt.absent)
			}
			time.Sleep(50 * time.Millisecond) // an acknowledged NAR's rename
			for _, p := range all {
				if ni, nar := stored(dir, p); ni || nar {
					t.Errorf("%s: narinfo stored %v, NAR stored %v", p.base, ni, nar)
				}
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, ".tmp")); len(ents) > 0 {
				t.Errorf("left in .tmp: %v", ents)
			}
		})
	}
}

// TestUpstreamsInOrder: a path the first upstream lacks comes from the
// second; one that none has is a miss.
func TestUpstreamsInOrder(t *testing.T) {
	key := testKey(t, "upstream-1")
	first, second := newUpstreamCache(t), newUpstreamCache(t)
	p := second.add("x", nil, "zstd", &key)
	c, dir := newCache(t)
	f := newFetcher(t, key.PublicKey(), first.srv.URL, second.srv.URL+"/")
	if err := f.Fetch(context.Background(), p.hash, c); err != nil {
		t.Fatal(err)
	}
	if ni, nar := stored(dir, p); !ni || !nar {
		t.Errorf("narinfo stored %v, NAR stored %v", ni, nar)
	}
	if first.count("/"+p.hash+".narinfo") != 1 {
		t.Errorf("first upstream not asked first")
	}
	err := f.Fetch(context.Background(), strings.Repeat("a", 32), c)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a path no upstream has: %v", err)
	}
}

// TestMissesAreRemembered: a miss is asked upstream once within the
// negative TTL, and again after it.
func TestMissesAreRemembered(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	c, _ := newCache(t)
	f := newFetcher(t, key.PublicKey(), up.srv.URL)
	now := time.Now()
	f.now = func() time.Time { return now }
	h := strings.Repeat("b", 32)
	for range 5 {
		if err := f.Fetch(context.Background(), h, c); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("a miss: %v", err)
		}
	}
	if n := up.count("/" + h + ".narinfo"); n != 1 {
		t.Errorf("asked upstream %d times within the negative TTL, want 1", n)
	}
	now = now.Add(time.Minute)
	f.Fetch(context.Background(), h, c)
	if n := up.count("/" + h + ".narinfo"); n != 2 {
		t.Errorf("asked upstream %d times after the negative TTL, want 2", n)
	}
}

// TestConcurrentMissesShareAFetch: many readers missing one path cost one
// download.
func TestConcurrentMissesShareAFetch(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	app := up.add("app", []string{lib.base}, "xz", &key)
	c, _ := newCache(t)
	f := newFetcher(t, key.PublicKey(), up.srv.URL)
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f.Fetch(context.Background(), app.hash, c); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	for _, p := range []path{lib, app} {
		if n := up.count("/" + p.narURL); n != 1 {
			t.Errorf("%s: NAR downloaded %d times", p.base, n)
		}
	}
}

// TestDeadUpstreamFailsFast: an upstream that accepts connections and
// never answers costs the timeout, not minutes; a closed port less.
func TestDeadUpstreamFailsFast(t *testing.T) {
	key := testKey(t, "upstream-1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // held open, never answered
		}
	}()
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	closedAddr := closed.Addr().String()
	closed.Close()
	for _, tt := range []struct{ name, url string }{
		{"silent", "http://" + ln.Addr().String()},
		{"closed-port", "http://" + closedAddr},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := newCache(t)
			f := newFetcher(t, key.PublicKey(), tt.url)
			start := time.Now()
			err := f.Fetch(context.Background(), strings.Repeat("c", 32), c)
			if err == nil {
				t.Fatal("fetched from a dead upstream")
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %s", d)
			}
			// Other paths do not wait for it again.
			start = time.Now()
			if err := f.Fetch(context.Background(), strings.Repeat("d", 32), c); err == nil {
				t.Fatal("fetched from a dead upstream")
			}
			if d := time.Since(start); d > 100*time.Millisecond {
				t.Errorf("a second path took %s: the dead upstream was asked again", d)
			}
		})
	}
}

// TestServeFetchesOnAMiss: a narinfo that the cache lacks is fetched on
// either role, and answered, with its NAR, from the cache; a refused one
// is a 404.
func TestServeFetchesOnAMiss(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	app := up.add("app", []string{lib.base}, "xz", &key)
	unsigned := up.add("unsigned", nil, "xz", nil)
	f := newFetcher(t, key.PublicKey(), up.srv.URL)
	dir := filepath.Join(t.TempDir(), "cache")
	c, err := serve.New(serve.Config{Dir: dir, Upstream: f, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	for _, role := range []serve.Role{serve.Read, serve.Write} {
		t.Run(role.String(), func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := c.NewServer(role, quietLog())
			go srv.Serve(ln)
			defer srv.Shutdown(context.Background())
			base := "http://" + ln.Addr().String() + "/"
			get := func(rel string) (int, []byte) {
				resp, err := http.Get(base + rel)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, b
			}
			if code, _ := get(app.hash + ".narinfo"); code != 200 {
				t.Fatalf("narinfo of a path upstream has: %d", code)
			}
			for _, p := range []path{lib, app} {
				want, _ := os.ReadFile(filepath.Join(up.dir, p.narURL))
				if code, b := get(p.narURL); code != 200 || !bytes.Equal(b, want) {
					t.Errorf("NAR of %s: %d, %d bytes", p.base, code, len(b))
				}
			}
			if code, _ := get(unsigned.hash + ".narinfo"); code != 404 {
				t.Errorf("narinfo of an unsigned path: %d, want 404", code)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, unsigned.hash+".narinfo")); err == nil {
		t.Error("unsigned path stored")
	}
}

// TestKeepMarker: with a keep time, fetched paths are named by the keep
// marker until that long after their last read, across a restart; a path
// that a kept one references stays with it.
func TestKeepMarker(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	app := up.add("app", []string{lib.base}, "xz", &key)
	other := up.add("other", nil, "xz", &key)
	c, dir := newCache(t)
	now := time.Now()
	newF := func() *Fetcher {
		f, err := New(Config{URLs: []string{up.srv.URL}, Keys: []nixcache.PublicKey{key.PublicKey()}, Keep: time.Hour, CacheDir: dir, Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		f.now = func() time.Time { return now }
		return f
	}
	f := newF()
	for _, p := range []path{app, other} {
		if err := f.Fetch(context.Background(), p.hash, c); err != nil {
			t.Fatal(err)
		}
	}
	marker := func() []string {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, KeepMarker))
		if err != nil {
			t.Fatal(err)
		}
		roots, err := nixcache.ParseMarker(b, "/nix/store")
		if err != nil {
			t.Fatalf("keep marker does not parse: %v\n%s", err, b)
		}
		return roots
	}
	if got := marker(); len(got) != 3 {
		t.Fatalf("marker after a fetch: %v", got)
	}
	now = now.Add(50 * time.Minute)
	f.Used(app.narURL)
	f.Used("nar/" + strings.Repeat("a", 52) + ".nar") // not fetched: ignored
	now = now.Add(20 * time.Minute)
	f.keeper.flush(f.keeper.store(c))
	if got := marker(); len(got) != 2 || got[0] != lib.base || got[1] != app.base {
		t.Errorf("marker after app was read, and lib and other were not: %v, want lib (app references it) and app", got)
	}
	// A restarted serve takes up the marker.
	f = newF()
	now = now.Add(30 * time.Minute)
	f.keeper.flush(f.keeper.store(c))
	if got := marker(); len(got) != 2 {
		t.Errorf("marker after a restart, within the keep time: %v", got)
	}
	now = now.Add(time.Hour)
	f.keeper.flush(f.keeper.store(c))
	if got := marker(); len(got) != 0 {
		t.Errorf("marker past the keep time: %v", got)
	}
}

// TestNarStreamsWhileStored: the first client gets the narinfo once the
// closure's narinfos are checked, and the NAR as it downloads; a download
// that turns out wrong cuts the client off and leaves nothing.
func TestNarStreamsWhileStored(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	good := up.add("good", nil, "none", &key)
	bad := up.add("bad", nil, "none", &key)
	os.WriteFile(filepath.Join(up.dir, bad.narURL), bytes.Repeat([]byte{1}, len(bad.nar)), 0o644)
	release := make(chan struct{})
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
	defer slow.Close()
	f := newFetcher(t, key.PublicKey(), slow.URL)
	dir := filepath.Join(t.TempDir(), "cache")
	c, err := serve.New(serve.Config{Dir: dir, Upstream: f, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := c.NewServer(serve.Read, quietLog())
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	base := "http://" + ln.Addr().String() + "/"

	for _, tt := range []struct {
		name string
		p    path
		ok   bool
	}{{"good", good, true}, {"tampered", bad, false}} {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := http.Get(base + tt.p.hash + ".narinfo")
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("narinfo: %v %v", resp.Status, err)
			}
			resp.Body.Close()
			resp, err = http.Get(base + tt.p.narURL)
			if err != nil || resp.StatusCode != 200 {
				t.Fatalf("NAR: %v %v", resp.Status, err)
			}
			defer resp.Body.Close()
			half := make([]byte, len(tt.p.nar)/2)
			if _, err := io.ReadFull(resp.Body, half); err != nil {
				t.Fatalf("first half of the NAR before the download ended: %v", err)
			}
			release <- struct{}{}
			rest, err := io.ReadAll(resp.Body)
			got := append(half, rest...)
			if tt.ok {
				if err != nil || !bytes.Equal(got, tt.p.nar) {
					t.Errorf("streamed NAR: %d bytes, %v", len(got), err)
				}
				if _, err := os.Stat(filepath.Join(dir, tt.p.hash+".narinfo")); err != nil {
					// Stored just after the stream ends.
					time.Sleep(200 * time.Millisecond)
					if _, err := os.Stat(filepath.Join(dir, tt.p.hash+".narinfo")); err != nil {
						t.Errorf("not stored: %v", err)
					}
				}
				return
			}
			if err == nil {
				t.Errorf("a tampered NAR streamed whole, without an error")
			}
			time.Sleep(200 * time.Millisecond)
			if ni, nar := stored(dir, tt.p); ni || nar {
				t.Errorf("tampered path stored: narinfo %v, NAR %v", ni, nar)
			}
		})
	}
}
