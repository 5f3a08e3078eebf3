package e2e

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// TestBucketUpstream: a serve on a bucket of a real SeaweedFS, with an
// upstream, gives a reader behind its read onion a closure that only
// upstream has; the closure then sits in the bucket as upstream has it,
// rooted by the keep marker, and another front end on the bucket serves
// it with upstream gone.
func TestBucketUpstream(t *testing.T) {
	srv := s3test.Start(t)
	up := newUpstreamCache(t)
	top, closure := up.add(t, "zstd", "write-nar-listing=true")
	b := newBucketStore(t, srv, "pulled")

	state := t.TempDir()
	reader := addKey(t, state, "laptop", "reader")
	a := startOnionServer(t, state, filepath.Join(t.TempDir(), "unused"),
		append(b.args(), "--upstream", up.readURL, "--upstream-key", up.key.public, "--upstream-keep", "24h")...)
	g := startGateway(t, reader)
	g.waitReachable(t)
	sub := newNix(t, "substituters = "+g.url, "trusted-public-keys = "+up.key.public, "require-sigs = true")
	sub.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, up.src, sub, p)
	}

	// Each narinfo is stored after its NAR; Nix may finish first.
	waitReady(t, a.proc, "the closure's narinfos in the bucket", time.Minute, func() bool {
		for _, p := range closure {
			if !b.has(t, strings.TrimPrefix(p, "/nix/store/")[:32]+".narinfo") {
				return false
			}
		}
		return true
	})
	for _, p := range closure {
		hash := strings.TrimPrefix(p, "/nix/store/")[:32]
		for _, name := range []string{hash + ".narinfo", hash + ".ls"} {
			want, _ := os.ReadFile(filepath.Join(up.cacheDir, name))
			if got := b.read(t, name); string(got) != string(want) || len(want) == 0 {
				t.Errorf("%s in the bucket (%d bytes) is not upstream's (%d bytes)", name, len(got), len(want))
			}
		}
	}
	b.checkWhole(t)
	// --upstream-keep roots what came, with a marker in the bucket.
	waitReady(t, a.proc, "the keep marker naming the closure", time.Minute, func() bool {
		m := string(b.read(t, "gcroots/upstream/recent"))
		for _, p := range closure {
			if !strings.Contains(m, "\n"+p+"\n") {
				return false
			}
		}
		return true
	})

	up.kill()
	readAddr := freeAddr(t)
	other := start(t, append([]string{"serve", "--tor", "off", "--state-dir", t.TempDir(), "--listen", readAddr}, b.args()...)...)
	waitHTTP(t, other, "http://"+readAddr+"/nix-cache-info")
	again := newNix(t, "substituters = http://"+readAddr, "trusted-public-keys = "+up.key.public, "require-sigs = true")
	again.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, up.src, again, p)
	}
}

// has reports whether the bucket holds name.
func (b *bucketStore) has(t *testing.T, name string) bool {
	t.Helper()
	_, err := b.st.Stat(context.Background(), name)
	return err == nil
}

// read returns the object name, nil when it is not there.
func (b *bucketStore) read(t *testing.T, name string) []byte {
	t.Helper()
	rc, _, err := b.st.Get(context.Background(), name, 0, -1)
	if err != nil {
		return nil
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return data
}
