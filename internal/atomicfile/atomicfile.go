// Package atomicfile writes files so that a reader sees either the old
// content or the whole new content, never a part, even across a crash:
// write to a temporary file, fsync it, rename it into place, fsync the
// directory.
package atomicfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// File is a temporary file that becomes its final name on Commit.
type File struct {
	*os.File
	path    string
	done    bool
	flushed bool
}

// Create opens a new temporary file in tmpDir (which must be on the same
// file system as path) that Commit will rename to path.
func Create(tmpDir, path string, perm os.FileMode) (*File, error) {
	f, err := os.CreateTemp(tmpDir, "."+filepath.Base(path)+".*")
	if err != nil {
		return nil, err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return &File{File: f, path: path}, nil
}

// Commit flushes the file to disk, renames it into place and makes the
// new name durable.
func (f *File) Commit() error {
	if err := f.Rename(); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(f.path))
}

// Rename flushes the file to disk and renames it into place, but leaves
// the fsync of the directory to the caller: until then, a crash may lose
// the new name (never the content behind it).
func (f *File) Rename() error {
	if f.done {
		return errors.New("atomicfile: commit after commit or abort")
	}
	f.done = true
	tmp := f.Name()
	var err error
	if !f.flushed {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, f.path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// Flush fsyncs what was written so far, so that a Rename or Commit right
// after need not. Nothing may be written after it.
func (f *File) Flush() error {
	err := f.Sync()
	f.flushed = err == nil
	return err
}

// Path returns the final name the file gets on Commit or Rename.
func (f *File) Path() string { return f.path }

// Abort discards the temporary file. It is a no-op after Commit, so it can
// be deferred.
func (f *File) Abort() {
	if f.done {
		return
	}
	f.done = true
	f.Close()
	os.Remove(f.Name())
}

// WriteFile atomically replaces path with data, using path's directory for
// the temporary file.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	f, err := Create(filepath.Dir(path), path, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer f.Abort()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Commit(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// SyncDir fsyncs a directory, making a rename or removal in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
