package atomicfile

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCommitSteps(t *testing.T) {
	for _, tt := range []struct {
		name  string
		flush bool
		final func(*File) error
	}{
		{"commit", false, (*File).Commit},
		{"rename", false, (*File).Rename},
		{"flush, then commit", true, (*File).Commit},
		{"flush, then rename", true, (*File).Rename},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			tmp := filepath.Join(dir, "tmp")
			os.Mkdir(tmp, 0o700)
			dst := filepath.Join(dir, "out")
			f, err := Create(tmp, dst, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			if f.Path() != dst {
				t.Errorf("Path() = %s", f.Path())
			}
			f.Write([]byte("content"))
			if tt.flush {
				if err := f.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := os.Stat(dst); err == nil {
				t.Fatal("visible before the commit")
			}
			if err := tt.final(f); err != nil {
				t.Fatal(err)
			}
			f.Abort() // a no-op now
			if b, err := os.ReadFile(dst); err != nil || string(b) != "content" {
				t.Errorf("after the commit: %q %v", b, err)
			}
			if fi, _ := os.Stat(dst); fi.Mode().Perm() != 0o644 {
				t.Errorf("mode %v", fi.Mode())
			}
			if left, _ := os.ReadDir(tmp); len(left) != 0 {
				t.Errorf("temporary files left: %v", left)
			}
			if err := f.Commit(); err == nil {
				t.Error("a second commit succeeded")
			}
		})
	}
}

func TestAbortLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	f, err := Create(dir, filepath.Join(dir, "out"), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("partial"))
	f.Abort()
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("left after Abort: %v", left)
	}
}
