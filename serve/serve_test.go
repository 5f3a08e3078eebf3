package serve

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

const (
	hashA = "0a1zq2ax9h7dsnd3kkbxh3d9mvlkfx2d"
	hashB = "1b9jydsiygi6jhlz2dxbrxi6b4m1rn2i"
)

// testCache is a cache served by a read and a write test server, inside a
// directory that also holds an "outside" sibling a hostile request must
// never reach.
type testCache struct {
	*Cache
	root, dir    string
	read, write  *testServer
	outsideFiles []string
}

func newTestCache(t testing.TB, edit func(*Config)) *testCache {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "cache")
	outside := filepath.Join(root, "outside")
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "secret"), []byte("secret\n"), 0o644)
	l := logrus.New()
	l.SetOutput(io.Discard)
	cfg := Config{Dir: dir, Priority: 30, WantMassQuery: true, MaxUploadSize: 1 << 20, UploadIdleTimeout: 300 * time.Millisecond, Log: logrus.NewEntry(l)}
	if edit != nil {
		edit(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tc := &testCache{Cache: c, root: root, dir: dir}
	tc.read = startServer(t, c, Read)
	tc.write = startServer(t, c, Write)
	tc.outsideFiles = listTree(t, outside)
	return tc
}

// testServer is a Server on a loopback listener, with the parts of
// httptest.Server the tests use.
type testServer struct {
	URL      string
	Listener net.Listener
	client   *http.Client
}

func (s *testServer) Client() *http.Client { return s.client }

func startServer(t testing.TB, c *Cache, role Role) *testServer {
	t.Helper()
	return serveOnLoopback(t, c.NewServer(role, nil), role.String())
}

// serveOnLoopback serves srv on a free loopback port until the test ends.
func serveOnLoopback(t testing.TB, srv *Server, what string) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	tr := &http.Transport{}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown of the %s server: %v", what, err)
		}
		if err := <-done; err != nil {
			t.Errorf("the %s server: %v", what, err)
		}
	})
	return &testServer{URL: "http://" + ln.Addr().String(), Listener: ln, client: &http.Client{Transport: tr}}
}

func listTree(t testing.TB, dir string) []string {
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// checkNothingLeaked asserts that nothing was written outside the cache
// and no partial upload stayed in .tmp.
func (tc *testCache) checkNothingLeaked(t *testing.T) {
	t.Helper()
	if got := listTree(t, filepath.Join(tc.root, "outside")); strings.Join(got, ",") != strings.Join(tc.outsideFiles, ",") {
		t.Errorf("files outside the cache changed: %v", got)
	}
	entries, _ := os.ReadDir(filepath.Join(tc.root))
	if len(entries) != 2 {
		t.Errorf("the cache's parent has %d entries, want cache and outside", len(entries))
	}
	tmp, _ := os.ReadDir(filepath.Join(tc.dir, ".tmp"))
	for _, e := range tmp {
		t.Errorf("partial upload left in .tmp: %s", e.Name())
	}
}

// do sends an HTTP request to srv and returns the response, body read.
func do(t testing.TB, srv *testServer, method, path string, body []byte, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body == nil {
		req.Body = nil
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// raw sends bytes as they are (so that the path is not normalised) and
// returns the status code.
func raw(t *testing.T, srv *testServer, request string) int {
	t.Helper()
	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, request)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response to %q: %v", request, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// nar returns a NAR file name that matches content's hash.
func narName(content []byte, ext string) string {
	sum := sha256.Sum256(content)
	return "nar/" + nixcache.Base32(sum[:]) + ".nar" + ext
}

func narInfo(hash, name, url string, refs ...string) string {
	return fmt.Sprintf("StorePath: /nix/store/%s-%s\nURL: %s\nCompression: none\nNarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 568\nReferences: %s\n",
		hash, name, url, strings.Join(refs, " "))
}

// upload puts a NAR and its narinfo, as nix copy does.
func (tc *testCache) upload(t testing.TB, hash, name string, refs ...string) string {
	t.Helper()
	content := []byte("nar of " + hash)
	url := narName(content, "")
	if resp, body := do(t, tc.write, "PUT", "/"+url, content); resp.StatusCode != 201 {
		t.Fatalf("PUT %s: %d %s", url, resp.StatusCode, body)
	}
	if resp, body := do(t, tc.write, "PUT", "/"+hash+".narinfo", []byte(narInfo(hash, name, url, refs...))); resp.StatusCode != 201 {
		t.Fatalf("PUT narinfo: %d %s", resp.StatusCode, body)
	}
	// The narinfo was acknowledged; the tests look at the files.
	tc.durable.barrier()
	return url
}

func gzipped(b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

func TestHostileRequests(t *testing.T) {
	tc := newTestCache(t, nil)
	tc.upload(t, hashB, "dep")
	good := []byte("good nar")
	goodURL := narName(good, ".zst")
	bomb := gzipped(bytes.Repeat([]byte("a"), 2<<20))
	longMarker := strings.Repeat("# padding\n", 500)

	tests := []struct {
		name   string
		srv    *testServer
		req    string // raw request, or:
		method string
		path   string
		body   []byte
		hdr    []string
		want   int
	}{
		{name: "dot-dot in path", srv: tc.read, req: "GET /../outside/secret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "HTTP/9.9 on the read listener", srv: tc.read, req: "GET /nix-cache-info HTTP/9.9\r\nHost: x\r\n\r\n", want: 505},
		{name: "HTTP/9.9 on the write listener", srv: tc.write, req: "GET /nix-cache-info HTTP/9.9\r\nHost: x\r\n\r\n", want: 505},
		{name: "dot-dot under nar", srv: tc.read, req: "GET /nar/../../outside/secret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "encoded dot-dot", srv: tc.read, req: "GET /%2e%2e/outside/secret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "encoded slashes", srv: tc.read, req: "GET /nar%2f..%2f..%2foutside%2fsecret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "encoded backslash", srv: tc.read, req: "GET /nar/..%5c..%5csecret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "NUL byte", srv: tc.read, req: "GET /nar/x%00.nar HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "double slash", srv: tc.read, req: "GET //outside/secret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "absolute-form outside", srv: tc.read, req: "GET http://x/../outside/secret HTTP/1.1\r\nHost: x\r\n\r\n", want: 400},
		{name: "PUT traversal", srv: tc.write, req: "PUT /nar/../../outside/evil HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nevil", want: 400},
		{name: "PUT encoded traversal", srv: tc.write, req: "PUT /nar%2f..%2f..%2foutside%2fevil HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nevil", want: 400},
		{name: "PUT narinfo by traversal", srv: tc.write, req: "PUT /../outside/" + hashA + ".narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nevil", want: 400},
		{name: "unknown top-level path", srv: tc.read, method: "GET", path: "/index.html", want: 404},
		{name: "unknown path PUT", srv: tc.write, method: "PUT", path: "/evil.sh", body: []byte("x"), want: 404},
		{name: "hidden file under nar", srv: tc.write, method: "PUT", path: "/nar/.evil", body: []byte("x"), want: 400},
		{name: "nested nar", srv: tc.write, method: "PUT", path: "/nar/a/b.nar", body: []byte("x"), want: 400},
		{name: "narinfo name not a hash", srv: tc.write, method: "PUT", path: "/evil.narinfo", body: []byte("x"), want: 400},
		{name: "narinfo store path hash is not its name", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashB, "dep", "nar/x.nar")), want: 400},
		{name: "narinfo without NarHash", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte("StorePath: /nix/store/" + hashA + "-a\nURL: nar/x.nar\nNarSize: 5\n"), want: 400},
		{name: "narinfo URL traversal", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashA, "a", "nar/../../outside/secret")), want: 400},
		{name: "narinfo URL absolute", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashA, "a", "/etc/passwd")), want: 400},
		{name: "narinfo reference is a full path", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashA, "a", goodURL, "/nix/store/"+hashB+"-dep")), want: 400},
		{name: "narinfo NarSize zero", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(strings.Replace(narInfo(hashA, "a", goodURL), "NarSize: 568", "NarSize: 0", 1)), want: 400},
		{name: "narinfo store path in another store", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(strings.Replace(narInfo(hashA, "a", goodURL), "/nix/store/", "/gnu/store/", 1)), want: 400},
		{name: "narinfo before its NAR", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashA, "a", goodURL)), want: 409},
		{name: "narinfo before its reference", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: []byte(narInfo(hashA, "a", narName([]byte("nar of "+hashB), ""), "0c8gzmaclfrqrjcrkcv8wgfbwvn3f4cw-missing")), want: 409},
		{name: "body over the limit by Content-Length", srv: tc.write, method: "PUT", path: "/" + goodURL, body: make([]byte, 1<<20+1), want: 413},
		{name: "chunked body over the limit", srv: tc.write, req: "PUT /" + goodURL + " HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n" + strings.Repeat("a", 1<<20+1) + "\r\n0\r\n\r\n", want: 413},
		{name: "gzip bomb narinfo", srv: tc.write, method: "PUT", path: "/" + hashA + ".narinfo", body: bomb, hdr: []string{"Content-Encoding", "gzip"}, want: 413},
		{name: "unknown Content-Encoding", srv: tc.write, method: "PUT", path: "/" + goodURL, body: good, hdr: []string{"Content-Encoding", "compress"}, want: 415},
		{name: "body that is not gzip", srv: tc.write, method: "PUT", path: "/" + goodURL, body: good, hdr: []string{"Content-Encoding", "gzip"}, want: 400},
		{name: "NAR content does not match its name", srv: tc.write, method: "PUT", path: "/" + goodURL, body: []byte("other"), want: 400},
		{name: "marker over 4 KiB", srv: tc.write, method: "PUT", path: "/gcroots/web1", body: []byte(longMarker), want: 413},
		{name: "marker with a bad line", srv: tc.write, method: "PUT", path: "/gcroots/web1", body: []byte("/etc/passwd\n"), want: 400},
		{name: "marker naming a path not in the cache", srv: tc.write, method: "PUT", path: "/gcroots/web1", body: []byte("/nix/store/" + hashA + "-a\n"), want: 409},
		{name: "hidden marker", srv: tc.write, method: "PUT", path: "/gcroots/.evil", body: []byte(""), want: 400},
		{name: "lock name with traversal", srv: tc.write, req: "PUT /gcroots/.lock/../../x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", want: 400},
		{name: "lock body over 1 KiB", srv: tc.write, method: "PUT", path: "/gcroots/.lock/ci", body: make([]byte, 1025), want: 413},
		{name: "log name not a store path", srv: tc.write, method: "PUT", path: "/log/evil", body: []byte("x"), want: 400},
		{name: "realisation not .doi", srv: tc.write, method: "PUT", path: "/realisations/x.json", body: []byte("{}"), want: 400},
		{name: "DELETE a NAR", srv: tc.write, method: "DELETE", path: "/" + narName([]byte("nar of "+hashB), ""), want: 405},
		{name: "DELETE a missing marker", srv: tc.write, method: "DELETE", path: "/gcroots/nothing", want: 404},
		{name: "POST", srv: tc.write, method: "POST", path: "/" + hashA + ".narinfo", body: []byte("x"), want: 405},
		{name: "PUT on the read listener", srv: tc.read, method: "PUT", path: "/" + goodURL, body: good, want: 405},
		{name: "PUT marker on the read listener", srv: tc.read, method: "PUT", path: "/gcroots/web1", body: []byte("/nix/store/" + hashB + "-dep\n"), want: 405},
		{name: "lock on the read listener", srv: tc.read, method: "PUT", path: "/gcroots/.lock/ci", body: nil, want: 405},
		{name: "DELETE on the read listener", srv: tc.read, method: "DELETE", path: "/gcroots/web1", want: 405},
		{name: "PUT unknown path on the read listener", srv: tc.read, method: "PUT", path: "/evil", body: []byte("x"), want: 405},
	}
	if len(tests) < 30 {
		t.Fatalf("only %d hostile cases", len(tests))
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got int
			var body string
			if tt.req != "" {
				got = raw(t, tt.srv, tt.req)
			} else {
				var resp *http.Response
				resp, body = do(t, tt.srv, tt.method, tt.path, tt.body, tt.hdr...)
				got = resp.StatusCode
				if got == 405 && resp.Header.Get("Allow") == "" {
					t.Error("405 without an Allow header")
				}
			}
			if got != tt.want {
				t.Errorf("status %d, want %d (%s)", got, tt.want, strings.TrimSpace(body))
			}
			tc.checkNothingLeaked(t)
		})
	}
	// Nothing that was refused exists under a final name.
	for _, p := range []string{hashA + ".narinfo", goodURL, "gcroots/web1", "log/evil", "nar/.evil"} {
		if _, err := os.Stat(filepath.Join(tc.dir, p)); err == nil {
			t.Errorf("refused upload %s exists", p)
		}
	}
}

func TestTruncatedAndStalledUploadsLeaveNothing(t *testing.T) {
	tc := newTestCache(t, nil)
	content := bytes.Repeat([]byte("x"), 100000)
	url := narName(content, "")
	for _, tt := range []struct {
		name  string
		send  string
		close bool
	}{
		{"client closes mid-body", fmt.Sprintf("PUT /%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", url, len(content), content[:5000]), true},
		{"client stalls mid-body", fmt.Sprintf("PUT /%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", url, len(content), content[:5000]), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", tc.write.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			io.WriteString(conn, tt.send)
			if tt.close {
				conn.Close()
			} else {
				// The server's idle timeout (300 ms here) cuts it off.
				conn.SetReadDeadline(time.Now().Add(10 * time.Second))
				io.Copy(io.Discard, conn)
				conn.Close()
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				tmp, _ := os.ReadDir(filepath.Join(tc.dir, ".tmp"))
				if len(tmp) == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("partial upload still in .tmp: %v", tmp)
				}
				time.Sleep(20 * time.Millisecond)
			}
			if _, err := os.Stat(filepath.Join(tc.dir, url)); err == nil {
				t.Fatal("partial NAR visible under its final name")
			}
		})
	}
}

func TestReadsServeFilesAsStored(t *testing.T) {
	tc := newTestCache(t, nil)
	narURL := tc.upload(t, hashB, "dep")
	tc.upload(t, hashA, "app", hashB+"-dep", hashA+"-app")

	resp, body := do(t, tc.read, "GET", "/nix-cache-info", nil)
	if resp.StatusCode != 200 || body != "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n" {
		t.Errorf("nix-cache-info: %d %q", resp.StatusCode, body)
	}
	if b, _ := os.ReadFile(filepath.Join(tc.dir, "nix-cache-info")); string(b) != body {
		t.Errorf("nix-cache-info on disk %q differs from served %q", b, body)
	}

	resp, body = do(t, tc.read, "GET", "/"+hashA+".narinfo", nil)
	if resp.StatusCode != 200 || !strings.Contains(body, "References: "+hashB+"-dep") || resp.Header.Get("Content-Type") != "text/x-nix-narinfo" {
		t.Errorf("narinfo: %d %s %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	etag := resp.Header.Get("ETag")
	if etag == "" {
		t.Error("narinfo without ETag")
	}
	resp, _ = do(t, tc.read, "GET", "/"+hashA+".narinfo", nil, "If-None-Match", etag)
	if resp.StatusCode != 304 {
		t.Errorf("If-None-Match: %d, want 304", resp.StatusCode)
	}
	resp, body = do(t, tc.read, "HEAD", "/"+hashA+".narinfo", nil)
	if resp.StatusCode != 200 || body != "" || resp.ContentLength <= 0 {
		t.Errorf("HEAD narinfo: %d len %d body %q", resp.StatusCode, resp.ContentLength, body)
	}

	resp, body = do(t, tc.read, "GET", "/"+narURL, nil, "Range", "bytes=4-")
	if resp.StatusCode != 206 || body != "of "+hashB || resp.Header.Get("Content-Encoding") != "" || resp.Header.Get("Accept-Ranges") != "bytes" {
		t.Errorf("NAR range: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	resp, _ = do(t, tc.read, "GET", "/"+narURL, nil, "Accept-Encoding", "gzip")
	if resp.Header.Get("Content-Encoding") != "" || resp.Header.Get("Content-Type") != "application/x-nix-nar" {
		t.Errorf("NAR served with %v", resp.Header)
	}
	for _, p := range []string{"/" + hashB + ".ls", "/nar/0000000000000000000000000000000000000000000000000000.nar", "/log/" + hashA + "-x.drv", "/gcroots/none"} {
		if resp, _ := do(t, tc.read, "GET", p, nil); resp.StatusCode != 404 {
			t.Errorf("GET %s: %d, want 404", p, resp.StatusCode)
		}
	}

	// A narinfo deleted behind the server's back stops being served.
	os.Remove(filepath.Join(tc.dir, hashA+".narinfo"))
	time.Sleep(revalidateAfter + 50*time.Millisecond)
	if resp, _ := do(t, tc.read, "GET", "/"+hashA+".narinfo", nil); resp.StatusCode != 404 {
		t.Errorf("deleted narinfo: %d, want 404", resp.StatusCode)
	}
}

func TestUploadsDecodeContentEncoding(t *testing.T) {
	tc := newTestCache(t, nil)
	tc.upload(t, hashB, "dep")
	listing := []byte(`{"version":1,"root":{"type":"regular","size":3}}`)
	var zbuf bytes.Buffer
	zw, _ := zstd.NewWriter(&zbuf)
	zw.Write(listing)
	zw.Close()
	for _, tt := range []struct {
		enc  string
		body []byte
	}{{"gzip", gzipped(listing)}, {"zstd", zbuf.Bytes()}, {"", listing}} {
		resp, body := do(t, tc.write, "PUT", "/"+hashB+".ls", tt.body, "Content-Encoding", tt.enc)
		if resp.StatusCode != 201 {
			t.Fatalf("%s: %d %s", tt.enc, resp.StatusCode, body)
		}
		if got, _ := os.ReadFile(filepath.Join(tc.dir, hashB+".ls")); !bytes.Equal(got, listing) {
			t.Errorf("%s: stored %q, want the decoded listing", tt.enc, got)
		}
	}
	for _, p := range []string{"/log/" + hashB + "-dep.drv", "/realisations/sha256:abc!out.doi", "/build-trace-v2/" + hashB + "-dep.drv/out.doi", "/debuginfo/0123abcdef"} {
		if resp, body := do(t, tc.write, "PUT", p, []byte("{}"), "Content-Encoding", "gzip"); resp.StatusCode != 400 {
			t.Errorf("PUT %s with a non-gzip body: %d %s", p, resp.StatusCode, body)
		}
		if resp, body := do(t, tc.write, "PUT", p, gzipped([]byte("{}")), "Content-Encoding", "gzip"); resp.StatusCode != 201 {
			t.Errorf("PUT %s: %d %s", p, resp.StatusCode, body)
		}
		if resp, body := do(t, tc.read, "GET", p, nil); resp.StatusCode != 200 || body != "{}" {
			t.Errorf("GET %s: %d %q", p, resp.StatusCode, body)
		}
	}
}

func TestMarkersAndLocks(t *testing.T) {
	tc := newTestCache(t, nil)
	tc.upload(t, hashB, "dep")
	marker := "/nix/store/" + hashB + "-dep\n"
	for _, p := range []string{"/gcroots/web1", "/gcroots/hosts/web2"} {
		if resp, body := do(t, tc.write, "PUT", p, []byte(marker)); resp.StatusCode != 201 {
			t.Fatalf("PUT %s: %d %s", p, resp.StatusCode, body)
		}
		if resp, body := do(t, tc.read, "GET", p, nil); resp.StatusCode != 200 || body != marker {
			t.Errorf("GET %s: %d %q", p, resp.StatusCode, body)
		}
	}
	if resp, _ := do(t, tc.write, "DELETE", "/gcroots/web1", nil); resp.StatusCode != 204 {
		t.Errorf("DELETE marker: %d", resp.StatusCode)
	}
	if _, err := os.Stat(filepath.Join(tc.dir, "gcroots/web1")); err == nil {
		t.Error("deleted marker still there")
	}
	if resp, body := do(t, tc.write, "PUT", "/gcroots/.lock/ci", []byte("runner 7")); resp.StatusCode != 201 {
		t.Fatalf("take lock: %d %s", resp.StatusCode, body)
	}
	if resp, _ := do(t, tc.write, "DELETE", "/gcroots/.lock/ci", nil); resp.StatusCode != 204 {
		t.Errorf("drop lock: %d", resp.StatusCode)
	}
}

func TestTrustedWriterKeys(t *testing.T) {
	sk, _ := nixcache.ParseSecretKey("test-1:RqDnNxL4OTWHkM8/F4h+NyEzq70mFZrggon5qLYJW+8Wj+tANHJmCfYwvdNFGfVx2PWORQavP+EzvlYKvkwDTA==")
	tc := newTestCache(t, func(c *Config) { c.TrustedKeys = []nixcache.PublicKey{sk.PublicKey()} })
	content := []byte("nar")
	url := narName(content, "")
	do(t, tc.write, "PUT", "/"+url, content)
	text := narInfo(hashA, "a", url)
	if resp, _ := do(t, tc.write, "PUT", "/"+hashA+".narinfo", []byte(text)); resp.StatusCode != 422 {
		t.Errorf("unsigned narinfo: %d, want 422", resp.StatusCode)
	}
	ni, _ := nixcache.ParseNarInfo([]byte(text))
	fp, _ := ni.Fingerprint("/nix/store")
	if resp, body := do(t, tc.write, "PUT", "/"+hashA+".narinfo", []byte(text+"Sig: "+sk.Sign(fp)+"\n")); resp.StatusCode != 201 {
		t.Errorf("signed narinfo: %d %s", resp.StatusCode, body)
	}
}
