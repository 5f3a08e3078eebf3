//go:build !linux

package serve

import (
	"os"
	"path/filepath"
	"strings"
)

// openBeneath opens rel beneath the cache directory for reading, refusing a symlink at any
// component (checked with Lstat first: a best effort where Linux's openat2
// is missing).
func openBeneath(r *cacheRoot, rel string) (*os.File, error) {
	p := r.dir
	for _, part := range strings.Split(rel, "/") {
		p = filepath.Join(p, part)
		fi, err := os.Lstat(p)
		if err != nil {
			return nil, err
		}
		if fi.Mode()&os.ModeSymlink != 0 {
			return nil, errSymlink
		}
	}
	return os.Open(p)
}
