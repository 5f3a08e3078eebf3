package e2e

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// hashOf returns a store path's hash part.
func hashOf(p string) string { return strings.TrimPrefix(p, "/nix/store/")[:32] }

// named returns the path of closure whose name ends in suffix.
func named(t *testing.T, closure []string, suffix string) string {
	t.Helper()
	for _, p := range closure {
		if strings.HasSuffix(p, suffix) {
			return p
		}
	}
	t.Fatalf("no path ending in %s in %v", suffix, closure)
	return ""
}

// cacheFiles lists the cache's files (but .tmp/ and the lock directory).
func cacheFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		rel, _ := filepath.Rel(dir, p)
		if err == nil && d.IsDir() && (rel == ".tmp" || rel == "gcroots/.lock") {
			return filepath.SkipDir
		}
		if err == nil && d.Type().IsRegular() {
			out = append(out, rel)
		}
		return nil
	})
	return out
}

// cacheProblems returns what makes the cache invalid: a narinfo whose
// NAR, or a reference's narinfo, is missing.
func cacheProblems(dir string) []string {
	var problems []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".narinfo") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // forgotten or pruned meanwhile
		}
		for _, l := range strings.Split(string(data), "\n") {
			if u, ok := strings.CutPrefix(l, "URL: "); ok {
				if _, err := os.Stat(filepath.Join(dir, u)); err != nil {
					problems = append(problems, fmt.Sprintf("%s: its NAR %s is missing", e.Name(), u))
				}
			}
			if refs, ok := strings.CutPrefix(l, "References: "); ok {
				for _, r := range strings.Fields(refs) {
					if _, err := os.Stat(filepath.Join(dir, r[:32]+".narinfo")); err != nil {
						problems = append(problems, fmt.Sprintf("%s: its reference %s is missing", e.Name(), r))
					}
				}
			}
		}
	}
	return problems
}

// TestForgetWithNix forgets paths pushed with the real nix, on the cache
// directory beside a running serve and through its write role, and
// substitutes with the real nix afterwards: what was forgotten does not
// substitute, the rest does, and a refused forget changes nothing.
func TestForgetWithNix(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	srv := startServer(t, "")
	src := newNix(t)
	push := srv.writeURL + "?compression=zstd&write-nar-listing=true&secret-key=" + key.secretFile
	app, closure := src.buildClosure(64)
	lib, data := named(t, closure, "-lib"), named(t, closure, "-data")
	app2, closure2 := src.buildClosure(64)
	lib2, data2 := named(t, closure2, "-lib"), named(t, closure2, "-data")
	src.must("nix", "copy", "--to", push, app, app2)
	for _, p := range append(closure, closure2...) {
		if _, err := visibleFile(t, srv.cacheDir, hashOf(p)+".narinfo"); err != nil {
			t.Fatalf("%s not in the cache after nix copy: %v", p, err)
		}
	}
	if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(app+"\n")); code != 201 {
		t.Fatalf("PUT marker: %d %s", code, body)
	}
	forget := func(args ...string) (string, int) {
		return runKissOnion(t, append([]string{"forget", "--cache-dir", srv.cacheDir, "--state-dir", srv.stateDir}, args...)...)
	}
	substitutes := func(p string) bool {
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		_, err := dst.run(nil, "nix-store", "--realise", p)
		return err == nil && dst.hasPath(p)
	}
	gone := func(p string) {
		t.Helper()
		for _, u := range []string{srv.readURL, srv.writeURL} {
			for _, method := range []string{"GET", "HEAD"} {
				if code, _ := httpDo(t, method, u+"/"+hashOf(p)+".narinfo", nil); code != 404 {
					t.Errorf("%s %s.narinfo on %s right after the forget: %d, want 404", method, hashOf(p), u, code)
				}
			}
		}
		if substitutes(p) {
			t.Errorf("%s still substitutes after it was forgotten", p)
		}
	}

	t.Run("a forget of a referenced path is refused and changes nothing", func(t *testing.T) {
		before := cacheFiles(t, srv.cacheDir)
		out, code := forget(lib)
		for _, want := range []string{"referrer " + app + "\n", "referrer " + data + "\n", "marker gcroots/web1 names " + app + "\n",
			"kiss-onion: error: forget: " + lib + ": still referenced", "kiss-onion: hint:"} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q:\n%s", want, out)
			}
		}
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		code, body := httpDo(t, "DELETE", srv.writeURL+"/"+hashOf(lib)+".narinfo", nil)
		if code != 409 || !strings.Contains(body, "referrer "+app+"\n") || !strings.Contains(body, "marker gcroots/web1 names "+app) {
			t.Errorf("DELETE of a referenced narinfo: %d %q, want 409 naming the referrers", code, body)
		}
		if code, _ := httpDo(t, "DELETE", srv.readURL+"/"+hashOf(app)+".narinfo", nil); code != 405 {
			t.Errorf("DELETE on the read role: %d, want 405", code)
		}
		if after := cacheFiles(t, srv.cacheDir); !slices.Equal(before, after) {
			t.Errorf("a refused forget changed the cache:\nbefore %q\nafter  %q", before, after)
		}
		if !substitutes(app) {
			t.Errorf("%s does not substitute after a refused forget", app)
		}
	})

	t.Run("a forgotten leaf no longer substitutes, what it refers to still does", func(t *testing.T) {
		out, code := forget(app)
		if code != 0 || !strings.Contains(out, "forgetting "+app) || !strings.Contains(out, "marker gcroots/web1 names "+app+", which is no longer in the cache") {
			t.Fatalf("forget %s: exit %d\n%s", app, code, out)
		}
		for _, f := range []string{hashOf(app) + ".narinfo", hashOf(app) + ".ls"} {
			if _, err := os.Stat(filepath.Join(srv.cacheDir, f)); err == nil {
				t.Errorf("%s is still in the cache", f)
			}
		}
		gone(app)
		for _, p := range []string{lib, data} {
			if !substitutes(p) {
				t.Errorf("%s does not substitute after its referrer was forgotten", p)
			}
		}
	})

	t.Run("a DELETE through the write role forgets a leaf", func(t *testing.T) {
		code, body := httpDo(t, "DELETE", srv.writeURL+"/"+hashOf(data)+".narinfo", nil)
		if code != 200 || !strings.Contains(body, "forgot "+data) {
			t.Fatalf("DELETE %s.narinfo: %d %q", hashOf(data), code, body)
		}
		gone(data)
		if !substitutes(lib) {
			t.Errorf("%s does not substitute after its referrers were forgotten", lib)
		}
		if code, _ := httpDo(t, "DELETE", srv.writeURL+"/"+hashOf(data)+".narinfo", nil); code != 404 {
			t.Errorf("a second DELETE: %d, want 404", code)
		}
	})

	t.Run("with --with-referrers the referrers go first", func(t *testing.T) {
		out, code := forget("--with-referrers", lib2)
		if code != 0 {
			t.Fatalf("forget --with-referrers: exit %d\n%s", code, out)
		}
		iApp, iData, iLib := strings.Index(out, "forgetting "+app2), strings.Index(out, "forgetting "+data2), strings.Index(out, "forgetting "+lib2)
		if iApp < 0 || iData < 0 || iLib < 0 || iApp > iData || iData > iLib {
			t.Errorf("not said, or not referrers first:\n%s", out)
		}
		for _, p := range closure2 {
			gone(p)
		}
		if !substitutes(lib) {
			t.Errorf("%s, of another closure, does not substitute", lib)
		}
	})
	if problems := cacheProblems(srv.cacheDir); len(problems) > 0 {
		t.Errorf("cache left invalid:\n%s", strings.Join(problems, "\n"))
	}
}

// TestForgetRacesUploadsAndPrunes runs forgets (on the directory and
// through the write role), uploads (under a lock and without) and prunes
// at once against one serve: the cache must stay closed under references,
// uploads under a lock must succeed and stay substitutable.
func TestForgetRacesUploadsAndPrunes(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	srv := startServer(t, "")
	src := newNix(t)
	push := srv.writeURL + "?compression=zstd&secret-key=" + key.secretFile
	const locked, loose = 3, 3
	var tops []string
	keep := map[string]bool{} // the hashes of the closures uploaded under a lock
	for i := 0; i < locked+loose; i++ {
		top, closure := src.buildClosure(16)
		tops = append(tops, top)
		if i < locked {
			for _, p := range closure {
				keep[hashOf(p)] = true
			}
		}
	}

	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var background sync.WaitGroup
	var mu sync.Mutex
	counts := map[string]int{}
	count := func(what string) { mu.Lock(); counts[what]++; mu.Unlock() }

	background.Add(1)
	go func() { // forgets of whatever is there, but the closures under a lock
		defer background.Done()
		rng := rand.New(rand.NewSource(1))
		for !stopped() {
			var candidates []string
			ents, _ := os.ReadDir(srv.cacheDir)
			for _, e := range ents {
				if h, ok := strings.CutSuffix(e.Name(), ".narinfo"); ok && !keep[h] {
					candidates = append(candidates, h)
				}
			}
			if len(candidates) == 0 {
				time.Sleep(50 * time.Millisecond)
				continue
			}
			h := candidates[rng.Intn(len(candidates))]
			switch rng.Intn(3) {
			case 0:
				code, body := httpDo(t, "DELETE", srv.writeURL+"/"+h+".narinfo", nil)
				switch code {
				case 200:
					count("forgot through the write role")
				case 404, 409, 503:
					count("DELETE refused")
				default:
					t.Errorf("DELETE %s.narinfo: %d %q", h, code, body)
				}
			default:
				args := []string{"forget", "--cache-dir", srv.cacheDir, "--state-dir", srv.stateDir, "--lock-wait", "30s", h}
				if rng.Intn(2) == 0 {
					args = append(args, "--with-referrers")
				}
				out, code := runKissOnion(t, args...)
				switch {
				case code == 0:
					count("forgot on the directory")
				case code == 1 && (strings.Contains(out, "still referenced") || strings.Contains(out, "none of the paths")):
					count("forget refused")
				default:
					t.Errorf("forget: exit %d\n%s", code, out)
				}
			}
		}
	}()
	background.Add(1)
	go func() { // prunes, which keep the closures under a lock (markers)
		defer background.Done()
		state := t.TempDir()
		for !stopped() {
			out, code := runKissOnion(t, "prune", "--state-dir", state, "--lock-wait", "30s", srv.cacheDir)
			switch {
			case code == 0:
				count("pruned")
			case strings.Contains(out, "another prune is running"):
				count("prune turned away")
			default:
				t.Errorf("prune: exit %d\n%s", code, out)
			}
			time.Sleep(time.Second)
		}
	}()

	// Uploads for a while: each closure again and again, so that what a
	// forget took comes back; the loose ones get a marker too (without a
	// lock), so that prunes leave them to the forgets.
	var uploads sync.WaitGroup
	until := time.Now().Add(20 * time.Second)
	uploads.Add(2)
	go func() { // under a lock, writing a marker: never refused
		defer uploads.Done()
		for round := 0; round == 0 || time.Now().Before(until); round++ {
			for i := 0; i < locked; i++ {
				marker := fmt.Sprintf("%s/gcroots/keep-%d", srv.writeURL, i)
				out, code := kissOnion(t, src, "with-lock", marker, tops[i], "--", "nix", "--store", src.root, "copy", "--to", push, tops[i])
				if code != 0 {
					t.Errorf("with-lock upload of %s: exit %d\n%s", tops[i], code, out)
				}
				count("uploaded under a lock")
				time.Sleep(500 * time.Millisecond)
			}
		}
	}()
	go func() { // plain nix copy: may be refused when a forget takes a reference
		defer uploads.Done()
		for time.Now().Before(until) {
			for i := locked; i < locked+loose; i++ {
				// The same store, but a narinfo cache of its own each time:
				// one that remembers a forgotten path uploads nothing, and
				// two nix processes writing one (Nix 2.8) can fail with
				// "constraint failed".
				other := &nixClient{t: t, root: src.root, xdg: filepath.Join(t.TempDir(), "xdg")}
				if out, err := other.run(nil, "nix", "copy", "--to", push, tops[i]); err != nil {
					t.Logf("nix copy of %s without a lock failed (a forget may have taken a reference): %s", tops[i], lastLine(out))
					count("upload refused")
					continue
				}
				count("uploaded without a lock")
				code, _ := httpDo(t, "PUT", fmt.Sprintf("%s/gcroots/loose-%d", srv.writeURL, i), strings.NewReader(tops[i]+"\n"))
				if code != 201 && code != 409 {
					t.Errorf("PUT marker loose-%d: %d", i, code)
				}
			}
		}
	}()
	uploads.Wait()
	// Let the forgets and prunes run on what came.
	time.Sleep(2 * time.Second)
	close(stop)
	background.Wait()
	t.Logf("%v", counts)
	if counts["forgot on the directory"]+counts["forgot through the write role"] == 0 {
		t.Error("nothing was forgotten")
	}
	if problems := cacheProblems(srv.cacheDir); len(problems) > 0 {
		t.Errorf("cache left invalid:\n%s", strings.Join(problems, "\n"))
	}
	for i := 0; i < locked; i++ {
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		if out, err := dst.run(nil, "nix-store", "--realise", tops[i]); err != nil {
			t.Errorf("%s, uploaded under a lock, does not substitute: %v\n%s", tops[i], err, out)
		}
	}
}

// TestForgetWithReferrersThroughTheWriteRole: `forget --cache URL
// --with-referrers` (DELETE /<hash>.narinfo?with-referrers=1) takes a
// referenced path and its referrers out of a cache filled with the real
// nix: the referrer no longer substitutes, an unrelated path still does.
func TestForgetWithReferrersThroughTheWriteRole(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	srv := startServer(t, "")
	src := newNix(t)
	app, closure := src.buildClosure(64)
	lib, data := named(t, closure, "-lib"), named(t, closure, "-data")
	other, otherClosure := src.buildClosure(64)
	src.must("nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, app, other)
	for _, p := range append(closure, otherClosure...) {
		if _, err := visibleFile(t, srv.cacheDir, hashOf(p)+".narinfo"); err != nil {
			t.Fatalf("%s not in the cache after nix copy: %v", p, err)
		}
	}
	if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(app+"\n")); code != 201 {
		t.Fatalf("PUT marker: %d %s", code, body)
	}
	substitutes := func(p string) bool {
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		_, err := dst.run(nil, "nix-store", "--realise", p)
		return err == nil && dst.hasPath(p)
	}

	before := cacheFiles(t, srv.cacheDir)
	for _, q := range []string{"?dry-run=1", "?with-referrers=yes"} {
		if code, body := httpDo(t, "DELETE", srv.writeURL+"/"+hashOf(lib)+".narinfo"+q, nil); code != 400 {
			t.Errorf("DELETE %s: %d %q, want 400", q, code, body)
		}
	}
	out, code := runKissOnion(t, "forget", "--cache", srv.writeURL, lib)
	if code != 1 || !strings.Contains(out, "referrer "+app) || !strings.Contains(out, "add --with-referrers") {
		t.Errorf("forget --cache of a referenced path: exit %d, want 1, the referrers and a hint:\n%s", code, out)
	}
	if after := cacheFiles(t, srv.cacheDir); !slices.Equal(before, after) {
		t.Fatalf("refusals changed the cache:\nbefore %q\nafter  %q", before, after)
	}

	// app comes too: it goes as a referrer of lib, and is not then
	// reported missing.
	out, code = runKissOnion(t, "forget", "--cache", srv.writeURL, "--with-referrers", lib, app)
	if code != 0 {
		t.Fatalf("forget --cache --with-referrers: exit %d\n%s", code, out)
	}
	for _, want := range []string{"kiss-onion: forgot " + lib + " and 2 referrers: ", "forgot referrer " + app + "\n", "forgot referrer " + data + "\n",
		"warning: marker gcroots/web1 names " + app + ", which is gone"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "not in the cache") {
		t.Errorf("a path forgotten as a referrer reported missing:\n%s", out)
	}
	for _, p := range closure {
		for _, u := range []string{srv.readURL, srv.writeURL} {
			if code, _ := httpDo(t, "GET", u+"/"+hashOf(p)+".narinfo", nil); code != 404 {
				t.Errorf("GET %s.narinfo on %s after the forget: %d, want 404", hashOf(p), u, code)
			}
		}
	}
	if substitutes(app) {
		t.Errorf("%s, a referrer of the forgotten %s, still substitutes", app, lib)
	}
	if !substitutes(other) {
		t.Errorf("%s, unrelated, does not substitute", other)
	}
	if problems := cacheProblems(srv.cacheDir); len(problems) > 0 {
		t.Errorf("cache left invalid:\n%s", strings.Join(problems, "\n"))
	}
}
