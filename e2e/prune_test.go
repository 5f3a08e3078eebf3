package e2e

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// narinfoOf returns the cache file of a store path's narinfo.
func narinfoOf(cacheDir, storePath string) string {
	return filepath.Join(cacheDir, strings.TrimPrefix(storePath, "/nix/store/")[:32]+".narinfo")
}

// TestPruneWithNix pushes a closure with the real nix under with-lock
// through a running serve, prunes the cache beside it, substitutes the
// closure back; then drops the marker, prunes, and the closure is gone.
func TestPruneWithNix(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	srv := startServer(t, "")
	state := t.TempDir()
	src := newNix(t)
	pushURL := srv.writeURL + "?compression=zstd&secret-key=" + key.secretFile

	// Garbage: a closure pushed without a marker.
	garbage, garbageClosure := src.buildClosure(64)
	src.must("nix", "copy", "--to", pushURL, garbage)

	// The closure that stays, pushed under with-lock, which writes the marker.
	top, closure := src.buildClosure(64)
	marker := srv.writeURL + "/gcroots/hosts/web1"
	out := mustKissOnion(t, src, "with-lock", marker, top, "--", "nix", "--store", src.root, "copy", "--to", pushURL, top)
	if !strings.Contains(out, "now names "+top) {
		t.Errorf("with-lock output:\n%s", out)
	}
	if code, body := httpDo(t, "GET", srv.readURL+"/gcroots/hosts/web1", nil); code != 200 || body != top+"\n" {
		t.Fatalf("marker after with-lock: %d %q", code, body)
	}
	locks, _ := filepath.Glob(filepath.Join(srv.cacheDir, "gcroots", ".lock", "[^.]*"))
	if len(locks) != 0 {
		t.Errorf("locks left after with-lock: %v", locks)
	}

	// A failing command writes no marker and passes its status on.
	out, code := kissOnion(t, src, "with-lock", srv.writeURL+"/gcroots/failed", top, "--", "sh", "-c", "exit 3")
	if code != 3 {
		t.Errorf("with-lock of a failing command: exit %d, want 3\n%s", code, out)
	}
	if code, _ := httpDo(t, "GET", srv.readURL+"/gcroots/failed", nil); code != 404 {
		t.Errorf("a failed command's marker: GET answered %d, want 404", code)
	}

	// A dry run lists the garbage and deletes nothing.
	out, code = runKissOnion(t, "prune", "--dry-run", "--state-dir", state, srv.cacheDir)
	if code != 0 {
		t.Fatalf("prune --dry-run: exit %d\n%s", code, out)
	}
	for _, p := range garbageClosure {
		rel := filepath.Base(narinfoOf(srv.cacheDir, p))
		if !strings.Contains(out, "would delete "+rel) {
			t.Errorf("dry run does not list %s:\n%s", rel, out)
		}
		if _, err := os.Stat(narinfoOf(srv.cacheDir, p)); err != nil {
			t.Errorf("dry run deleted %s", rel)
		}
	}

	// The prune, beside the running serve.
	out, code = runKissOnion(t, "prune", "--state-dir", state, srv.cacheDir)
	if code != 0 || !strings.Contains(out, "pruned "+srv.cacheDir) {
		t.Fatalf("prune: exit %d\n%s", code, out)
	}
	for _, p := range garbageClosure {
		if _, err := os.Stat(narinfoOf(srv.cacheDir, p)); err == nil {
			t.Errorf("garbage %s survived the prune", p)
		}
	}
	sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	sub.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, src, sub, p)
	}

	// Drop the marker: the next prune takes the closure.
	if code, body := httpDo(t, "DELETE", marker, nil); code/100 != 2 {
		t.Fatalf("DELETE marker: %d %s", code, body)
	}
	out, code = runKissOnion(t, "prune", "--state-dir", state, srv.cacheDir)
	if code != 0 {
		t.Fatalf("prune: exit %d\n%s", code, out)
	}
	for _, p := range closure {
		if _, err := os.Stat(narinfoOf(srv.cacheDir, p)); err == nil {
			t.Errorf("%s survived the prune after its marker was dropped", p)
		}
	}
	nars, _ := os.ReadDir(filepath.Join(srv.cacheDir, "nar"))
	if len(nars) != 0 {
		t.Errorf("%d NARs left in an empty cache", len(nars))
	}
	fresh := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	if out, err := fresh.run(nil, "nix-store", "--realise", top); err == nil {
		t.Errorf("%s still substitutes after the prune:\n%s", top, out)
	}
}

// TestPruneLockAnswers checks the HTTP lock protocol against a prune: a
// prune waits for a held lock and new locks get 503 meanwhile; a stale
// lock is ignored; a reader cannot take a lock.
func TestPruneLockAnswers(t *testing.T) {
	srv := startServer(t, "")
	lock := srv.writeURL + "/gcroots/.lock/"

	if code, _ := httpDo(t, "PUT", srv.readURL+"/gcroots/.lock/reader", strings.NewReader("x")); code == 200 || code == 204 || code == 403 || code/100 == 5 {
		t.Errorf("a lock PUT on the read listener answered %d, want 401 or 405", code)
	}
	if code, body := httpDo(t, "PUT", lock+"uploader", strings.NewReader("ci job 7")); code/100 != 2 {
		t.Fatalf("PUT lock: %d %s", code, body)
	}

	// The prune waits for the lock; while it does, the cache is held.
	prune := exec.Command(binary, "prune", "--lock-wait", "1m", "--state-dir", t.TempDir(), srv.cacheDir)
	var out syncBuffer
	prune.Stdout, prune.Stderr = &out, &out
	prune.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := prune.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- prune.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, _ := httpDo(t, "PUT", lock+"late", strings.NewReader("x"))
		if code == http.StatusServiceUnavailable {
			break
		}
		if code/100 == 2 {
			httpDo(t, "DELETE", lock+"late", nil)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 503 for a new lock while a prune waits (last %d)\n%s", code, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The holder may still refresh its lock while the prune waits for it.
	if code, body := httpDo(t, "PUT", lock+"uploader", strings.NewReader("ci job 7")); code/100 != 2 {
		t.Errorf("refresh of a held lock while a prune waits: %d %s", code, body)
	}
	select {
	case err := <-done:
		t.Fatalf("the prune did not wait for the lock: %v\n%s", err, out.String())
	case <-time.After(300 * time.Millisecond):
	}
	httpDo(t, "DELETE", lock+"uploader", nil)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("prune: %v\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the prune did not finish after the lock was released\n%s", out.String())
	}
	if code, _ := httpDo(t, "PUT", lock+"late", strings.NewReader("x")); code/100 != 2 {
		t.Errorf("PUT lock after the prune: %d", code)
	}
	httpDo(t, "DELETE", lock+"late", nil)

	// A stale lock does not hold a prune back; a fresh one does, until
	// --lock-wait runs out.
	if code, _ := httpDo(t, "PUT", lock+"dead", strings.NewReader("x")); code/100 != 2 {
		t.Fatalf("PUT lock: %d", code)
	}
	old := time.Now().Add(-31 * time.Minute)
	os.Chtimes(filepath.Join(srv.cacheDir, "gcroots", ".lock", "dead"), old, old)
	if out, code := runKissOnion(t, "prune", "--lock-wait", "0s", srv.cacheDir); code != 0 {
		t.Errorf("prune beside a stale lock: exit %d\n%s", code, out)
	}
	httpDo(t, "PUT", lock+"alive", strings.NewReader("x"))
	out2, code := runKissOnion(t, "prune", "--lock-wait", "500ms", srv.cacheDir)
	if code != 1 || !strings.Contains(out2, "alive") || !strings.Contains(out2, "kiss-onion: error:") {
		t.Errorf("prune beside a fresh lock: exit %d, want 1 naming the lock\n%s", code, out2)
	}
}
