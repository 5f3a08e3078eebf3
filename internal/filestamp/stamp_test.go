package filestamp

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestStampChangesWithTheFile: a missing file has the zero Stamp, and a
// file replaced by a rename with the same size and time still gets
// another Stamp.
func TestStampChangesWithTheFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	stat := func() Stamp {
		t.Helper()
		st, err := Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	if st := stat(); st != (Stamp{}) || st.Exists() {
		t.Fatalf("a missing file: %+v, want the zero Stamp", st)
	}
	mtime := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	write := func(name, data string) {
		t.Helper()
		if err := os.WriteFile(name, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(name, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	write(path, "first")
	first := stat()
	if !first.Exists() || first != stat() {
		t.Fatalf("the same file stamped twice: %+v, %+v", first, stat())
	}
	write(path+".new", "other")
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
	if stat() == first {
		t.Error("a file replaced by a rename, same size and time, kept its Stamp")
	}
}
