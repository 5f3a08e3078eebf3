package prune

import (
	"encoding/binary"
	"errors"
	"io/fs"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// dir is an open directory whose entries are read, stat'ed, opened and
// removed relative to its descriptor: no path lookups from the root, no
// per-entry objects.
type dir struct {
	path string
	fd   int
}

func openDir(path string) (*dir, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return &dir{path: path, fd: fd}, nil
}

func (d *dir) close() { unix.Close(d.fd) }

// Entry types of each's callback.
const (
	typeUnknown = iota
	typeFile
	typeDir
	typeOther // symlinks, devices, ...
)

// each calls fn for every entry but "." and "..", with the name (valid
// only during the call), the inode and the type as the directory reports
// them (typeUnknown on file systems that do not).
func (d *dir) each(fn func(name []byte, ino uint64, typ int) error) error {
	if _, err := unix.Seek(d.fd, 0, 0); err != nil {
		return &fs.PathError{Op: "seek", Path: d.path, Err: err}
	}
	buf := make([]byte, 256<<10)
	for {
		n, err := unix.Getdents(d.fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return &fs.PathError{Op: "readdir", Path: d.path, Err: err}
		}
		if n <= 0 {
			return nil
		}
		for b := buf[:n]; len(b) >= 19; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(binary.NativeEndian.Uint16(b[16:]))
			if reclen < 19 || reclen > len(b) {
				return &fs.PathError{Op: "readdir", Path: d.path, Err: errors.New("malformed directory entry")}
			}
			ino := binary.NativeEndian.Uint64(b[0:])
			dt := b[18]
			name := b[19:reclen]
			for i, c := range name {
				if c == 0 {
					name = name[:i]
					break
				}
			}
			b = b[reclen:]
			if len(name) == 0 || name[0] == '.' && (len(name) == 1 || len(name) == 2 && name[1] == '.') {
				continue
			}
			typ := typeOther
			switch dt {
			case unix.DT_UNKNOWN:
				typ = typeUnknown
			case unix.DT_REG:
				typ = typeFile
			case unix.DT_DIR:
				typ = typeDir
			}
			if err := fn(name, ino, typ); err != nil {
				return err
			}
		}
	}
}

// fileInfo is what a prune needs of lstat.
type fileInfo struct {
	ident uint64 // changes whenever the file is replaced or written
	ino   uint64
	size  int64
	mtime int64 // Unix nanoseconds
	typ   int
}

// stat lstats the entry name.
func (d *dir) stat(name string) (fileInfo, error) {
	var st unix.Stat_t
	var err error
	for {
		err = unix.Fstatat(d.fd, name, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fileInfo{}, &fs.PathError{Op: "stat", Path: d.path + "/" + name, Err: err}
	}
	return infoOf(&st), nil
}

func infoOf(st *unix.Stat_t) fileInfo {
	fi := fileInfo{
		ino:   st.Ino,
		size:  st.Size,
		mtime: st.Mtim.Nano(),
		typ:   typeOther,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		fi.typ = typeFile
	case unix.S_IFDIR:
		fi.typ = typeDir
	}
	// The change time moves on every write, rename-over and chmod and
	// cannot be set back by a user: with the inode, size and modification
	// time it tells a rewritten file from the one seen before.
	fi.ident = identOf(uint64(st.Dev), st.Ino, uint64(st.Size), uint64(st.Mtim.Nano()), uint64(st.Ctim.Nano()))
	return fi
}

// noAtime is cleared once opening with O_NOATIME is refused (the files are
// not ours): reading would otherwise dirty every inode it touches (relatime
// updates the access time of a file first read after a write), and writing
// those inodes back competes with the deletions for the disk.
var noAtime atomic.Bool

func init() { noAtime.Store(true) }

// openRead opens the entry name for reading, never following a symlink
// (ELOOP) nor blocking on a FIFO.
func (d *dir) openRead(name string) (int, error) {
	flags := unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW | unix.O_NONBLOCK
	for {
		na := noAtime.Load()
		f := flags
		if na {
			f |= unix.O_NOATIME
		}
		fd, err := unix.Openat(d.fd, name, f, 0)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EPERM && na:
			noAtime.Store(false)
			continue
		case err != nil:
			return -1, &fs.PathError{Op: "open", Path: d.path + "/" + name, Err: err}
		}
		return fd, nil
	}
}

// readFile reads the regular file name into buf (growing it), refusing
// files over limit bytes. size is the file's size as stat saw it: with
// room for one more byte, one read usually does.
func (d *dir) readFile(name string, buf []byte, size int64, limit int) ([]byte, error) {
	fd, err := d.openRead(name)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	return d.readFD(fd, name, buf, size, limit)
}

// statRead opens the entry name and fstats it; if it is a regular file it
// also reads it, as readFile does. One path lookup instead of two, and the
// identity comes from the file read, taken before reading: the data is
// never older than it. A symlink is reported as typeOther, without error.
// On an open or stat failure fi is zero; on a read failure it is the
// file's.
func (d *dir) statRead(name string, buf []byte, limit int) (fi fileInfo, data []byte, err error) {
	fd, err := d.openRead(name)
	if errors.Is(err, unix.ELOOP) {
		return fileInfo{typ: typeOther}, nil, nil
	}
	if err != nil {
		return fileInfo{}, nil, err
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	for {
		err = unix.Fstat(fd, &st)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return fileInfo{}, nil, &fs.PathError{Op: "stat", Path: d.path + "/" + name, Err: err}
	}
	fi = infoOf(&st)
	if fi.typ != typeFile {
		return fi, nil, nil
	}
	data, err = d.readFD(fd, name, buf, fi.size, limit)
	return fi, data, err
}

func (d *dir) readFD(fd int, name string, buf []byte, size int64, limit int) ([]byte, error) {
	buf = buf[:0]
	for {
		if len(buf) > limit {
			return nil, &fs.PathError{Op: "read", Path: d.path + "/" + name, Err: errTooBig}
		}
		if want := max(int(min(size, int64(limit)))+1, len(buf)+4096); cap(buf) < want {
			buf = append(make([]byte, 0, want), buf...)
		}
		room := buf[len(buf):cap(buf)]
		n, err := unix.Read(fd, room)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: d.path + "/" + name, Err: err}
		}
		buf = buf[:len(buf)+n]
		if n < len(room) {
			// A short read of a regular file is its end.
			if len(buf) > limit {
				return nil, &fs.PathError{Op: "read", Path: d.path + "/" + name, Err: errTooBig}
			}
			return buf, nil
		}
	}
}

// remove unlinks the file name; a file already gone is no error.
func (d *dir) remove(name string) error {
	err := unix.Unlinkat(d.fd, name, 0)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return &fs.PathError{Op: "remove", Path: d.path + "/" + name, Err: err}
	}
	return nil
}

// removeDir removes the empty directory name; a non-empty one stays.
func (d *dir) removeDir(name string) error {
	err := unix.Unlinkat(d.fd, name, unix.AT_REMOVEDIR)
	if err == unix.ENOENT || err == unix.ENOTEMPTY || err == unix.EEXIST {
		return nil
	}
	if err != nil {
		return &fs.PathError{Op: "remove", Path: d.path + "/" + name, Err: err}
	}
	return nil
}

// sync makes the removals in the directory durable.
func (d *dir) sync() error {
	if err := unix.Fsync(d.fd); err != nil {
		return &fs.PathError{Op: "sync", Path: d.path, Err: err}
	}
	return nil
}

// stampDir returns the state of the directory at path, zero if it cannot
// be stat'ed. Kernels with multigrain timestamps (Linux 6.13 on) give
// every change after a stat a distinct modification time; before them a
// change in the same clock tick as the stat goes unseen, which can only
// leave an orphan file to a later prune.
func stampDir(path string) dirStamp {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return dirStamp{}
	}
	return dirStamp{dev: uint64(st.Dev), ino: st.Ino, mtime: uint64(st.Mtim.Nano())}
}
