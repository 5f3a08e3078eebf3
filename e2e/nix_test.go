package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// busybox is the static shell the test derivations build with: a chroot
// store's build sees only what sandbox-paths lets in.
const busybox = "/bin/busybox"

// nixClient is Debian's nix-bin on a store of its own (--store DIR), with
// a fresh XDG_CACHE_HOME so that no narinfo answer is remembered between
// clients.
type nixClient struct {
	t     testing.TB
	root  string // the chroot store; /nix/store/x is at root/nix/store/x
	xdg   string
	extra []string // more NIX_CONFIG lines
	// bin is the directory of another Nix's programs (modern Nix), empty
	// for the nix on PATH; env are its variables.
	bin  string
	env0 []string
}

func newNix(t testing.TB, extraConfig ...string) *nixClient {
	t.Helper()
	dir := t.TempDir()
	n := &nixClient{t: t, root: filepath.Join(dir, "store"), xdg: filepath.Join(dir, "xdg"), extra: extraConfig}
	return n
}

func (n *nixClient) env() []string {
	conf := strings.Join(append([]string{
		"experimental-features = nix-command",
		"build-users-group =",
		"sandbox-paths = " + busybox,
		"substituters =",
		"narinfo-cache-negative-ttl = 0",
		"connect-timeout = 30",
	}, n.extra...), "\n")
	env := append([]string{"NIX_CONFIG=" + conf, "XDG_CACHE_HOME=" + n.xdg, "HOME=" + n.xdg, "PATH=" + os.Getenv("PATH")}, n.env0...)
	for _, k := range []string{"ALL_PROXY", "all_proxy"} {
		if v := os.Getenv(k); v != "" {
			env = append(env, k+"="+v)
		}
	}
	return env
}

// run runs a nix command against this client's store and returns its
// combined output.
func (n *nixClient) run(env []string, name string, args ...string) (string, error) {
	n.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if n.bin != "" {
		name = filepath.Join(n.bin, name)
	}
	cmd := exec.CommandContext(ctx, name, append([]string{"--store", n.root}, args...)...)
	cmd.Env = append(n.env(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func (n *nixClient) must(name string, args ...string) string {
	n.t.Helper()
	out, err := n.run(nil, name, args...)
	if err != nil {
		n.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// closureExpr builds app -> {lib, data}, data -> lib: a small closure
// with a shared dependency, a directory tree, an executable, a symlink
// and half a megabyte of random data. nonce makes every build distinct.
const closureExpr = `{ nonce, blobKiB ? "512" }:
let
  bb = "` + busybox + `";
  mk = name: script: derivation { inherit name nonce; system = builtins.currentSystem; builder = bb; args = [ "sh" "-c" script ]; };
  lib = mk "lib" "echo lib > $out";
  data = mk "data" "${bb} mkdir -p $out/share; ${bb} dd if=/dev/urandom of=$out/share/blob bs=1024 count=${blobKiB} 2>/dev/null; echo ${lib} > $out/share/lib-ref";
in mk "app" "${bb} mkdir -p $out/bin; echo ${lib} ${data} > $out/refs; echo building app; printf '#!/bin/sh\necho hello\n' > $out/bin/hello; ${bb} chmod +x $out/bin/hello; ${bb} ln -s hello $out/bin/hi"
`

// buildClosure builds closureExpr in this client's store and returns the
// top path and its closure.
func (n *nixClient) buildClosure(blobKiB int) (string, []string) {
	n.t.Helper()
	expr := filepath.Join(n.t.TempDir(), "closure.nix")
	if err := os.WriteFile(expr, []byte(closureExpr), 0o644); err != nil {
		n.t.Fatal(err)
	}
	nonce := make([]byte, 8)
	rand.Read(nonce)
	out := n.must("nix-build", expr, "--argstr", "nonce", hex.EncodeToString(nonce), "--argstr", "blobKiB", strconv.Itoa(blobKiB), "--no-out-link")
	top := lastLine(out)
	closure := strings.Fields(n.must("nix-store", "-qR", top))
	if len(closure) != 3 {
		n.t.Fatalf("closure of %s has %d paths, want 3: %v", top, len(closure), closure)
	}
	return top, closure
}

// physical returns where a store path of this client lives on disk.
func (n *nixClient) physical(p string) string { return filepath.Join(n.root, p) }

// hasPath reports whether the store holds p.
func (n *nixClient) hasPath(p string) bool {
	_, err := n.run(nil, "nix-store", "--check-validity", p)
	return err == nil
}

// signingKey is a binary-cache key pair from nix-store --generate-binary-cache-key.
type signingKey struct {
	secretFile string
	public     string
}

func newSigningKey(t testing.TB, name string) signingKey {
	t.Helper()
	dir := t.TempDir()
	sk, pk := filepath.Join(dir, "sk"), filepath.Join(dir, "pk")
	if out, err := exec.Command("nix-store", "--generate-binary-cache-key", name, sk, pk).CombinedOutput(); err != nil {
		t.Fatalf("generate key: %v\n%s", err, out)
	}
	b, err := os.ReadFile(pk)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{secretFile: sk, public: strings.TrimSpace(string(b))}
}

// sameTree fails unless the store path p has the same contents in a and b.
func sameTree(t testing.TB, a, b *nixClient, p string) {
	t.Helper()
	out, err := exec.Command("diff", "-r", "--no-dereference", a.physical(p), b.physical(p)).CombinedOutput()
	if err != nil {
		t.Fatalf("%s differs between the stores: %v\n%s", p, err, out)
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}
