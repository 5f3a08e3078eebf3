package e2e

import (
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestGatewayPrefetch substitutes closures through read gateways that ask
// the cache for a closure's narinfos at once and fetch its NARs ahead
// (the default), with the real nix 2.8 and the real onion: what arrives
// is the pushed closure; a path forgotten between the closure answer and
// Nix's NAR request fails cleanly; a LAN cache (--cache-dir) serves a
// second, fresh store with the onion gone; and --cache-size holds under a
// closure larger than it.
func TestGatewayPrefetch(t *testing.T) {
	state, cache := t.TempDir(), filepath.Join(t.TempDir(), "cache")
	reader := addKey(t, state, "lan", "reader")
	pushAddr := freeAddr(t)
	srv := startOnionServer(t, state, cache, "--listen-write", pushAddr)

	key := newSigningKey(t, "e2e-prefetch-1")
	src := newNix(t)
	wide, wideClosure := src.buildWideClosure(20)
	big, bigClosure := src.buildClosure(512)
	doomed, doomedClosure := src.buildClosure(1)
	src.must("nix", "copy", "--to", "http://"+pushAddr+"?compression=none&secret-key="+key.secretFile, wide, big, doomed)

	lanDir := filepath.Join(t.TempDir(), "lan")
	smallDir := filepath.Join(t.TempDir(), "small")
	const small = 256 << 10
	lan := startGateway(t, reader, "--cache-dir", lanDir)
	onDemand := startGateway(t, reader, "--prefetch=false")
	tight := startGateway(t, reader, "--cache-dir", smallDir, "--cache-size", "256K")
	for _, g := range []*gateway{lan, onDemand, tight} {
		g.waitReachable(t)
	}
	substituter := func(g *gateway) *nixClient {
		return newNix(t, "substituters = "+g.url, "trusted-public-keys = "+key.public, "require-sigs = true")
	}

	t.Run("a closure arrives whole", func(t *testing.T) {
		dst := substituter(lan)
		dst.must("nix-store", "--realise", wide)
		for _, p := range wideClosure {
			sameTree(t, src, dst, p)
		}
		// The NARs came ahead into the LAN cache, with their narinfos.
		for _, p := range wideClosure {
			if _, err := os.Stat(filepath.Join(lanDir, hashOf(p)+".narinfo")); err != nil {
				t.Errorf("the LAN cache has no narinfo of %s: %v", p, err)
			}
		}
	})

	t.Run("cache-size holds", func(t *testing.T) {
		dst := substituter(tight)
		dst.must("nix-store", "--realise", big)
		for _, p := range bigClosure {
			sameTree(t, src, dst, p)
		}
		if n := treeSize(t, smallDir); n > small {
			t.Errorf("--cache-size 256K: the cache holds %d bytes", n)
		}
	})

	t.Run("a path forgotten after the closure answer", func(t *testing.T) {
		// The gateway learns the closure's narinfos...
		if code, body := httpDo(t, "GET", onDemand.url+"/"+hashOf(doomed)+".narinfo", nil); code != 200 {
			t.Fatalf("narinfo through the gateway: %d %s", code, body)
		}
		// ...then the cache forgets the whole closure, and Nix asks.
		leaf := named(t, doomedClosure, "-lib")
		if out, code := runKissOnion(t, "forget", "--cache-dir", cache, "--state-dir", state, "--with-referrers", leaf); code != 0 {
			t.Fatalf("forget: exit %d\n%s", code, out)
		}
		dst := substituter(onDemand)
		out, err := dst.run(nil, "nix-store", "--realise", doomed)
		if err == nil {
			t.Fatalf("a forgotten closure was substituted:\n%s", out)
		}
		for _, p := range doomedClosure {
			if dst.hasPath(p) {
				t.Errorf("%s is valid in the store after its NAR was gone", p)
			}
			if _, err := os.Lstat(dst.physical(p)); err == nil {
				t.Errorf("%s left a file in the store", p)
			}
		}
	})

	t.Run("the LAN cache serves with the onion gone", func(t *testing.T) {
		srv.stop()
		dst := substituter(lan)
		began := time.Now()
		dst.must("nix-store", "--realise", wide)
		for _, p := range wideClosure {
			sameTree(t, src, dst, p)
		}
		t.Logf("substituted %d paths from the LAN cache with the onion gone in %s", len(wideClosure), time.Since(began).Round(time.Millisecond))
		if code, h := lan.health(t); code == 200 || h.Reachable {
			t.Errorf("the gateway says the stopped onion is reachable: %d %+v", code, h)
		}
	})
}

// treeSize is the bytes of the regular files under dir.
func treeSize(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}
