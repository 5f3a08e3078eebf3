package serve

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestSizeCountsNarInfosWithoutMetrics: CountSize counts the cache with no
// registry, and Size follows uploads and deletions, narinfos included
// (those of store paths only: the top directory's).
func TestSizeCountsNarInfosWithoutMetrics(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	for rel, content := range map[string]string{
		hashA + ".narinfo":   "StorePath: /nix/store/" + hashA + "-a\n",
		"nar/old.nar":        "an old NAR",
		"log/not-a.narinfo":  "not a store path's",
		"gcroots/.lock/ci":   "not counted",
		".tmp/partial":       "not counted",
		"realisations/x.doi": "{}",
	} {
		p := filepath.Join(dir, filepath.FromSlash(rel))
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tc := newTestCache(t, func(c *Config) { c.Dir = dir })
	if _, ok := tc.Size(); ok {
		t.Fatal("Size reports a count before CountSize")
	}
	tc.CountSize()
	tc.CountSize() // once
	waitCounted(t, tc.Cache)
	check := func(step string, narinfos int64) {
		t.Helper()
		tc.durable.barrier()
		s, ok := tc.Size()
		files, bytes := dirSize(t, dir)
		if !ok || s.NarInfos != narinfos || float64(s.Files) != files || float64(s.Bytes) != bytes || time.Since(s.Counted) > time.Minute {
			t.Errorf("%s: Size() = %+v, %v; want %d narinfos, %v files, %v bytes", step, s, ok, narinfos, files, bytes)
		}
	}
	check("at start", 1)
	narURL := tc.upload(t, hashB, "dep")
	check("after an upload", 2)
	tc.upload(t, hashB, "dep")
	check("after the same upload again", 2)
	if resp, b := do(t, tc.write, "DELETE", "/gcroots/.lock/ci", nil); resp.StatusCode != 204 {
		t.Fatalf("DELETE lock: %d %s", resp.StatusCode, b)
	}
	old := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(dir, filepath.FromSlash(narURL)), old, old)
	if resp, b := do(t, tc.write, "DELETE", "/"+hashB+".narinfo", nil); resp.StatusCode != 200 {
		t.Fatalf("DELETE narinfo: %d %s", resp.StatusCode, b)
	}
	check("after a forget", 1)
	p := filepath.Join(dir, hashA+".narinfo")
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(p)
	tc.Removed(hashA+".narinfo", fi.Size())
	check("after a prune in the process", 0)
}
