package serve

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func TestMemCacheStaysUnderItsLimit(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 1000)
	for i := 0; i < 100; i++ {
		os.WriteFile(filepath.Join(dir, strconv.Itoa(i)), data, 0o644)
	}
	limit := int64(10 * (1000 + 256 + 2))
	mc := newMemCache(limit)
	root, err := openCacheRoot(dir)
	if err != nil {
		t.Fatal(err)
	}
	for round := 0; round < 3; round++ {
		for i := 0; i < 100; i++ {
			e, err := mc.get(root, strconv.Itoa(i))
			if err != nil || len(e.data) != 1000 {
				t.Fatalf("get %d: %v", i, err)
			}
			if mc.bytes > limit {
				t.Fatalf("memory cache holds %d bytes, over its limit of %d", mc.bytes, limit)
			}
		}
	}
	var n int64
	for k, v := range mc.m {
		n += entrySize(k, v)
	}
	if n != mc.bytes {
		t.Errorf("accounted %d bytes, holds %d", mc.bytes, n)
	}
	// An entry larger than the whole limit is served but not kept.
	big := make([]byte, limit)
	os.WriteFile(filepath.Join(dir, "big"), big, 0o644)
	if e, err := mc.get(root, "big"); err != nil || len(e.data) != len(big) {
		t.Fatalf("get big: %v", err)
	}
	if _, ok := mc.m["big"]; ok {
		t.Error("entry over the limit kept")
	}
}
