package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
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
