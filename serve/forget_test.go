package serve

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const hashC = "2c7f3ndpkmgz1mbp94wkh6hqdk2s4s0r"

func TestDeleteNarInfo(t *testing.T) {
	tc := newTestCache(t, nil)
	urlB := tc.upload(t, hashB, "lib")
	urlA := tc.upload(t, hashA, "app", hashB+"-lib")
	marker := "/nix/store/" + hashA + "-app\n"
	if resp, body := do(t, tc.write, "PUT", "/gcroots/web1", []byte(marker)); resp.StatusCode != 201 {
		t.Fatalf("PUT marker: %d %s", resp.StatusCode, body)
	}
	// Both roles have the narinfos in memory now.
	for _, srv := range []*testServer{tc.read, tc.write} {
		for _, h := range []string{hashA, hashB} {
			if resp, _ := do(t, srv, "GET", "/"+h+".narinfo", nil); resp.StatusCode != 200 {
				t.Fatalf("GET %s.narinfo: %d", h, resp.StatusCode)
			}
		}
	}

	for _, tt := range []struct {
		name     string
		srv      *testServer
		path     string
		want     int
		wantBody []string
	}{
		{"a referenced path is refused, naming referrers and markers", tc.write, "/" + hashB + ".narinfo", 409,
			[]string{"referrer /nix/store/" + hashA + "-app", "marker gcroots/web1 names /nix/store/" + hashA + "-app"}},
		{"the read role takes no DELETE", tc.read, "/" + hashA + ".narinfo", 405, nil},
		{"a name that is no hash", tc.write, "/not-a-hash.narinfo", 400, nil},
		{"a path not in the cache", tc.write, "/" + hashC + ".narinfo", 404, nil},
		{"a listing is not deleted on its own", tc.write, "/" + hashA + ".ls", 405, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := do(t, tt.srv, "DELETE", tt.path, nil)
			if resp.StatusCode != tt.want {
				t.Fatalf("DELETE %s: %d %q, want %d", tt.path, resp.StatusCode, body, tt.want)
			}
			for _, l := range tt.wantBody {
				if !strings.Contains(body, l+"\n") {
					t.Errorf("answer does not say %q:\n%s", l, body)
				}
			}
			if resp.StatusCode == 405 && !strings.Contains(resp.Header.Get("Allow"), "GET") {
				t.Errorf("405 with Allow %q", resp.Header.Get("Allow"))
			}
		})
	}
	for _, p := range []string{hashA + ".narinfo", hashB + ".narinfo", urlA, urlB} {
		if _, err := os.Stat(filepath.Join(tc.dir, p)); err != nil {
			t.Fatalf("a refused DELETE removed %s", p)
		}
	}

	// A forget keeps a NAR written moments before it began (an upload may
	// be about to name it): these were uploaded long ago.
	old := time.Now().Add(-time.Hour)
	for _, u := range []string{urlA, urlB} {
		if err := os.Chtimes(filepath.Join(tc.dir, u), old, old); err != nil {
			t.Fatal(err)
		}
	}
	// The referrer goes, then what it referred to: nothing of either is
	// served afterwards, from memory or from disk, on either role.
	for _, h := range []string{hashA, hashB} {
		resp, body := do(t, tc.write, "DELETE", "/"+h+".narinfo", nil)
		if resp.StatusCode != 200 || !strings.Contains(body, "forgot /nix/store/"+h) {
			t.Fatalf("DELETE %s.narinfo: %d %q", h, resp.StatusCode, body)
		}
		for _, srv := range []*testServer{tc.read, tc.write} {
			for _, method := range []string{"GET", "HEAD"} {
				if resp, _ := do(t, srv, method, "/"+h+".narinfo", nil); resp.StatusCode != 404 {
					t.Errorf("%s %s.narinfo right after its DELETE: %d", method, h, resp.StatusCode)
				}
			}
		}
	}
	for _, u := range []string{urlA, urlB} {
		if resp, _ := do(t, tc.read, "GET", "/"+u, nil); resp.StatusCode != 404 {
			t.Errorf("GET %s after the DELETE: %d", u, resp.StatusCode)
		}
	}
	if resp, body := do(t, tc.write, "DELETE", "/"+hashA+".narinfo", nil); resp.StatusCode != 404 {
		t.Errorf("a second DELETE: %d %q, want 404", resp.StatusCode, body)
	}
	// The path may come again.
	tc.upload(t, hashB, "lib")
	if resp, _ := do(t, tc.read, "GET", "/"+hashB+".narinfo", nil); resp.StatusCode != 200 {
		t.Errorf("GET of a path uploaded again: %d", resp.StatusCode)
	}
}

func TestDeleteNarInfoWaitsForLocks(t *testing.T) {
	old := forgetLockWait
	forgetLockWait = 200 * time.Millisecond
	defer func() { forgetLockWait = old }()
	tc := newTestCache(t, nil)
	tc.upload(t, hashA, "app")
	if resp, body := do(t, tc.write, "PUT", "/gcroots/.lock/ci", []byte("job 7")); resp.StatusCode != 201 {
		t.Fatalf("PUT lock: %d %s", resp.StatusCode, body)
	}
	resp, body := do(t, tc.write, "DELETE", "/"+hashA+".narinfo", nil)
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || !strings.Contains(body, "ci") {
		t.Fatalf("DELETE beside a held lock: %d %q (Retry-After %q), want 503 naming the lock", resp.StatusCode, body, resp.Header.Get("Retry-After"))
	}
	do(t, tc.write, "DELETE", "/gcroots/.lock/ci", nil)
	if resp, body := do(t, tc.write, "DELETE", "/"+hashA+".narinfo", nil); resp.StatusCode != 200 {
		t.Fatalf("DELETE once the lock is gone: %d %q", resp.StatusCode, body)
	}
}

// TestDeleteRacesReadsAndUploads deletes narinfos while readers hammer
// them (the memory cache must not bring one back) and while a referrer
// is uploaded: either the referrer is refused or the DELETE is, never
// both accepted.
func TestDeleteRacesReadsAndUploads(t *testing.T) {
	tc := newTestCache(t, nil)
	rounds := 6
	if testing.Short() {
		rounds = 2
	}
	var both, refusedUpload, refusedDelete atomic.Int64
	for i := 0; i < rounds; i++ {
		urlB := tc.upload(t, hashB, "lib")
		stop := make(chan struct{})
		var readers sync.WaitGroup
		for _, srv := range []*testServer{tc.read, tc.write} {
			readers.Add(1)
			go func(srv *testServer) {
				defer readers.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					do(t, srv, "GET", "/"+hashB+".narinfo", nil)
				}
			}(srv)
		}
		// The referrer's NAR first, then its narinfo beside the DELETE.
		content := []byte("nar of " + hashA)
		url := narName(content, "")
		if resp, body := do(t, tc.write, "PUT", "/"+url, content); resp.StatusCode != 201 {
			t.Fatalf("PUT %s: %d %s", url, resp.StatusCode, body)
		}
		var put, del int
		var wg sync.WaitGroup
		wg.Add(2)
		go func() {
			defer wg.Done()
			resp, _ := do(t, tc.write, "PUT", "/"+hashA+".narinfo", []byte(narInfo(hashA, "app", url, hashB+"-lib")))
			put = resp.StatusCode
		}()
		go func() {
			defer wg.Done()
			resp, _ := do(t, tc.write, "DELETE", "/"+hashB+".narinfo", nil)
			del = resp.StatusCode
			if del == 200 {
				for _, srv := range []*testServer{tc.read, tc.write} {
					if resp, _ := do(t, srv, "GET", "/"+hashB+".narinfo", nil); resp.StatusCode != 404 {
						t.Errorf("round %d: GET right after the DELETE: %d", i, resp.StatusCode)
					}
				}
			}
		}()
		wg.Wait()
		close(stop)
		readers.Wait()
		tc.durable.barrier()
		switch {
		case put == 201 && del == 409:
			refusedDelete.Add(1)
		case put == 409 && del == 200:
			refusedUpload.Add(1)
		default:
			both.Add(1)
			t.Errorf("round %d: upload of a referrer %d, DELETE of what it refers to %d", i, put, del)
		}
		_, errA := os.Stat(filepath.Join(tc.dir, hashA+".narinfo"))
		_, errB := os.Stat(filepath.Join(tc.dir, hashB+".narinfo"))
		if errA == nil && errB != nil {
			t.Fatalf("round %d: the referrer is there without what it refers to", i)
		}
		if _, err := os.Stat(filepath.Join(tc.dir, urlB)); errB == nil && err != nil {
			t.Fatalf("round %d: a narinfo without its NAR", i)
		}
		// Clean up for the next round.
		if errA == nil {
			do(t, tc.write, "DELETE", "/"+hashA+".narinfo", nil)
		}
		if _, err := os.Stat(filepath.Join(tc.dir, hashB+".narinfo")); err == nil {
			do(t, tc.write, "DELETE", "/"+hashB+".narinfo", nil)
		}
	}
	t.Logf("%d rounds: the upload refused %d times, the DELETE %d times", rounds, refusedUpload.Load(), refusedDelete.Load())
}
