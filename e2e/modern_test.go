package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestNix235UploadOrderSurvivesScheduledPrunes replays what Nix 2.35's
// nix copy sends, which no binary built here can: every NAR first,
// largest first, and only then the narinfos, while serve prunes every 2 s
// with a grace of 1 s. A NAR waits far longer than the grace for the
// narinfo that names it; it must still be there when that narinfo comes.
func TestNix235UploadOrderSurvivesScheduledPrunes(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	src := newNix(t)
	var tops []string
	for i := 0; i < 3; i++ {
		top, _ := src.buildClosure(64 * (i + 1))
		tops = append(tops, top)
	}
	// What Nix would send, from a file:// copy of the closures.
	staged := t.TempDir()
	src.must("nix", append([]string{"copy", "--to", "file://" + staged + "?compression=zstd&secret-key=" + key.secretFile}, tops...)...)
	nars, narinfos := stagedUploads(t, staged)

	srv := startServer(t, "", "--prune-interval", "2s", "--prune-grace", "1s")
	put := func(rel string) {
		t.Helper()
		data, err := os.ReadFile(filepath.Join(staged, rel))
		if err != nil {
			t.Fatal(err)
		}
		if code, body := httpDo(t, "PUT", srv.writeURL+"/"+rel, bytes.NewReader(data)); code != 201 && code != 204 {
			t.Fatalf("PUT %s: %d %s\n%s", rel, code, body, srv.proc.out)
		}
	}
	// The NAR phase: the first NAR then waits for 6 s of other NARs, as
	// behind a slow link, through three scheduled prunes.
	put(nars[0])
	for end := time.Now().Add(6 * time.Second); time.Now().Before(end); {
		for _, rel := range nars[1:] {
			put(rel)
			time.Sleep(200 * time.Millisecond)
		}
	}
	// The narinfo phase, references first.
	for _, rel := range narinfos {
		put(rel)
	}
	sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	for _, top := range tops {
		sub.must("nix-store", "--realise", top)
		sameTree(t, src, sub, top)
	}
}

// stagedUploads returns the NARs of a file:// cache, largest first, and
// its narinfos in an order where each comes after its references.
func stagedUploads(t *testing.T, dir string) (nars, narinfos []string) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "nar"))
	if err != nil {
		t.Fatal(err)
	}
	size := map[string]int64{}
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		nars = append(nars, "nar/"+e.Name())
		size["nar/"+e.Name()] = fi.Size()
	}
	sort.Slice(nars, func(i, j int) bool { return size[nars[i]] > size[nars[j]] })
	refs := map[string][]string{} // narinfo -> narinfos of its references
	files, _ := filepath.Glob(filepath.Join(dir, "*.narinfo"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		name := filepath.Base(f)
		for _, line := range strings.Split(string(data), "\n") {
			if rest, ok := strings.CutPrefix(line, "References: "); ok {
				for _, r := range strings.Fields(rest) {
					if dep := r[:32] + ".narinfo"; dep != name {
						refs[name] = append(refs[name], dep)
					}
				}
			}
		}
		refs[name] = append(refs[name], []string{}...)
	}
	done := map[string]bool{}
	var visit func(string)
	visit = func(n string) {
		if done[n] {
			return
		}
		done[n] = true
		for _, d := range refs[n] {
			visit(d)
		}
		narinfos = append(narinfos, n)
	}
	names := make([]string, 0, len(refs))
	for n := range refs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		visit(n)
	}
	if len(nars) == 0 || len(narinfos) < len(nars) {
		t.Fatalf("staged %d NARs and %d narinfos", len(nars), len(narinfos))
	}
	return nars, narinfos
}

// modernNixBin is where scripts/deps builds Nix 2.18.9 from
// ../shared/modern-nix (its build script's default prefix);
// KISS_ONION_NIX_2_18 names another.
func modernNixBin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("KISS_ONION_NIX_2_18")
	if bin == "" {
		bin = "/opt/nix-2.18/bin"
	}
	if _, err := os.Stat(filepath.Join(bin, "nix")); err != nil {
		t.Fatalf("Nix 2.18.9 is not at %s (%v): run scripts/deps, which builds it from ../shared/modern-nix, or set KISS_ONION_NIX_2_18", bin, err)
	}
	return bin
}

// newModernNix is newNix with Nix 2.18.9, its state and configuration
// in scratch directories.
func newModernNix(t testing.TB, extraConfig ...string) *nixClient {
	t.Helper()
	n := newNix(t, extraConfig...)
	n.bin = modernNixBin(t)
	scratch := t.TempDir()
	for _, v := range []string{"NIX_CONF_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR"} {
		dir := filepath.Join(scratch, strings.ToLower(v))
		os.MkdirAll(dir, 0o755)
		n.env0 = append(n.env0, v+"="+dir)
	}
	return n
}

// wideClosureExpr builds top -> mid-i -> leaf-i, leaf-(i+1): 2n paths, each
// leaf a random file of i+1 KiB, so that nix copy has many paths to send
// at once. (head, not dd: Nix 2.18's sandbox now and then kills busybox dd
// with signal 9 in a run of many builds.)
const wideClosureExpr = `{ nonce, n }:
let
  bb = "` + busybox + `";
  mk = name: script: derivation { inherit name nonce; system = builtins.currentSystem; builder = bb; args = [ "sh" "-c" script ]; };
  leaves = builtins.genList (i: mk "leaf-${toString i}" "${bb} head -c ${toString ((i + 1) * 1024)} /dev/urandom > $out") n;
  mids = builtins.genList (i: mk "mid-${toString i}" "echo ${builtins.elemAt leaves i} ${builtins.elemAt leaves (i + 1)} > $out") (n - 1);
in mk "top" "echo ${toString mids} > $out"
`

// buildWideClosure builds wideClosureExpr with n leaves and returns the
// top path and its closure.
func (n *nixClient) buildWideClosure(leaves int) (string, []string) {
	n.t.Helper()
	expr := filepath.Join(n.t.TempDir(), "wide.nix")
	if err := os.WriteFile(expr, []byte(wideClosureExpr), 0o644); err != nil {
		n.t.Fatal(err)
	}
	out := n.must("nix-build", expr, "--argstr", "nonce", strconv.FormatInt(time.Now().UnixNano(), 36), "--arg", "n", strconv.Itoa(leaves), "--no-out-link")
	top := lastLine(out)
	return top, strings.Fields(n.must("nix-store", "-qR", top))
}

// TestNix218RoundTrip pushes a closure of 44 paths with Nix 2.18.9, which
// uploads in parallel, with listings, then substitutes it into a fresh
// store with signatures required and verifies it: over serve's loopback
// listeners, then through the write and read gateways into the onions.
func TestNix218RoundTrip(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	src := newModernNix(t)
	if out := src.must("nix", "--version"); !strings.Contains(out, "2.18.9") {
		t.Fatalf("nix --version: %s", out)
	}
	top, closure := src.buildWideClosure(22)
	if len(closure) < 40 {
		t.Fatalf("closure of %d paths, want 40 or more", len(closure))
	}
	params := "?compression=zstd&write-nar-listing=true&secret-key=" + key.secretFile
	roundTrip := func(t *testing.T, cacheDir, writeURL, readURL string) {
		src.must("nix", "copy", "--to", writeURL+params, top)
		for _, p := range closure {
			hash := strings.TrimPrefix(p, "/nix/store/")[:32]
			if _, err := visibleFile(t, cacheDir, hash+".narinfo"); err != nil {
				t.Fatalf("no narinfo for %s after nix copy: %v", p, err)
			}
			if ls, err := os.ReadFile(filepath.Join(cacheDir, hash+".ls")); err != nil || !bytes.HasPrefix(ls, []byte("{")) {
				t.Errorf("no listing for %s: %v", p, err)
			}
		}
		dst := newModernNix(t, "substituters = "+readURL, "trusted-public-keys = "+key.public, "require-sigs = true")
		dst.must("nix-store", "--realise", top)
		dst.must("nix", "store", "verify", "--recursive", top)
		for _, p := range closure {
			sameTree(t, src, dst, p)
		}
	}
	t.Run("loopback listeners", func(t *testing.T) {
		srv := startServer(t, "")
		roundTrip(t, srv.cacheDir, srv.writeURL, srv.readURL)
	})
	t.Run("through the gateways", func(t *testing.T) {
		state, cache := t.TempDir(), filepath.Join(t.TempDir(), "cache")
		writer := addKey(t, state, "ci", "writer")
		reader := addKey(t, state, "laptop", "reader")
		startOnionServer(t, state, cache)
		w, r := startGateway(t, writer, "--write"), startGateway(t, reader)
		w.waitReachable(t)
		r.waitReachable(t)
		roundTrip(t, cache, w.url, r.url)
	})
}
