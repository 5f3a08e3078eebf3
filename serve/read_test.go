package serve

import (
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"
)

// TestReadAnswers sends each kind of GET and HEAD to both roles (the read
// role's fasthttp server and the write role's net/http one): a cache must
// answer the same whichever onion a client came through.
func TestReadAnswers(t *testing.T) {
	tc := newTestCache(t, nil)
	narURL := tc.upload(t, hashB, "dep")
	nar, _ := os.ReadFile(filepath.Join(tc.dir, narURL))
	big := strings.Repeat("0123456789abcdef", 20000) // over the small-file path
	os.WriteFile(filepath.Join(tc.dir, hashB+".ls"), []byte(big), 0o644)
	info, _ := os.ReadFile(filepath.Join(tc.dir, hashB+".narinfo"))
	_, first := do(t, tc.read, "GET", "/"+hashB+".narinfo", nil)
	if first != string(info) {
		t.Fatalf("narinfo served %q, stored %q", first, info)
	}
	resp, _ := do(t, tc.read, "HEAD", "/"+narURL, nil)
	etag, lastMod := resp.Header.Get("Etag"), resp.Header.Get("Last-Modified")
	if etag == "" || lastMod == "" {
		t.Fatalf("NAR without validators: %v", resp.Header)
	}
	future := time.Now().Add(time.Hour).UTC().Format(http.TimeFormat)
	past := time.Unix(0, 0).UTC().Format(http.TimeFormat)
	n := len(nar)
	itoa := strconv.Itoa

	tests := []struct {
		name, method, path string
		hdr                []string
		status             int
		body               string // checked when the status has a body
		header             map[string]string
	}{
		{name: "narinfo", method: "GET", path: "/" + hashB + ".narinfo", status: 200, body: string(info),
			header: map[string]string{"Content-Type": "text/x-nix-narinfo", "Accept-Ranges": "bytes", "Content-Length": itoa(len(info))}},
		{name: "narinfo HEAD", method: "HEAD", path: "/" + hashB + ".narinfo", status: 200,
			header: map[string]string{"Content-Length": itoa(len(info)), "Content-Type": "text/x-nix-narinfo"}},
		{name: "missing narinfo", method: "GET", path: "/" + hashA + ".narinfo", status: 404},
		{name: "missing narinfo HEAD", method: "HEAD", path: "/" + hashA + ".narinfo", status: 404},
		{name: "cache info", method: "GET", path: "/nix-cache-info", status: 200, body: "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
			header: map[string]string{"Content-Type": "text/x-nix-cache-info"}},
		{name: "NAR", method: "GET", path: "/" + narURL, status: 200, body: string(nar),
			header: map[string]string{"Content-Type": "application/x-nix-nar", "Etag": etag, "Last-Modified": lastMod, "Content-Encoding": ""}},
		{name: "NAR HEAD", method: "HEAD", path: "/" + narURL, status: 200, header: map[string]string{"Content-Length": itoa(n)}},
		{name: "big listing", method: "GET", path: "/" + hashB + ".ls", status: 200, body: big, header: map[string]string{"Content-Type": "application/json"}},
		{name: "big listing range", method: "GET", path: "/" + hashB + ".ls", hdr: []string{"Range", "bytes=100000-100015"}, status: 206,
			body: big[100000:100016], header: map[string]string{"Content-Range": "bytes 100000-100015/" + itoa(len(big))}},
		{name: "range from", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=4-"}, status: 206, body: string(nar[4:]),
			header: map[string]string{"Content-Range": "bytes 4-" + itoa(n-1) + "/" + itoa(n), "Content-Length": itoa(n - 4)}},
		{name: "range middle", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=1-3"}, status: 206, body: string(nar[1:4])},
		{name: "range suffix", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=-5"}, status: 206, body: string(nar[n-5:])},
		{name: "range past the end is clamped", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=2-999999"}, status: 206, body: string(nar[2:])},
		{name: "range on a narinfo", method: "GET", path: "/" + hashB + ".narinfo", hdr: []string{"Range", "bytes=0-9"}, status: 206, body: string(info[:10])},
		{name: "range not satisfiable", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=999999-"}, status: 416,
			header: map[string]string{"Content-Range": "bytes */" + itoa(n)}},
		{name: "several ranges: the whole file", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=0-1,3-4"}, status: 200, body: string(nar)},
		{name: "malformed range ignored", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=x-y"}, status: 200, body: string(nar)},
		{name: "If-Range matching", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=4-", "If-Range", etag}, status: 206, body: string(nar[4:])},
		{name: "If-Range stale: whole file", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=4-", "If-Range", `"old"`}, status: 200, body: string(nar)},
		{name: "If-Range date", method: "GET", path: "/" + narURL, hdr: []string{"Range", "bytes=4-", "If-Range", lastMod}, status: 206, body: string(nar[4:])},
		{name: "If-None-Match", method: "GET", path: "/" + narURL, hdr: []string{"If-None-Match", etag}, status: 304, header: map[string]string{"Etag": etag}},
		{name: "If-None-Match weak in a list", method: "GET", path: "/" + narURL, hdr: []string{"If-None-Match", `"x", W/` + etag}, status: 304},
		{name: "If-None-Match other", method: "GET", path: "/" + narURL, hdr: []string{"If-None-Match", `"x"`}, status: 200, body: string(nar)},
		{name: "If-None-Match narinfo", method: "HEAD", path: "/" + hashB + ".narinfo", hdr: []string{"If-None-Match", "*"}, status: 304},
		{name: "If-Modified-Since now", method: "GET", path: "/" + narURL, hdr: []string{"If-Modified-Since", future}, status: 304},
		{name: "If-Modified-Since long ago", method: "GET", path: "/" + narURL, hdr: []string{"If-Modified-Since", past}, status: 200, body: string(nar)},
		{name: "If-Match other", method: "GET", path: "/" + narURL, hdr: []string{"If-Match", `"x"`}, status: 412},
		{name: "If-Match", method: "GET", path: "/" + narURL, hdr: []string{"If-Match", etag}, status: 200, body: string(nar)},
		{name: "If-Unmodified-Since long ago", method: "GET", path: "/" + narURL, hdr: []string{"If-Unmodified-Since", past}, status: 412},
		{name: "query string ignored", method: "GET", path: "/" + hashB + ".narinfo?x=1", status: 200, body: string(info)},
		{name: "percent-encoded narinfo name", method: "GET", path: "/" + hashB[:5] + "%64" + hashB[6:] + ".narinfo", status: 200, body: string(info)},
	}
	for _, role := range []*testServer{tc.read, tc.write} {
		for _, tt := range tests {
			resp, body := do(t, role, tt.method, tt.path, nil, tt.hdr...)
			where := role.URL + " " + tt.name
			if resp.StatusCode != tt.status {
				t.Errorf("%s: status %d, want %d (%q)", where, resp.StatusCode, tt.status, body)
				continue
			}
			if tt.method == "HEAD" && body != "" {
				t.Errorf("%s: HEAD with a body %q", where, body)
			}
			if tt.body != "" && body != tt.body {
				t.Errorf("%s: body of %d bytes, want %d", where, len(body), len(tt.body))
			}
			for k, v := range tt.header {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s: %s: %q, want %q", where, k, got, v)
				}
			}
		}
	}
}

// FuzzReadRequest sends arbitrary request targets and Range headers to the
// read role's handler: it must not panic, must answer with a status a read
// can get, and must never send a byte from outside the cache directory.
func FuzzReadRequest(f *testing.F) {
	tc := newTestCache(f, nil)
	narURL := tc.upload(f, hashB, "dep")
	for _, s := range []string{"/" + hashB + ".narinfo", "/" + narURL, "/nix-cache-info", "/../outside/secret", "/%2e%2e/outside/secret", "http://x/nar/../x", "*"} {
		for _, r := range []string{"", "bytes=0-3", "bytes=-1", "bytes=9999-", "bytes=3-1"} {
			f.Add(s, r)
		}
	}
	conn, other := net.Pipe()
	f.Cleanup(func() { conn.Close(); other.Close() })
	f.Fuzz(func(t *testing.T, target, rng string) {
		var ctx fasthttp.RequestCtx
		ctx.Init2(conn, nil, false)
		ctx.Request.Header.SetRequestURI(target)
		if rng != "" {
			ctx.Request.Header.Set("Range", rng)
		}
		tc.handleRead(&ctx)
		defer ctx.Response.Reset() // closes a file body
		switch st := ctx.Response.StatusCode(); st {
		case 200, 206, 400, 404, 416:
		default:
			t.Fatalf("GET %q with Range %q: status %d", target, rng, st)
		}
		if strings.Contains(string(ctx.Response.Body()), "secret") {
			t.Fatalf("GET %q sent a file from outside the cache", target)
		}
	})
}
