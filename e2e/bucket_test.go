package e2e

import (
	"context"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// bucketStore is a prefix of a real SeaweedFS bucket, as serve's --store
// URL and a credentials file, and a client to look at its objects.
type bucketStore struct {
	url, credentials string
	st               *s3store.Store
}

func newBucketStore(t *testing.T, srv *s3test.Server, prefix string) *bucketStore {
	t.Helper()
	creds := filepath.Join(t.TempDir(), "credentials")
	data := "[default]\naws_access_key_id = " + srv.AccessKey + "\naws_secret_access_key = " + srv.SecretKey + "\n"
	if err := os.WriteFile(creds, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
		Bucket: srv.Bucket, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return &bucketStore{url: "s3://" + srv.Bucket + "/" + prefix + "?endpoint=http://" + srv.Endpoint + "&region=" + srv.Region,
		credentials: creds, st: st}
}

// args are serve's flags for the bucket.
func (b *bucketStore) args() []string {
	return []string{"--store", b.url, "--s3-credentials", b.credentials}
}

// objects lists the bucket's objects under dir ("" for all).
func (b *bucketStore) objects(t *testing.T, dir string) []s3store.Info {
	t.Helper()
	var out []s3store.Info
	if err := b.st.List(context.Background(), dir, func(page []s3store.Info) error { out = append(out, page...); return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

// checkWhole fails unless every NAR in the bucket holds what its name
// promises and every narinfo's NAR is there: no object is partial, no
// narinfo dangles.
func (b *bucketStore) checkWhole(t *testing.T) {
	t.Helper()
	have := map[string]bool{}
	for _, in := range b.objects(t, "nar/") {
		have[in.Name] = true
		rc, _, err := b.st.Get(context.Background(), in.Name, 0, -1)
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.New()
		io.Copy(sum, rc)
		rc.Close()
		if want := nixcache.NarURLHash(in.Name); want != "" && nixcache.Base32(sum.Sum(nil)) != want {
			t.Errorf("%s (%d bytes) does not hold what its name promises", in.Name, in.Size)
		}
	}
	for _, in := range b.objects(t, "") {
		if !strings.HasSuffix(in.Name, ".narinfo") || strings.Contains(in.Name, "/") {
			continue
		}
		rc, _, err := b.st.Get(context.Background(), in.Name, 0, -1)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(rc)
		rc.Close()
		ni, err := nixcache.ParseNarInfo(data)
		if err != nil {
			t.Fatalf("%s: %v", in.Name, err)
		}
		if !have[ni.URL] {
			t.Errorf("%s names %s, which is not in the bucket", in.Name, ni.URL)
		}
	}
}

// TestBucketStore runs serve on a bucket of a real SeaweedFS, with the
// real nix and the real onions: a closure pushed through one front end is
// substituted through the other's read onion, and a serve killed in the
// middle of an upload leaves no object behind.
func TestBucketStore(t *testing.T) {
	srv := s3test.Start(t)
	key := newSigningKey(t, "e2e-bucket-1")

	t.Run("pushed through one front end, substituted through the other", func(t *testing.T) {
		b := newBucketStore(t, srv, "two")
		pushAddr, readAddr := freeAddr(t), freeAddr(t)
		a := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen-write", pushAddr, "--listen", readAddr}, b.args()...)...)
		waitHTTP(t, a, "http://"+readAddr+"/nix-cache-info")
		stateB := t.TempDir()
		reader := addKey(t, stateB, "laptop", "reader")
		startOnionServer(t, stateB, filepath.Join(t.TempDir(), "unused"), b.args()...)

		src := newNix(t)
		wide, closure := src.buildWideClosure(12)
		top, small := src.buildClosure(256)
		src.must("nix", "copy", "--to", "http://"+pushAddr+"?compression=zstd&write-nar-listing=true&secret-key="+key.secretFile, wide, top)
		b.checkWhole(t)
		if infos := b.objects(t, "nar/"); len(infos) < len(closure)+len(small) {
			t.Fatalf("%d NARs in the bucket after pushing %d paths", len(infos), len(closure)+len(small))
		}

		g := startGateway(t, reader)
		g.waitReachable(t)
		dst := newNix(t, "substituters = "+g.url, "trusted-public-keys = "+key.public, "require-sigs = true")
		dst.must("nix-store", "--realise", wide, top)
		for _, p := range append(closure, small...) {
			sameTree(t, src, dst, p)
		}
		// And straight from the first front end, as nix copy --from.
		direct := newNix(t, "trusted-public-keys = "+key.public)
		direct.must("nix", "copy", "--from", "http://"+readAddr, top)
		for _, p := range small {
			sameTree(t, src, direct, p)
		}
	})

	t.Run("Nix 2.18 uploads in parallel", func(t *testing.T) {
		b := newBucketStore(t, srv, "modern")
		pushAddr, readAddr := freeAddr(t), freeAddr(t)
		s := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen-write", pushAddr, "--listen", readAddr}, b.args()...)...)
		waitHTTP(t, s, "http://"+readAddr+"/nix-cache-info")
		src := newModernNix(t)
		top, closure := src.buildWideClosure(22)
		src.must("nix", "copy", "--to", "http://"+pushAddr+"?compression=zstd&write-nar-listing=true&secret-key="+key.secretFile, top)
		b.checkWhole(t)
		dst := newModernNix(t, "substituters = http://"+readAddr, "trusted-public-keys = "+key.public, "require-sigs = true")
		dst.must("nix-store", "--realise", top)
		dst.must("nix", "store", "verify", "--recursive", top)
		for _, p := range closure {
			sameTree(t, src, dst, p)
		}
		if out := dst.must("nix", "store", "ls", "--store", "http://"+readAddr, closure[len(closure)-1]); out == "" {
			t.Error("nix store ls through the bucket's listing: nothing")
		}
	})

	t.Run("a scheduled prune keeps exactly the rooted closure", func(t *testing.T) {
		b := newBucketStore(t, srv, "pruned")
		w, r := freeAddr(t), freeAddr(t)
		s := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen-write", w, "--listen", r,
			"--prune-interval", "1s", "--prune-grace", "0s"}, b.args()...)...)
		waitHTTP(t, s, "http://"+r+"/nix-cache-info")
		src := newNix(t)
		kept, keptClosure := src.buildClosure(16)
		gone, goneClosure := src.buildClosure(16)
		for _, top := range []string{kept, gone} {
			// Under a lock, so that no prune runs between the upload and
			// the marker; refused with 503 while a prune holds the bucket.
			for end := time.Now().Add(2 * time.Minute); ; time.Sleep(100 * time.Millisecond) {
				code, body := httpDo(t, "PUT", "http://"+w+"/gcroots/.lock/upload", strings.NewReader("e2e"))
				if code == 201 {
					break
				}
				if code != 503 || time.Now().After(end) {
					t.Fatalf("take lock: %d %s", code, body)
				}
			}
			src.must("nix", "copy", "--to", "http://"+w+"?compression=zstd&secret-key="+key.secretFile, top)
			if top == kept {
				if code, body := httpDo(t, "PUT", "http://"+w+"/gcroots/web1", strings.NewReader(kept+"\n")); code != 201 {
					t.Fatalf("PUT marker: %d %s", code, body)
				}
			}
			if code, body := httpDo(t, "DELETE", "http://"+w+"/gcroots/.lock/upload", nil); code != 204 {
				t.Fatalf("drop lock: %d %s", code, body)
			}
		}
		has := func(p string) bool {
			_, err := b.st.Stat(context.Background(), hashOf(p)+".narinfo")
			return err == nil
		}
		waitReady(t, s, "the unrooted closure pruned from the bucket", 2*time.Minute, func() bool {
			for _, p := range goneClosure {
				if has(p) {
					return false
				}
			}
			return true
		})
		for _, p := range keptClosure {
			if !has(p) {
				t.Fatalf("rooted %s pruned", p)
			}
		}
		b.checkWhole(t)
		dst := newNix(t, "substituters = http://"+r, "trusted-public-keys = "+key.public)
		dst.must("nix-store", "--realise", kept)
		for _, p := range keptClosure {
			sameTree(t, src, dst, p)
		}
		if !strings.Contains(s.out.String(), "component=prune") {
			t.Errorf("serve logged no prune summary:\n%s", s.out)
		}
	})

	t.Run("a serve killed mid-upload leaves no object", func(t *testing.T) {
		b := newBucketStore(t, srv, "killed")
		addr := freeAddr(t)
		s := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen-write", addr}, b.args()...)...)
		waitHTTP(t, s, "http://"+addr+"/nix-cache-info")
		name := "nar/" + strings.Repeat("0", 52) + ".nar"
		cut := slowPut(t, "http://"+addr+"/"+name, 41) // past two parts of 16 MiB
		s.kill()
		cut()
		if _, err := b.st.Stat(context.Background(), name); err == nil {
			t.Fatal("the killed upload is an object in the bucket")
		}
		if objs := b.objects(t, "nar/"); len(objs) != 0 {
			t.Fatalf("objects under nar/ after a killed upload: %v", objs)
		}
		// The parts it left are invisible; a day later, prune aborts them.
		again := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen", addr}, b.args()...)...)
		waitHTTP(t, again, "http://"+addr+"/nix-cache-info")
		if code, _ := httpDo(t, "GET", "http://"+addr+"/"+name, nil); code != 404 {
			t.Fatalf("GET of the killed upload: %d, want 404", code)
		}
	})
}
