// Package filestamp tells versions of a file apart cheaply, from its
// metadata, for a service that polls a file it reads (a client registry,
// a certificate) and reads it again only when it changed.
package filestamp

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// Stamp identifies one version of a file: its size, modification time,
// device and inode, so that a file replaced by a rename changes it even
// within the clock's resolution. Stamps are comparable with ==; the
// Stamp of a missing file is the zero Stamp.
type Stamp struct {
	exists  bool
	size    int64
	modTime int64 // nanoseconds
	dev     uint64
	ino     uint64
}

// Of returns the Stamp of the file fi describes.
func Of(fi fs.FileInfo) Stamp {
	dev, ino := fileID(fi)
	return Stamp{exists: true, size: fi.Size(), modTime: fi.ModTime().UnixNano(), dev: dev, ino: ino}
}

// Stat returns the Stamp of the file at path without reading it: the
// zero Stamp when it does not exist.
func Stat(path string) (Stamp, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Stamp{}, nil
	}
	if err != nil {
		return Stamp{}, fmt.Errorf("stat %s: %w", path, err)
	}
	return Of(fi), nil
}

// Exists reports whether the file existed when stamped.
func (s Stamp) Exists() bool { return s.exists }
