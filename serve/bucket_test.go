package serve

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// TestBucket serves caches on a real SeaweedFS: two front ends over one
// bucket, as two serve processes on two machines would be.
func TestBucket(t *testing.T) {
	srv := s3test.Start(t)
	for _, tt := range []struct {
		name string
		fn   func(t *testing.T, a, b *bucketCache)
	}{
		{"UploadThenRead", testBucketUploadThenRead},
		{"CorruptNarLeavesNothing", testBucketCorruptNar},
		{"NarInfoOrder", testBucketNarInfoOrder},
		{"OtherFrontEnd", testBucketOtherFrontEnd},
		{"MarkersAndLocks", testBucketMarkersAndLocks},
		{"KilledUploadLeavesNothing", testBucketKilledUpload},
		{"Closure", testBucketClosure},
	} {
		t.Run(tt.name, func(t *testing.T) {
			prefix := "t" + strconv.Itoa(rand.IntN(1e9))
			a := newBucketCache(t, srv, prefix)
			b := newBucketCache(t, srv, prefix)
			tt.fn(t, a, b)
		})
	}
}

// bucketCache is a cache on a bucket prefix with a read and a write
// server, and the store to look at the objects with.
type bucketCache struct {
	*Cache
	st          *s3store.Store
	locks       *bucketlock.Locks
	read, write *testServer
}

func newBucketCache(t *testing.T, srv *s3test.Server, prefix string) *bucketCache {
	t.Helper()
	l := logrus.New()
	l.SetOutput(io.Discard)
	log := logrus.NewEntry(l)
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
		Bucket: srv.Bucket, Prefix: prefix, PartSize: s3store.MinPartSize, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	locks := bucketlock.New(st, log)
	c, err := New(Config{Bucket: st, BucketLocks: locks, Priority: 30, WantMassQuery: true, MaxUploadSize: 64 << 20,
		UploadIdleTimeout: 2 * time.Second, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return &bucketCache{Cache: c, st: st, locks: locks, read: startServer(t, c, Read), write: startServer(t, c, Write)}
}

// exists reports whether the bucket holds name.
func (bc *bucketCache) exists(t *testing.T, name string) bool {
	t.Helper()
	_, err := bc.st.Stat(context.Background(), name)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return err == nil
}

func (bc *bucketCache) put(t *testing.T, path string, body []byte, want int) {
	t.Helper()
	if resp, msg := do(t, bc.write, "PUT", path, body); resp.StatusCode != want {
		t.Fatalf("PUT %s: %d %s, want %d", path, resp.StatusCode, msg, want)
	}
}

func testBucketUploadThenRead(t *testing.T, a, _ *bucketCache) {
	if resp, body := do(t, a.read, "GET", "/nix-cache-info", nil); resp.StatusCode != 200 || !strings.Contains(body, "StoreDir: /nix/store") {
		t.Fatalf("nix-cache-info: %d %q", resp.StatusCode, body)
	}
	if !a.exists(t, "nix-cache-info") {
		t.Fatal("no nix-cache-info in the bucket: it is not a valid cache")
	}
	content := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	url := narName(content, "")
	a.put(t, "/"+url, content, 201)
	ni := narInfo(hashA, "a", url)
	a.put(t, "/"+hashA+".narinfo", []byte(ni), 201)
	for _, srv := range []*testServer{a.read, a.write} {
		if resp, body := do(t, srv, "GET", "/"+hashA+".narinfo", nil); resp.StatusCode != 200 || body != ni {
			t.Fatalf("GET narinfo: %d %q", resp.StatusCode, body)
		}
		resp, body := do(t, srv, "GET", "/"+url, nil)
		if resp.StatusCode != 200 || body != string(content) || resp.Header.Get("Accept-Ranges") != "bytes" || resp.ContentLength != int64(len(content)) {
			t.Fatalf("GET NAR: %d, %d bytes, Accept-Ranges %q", resp.StatusCode, len(body), resp.Header.Get("Accept-Ranges"))
		}
		resp, body = do(t, srv, "GET", "/"+url, nil, "Range", "bytes=1000-1999")
		if resp.StatusCode != 206 || body != string(content[1000:2000]) || resp.Header.Get("Content-Range") != "bytes 1000-1999/1048576" {
			t.Fatalf("GET range: %d %q, %d bytes", resp.StatusCode, resp.Header.Get("Content-Range"), len(body))
		}
		resp, _ = do(t, srv, "GET", "/"+url, nil, "Range", "bytes=2000000-")
		if resp.StatusCode != 416 {
			t.Fatalf("range past the end: %d, want 416", resp.StatusCode)
		}
		resp, body = do(t, srv, "HEAD", "/"+url, nil)
		if resp.StatusCode != 200 || body != "" || resp.ContentLength != int64(len(content)) {
			t.Fatalf("HEAD NAR: %d, length %d", resp.StatusCode, resp.ContentLength)
		}
		etag := resp.Header.Get("Etag")
		if resp, _ := do(t, srv, "GET", "/"+url, nil, "If-None-Match", etag); etag == "" || resp.StatusCode != 304 {
			t.Fatalf("If-None-Match %q: %d, want 304", etag, resp.StatusCode)
		}
		if resp, _ := do(t, srv, "GET", "/"+hashB+".narinfo", nil); resp.StatusCode != 404 {
			t.Fatalf("GET a missing narinfo: %d", resp.StatusCode)
		}
		if resp, _ := do(t, srv, "GET", "/nar/"+strings.Repeat("1", 52)+".nar", nil); resp.StatusCode != 404 {
			t.Fatalf("GET a missing NAR: %d", resp.StatusCode)
		}
	}
	// A reader may not write.
	if resp, _ := do(t, a.read, "PUT", "/"+url, content[:100]); resp.StatusCode != 405 {
		t.Fatalf("PUT on the read role: %d", resp.StatusCode)
	}
	// Compressed in transit, decoded into the bucket.
	other := []byte("another nar, sent gzipped")
	a.put(t, "/"+hashB+".ls", nil, 201)
	if resp, msg := do(t, a.write, "PUT", "/"+narName(other, ""), gzipped(other), "Content-Encoding", "gzip"); resp.StatusCode != 201 {
		t.Fatalf("PUT gzip: %d %s", resp.StatusCode, msg)
	}
	if resp, body := do(t, a.read, "GET", "/"+narName(other, ""), nil); resp.StatusCode != 200 || body != string(other) {
		t.Fatalf("GET of a NAR sent gzipped: %d %q", resp.StatusCode, body)
	}
}

func testBucketCorruptNar(t *testing.T, a, _ *bucketCache) {
	content := []byte("the NAR its name promises")
	url := narName(content, "")
	// Known length, one PUT; and chunked, of unknown length.
	a.put(t, "/"+url, []byte("not the NAR its name promises"), 400)
	req, _ := http.NewRequest("PUT", a.write.URL+"/"+url, io.MultiReader(strings.NewReader("not the "), strings.NewReader("NAR its name promises")))
	req.ContentLength = -1
	resp, err := a.write.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("chunked corrupt NAR: %d, want 400", resp.StatusCode)
	}
	// Larger than a part: a multipart upload that must never complete.
	big := bytes.Repeat([]byte{7}, 3*s3store.MinPartSize)
	bigURL := narName(big, "")
	big[len(big)-1] = 8
	a.put(t, "/"+bigURL, big, 400)
	for _, u := range []string{url, bigURL} {
		if a.exists(t, u) {
			t.Errorf("%s is in the bucket after a corrupt upload", u)
		}
	}
}

func testBucketNarInfoOrder(t *testing.T, a, _ *bucketCache) {
	content := []byte("nar of a")
	url := narName(content, "")
	a.put(t, "/"+hashA+".narinfo", []byte(narInfo(hashA, "a", url)), 409)
	a.put(t, "/"+url, content, 201)
	a.put(t, "/"+hashA+".narinfo", []byte(narInfo(hashA, "a", url, hashB+"-b")), 409)
	if a.exists(t, hashA+".narinfo") {
		t.Fatal("a narinfo whose reference is missing reached the bucket")
	}
	a.put(t, "/"+hashA+".narinfo", []byte("StorePath: nonsense\n"), 400)
	a.put(t, "/"+hashA+".narinfo", []byte(narInfo(hashA, "a", url)), 201)
	if !a.exists(t, hashA+".narinfo") {
		t.Fatal("the narinfo is not in the bucket")
	}
}

func testBucketOtherFrontEnd(t *testing.T, a, b *bucketCache) {
	// b has listed the bucket already; what a uploads now is found on a
	// miss, never refused.
	content := []byte("nar of a, through front end a")
	url := narName(content, "")
	a.put(t, "/"+url, content, 201)
	ni := narInfo(hashA, "a", url)
	a.put(t, "/"+hashA+".narinfo", []byte(ni), 201)
	if resp, body := do(t, b.read, "GET", "/"+hashA+".narinfo", nil); resp.StatusCode != 200 || body != ni {
		t.Fatalf("narinfo through the other front end: %d %q", resp.StatusCode, body)
	}
	if resp, body := do(t, b.read, "GET", "/"+url, nil); resp.StatusCode != 200 || body != string(content) {
		t.Fatalf("NAR through the other front end: %d", resp.StatusCode)
	}
	// A reference uploaded through a is good for a narinfo through b.
	content2 := []byte("nar of b, through front end b")
	url2 := narName(content2, "")
	b.put(t, "/"+url2, content2, 201)
	b.put(t, "/"+hashB+".narinfo", []byte(narInfo(hashB, "b", url2, hashA+"-a")), 201)
	// Deleted behind b's back (by a prune elsewhere): gone within a
	// revalidation.
	if err := a.st.Delete(context.Background(), []string{hashB + ".narinfo"}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(revalidateAfter + 100*time.Millisecond)
	if resp, _ := do(t, b.read, "GET", "/"+hashB+".narinfo", nil); resp.StatusCode != 404 {
		t.Fatalf("a deleted narinfo: %d, want 404", resp.StatusCode)
	}
}

func testBucketMarkersAndLocks(t *testing.T, a, b *bucketCache) {
	a.put(t, "/gcroots/web", []byte("/nix/store/"+hashA+"-a\n"), 409)
	a.upload(t, hashA, "a")
	a.put(t, "/gcroots/web", []byte("/nix/store/"+hashA+"-a\n"), 201)
	if resp, body := do(t, b.read, "GET", "/gcroots/web", nil); resp.StatusCode != 200 || body != "/nix/store/"+hashA+"-a\n" {
		t.Fatalf("GET marker through b: %d %q", resp.StatusCode, body)
	}
	a.put(t, "/gcroots/bad", []byte("not a store path\n"), 400)
	if resp, _ := do(t, a.write, "DELETE", "/gcroots/web", nil); resp.StatusCode != 204 {
		t.Fatalf("DELETE marker: %d", resp.StatusCode)
	}
	if resp, _ := do(t, a.write, "DELETE", "/gcroots/web", nil); resp.StatusCode != 404 {
		t.Fatalf("DELETE a missing marker: %d", resp.StatusCode)
	}
	a.put(t, "/gcroots/.lock/ci", []byte("job 1\n"), 201)
	if !a.exists(t, "gcroots/.lock/ci") {
		t.Fatal("the lock is not in the bucket")
	}
	if resp, _ := do(t, b.write, "DELETE", "/gcroots/.lock/ci", nil); resp.StatusCode != 204 {
		t.Fatalf("DELETE lock through b: %d", resp.StatusCode)
	}
	// While a prune holds the bucket, through either front end: 503 for
	// a new lock; narinfos go on while it scans, and wait while it
	// deletes.
	b.locks.SetGuardWindow(200 * time.Millisecond)
	a.locks.SetGuardWindow(200 * time.Millisecond)
	h, err := b.locks.Hold(context.Background(), time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	a.put(t, "/gcroots/.lock/ci", []byte("job 2\n"), 503)
	content := []byte("nar during a prune")
	url := narName(content, "")
	a.put(t, "/"+url, content, 201)
	a.put(t, "/"+hashB+".narinfo", []byte(narInfo(hashB, "b", url)), 201)
	if err := h.Deleting(context.Background()); err != nil {
		t.Fatal(err)
	}
	content2 := []byte("nar during a prune's deletion")
	url2 := narName(content2, "")
	a.put(t, "/"+url2, content2, 201)
	released := make(chan time.Time, 1)
	go func() {
		time.Sleep(500 * time.Millisecond)
		released <- time.Now()
		h.Release()
	}()
	a.put(t, "/"+hashC+".narinfo", []byte(narInfo(hashC, "c", url2)), 201)
	if at := <-released; time.Now().Before(at) {
		t.Fatal("a narinfo was published while a prune deleted")
	}
}

// testBucketKilledUpload: a client that dies in the middle of an upload
// leaves no object, in one PUT or in parts.
func testBucketKilledUpload(t *testing.T, a, _ *bucketCache) {
	for _, size := range []int{64 << 10, 3 * s3store.MinPartSize} {
		content := make([]byte, size)
		for i := range content {
			content[i] = byte(i * 7)
		}
		url := narName(content, "")
		conn, err := net.Dial("tcp", a.write.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(conn, "PUT /"+url+" HTTP/1.1\r\nHost: x\r\nContent-Length: "+strconv.Itoa(size)+"\r\n\r\n")
		conn.Write(content[:size-size/4])
		time.Sleep(300 * time.Millisecond)
		conn.Close()
		time.Sleep(500 * time.Millisecond)
		if a.exists(t, url) {
			t.Errorf("%d-byte upload cut three quarters in: the object is in the bucket", size)
		}
	}
}

func testBucketClosure(t *testing.T, a, b *bucketCache) {
	a.upload(t, hashB, "b")
	a.upload(t, hashA, "a", hashB+"-b")
	resp, body := do(t, b.read, "GET", "/kiss-onion/closure/"+hashA, nil)
	if resp.StatusCode != 200 || !strings.Contains(body, hashA+" ") || !strings.Contains(body, hashB+" ") || !strings.HasSuffix(body, "end\n") {
		t.Fatalf("closure query through b: %d %q", resp.StatusCode, body)
	}
}

// upload puts a NAR and its narinfo, as nix copy does.
func (bc *bucketCache) upload(t *testing.T, hash, name string, refs ...string) {
	t.Helper()
	content := []byte("nar of " + hash)
	url := narName(content, "")
	bc.put(t, "/"+url, content, 201)
	bc.put(t, "/"+hash+".narinfo", []byte(narInfo(hash, name, url, refs...)), 201)
}
