package serve

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestForgetQuery(t *testing.T) {
	for _, tt := range []struct {
		raw     string
		want    bool
		wantErr string
	}{
		{"", false, ""},
		{"with-referrers=1", true, ""},
		{"with-referrers=true", true, ""},
		{"with-referrers=0", false, ""},
		{"with-referrers=false", false, ""},
		{"with-referrers=yes", false, `with-referrers="yes": want 1 or 0`},
		{"with-referrers", false, `with-referrers="": want 1 or 0`},
		{"with-referrers=1&with-referrers=1", false, "given 2 times"},
		{"dry-run=1", false, `unknown query parameter "dry-run"`},
		{"with-referrers=1&force=1", false, `unknown query parameter "force"`},
		{"with-referrers=%zz", false, "malformed query"},
	} {
		t.Run(tt.raw, func(t *testing.T) {
			got, err := forgetQuery(tt.raw)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("forgetQuery(%q) = %v, %v; want an error saying %q", tt.raw, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("forgetQuery(%q) = %v, %v; want %v", tt.raw, got, err, tt.want)
			}
		})
	}
}

// TestDeleteNarInfoWithReferrers: DELETE with ?with-referrers=1 forgets a
// referenced path and what refers to it, naming the referrers and the
// markers left naming a forgotten path; a query the write role does not
// know is refused with 400 and changes nothing.
func TestDeleteNarInfoWithReferrers(t *testing.T) {
	tc := newTestCache(t, nil)
	urlB := tc.upload(t, hashB, "lib")
	urlA := tc.upload(t, hashA, "app", hashB+"-lib")
	urlC := tc.upload(t, hashC, "other")
	if resp, body := do(t, tc.write, "PUT", "/gcroots/web1", []byte("/nix/store/"+hashA+"-app\n")); resp.StatusCode != 201 {
		t.Fatalf("PUT marker: %d %s", resp.StatusCode, body)
	}
	old := time.Now().Add(-time.Hour)
	for _, u := range []string{urlA, urlB, urlC} {
		os.Chtimes(filepath.Join(tc.dir, u), old, old)
	}
	for _, q := range []string{"?dry-run=1", "?with-referrers=2", "?with-referrers=1&x=1"} {
		if resp, body := do(t, tc.write, "DELETE", "/"+hashB+".narinfo"+q, nil); resp.StatusCode != 400 || !strings.Contains(body, hashB+".narinfo: ") {
			t.Errorf("DELETE %s: %d %q, want 400 naming the narinfo", q, resp.StatusCode, body)
		}
	}
	if resp, body := do(t, tc.write, "DELETE", "/"+hashB+".narinfo?with-referrers=0", nil); resp.StatusCode != 409 {
		t.Errorf("DELETE with-referrers=0 of a referenced path: %d %q, want 409", resp.StatusCode, body)
	}
	for _, p := range []string{hashA + ".narinfo", hashB + ".narinfo", urlA, urlB} {
		if _, err := os.Stat(filepath.Join(tc.dir, p)); err != nil {
			t.Fatalf("a refused DELETE removed %s", p)
		}
	}

	resp, body := do(t, tc.write, "DELETE", "/"+hashB+".narinfo?with-referrers=1", nil)
	if resp.StatusCode != 200 {
		t.Fatalf("DELETE with referrers: %d %q", resp.StatusCode, body)
	}
	for _, l := range []string{
		"forgot /nix/store/" + hashB + "-lib and 1 referrers: ",
		"referrer /nix/store/" + hashA + "-app",
		"marker gcroots/web1 names /nix/store/" + hashA + "-app, which is gone",
	} {
		if !strings.Contains(body, l) {
			t.Errorf("the answer does not say %q:\n%s", l, body)
		}
	}
	for _, h := range []string{hashA, hashB} {
		for _, srv := range []*testServer{tc.read, tc.write} {
			if resp, _ := do(t, srv, "GET", "/"+h+".narinfo", nil); resp.StatusCode != 404 {
				t.Errorf("GET %s.narinfo after the DELETE: %d", h, resp.StatusCode)
			}
		}
	}
	for _, u := range []string{urlA, urlB} {
		if _, err := os.Stat(filepath.Join(tc.dir, u)); err == nil {
			t.Errorf("%s left", u)
		}
	}
	if resp, _ := do(t, tc.read, "GET", "/"+hashC+".narinfo", nil); resp.StatusCode != 200 {
		t.Errorf("GET of an unrelated path: %d", resp.StatusCode)
	}
}
