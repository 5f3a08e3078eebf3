package clientauth

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// FileError is an error in the content of a file: it names the file and,
// when known, the line. It never quotes a secret.
type FileError struct {
	Path string
	Line int // 0 when the error is about the whole file
	Err  error
}

func (e *FileError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("%s:%d: %v", e.Path, e.Line, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.Path, e.Err)
}

func (e *FileError) Unwrap() error { return e.Err }

// ensureDir creates dir and its missing parents with mode 0700. An existing
// directory is left as it is.
func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create directory: %w", err)
	}
	return nil
}

// writeTemp writes data to a new file with mode 0600 in dir, syncs it and
// returns its name.
func writeTemp(dir, base string, data []byte) (string, error) {
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return "", err
	}
	name := f.Name()
	// os.CreateTemp makes the file 0600 already; say so for the reader and
	// for a umask-proof result.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(name)
		return "", err
	}
	return name, nil
}

// replaceFile atomically replaces (or creates) path with data, mode 0600:
// a temporary file in the same directory, fsync, rename, fsync the
// directory.
func replaceFile(path string, data []byte) error {
	return atomicfile.WriteFile(path, data, 0o600)
}

// createFile atomically creates path with data, mode 0600, and fails with
// an error matching fs.ErrExist when path exists: the temporary file is
// hard-linked to its final name, which never replaces a file.
func createFile(path string, data []byte) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := writeTemp(dir, base, data)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp)
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("write %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Remove(tmp); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// LockFile takes an exclusive lock on path (created 0600 when missing),
// waiting for it, and returns the function that releases it: the lock
// UpdateRegistry holds, for other state files made once and shared.
func LockFile(path string) (unlock func(), err error) { return lockFile(path) }
