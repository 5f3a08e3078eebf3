package serve

import (
	"net/http"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/internal/closure"
)

func TestClosureQuery(t *testing.T) {
	tc := newTestCache(t, nil)
	hash := func(c byte) string { return strings.Repeat(string(c), 32) }
	// d <- b <- a -> c -> d, and f on its own.
	tc.upload(t, hash('d'), "d")
	tc.upload(t, hash('b'), "b", hash('d')+"-d")
	tc.upload(t, hash('c'), "c", hash('d')+"-d")
	tc.upload(t, hash('a'), "a", hash('b')+"-b", hash('c')+"-c", hash('a')+"-a")
	tc.upload(t, hash('f'), "e")
	gone := hash('g')

	for _, step := range []struct {
		name  string
		roots []string
		want  []string // hashes found, in order
		miss  []string
	}{
		{"a leaf", []string{hash('d')}, []string{hash('d')}, nil},
		{"a whole closure, breadth first, self-reference once", []string{hash('a')}, []string{hash('a'), hash('b'), hash('c'), hash('d')}, nil},
		{"two roots sharing paths", []string{hash('b'), hash('f'), hash('c')}, []string{hash('b'), hash('f'), hash('c'), hash('d')}, nil},
		{"a root the cache lacks", []string{gone, hash('f')}, []string{hash('f')}, []string{gone}},
	} {
		for _, srv := range []*testServer{tc.read, tc.write} {
			resp, body := do(t, srv, "GET", closure.Query(step.roots), nil)
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != closure.ContentType {
				t.Fatalf("%s: %d %s %q", step.name, resp.StatusCode, resp.Header.Get("Content-Type"), body)
			}
			a, err := closure.Parse(strings.NewReader(body), 1<<20)
			if err != nil {
				t.Fatalf("%s: %v", step.name, err)
			}
			if !a.Complete {
				t.Errorf("%s: truncated", step.name)
			}
			var found, missing []string
			for _, r := range a.Records {
				switch r.Status {
				case closure.Found:
					found = append(found, r.Hash)
					// Byte for byte what a GET of the narinfo answers.
					if _, got := do(t, srv, "GET", "/"+r.Hash+".narinfo", nil); got != string(r.NarInfo) {
						t.Errorf("%s: the answer's narinfo of %s differs from a GET's:\n%s\n%s", step.name, r.Hash, r.NarInfo, got)
					}
				case closure.Missing:
					missing = append(missing, r.Hash)
				default:
					t.Errorf("%s: %s unknown", step.name, r.Hash)
				}
			}
			if strings.Join(found, ",") != strings.Join(step.want, ",") || strings.Join(missing, ",") != strings.Join(step.miss, ",") {
				t.Errorf("%s: found %v missing %v, want %v and %v", step.name, found, missing, step.want, step.miss)
			}
		}
	}

	for _, bad := range []struct {
		srv    *testServer
		method string
		path   string
		want   int
	}{
		{tc.read, "GET", closure.PathPrefix + "not-a-hash", http.StatusBadRequest},
		{tc.read, "GET", closure.PathPrefix + strings.TrimSuffix(strings.Repeat(hash('a')+",", closure.MaxRoots+1), ","), http.StatusBadRequest},
		{tc.read, "GET", "/kiss-onion/other", http.StatusNotFound},
		{tc.write, "PUT", closure.Query([]string{hash('a')}), http.StatusMethodNotAllowed},
		{tc.write, "DELETE", closure.Query([]string{hash('a')}), http.StatusMethodNotAllowed},
		{tc.read, "PUT", closure.Query([]string{hash('a')}), http.StatusMethodNotAllowed},
	} {
		var body []byte
		if bad.method == "PUT" {
			body = []byte("x")
		}
		if resp, got := do(t, bad.srv, bad.method, bad.path, body); resp.StatusCode != bad.want {
			t.Errorf("%s %.60s: %d %q, want %d", bad.method, bad.path, resp.StatusCode, got, bad.want)
		}
	}
	if resp, body := do(t, tc.read, "HEAD", closure.Query([]string{hash('a')}), nil); resp.StatusCode != 200 || body != "" {
		t.Errorf("HEAD: %d %q", resp.StatusCode, body)
	}
	tc.checkNothingLeaked(t)
}

func TestClosureQueryWithoutMemoryCache(t *testing.T) {
	tc := newTestCache(t, func(c *Config) { c.NarInfoMemory = -1 })
	a, b := strings.Repeat("a", 32), strings.Repeat("b", 32)
	tc.upload(t, b, "b")
	tc.upload(t, a, "a", b+"-b")
	_, body := do(t, tc.read, "GET", closure.Query([]string{a}), nil)
	ans, err := closure.Parse(strings.NewReader(body), 1<<20)
	if err != nil || len(ans.Records) != 2 || ans.Records[1].Hash != b || ans.Records[1].Status != closure.Found {
		t.Errorf("closure of a: %+v, %v", ans, err)
	}
}
