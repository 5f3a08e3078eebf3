package e2e

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// TestBucketForget forgets paths from a cache on a bucket of a real
// SeaweedFS through the write onion of one serve, with 'kiss-onion forget
// --bundle', and substitutes with the real nix through the read onion of
// another serve on the same bucket: a referenced path is refused with its
// referrers listed, and once the top of the closure is forgotten it no
// longer substitutes while what it referred to still does, byte for byte.
func TestBucketForget(t *testing.T) {
	srv := s3test.Start(t)
	key := newSigningKey(t, "e2e-bucket-forget-1")
	b := newBucketStore(t, srv, "forget")

	stateA, stateB := t.TempDir(), t.TempDir()
	writer := addKey(t, stateA, "ci", "writer")
	reader := addKey(t, stateB, "laptop", "reader")
	pushAddr := freeAddr(t)
	startOnionServer(t, stateA, filepath.Join(t.TempDir(), "unused"), append(b.args(), "--listen-write", pushAddr)...)
	startOnionServer(t, stateB, filepath.Join(t.TempDir(), "unused"), b.args()...)

	src := newNix(t)
	top, closure := src.buildClosure(64)
	lib, data := named(t, closure, "-lib"), named(t, closure, "-data")
	src.must("nix", "copy", "--to", "http://"+pushAddr+"?compression=zstd&write-nar-listing=true&secret-key="+key.secretFile, top)
	// Without prefetch the gateway only forwards: with it, the closure
	// answer and NARs it fetched ahead for the GET below would be its
	// own copy, as a machine that substituted the path keeps its copy.
	g := startGateway(t, reader, "--prefetch=false")
	g.waitReachable(t)
	// The second front end holds the narinfo in its index.
	if code, body := httpDo(t, "GET", g.url+"/"+hashOf(top)+".narinfo", nil); code != 200 {
		t.Fatalf("GET the top's narinfo through the other front end: %d %s", code, body)
	}

	forget := func(args ...string) (string, int) {
		return runKissOnion(t, append([]string{"forget", "--bundle", writer, "--tor-config", torNetConf, "--state-dir", t.TempDir()}, args...)...)
	}
	out, code := forget(lib)
	for _, want := range []string{"referrer " + top + "\n", "referrer " + data + "\n", "still referenced", "kiss-onion: hint:"} {
		if !strings.Contains(out, want) {
			t.Errorf("a forget of a referenced path: output lacks %q:\n%s", want, out)
		}
	}
	if code != 1 {
		t.Errorf("a forget of a referenced path: exit %d, want 1", code)
	}
	out, code = forget(top)
	if code != 0 || !strings.Contains(out, "kiss-onion: forgot "+top) {
		t.Fatalf("forget %s: exit %d\n%s", top, code, out)
	}
	if _, err := b.st.Stat(context.Background(), hashOf(top)+".narinfo"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the top's narinfo after the forget: %v, want it gone", err)
	}
	b.checkWhole(t)

	dst := newNix(t, "substituters = "+g.url, "trusted-public-keys = "+key.public, "require-sigs = true")
	if _, err := dst.run(nil, "nix-store", "--realise", top); err == nil || dst.hasPath(top) {
		t.Errorf("%s still substitutes through the other front end after it was forgotten", top)
	}
	dst.must("nix-store", "--realise", data)
	for _, p := range []string{data, lib} {
		sameTree(t, src, dst, p)
	}
}
