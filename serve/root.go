package serve

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// cacheRoot is the cache directory, open, so that reads resolve names
// beneath it and never through a symlink: a symlink planted in the cache
// (nar/x.nar -> /etc/shadow) is not served, whatever it points at.
type cacheRoot struct {
	dir string
	f   *os.File // the directory itself, kept open
	fd  int      // f's descriptor, for openat
}

func openCacheRoot(dir string) (*cacheRoot, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open cache directory: %w", err)
	}
	return &cacheRoot{dir: dir, f: f, fd: int(f.Fd())}, nil
}

// open opens rel (a slash-separated path the router accepted) for reading,
// refusing every symlink on the way with an error matching
// errSymlink.
func (r *cacheRoot) open(rel string) (*os.File, error) {
	if rel == "" || strings.HasPrefix(rel, "/") || strings.Contains("/"+rel+"/", "/../") {
		return nil, &fs.PathError{Op: "open", Path: rel, Err: fs.ErrInvalid}
	}
	f, err := openBeneath(r, rel)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: rel, Err: err}
	}
	return f, nil
}

// lstat stats rel without following a final symlink. The narinfos it is
// for lie in the cache's top directory, so no other component could be one.
func (r *cacheRoot) lstat(rel string) (fs.FileInfo, error) {
	return os.Lstat(filepath.Join(r.dir, filepath.FromSlash(rel)))
}

// errSymlink is what open's error matches when a symlink was refused.
var errSymlink = errors.New("refused to follow a symlink")

// isSymlinkRefusal reports whether err is open refusing a symlink (ELOOP
// from O_NOFOLLOW or RESOLVE_NO_SYMLINKS, EXDEV from RESOLVE_BENEATH).
func isSymlinkRefusal(err error) bool {
	return errors.Is(err, errSymlink) || errors.Is(err, syscall.ELOOP) || errors.Is(err, syscall.EXDEV)
}

// readBeneath reads the regular file rel whole, through open.
func readBeneath(r *cacheRoot, rel string) ([]byte, error) {
	f, err := r.open(rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, &fs.PathError{Op: "read", Path: rel, Err: fs.ErrNotExist}
	}
	return io.ReadAll(f)
}
