package serve

import (
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// hashD is a store path hash no test uploads.
const hashD = "3d4vj1nxdlnyb7cwq4g7k0rffwc6z8yr"

// TestBucketForget forgets paths through the write role of one of two
// front ends over one bucket on a real SeaweedFS: the answers are the
// directory's, and neither front end serves a forgotten path afterward.
func TestBucketForget(t *testing.T) {
	srv := s3test.Start(t)
	for _, tt := range []struct {
		name string
		fn   func(t *testing.T, a, b *bucketCache)
	}{
		{"RefusedThenForgotten", testBucketForgetRefusedThenForgotten},
		{"WithReferrers", testBucketForgetWithReferrers},
	} {
		t.Run(tt.name, func(t *testing.T) {
			prefix := "f" + strconv.Itoa(rand.IntN(1e9))
			a := newBucketCache(t, srv, prefix)
			b := newBucketCache(t, srv, prefix)
			// The forget's hold waits a fraction of a second for uploads
			// rather than ten seconds.
			a.locks.SetGuardWindow(200 * time.Millisecond)
			b.locks.SetGuardWindow(200 * time.Millisecond)
			tt.fn(t, a, b)
		})
	}
}

// narOf is the URL of the NAR bucketCache.upload puts for hash.
func narOf(hash string) string { return narName([]byte("nar of "+hash), "") }

// servedBy returns the status of a GET of path through each role of
// each front end.
func servedBy(t *testing.T, path string, fronts ...*bucketCache) []int {
	t.Helper()
	var out []int
	for _, f := range fronts {
		for _, srv := range []*testServer{f.read, f.write} {
			resp, _ := do(t, srv, "GET", path, nil)
			out = append(out, resp.StatusCode)
		}
	}
	return out
}

func testBucketForgetRefusedThenForgotten(t *testing.T, a, b *bucketCache) {
	a.upload(t, hashB, "lib")
	a.upload(t, hashA, "app", hashB+"-lib")
	a.put(t, "/gcroots/web", []byte("/nix/store/"+hashA+"-app\n"), 201)
	// Both front ends hold the narinfos in memory.
	for _, h := range []string{hashA, hashB} {
		for i, code := range servedBy(t, "/"+h+".narinfo", a, b) {
			if code != 200 {
				t.Fatalf("GET %s.narinfo through role %d before the forget: %d", h, i, code)
			}
		}
	}
	// NARs modified since a forget began stay: these are older.
	time.Sleep(3 * time.Second)

	for _, q := range []string{"?dry-run=1", "?with-referrers=2"} {
		if resp, body := do(t, a.write, "DELETE", "/"+hashB+".narinfo"+q, nil); resp.StatusCode != 400 || !strings.Contains(body, hashB+".narinfo: ") {
			t.Errorf("DELETE %s: %d %q, want 400 naming the narinfo", q, resp.StatusCode, body)
		}
	}
	if resp, body := do(t, a.write, "DELETE", "/"+hashD+".narinfo", nil); resp.StatusCode != 404 {
		t.Errorf("DELETE of a path not in the cache: %d %q, want 404", resp.StatusCode, body)
	}
	resp, body := do(t, a.write, "DELETE", "/"+hashB+".narinfo", nil)
	if resp.StatusCode != 409 {
		t.Fatalf("DELETE of a referenced path: %d %q, want 409", resp.StatusCode, body)
	}
	for _, l := range []string{"referrer /nix/store/" + hashA + "-app", "marker gcroots/web names /nix/store/" + hashA + "-app"} {
		if !strings.Contains(body, "\n"+l) {
			t.Errorf("the 409 does not list %q: %q", l, body)
		}
	}
	for _, name := range []string{hashA + ".narinfo", hashB + ".narinfo", narOf(hashA), narOf(hashB)} {
		if !a.exists(t, name) {
			t.Fatalf("a refused DELETE removed %s", name)
		}
	}

	resp, body = do(t, a.write, "DELETE", "/"+hashA+".narinfo", nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(body, "forgot /nix/store/"+hashA+"-app: 2 files, ") ||
		!strings.Contains(body, "\nmarker gcroots/web names /nix/store/"+hashA+"-app, which is gone") {
		t.Fatalf("DELETE of the referrer: %d %q", resp.StatusCode, body)
	}
	// The answer waited the settle time: no front end serves it.
	for _, path := range []string{"/" + hashA + ".narinfo", "/" + narOf(hashA)} {
		for i, code := range servedBy(t, path, a, b) {
			if code != 404 {
				t.Errorf("GET %s through role %d after the forget: %d, want 404", path, i, code)
			}
		}
	}
	for _, path := range []string{"/" + hashB + ".narinfo", "/" + narOf(hashB)} {
		for i, code := range servedBy(t, path, a, b) {
			if code != 200 {
				t.Errorf("GET %s (it stays) through role %d: %d, want 200", path, i, code)
			}
		}
	}
	if resp, _ := do(t, b.write, "DELETE", "/"+hashA+".narinfo", nil); resp.StatusCode != 404 {
		t.Errorf("DELETE again through the other front end: %d, want 404", resp.StatusCode)
	}
}

func testBucketForgetWithReferrers(t *testing.T, a, b *bucketCache) {
	a.upload(t, hashB, "lib")
	a.upload(t, hashA, "app", hashB+"-lib")
	a.upload(t, hashC, "other")
	time.Sleep(3 * time.Second)
	resp, body := do(t, b.write, "DELETE", "/"+hashB+".narinfo?with-referrers=1", nil)
	if resp.StatusCode != 200 || !strings.HasPrefix(body, "forgot /nix/store/"+hashB+"-lib and 1 referrers: 4 files, ") ||
		!strings.Contains(body, "\nreferrer /nix/store/"+hashA+"-app") {
		t.Fatalf("DELETE with referrers: %d %q", resp.StatusCode, body)
	}
	for _, h := range []string{hashA, hashB} {
		for _, path := range []string{"/" + h + ".narinfo", "/" + narOf(h)} {
			for i, code := range servedBy(t, path, a, b) {
				if code != 404 {
					t.Errorf("GET %s through role %d after the forget: %d, want 404", path, i, code)
				}
			}
		}
	}
	if resp, got := do(t, a.read, "GET", "/"+narOf(hashC), nil); resp.StatusCode != 200 || got != "nar of "+hashC {
		t.Errorf("GET of a NAR that stays: %d %q", resp.StatusCode, got)
	}
}
