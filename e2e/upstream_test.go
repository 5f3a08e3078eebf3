package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// upstreamCache is a second cache, filled by the real `nix copy --to
// file://` with its own key and served by a second serve: what
// cache.nixos.org is to a real appliance.
type upstreamCache struct {
	*server
	key signingKey
	src *nixClient
}

func newUpstreamCache(t *testing.T) *upstreamCache {
	t.Helper()
	u := &upstreamCache{key: newSigningKey(t, "upstream-1"), src: newNix(t)}
	dir := filepath.Join(t.TempDir(), "upstream")
	u.server = startServer(t, dir)
	return u
}

// add builds a closure and copies it into the upstream cache, with more
// store parameters (like write-nar-listing=true) when given.
func (u *upstreamCache) add(t *testing.T, compression string, params ...string) (string, []string) {
	t.Helper()
	top, closure := u.src.buildClosure(128)
	extra := ""
	for _, p := range params {
		extra += "&" + p
	}
	u.src.must("nix", "copy", "--to", "file://"+u.cacheDir+"?compression="+compression+"&secret-key="+u.key.secretFile+extra, top)
	return top, closure
}

func narInfoField(ni []byte, field string) string {
	for _, l := range strings.Split(string(ni), "\n") {
		if v, ok := strings.CutPrefix(l, field+": "); ok {
			return v
		}
	}
	return ""
}

// TestUpstreamFallback: a reader substitutes, through the cache's read
// listener, a closure that only upstream has; the cache keeps it with the
// upstream's signature, and the listings upstream has, and serves it from
// disk once upstream is gone.
func TestUpstreamFallback(t *testing.T) {
	up := newUpstreamCache(t)
	top, closure := up.add(t, "xz", "write-nar-listing=true")
	srv := startServer(t, "", "--upstream", up.readURL, "--upstream-key", up.key.public)

	sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+up.key.public)
	sub.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, up.src, sub, p)
		hash := strings.TrimPrefix(p, "/nix/store/")[:32]
		ni, err := os.ReadFile(filepath.Join(srv.cacheDir, hash+".narinfo"))
		if err != nil {
			t.Fatalf("%s not kept in the cache: %v", p, err)
		}
		upNi, _ := os.ReadFile(filepath.Join(up.cacheDir, hash+".narinfo"))
		if string(ni) != string(upNi) {
			t.Errorf("narinfo of %s changed on the way:\n%s", p, ni)
		}
		if _, err := os.Stat(filepath.Join(srv.cacheDir, narInfoField(ni, "URL"))); err != nil {
			t.Errorf("NAR of %s not kept: %v", p, err)
		}
		ls, err := os.ReadFile(filepath.Join(srv.cacheDir, hash+".ls"))
		upLs, _ := os.ReadFile(filepath.Join(up.cacheDir, hash+".ls"))
		if err != nil || len(upLs) == 0 || string(ls) != string(upLs) {
			t.Errorf("listing of %s not kept as upstream has it (%d bytes): %v", p, len(upLs), err)
		}
	}

	up.kill()
	again := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+up.key.public)
	again.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, up.src, again, p)
	}
	// Nix reads the listing for nix store ls on a binary cache.
	if out := again.must("nix", "store", "ls", "--store", srv.readURL, "-R", top); !strings.Contains(out, "/") {
		t.Errorf("nix store ls of %s from the cache: %q", top, out)
	}
}

// TestUpstreamRefusals: a tampered upstream NAR is refused and nothing of
// it stays; a path signed by a key the cache does not trust upstream is a
// 404; a dead upstream costs the reader a miss within seconds.
func TestUpstreamRefusals(t *testing.T) {
	t.Run("tampered NAR", func(t *testing.T) {
		up := newUpstreamCache(t)
		top, _ := up.add(t, "none")
		hash := strings.TrimPrefix(top, "/nix/store/")[:32]
		ni, err := os.ReadFile(filepath.Join(up.cacheDir, hash+".narinfo"))
		if err != nil {
			t.Fatal(err)
		}
		url := narInfoField(ni, "URL")
		nar := filepath.Join(up.cacheDir, url)
		b, err := os.ReadFile(nar)
		if err != nil {
			t.Fatal(err)
		}
		i := strings.Index(string(b), "hello")
		b[i] = 'j' // same size, other content
		if err := os.WriteFile(nar, b, 0o644); err != nil {
			t.Fatal(err)
		}
		srv := startServer(t, "", "--upstream", up.readURL, "--upstream-key", up.key.public)
		// The narinfo is answered once the closure's narinfos are checked
		// (it is signed); the NAR streams to the reader, cut off when its
		// hash turns out wrong, and nothing of the path is stored.
		sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+up.key.public)
		if out, err := sub.run(nil, "nix-store", "--realise", top); err == nil || sub.hasPath(top) {
			t.Fatalf("a tampered path was substituted:\n%s", out)
		}
		if code, _ := httpDo(t, "GET", srv.readURL+"/"+hash+".narinfo", nil); code != 404 {
			t.Errorf("narinfo of a path with a tampered NAR, after its download failed: %d, want 404", code)
		}
		if !strings.Contains(srv.out.String(), "does not match") {
			t.Errorf("serve did not log the hash mismatch:\n%s", srv.out)
		}
		for _, rel := range []string{hash + ".narinfo", url} {
			if _, err := os.Stat(filepath.Join(srv.cacheDir, rel)); err == nil {
				t.Errorf("%s of the tampered path stayed in the cache", rel)
			}
		}
		if ents, _ := os.ReadDir(filepath.Join(srv.cacheDir, ".tmp")); len(ents) > 0 {
			t.Errorf("left in .tmp: %v", ents)
		}
	})

	t.Run("foreign key", func(t *testing.T) {
		up := newUpstreamCache(t)
		top, _ := up.add(t, "zstd")
		other := newSigningKey(t, "other-1")
		srv := startServer(t, "", "--upstream", up.readURL, "--upstream-key", other.public)
		hash := strings.TrimPrefix(top, "/nix/store/")[:32]
		if code, _ := httpDo(t, "GET", srv.readURL+"/"+hash+".narinfo", nil); code != 404 {
			t.Errorf("narinfo signed by an untrusted key: %d, want 404", code)
		}
		if _, err := os.Stat(filepath.Join(srv.cacheDir, hash+".narinfo")); err == nil {
			t.Error("a path signed by an untrusted key was stored")
		}
	})

	t.Run("dead upstream", func(t *testing.T) {
		src := newNix(t)
		top, _ := src.buildClosure(16)
		key := newSigningKey(t, "upstream-1")
		srv := startServer(t, "", "--upstream", "http://"+freeAddr(t), "--upstream-key", key.public)
		sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		start := time.Now()
		out, err := sub.run(nil, "nix-store", "--realise", top)
		if err == nil {
			t.Fatalf("substituted from a dead upstream:\n%s", out)
		}
		if d := time.Since(start); d > 15*time.Second {
			t.Errorf("a dead upstream cost the reader %s", d)
		}
	})
}

// TestUpstreamThroughOnions: an appliance with no clearnet reaches its
// upstream through its own tor (--upstream-via-tor; here upstream is an
// onion), and a reader substitutes, through the read onion, a closure
// that only upstream has.
func TestUpstreamThroughOnions(t *testing.T) {
	key := newSigningKey(t, "upstream-1")
	src := newNix(t)
	top, closure := src.buildClosure(64)
	upDir := filepath.Join(t.TempDir(), "upstream")
	src.must("nix", "copy", "--to", "file://"+upDir+"?compression=zstd&secret-key="+key.secretFile, top)
	up := startOnionServer(t, filepath.Join(t.TempDir(), "upstate"), upDir, "--public-read")

	srv := startOnionServer(t, filepath.Join(t.TempDir(), "state"), filepath.Join(t.TempDir(), "cache"), "--public-read",
		"--upstream", up.readURL, "--upstream-key", key.public, "--upstream-via-tor")
	reader := torClient(t, "")
	waitOnion(t, reader.SocksAddr(), srv.readURL)
	// The cache's tor needs a circuit to upstream's onion first; a failed
	// try is remembered for a while, so poll.
	hash := strings.TrimPrefix(top, "/nix/store/")[:32]
	deadline := time.Now().Add(4 * time.Minute)
	for {
		code, _, err := onionHTTP(reader.SocksAddr(), "GET", srv.readURL+"/"+hash+".narinfo", nil)
		if err == nil && code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("narinfo not fetched through tor in 4 minutes: %d %v\n%s", code, err, srv.out)
		}
		time.Sleep(2 * time.Second)
	}
	sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	if out, err := sub.run([]string{"ALL_PROXY=socks5h://" + reader.SocksAddr()}, "nix-store", "--realise", top); err != nil {
		t.Fatalf("substitute through the read onion: %v\n%s", err, out)
	}
	for _, p := range closure {
		sameTree(t, src, sub, p)
	}
}

// TestMirror: 'kiss-onion mirror' fetches closures from upstream ahead of
// time and roots them: a reader substitutes them once upstream is gone,
// and prunes keep them, while a path fetched on a miss is kept for
// --upstream-keep after its last read and then deleted.
func TestMirror(t *testing.T) {
	up := newUpstreamCache(t)
	top, closure := up.add(t, "zstd")
	other, otherClosure := up.add(t, "xz")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	closureFile := filepath.Join(t.TempDir(), "closure.txt")
	if err := os.WriteFile(closureFile, []byte(strings.Join(closure, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, code := runKissOnion(t, "mirror", "--cache-dir", cacheDir, "--from", up.readURL, "--upstream-key", up.key.public, "--name", "fleet", "--closure-file", closureFile)
	if code != 0 {
		t.Fatalf("mirror: exit %d\n%s", code, out)
	}
	marker, err := os.ReadFile(filepath.Join(cacheDir, "gcroots", "mirror", "fleet"))
	if err != nil || !strings.Contains(string(marker), top) {
		t.Fatalf("no marker naming %s: %v %q", top, err, marker)
	}
	// A path the upstream key did not sign fails the run.
	foreign := newSigningKey(t, "other-1")
	if out, code := runKissOnion(t, "mirror", "--cache-dir", cacheDir, "--from", up.readURL, "--upstream-key", foreign.public, "--name", "x", other); code != 1 || !strings.Contains(out, "kiss-onion: error:") {
		t.Errorf("mirror of a path with a foreign signature: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(cacheDir, "gcroots", "mirror", "x")); err == nil {
		t.Error("marker written for a failed mirror")
	}

	// other comes in on a miss, kept for a few seconds.
	srv := startServer(t, cacheDir, "--upstream", up.readURL, "--upstream-key", up.key.public, "--upstream-keep", "6s")
	sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+up.key.public)
	sub.must("nix-store", "--realise", other)
	// Killed: a graceful stop may wait 10 s for a connection the cache
	// opened to it and has not used yet.
	up.kill()
	if out, code := runKissOnion(t, "prune", "--state-dir", "", cacheDir); code != 0 {
		t.Fatalf("prune: exit %d\n%s", code, out)
	}
	for _, p := range otherClosure {
		hash := strings.TrimPrefix(p, "/nix/store/")[:32]
		if _, err := os.Stat(filepath.Join(cacheDir, hash+".narinfo")); err != nil {
			t.Errorf("prune deleted %s within its keep time", p)
		}
	}
	keep := filepath.Join(cacheDir, "gcroots", "upstream", "recent")
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		b, _ := os.ReadFile(keep)
		if !strings.Contains(string(b), other) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("keep marker still names %s after 20 s:\n%s", other, b)
		}
	}
	if out, code := runKissOnion(t, "prune", "--state-dir", "", cacheDir); code != 0 {
		t.Fatalf("prune: exit %d\n%s", code, out)
	}
	for _, p := range otherClosure {
		hash := strings.TrimPrefix(p, "/nix/store/")[:32]
		if _, err := os.Stat(filepath.Join(cacheDir, hash+".narinfo")); err == nil && !contains(closure, p) {
			t.Errorf("prune kept %s, fetched on a miss and unrooted", p)
		}
	}
	again := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+up.key.public)
	again.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, up.src, again, p)
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
