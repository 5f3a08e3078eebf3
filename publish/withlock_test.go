package publish

import (
	"context"
	"errors"
	"fmt"
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
	"github.com/kiss-onion/kiss-onion/gateway"
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
	changed  chan struct{} // closed, and replaced, at every request
	marker   map[string]string
	// refuseRefresh, when set, answers the first refresh of a lock (the
	// second lock PUT) in the lock's stead.
	refuseRefresh http.HandlerFunc
}

func newFakeCache(t *testing.T) (*fakeCache, *httptest.Server) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644)
	fc := &fakeCache{t: t, dir: dir, locks: cachelock.New(dir), marker: map[string]string{}, changed: make(chan struct{})}
	srv := httptest.NewServer(fc)
	t.Cleanup(srv.Close)
	return fc, srv
}

func (fc *fakeCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	fc.mu.Lock()
	defer fc.mu.Unlock()
	fc.requests = append(fc.requests, r.Method+" "+r.URL.Path)
	close(fc.changed)
	fc.changed = make(chan struct{})
	body, _ := io.ReadAll(r.Body)
	rest, ok := strings.CutPrefix(r.URL.Path, "/gcroots/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	if name, ok := strings.CutPrefix(rest, ".lock/"); ok {
		switch r.Method {
		case http.MethodPut:
			if fc.refuseRefresh != nil && fc.lockRequestsLocked() == 2 {
				fc.refuseRefresh(w, r)
				return
			}
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

// lockRequestsLocked counts the lock PUTs received, answered or not: the
// lock, then its refreshes. fc.mu must be held.
func (fc *fakeCache) lockRequestsLocked() int {
	n := 0
	for _, r := range fc.requests {
		if strings.HasPrefix(r, "PUT /gcroots/.lock/") {
			n++
		}
	}
	return n
}

// waitLockRequests returns once the cache has answered n lock PUTs; it
// reports an error if that takes more than a minute, which only a hung
// refresh would.
func (fc *fakeCache) waitLockRequests(n int) error {
	for {
		fc.mu.Lock()
		got, changed := fc.lockRequestsLocked(), fc.changed
		fc.mu.Unlock()
		if got >= n {
			return nil
		}
		select {
		case <-changed:
		case <-time.After(time.Minute):
			return fmt.Errorf("the cache had %d lock requests after a minute, want %d", got, n)
		}
	}
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
		wantStatus int
		wantMarker bool
	}{
		{name: "success writes the marker", marker: "web1", command: []string{"true"}, wantMarker: true},
		{name: "nested marker names", marker: "hosts/web1", command: []string{"true"}, wantMarker: true},
		{name: "a failed command's status passes through", marker: "web1", command: []string{"sh", "-c", "exit 7"}, wantStatus: 7},
		{name: "a signal's status is 128+n", marker: "web1", command: []string{"sh", "-c", "kill -TERM $$"}, wantStatus: 143},
		{name: "a busy cache is waited for", marker: "web1", command: []string{"true"},
			setup: func(fc *fakeCache) { fc.busy = 1 }, wantMarker: true},
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
				Marker: m, StorePath: storePath, Command: tc.command,
				Stdout: io.Discard, Stderr: io.Discard, Log: quiet(),
			})
			if err != nil {
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

// TestWithLockRefreshRefused runs a command until the cache has been asked
// to refresh the lock once, and refuses that refresh: the cache's refusal
// means the lock is lost and the marker must not be written, but the
// gateway's own refusal (the onion out of reach for a moment) does not.
func TestWithLockRefreshRefused(t *testing.T) {
	for _, tc := range []struct {
		name       string
		refusal    http.HandlerFunc
		wantMarker bool
	}{
		{
			name: "a prune holding the cache means a lost lock",
			refusal: func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "a prune holds the cache", http.StatusServiceUnavailable)
			},
		},
		{
			name: "the cache's 421 means a lost lock",
			refusal: func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "no such lock", http.StatusMisdirectedRequest)
			},
		},
		{
			name: "the gateway's 421 is the onion out of reach, not a lost lock",
			refusal: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set(gateway.ErrorHeader, "unreachable")
				http.Error(w, "kiss-onion gateway: http://x.onion is unreachable: descriptor not found", http.StatusMisdirectedRequest)
			},
			wantMarker: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fc, srv := newFakeCache(t)
			fc.refuseRefresh = tc.refusal
			m, err := ParseMarkerURL(srv.URL+"/gcroots/web1", "")
			if err != nil {
				t.Fatal(err)
			}
			// The command (cat) runs until its input ends: once the cache
			// has had the lock and its first refresh.
			stdin, release := io.Pipe()
			waited := make(chan error, 1)
			go func() {
				waited <- fc.waitLockRequests(2)
				release.Close()
			}()
			status, err := WithLock(context.Background(), WithLockOptions{
				Marker: m, StorePath: storePath, Command: []string{"cat"}, Refresh: 10 * time.Millisecond,
				Stdin: stdin, Stdout: io.Discard, Stderr: io.Discard, Log: quiet(),
			})
			if err := <-waited; err != nil {
				t.Fatal(err)
			}
			if status != 0 {
				t.Errorf("status = %d, want the command's 0", status)
			}
			if tc.wantMarker {
				if err != nil {
					t.Errorf("error = %v, want none", err)
				}
			} else if !errors.Is(err, ErrLockLost) || !strings.Contains(err.Error(), "the marker web1 was not written") {
				t.Errorf("error = %v, want %v saying the marker web1 was not written", err, ErrLockLost)
			}
			fc.mu.Lock()
			got, written := fc.marker["web1"]
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
