package serve

import (
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// heldSyncs replaces a cache's directory fsyncs: those of a held directory
// wait until release.
type heldSyncs struct {
	mu      sync.Mutex
	held    map[string]chan struct{}
	started map[string]int
}

func holdSyncs(c *Cache, dirs ...string) *heldSyncs {
	h := &heldSyncs{held: map[string]chan struct{}{}, started: map[string]int{}}
	for _, d := range dirs {
		h.held[filepath.Join(c.cfg.Dir, d)] = make(chan struct{})
	}
	c.durable.syncDir = func(dir string) error {
		h.mu.Lock()
		h.started[dir]++
		ch := h.held[dir]
		h.mu.Unlock()
		if ch != nil {
			<-ch
		}
		return nil
	}
	return h
}

func (h *heldSyncs) release() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for d, ch := range h.held {
		close(ch)
		delete(h.held, d)
	}
}

// request is one PUT of a durability scenario, on a connection of its own
// (a held connection must not hold the next request for another reason).
type request struct {
	path string
	body string
	held bool // must not be answered while the syncs are held
}

// getWaits GETs path from the read role, which must answer only after the
// syncs are released, with 200.
func getWaits(t *testing.T, tc *testCache, path string) chan int {
	t.Helper()
	done := make(chan int, 1)
	go func() {
		resp, err := http.Get(tc.read.URL + "/" + path)
		if err != nil {
			t.Errorf("GET %s: %v", path, err)
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	return done
}

func TestDurabilityOrder(t *testing.T) {
	narB := []byte("nar of " + hashB)
	narA := []byte("nar of " + hashA)
	urlB, urlA := narName(narB, ""), narName(narA, "")
	niB := narInfo(hashB, "dep", urlB)
	niA := narInfo(hashA, "app", urlA, hashB+"-dep")
	tests := []struct {
		name     string
		hold     []string // directories whose fsyncs wait
		requests []request
		// hidden are not visible while the syncs are held, and reads of
		// them wait; all requests answer 201 once released, and all the
		// files are there once durable.
		hidden []string
	}{
		{
			name: "NAR and narinfo answered before they are durable, narinfo visible after the NAR",
			hold: []string{"nar"},
			requests: []request{
				{path: urlB, body: string(narB)},
				{path: hashB + ".narinfo", body: niB},
			},
			hidden: []string{hashB + ".narinfo"},
		},
		{
			name: "narinfo visible after its reference's name is durable",
			hold: []string{"."},
			requests: []request{
				{path: urlB, body: string(narB)},
				{path: hashB + ".narinfo", body: niB},
				{path: urlA, body: string(narA)},
				{path: hashA + ".narinfo", body: niA},
			},
			hidden: []string{hashA + ".narinfo"},
		},
		{
			name: "marker waits for all that was acknowledged",
			hold: []string{"."},
			requests: []request{
				{path: urlB, body: string(narB)},
				{path: hashB + ".narinfo", body: niB},
				{path: "gcroots/web1", body: "/nix/store/" + hashB + "-dep\n", held: true},
			},
			hidden: []string{"gcroots/web1"},
		},
		{
			name: "marker waits for a NAR's name",
			hold: []string{"nar"},
			requests: []request{
				{path: urlB, body: string(narB)},
				{path: "gcroots/web1", body: "", held: true},
			},
			hidden: []string{"gcroots/web1"},
		},
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	put := func(tc *testCache, r request) (int, error) {
		req, _ := http.NewRequest("PUT", tc.write.URL+"/"+r.path, strings.NewReader(r.body))
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tc := newTestCache(t, nil)
			h := holdSyncs(tc.Cache, tt.hold...)
			var answered []chan int
			for _, r := range tt.requests {
				done := make(chan int, 1)
				answered = append(answered, done)
				go func() {
					code, err := put(tc, r)
					if err != nil {
						t.Errorf("PUT %s: %v", r.path, err)
					}
					done <- code
				}()
				if r.held {
					continue
				}
				select {
				case code := <-done:
					if code != 201 {
						t.Fatalf("PUT %s: %d", r.path, code)
					}
					done <- code
				case <-time.After(5 * time.Second):
					t.Fatalf("PUT %s not answered while the syncs are held", r.path)
				}
			}
			time.Sleep(100 * time.Millisecond)
			for i, r := range tt.requests {
				if r.held && len(answered[i]) > 0 {
					t.Errorf("PUT %s answered while the syncs are held", r.path)
				}
			}
			var reads []chan int
			for _, p := range tt.hidden {
				if _, err := os.Stat(filepath.Join(tc.dir, p)); err == nil {
					t.Errorf("%s visible while the syncs are held", p)
				}
				if !strings.HasPrefix(p, "gcroots/") {
					reads = append(reads, getWaits(t, tc, p))
				}
			}
			time.Sleep(100 * time.Millisecond)
			for i, done := range reads {
				if len(done) > 0 {
					code := <-done
					t.Errorf("GET %s answered %d while it is not visible", tt.hidden[i], code)
					done <- code
				}
			}
			h.release()
			for i, r := range tt.requests {
				select {
				case code := <-answered[i]:
					if code != 201 {
						t.Errorf("PUT %s: %d after the release", r.path, code)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("PUT %s not answered after the release", r.path)
				}
			}
			for i, done := range reads {
				select {
				case code := <-done:
					if code != 200 {
						t.Errorf("GET %s: %d after the release", tt.hidden[i], code)
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("GET %s not answered after the release", tt.hidden[i])
				}
			}
			tc.durable.barrier()
			for _, r := range tt.requests {
				if _, err := os.Stat(filepath.Join(tc.dir, r.path)); err != nil {
					t.Errorf("%s not there once durable: %v", r.path, err)
				}
			}
			tc.checkNothingLeaked(t)
		})
	}
}

// TestFailedNARCommit: a narinfo never becomes visible without its NAR.
// One that comes after the NAR failed is refused; one acknowledged before
// the failure stays invisible, and its readers get 404.
func TestFailedNARCommit(t *testing.T) {
	for _, after := range []bool{true, false} {
		name := map[bool]string{true: "narinfo after the failure", false: "narinfo before the failure"}[after]
		t.Run(name, func(t *testing.T) {
			tc := newTestCache(t, nil)
			narDir := filepath.Join(tc.dir, "nar")
			fail := make(chan struct{})
			tc.durable.syncDir = func(dir string) error {
				if dir == narDir {
					<-fail
					return errors.New("disk on fire")
				}
				return nil
			}
			content := []byte("nar of " + hashB)
			url := narName(content, "")
			if resp, body := do(t, tc.write, "PUT", "/"+url, content); resp.StatusCode != 201 {
				t.Fatalf("PUT NAR: %d %s", resp.StatusCode, body)
			}
			if after {
				close(fail)
				tc.durable.barrier()
			}
			resp, body := do(t, tc.write, "PUT", "/"+hashB+".narinfo", []byte(narInfo(hashB, "dep", url)))
			switch {
			case after && (resp.StatusCode != 409 || !strings.Contains(body, "disk on fire")):
				t.Errorf("narinfo of a NAR that failed to be stored: %d %s", resp.StatusCode, body)
			case !after && resp.StatusCode != 201:
				t.Errorf("narinfo of a NAR not yet durable: %d %s", resp.StatusCode, body)
			}
			if !after {
				close(fail)
			}
			if resp, _ := do(t, tc.read, "GET", "/"+hashB+".narinfo", nil); resp.StatusCode != 404 {
				t.Errorf("GET of a narinfo whose NAR failed: %d", resp.StatusCode)
			}
			tc.durable.barrier()
			if _, err := os.Stat(filepath.Join(tc.dir, hashB+".narinfo")); err == nil {
				t.Error("narinfo visible although its NAR failed")
			}
			tc.checkNothingLeaked(t)
		})
	}
}

func TestDirSyncGroupCommit(t *testing.T) {
	for _, tt := range []struct {
		name    string
		callers int
		fail    bool
	}{
		{"one caller", 1, false},
		{"callers during a sync share the next one", 8, false},
		{"a failed sync fails the callers it covered", 8, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := newDurability()
			var syncs atomic.Int32
			first := make(chan struct{})
			release := make(chan struct{})
			d.syncDir = func(string) error {
				if syncs.Add(1) == 1 {
					close(first)
					<-release
					if tt.fail {
						return errors.New("EIO")
					}
				}
				return nil
			}
			errs := make(chan error, tt.callers)
			go func() { errs <- d.sync("dir") }()
			<-first
			// These arrive while the first sync runs: it may have missed
			// their renames, so they need one more, which they share.
			for i := 1; i < tt.callers; i++ {
				go func() { errs <- d.sync("dir") }()
			}
			time.Sleep(50 * time.Millisecond)
			close(release)
			failed := 0
			for i := 0; i < tt.callers; i++ {
				if err := <-errs; err != nil {
					failed++
				}
			}
			want := int32(1)
			if tt.callers > 1 {
				want = 2
			}
			if got := syncs.Load(); got != want {
				t.Errorf("%d syncs for %d callers, want %d", got, tt.callers, want)
			}
			if wantFailed := map[bool]int{false: 0, true: 1}[tt.fail]; failed != wantFailed {
				t.Errorf("%d callers failed, want %d", failed, wantFailed)
			}
			if err := d.sync("dir"); err != nil {
				t.Errorf("a later sync: %v", err)
			}
		})
	}
}

var errEIO = errors.New("EIO")

func TestDurabilityWait(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "old.narinfo"), []byte("x"), 0o644)
	os.Mkdir(filepath.Join(dir, "adir"), 0o755)
	d := newDurability()
	os.WriteFile(filepath.Join(dir, "visible-bad"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(dir, "pending-ok"), []byte("x"), 0o644)
	ok := d.begin("pending-ok")
	bad := d.begin("pending-bad")
	visibleBad := d.begin("visible-bad")
	go func() {
		time.Sleep(20 * time.Millisecond)
		ok.end(nil, "")
		bad.end(errors.New("EIO"), "")
		visibleBad.end(errors.New("EIO"), filepath.Join(dir, "visible-bad"))
	}()
	d.barrier()
	for _, tt := range []struct {
		rel     string
		wantErr error
	}{
		{"old.narinfo", nil},
		{"missing.narinfo", fs.ErrNotExist},
		{"adir", fs.ErrNotExist},
		{"pending-ok", nil},
		{"pending-bad", errEIO},
		{"visible-bad", errEIO},
	} {
		err := d.wait(dir, tt.rel)
		if (err == nil) != (tt.wantErr == nil) || (err != nil && !errors.Is(err, tt.wantErr) && !strings.Contains(err.Error(), tt.wantErr.Error())) {
			t.Errorf("wait(%s) = %v, want %v", tt.rel, err, tt.wantErr)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "visible-bad")); err == nil {
		t.Error("a file whose commit failed is still visible")
	}
	// A file found on disk counts once its directory was fsynced, once.
	var syncs []string
	d.syncDir = func(dir string) error { syncs = append(syncs, dir); return nil }
	d.settled = map[string]bool{}
	d.wait(dir, "old.narinfo")
	d.wait(dir, "pending-ok")
	if len(syncs) != 1 || syncs[0] != dir {
		t.Errorf("directory fsyncs for files found on disk: %v, want one of %s", syncs, dir)
	}
	// A new upload of the name replaces the failure.
	again := d.begin("pending-bad")
	os.WriteFile(filepath.Join(dir, "pending-bad"), []byte("x"), 0o644)
	again.end(nil, "")
	if err := d.wait(dir, "pending-bad"); err != nil {
		t.Errorf("wait after a new upload: %v", err)
	}
}

// TestCircularReuploads: narinfos that name each other (which Nix never
// uploads, but a writer may) become visible once the syncs go on, instead
// of each waiting for the other for good: a narinfo waits only for what
// was there when it came.
func TestCircularReuploads(t *testing.T) {
	tc := newTestCache(t, nil)
	urlB := tc.upload(t, hashB, "dep")
	urlA := tc.upload(t, hashA, "app", hashB+"-dep")
	h := holdSyncs(tc.Cache, ".")
	for _, r := range []struct{ hash, name, url, ref string }{
		{hashB, "dep", urlB, hashA + "-app"},
		{hashA, "app", urlA, hashB + "-dep"},
	} {
		if resp, body := do(t, tc.write, "PUT", "/"+r.hash+".narinfo", []byte(narInfo(r.hash, r.name, r.url, r.ref))); resp.StatusCode != 201 {
			t.Fatalf("PUT %s.narinfo naming %s: %d %s", r.hash, r.ref, resp.StatusCode, body)
		}
	}
	h.release()
	done := make(chan struct{})
	go func() {
		tc.durable.barrier()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the re-uploads still pending 5 s after the syncs went on")
	}
	for _, p := range []struct{ hash, ref string }{{hashB, hashA}, {hashA, hashB}} {
		b, err := os.ReadFile(filepath.Join(tc.dir, p.hash+".narinfo"))
		if err != nil || !strings.Contains(string(b), "References: "+p.ref) {
			t.Errorf("%s.narinfo after the re-upload: %v %q", p.hash, err, b)
		}
	}
}
