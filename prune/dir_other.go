//go:build !linux

package prune

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// dir is an open directory. This portable version works by path; the
// Linux one works relative to a descriptor and is much faster.
type dir struct {
	path string
}

func openDir(path string) (*dir, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, &fs.PathError{Op: "open", Path: path, Err: errors.New("not a directory")}
	}
	return &dir{path: path}, nil
}

func (d *dir) close() {}

const (
	typeUnknown = iota
	typeFile
	typeDir
	typeOther
)

func (d *dir) each(fn func(name []byte, ino uint64, typ int) error) error {
	ents, err := os.ReadDir(d.path)
	if err != nil {
		return err
	}
	for _, e := range ents {
		typ := typeOther
		switch {
		case e.Type().IsRegular():
			typ = typeFile
		case e.IsDir():
			typ = typeDir
		}
		if err := fn([]byte(e.Name()), 0, typ); err != nil {
			return err
		}
	}
	return nil
}

type fileInfo struct {
	ident uint64
	ino   uint64
	size  int64
	mtime int64
	typ   int
}

func (d *dir) stat(name string) (fileInfo, error) {
	st, err := os.Lstat(filepath.Join(d.path, name))
	if err != nil {
		return fileInfo{}, err
	}
	fi := fileInfo{size: st.Size(), mtime: st.ModTime().UnixNano(), typ: typeOther}
	switch {
	case st.Mode().IsRegular():
		fi.typ = typeFile
	case st.IsDir():
		fi.typ = typeDir
	}
	fi.ident = identOf(0, 0, uint64(fi.size), uint64(fi.mtime), 0)
	return fi, nil
}

func (d *dir) readFile(name string, buf []byte, size int64, limit int) ([]byte, error) {
	f, err := os.Open(filepath.Join(d.path, name))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, int64(limit)+1))
	if err != nil {
		return nil, err
	}
	if len(data) > limit {
		return nil, &fs.PathError{Op: "read", Path: f.Name(), Err: errTooBig}
	}
	return data, nil
}

// statRead lstats the entry name and, if it is a regular file, reads it.
// On a stat failure fi is zero; on a read failure it is the file's.
func (d *dir) statRead(name string, buf []byte, limit int) (fi fileInfo, data []byte, err error) {
	fi, err = d.stat(name)
	if err != nil || fi.typ != typeFile {
		return fi, nil, err
	}
	data, err = d.readFile(name, buf, fi.size, limit)
	return fi, data, err
}

func (d *dir) remove(name string) error {
	err := os.Remove(filepath.Join(d.path, name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (d *dir) removeDir(name string) error {
	err := os.Remove(filepath.Join(d.path, name))
	if err != nil {
		if fi, serr := os.Lstat(filepath.Join(d.path, name)); serr != nil || fi.IsDir() {
			return nil // gone, or not empty
		}
	}
	return err
}

func (d *dir) sync() error {
	f, err := os.Open(d.path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func stampDir(path string) dirStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return dirStamp{}
	}
	return dirStamp{mtime: uint64(fi.ModTime().UnixNano())}
}
