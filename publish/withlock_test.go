package publish

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/sirupsen/logrus"
)

// fakeCache answers the lock and marker requests of a cache's write role,
// keeping locks with cachelock.Locks in a directory, as serve does.
type fakeCache struct {
	t     *testing.T
	dir   string
	locks *cachelock.Locks

	mu       sync.Mutex
	busy     int  // PUTs of a lock to answer 503 before taking it
	refuse   bool // answer 503 to every lock PUT from now on
	requests []string
	marker   map[string]string
}

func newFakeCache(t *testing.T) (*fakeCache, *httptest.Server) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644)
	fc := &fakeCache{t: t, dir: dir, locks: cachelock.New(dir), marker: map[string]string{}}
	srv := httptest.NewServer(fc)
	t.Cleanup(srv.Close)
	return fc, srv
}

func (fc *fakeCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	fc.requests = append(fc.requests, r.Method+" "+r.URL.Path)
	body, _ := io.ReadAll(r.Body)
	rest, ok := strings.CutPrefix(r.URL.Path, "/gcroots/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	if name, ok := strings.CutPrefix(rest, ".lock/"); ok {
		switch r.Method {
		case http.MethodPut:
			if fc.refuse || fc.busy > 0 {
				fc.busy--
				http.Error(w, "a prune holds the cache", http.StatusServiceUnavailable)
				return
			}
			if err := fc.locks.Acquire(name, body); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
		case http.MethodDelete:
			fc.locks.Release(name)
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if r.Method != http.MethodPut {
		http.Error(w, "bad method", http.StatusMethodNotAllowed)
		return
	}
	// A marker is written under a lock only.
	if ls, _ := fc.locks.List(); len(ls) == 0 {
		fc.t.Errorf("marker %s written without a lock", rest)
	}
	fc.marker[rest] = string(body)
	w.WriteHeader(http.StatusNoContent)
}

func (fc *fakeCache) lockCount() int {
	ls, _ := fc.locks.List()
	return len(ls)
}

func quiet() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

const storePath = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-system"

func TestWithLock(t *testing.T) {
	for _, tc := range []struct {
		name       string
		marker     string
		command    []string
		setup      func(fc *fakeCache)
		refresh    time.Duration
		wantStatus int
		wantErr    error // errors.Is
		wantMarker bool
	}{
		{name: "success writes the marker", marker: "web1", command: []string{"true"}, wantMarker: true},
		{name: "nested marker names", marker: "hosts/web1", command: []string{"true"}, wantMarker: true},
		{name: "a failed command's status passes through", marker: "web1", command: []string{"sh", "-c", "exit 7"}, wantStatus: 7},
		{name: "a signal's status is 128+n", marker: "web1", command: []string{"sh", "-c", "kill -TERM $$"}, wantStatus: 143},
		{name: "a busy cache is waited for", marker: "web1", command: []string{"true"},
			setup: func(fc *fakeCache) { fc.busy = 1 }, wantMarker: true},
		{name: "a lost lock writes no marker", marker: "web1", command: []string{"sleep", "0.5"}, refresh: 100 * time.Millisecond,
			setup: func(fc *fakeCache) {
				go func() {
					time.Sleep(150 * time.Millisecond)
					fc.mu.Lock()
					fc.refuse = true
					fc.mu.Unlock()
				}()
			}, wantErr: ErrLockLost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc, srv := newFakeCache(t)
			if tc.setup != nil {
				tc.setup(fc)
			}
			m, err := ParseMarkerURL(srv.URL+"/gcroots/"+tc.marker, "")
			if err != nil {
				t.Fatal(err)
			}
			status, err := WithLock(context.Background(), WithLockOptions{
				Marker: m, StorePath: storePath, Command: tc.command, Refresh: tc.refresh,
				Stdout: io.Discard, Stderr: io.Discard, Log: quiet(),
			})
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("error = %v, want %v", err, tc.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if status != tc.wantStatus {
				t.Errorf("status = %d, want %d", status, tc.wantStatus)
			}
			fc.mu.Lock()
			got, written := fc.marker[tc.marker]
			fc.mu.Unlock()
			if written != tc.wantMarker || written && got != storePath+"\n" {
				t.Errorf("marker written = %v (%q), want %v", written, got, tc.wantMarker)
			}
			if n := fc.lockCount(); n != 0 {
				t.Errorf("%d locks left behind", n)
			}
		})
	}
}

func TestWithLockGivesUpOnABusyCache(t *testing.T) {
	fc, srv := newFakeCache(t)
	fc.refuse = true
	m, _ := ParseMarkerURL(srv.URL+"/gcroots/web1", "")
	ran := filepath.Join(t.TempDir(), "ran")
	_, err := WithLock(context.Background(), WithLockOptions{
		Marker: m, StorePath: storePath, Command: []string{"touch", ran},
		LockWait: 1500 * time.Millisecond, Log: quiet(),
	})
	if !errors.Is(err, cachelock.ErrBusy) {
		t.Errorf("error = %v, want cachelock.ErrBusy", err)
	}
	if _, err := os.Stat(ran); err == nil {
		t.Error("the command ran without the lock")
	}
}

func TestWithLockThroughAProxy(t *testing.T) {
	fc, srv := newFakeCache(t)
	var proxied atomic.Int32
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A forward proxy gets absolute URLs: hand them to the cache.
		proxied.Add(1)
		fc.ServeHTTP(w, r)
	}))
	defer proxy.Close()
	// The cache's host is one only the proxy knows.
	m, err := ParseMarkerURL("http://cache.invalid/gcroots/web1", proxy.URL)
	if err != nil {
		t.Fatal(err)
	}
	srv.Close() // only the proxy reaches the cache
	status, err := WithLock(context.Background(), WithLockOptions{Marker: m, StorePath: storePath, Command: []string{"true"}, Log: quiet()})
	if err != nil || status != 0 {
		t.Fatalf("WithLock = %d, %v", status, err)
	}
	if proxied.Load() < 3 { // lock, final refresh, marker, unlock
		t.Errorf("%d requests went through the proxy, want all", proxied.Load())
	}
	if fc.marker["web1"] != storePath+"\n" {
		t.Errorf("marker = %q", fc.marker["web1"])
	}
}

func TestWithLockOnALocalCache(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "0123456789abcdfghijklmnpqrsvwxyz.narinfo"), []byte("x"), 0o644)
	m, err := ParseMarkerURL(filepath.Join(dir, "gcroots", "hosts", "web1"), "")
	if err != nil {
		t.Fatal(err)
	}
	lockSeen := filepath.Join(t.TempDir(), "locks")
	status, err := WithLock(context.Background(), WithLockOptions{
		Marker: m, StorePath: storePath, Log: quiet(),
		Command: []string{"sh", "-c", "ls " + filepath.Join(dir, "gcroots", ".lock") + " > " + lockSeen},
	})
	if err != nil || status != 0 {
		t.Fatalf("WithLock = %d, %v", status, err)
	}
	data, _ := os.ReadFile(filepath.Join(dir, "gcroots", "hosts", "web1"))
	if string(data) != storePath+"\n" {
		t.Errorf("marker = %q", data)
	}
	seen, _ := os.ReadFile(lockSeen)
	if !strings.HasPrefix(string(seen), "hosts:web1.") {
		t.Errorf("lock while the command ran: %q, want hosts:web1.<random>", seen)
	}
	if ls, _ := cachelock.New(dir).List(); len(ls) != 0 {
		t.Errorf("locks left: %v", ls)
	}
	// A path the cache lacks is not written.
	_, err = WithLock(context.Background(), WithLockOptions{
		Marker: m, StorePath: "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-x", Command: []string{"true"}, Log: quiet(),
	})
	if err == nil {
		t.Error("marker naming a missing path was written")
	}
}

func TestParseMarkerURL(t *testing.T) {
	cache := t.TempDir()
	os.WriteFile(filepath.Join(cache, "nix-cache-info"), nil, 0o644)
	for _, tc := range []struct {
		in, proxy string
		name      string // "" when refused
		where     string
	}{
		{in: "http://h.onion/gcroots/web1", name: "web1", where: "http://h.onion/gcroots/web1"},
		{in: "http://h/prefix/gcroots/a/b", name: "a/b", where: "http://h/prefix/gcroots/a/b"},
		{in: "https://h/gcroots/x", proxy: "socks5h://127.0.0.1:9050", name: "x", where: "https://h/gcroots/x"},
		{in: filepath.Join(cache, "gcroots/m"), name: "m", where: filepath.Join(cache, "gcroots/m")},
		{in: "http://h/web1"},
		{in: "http://h/gcroots/"},
		{in: "http://h/gcroots/.lock/x"},
		{in: "ftp://h/gcroots/x"},
		{in: "http://h/gcroots/x?y=1"},
		{in: "http://h/gcroots/x", proxy: "gopher://p"},
		{in: filepath.Join(t.TempDir(), "gcroots/m")}, // not a cache
		{in: filepath.Join(cache, "gcroots/m"), proxy: "http://p"},
	} {
		m, err := ParseMarkerURL(tc.in, tc.proxy)
		if tc.name == "" {
			if err == nil {
				t.Errorf("ParseMarkerURL(%q, %q) accepted it", tc.in, tc.proxy)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseMarkerURL(%q, %q): %v", tc.in, tc.proxy, err)
			continue
		}
		if m.Name != tc.name || m.String() != tc.where {
			t.Errorf("ParseMarkerURL(%q) = %q at %q, want %q at %q", tc.in, m.Name, m.String(), tc.name, tc.where)
		}
	}
}
