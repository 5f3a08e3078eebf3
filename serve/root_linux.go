package serve

import (
	"os"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// noOpenat2 is set once openat2 turned out to be missing (Linux before
// 5.6, or a seccomp filter that refuses it).
var noOpenat2 atomic.Bool

// openBeneath opens rel beneath the directory dir for reading, following
// no symlink: openat2 with RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS, or,
// where the kernel lacks it, openat with O_NOFOLLOW on every component.
func openBeneath(r *cacheRoot, rel string) (*os.File, error) {
	if !noOpenat2.Load() {
		how := unix.OpenHow{
			Flags:   unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOCTTY,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		}
		for {
			fd, err := unix.Openat2(r.fd, rel, &how)
			switch err {
			case nil:
				return os.NewFile(uintptr(fd), rel), nil
			case unix.EINTR, unix.EAGAIN:
				continue
			case unix.ENOSYS, unix.EPERM:
				noOpenat2.Store(true)
				return openNoFollow(r.fd, rel)
			}
			return nil, err
		}
	}
	return openNoFollow(r.fd, rel)
}

// openNoFollow walks rel a component at a time with O_NOFOLLOW, so that a
// symlink anywhere on the way fails with ELOOP (or ENOTDIR).
func openNoFollow(dirfd int, rel string) (*os.File, error) {
	parts := strings.Split(rel, "/")
	fd := dirfd
	for i, p := range parts {
		last := i == len(parts)-1
		flags := unix.O_CLOEXEC | unix.O_NOFOLLOW
		if last {
			flags |= unix.O_RDONLY | unix.O_NOCTTY
		} else {
			flags |= unix.O_PATH | unix.O_DIRECTORY
		}
		var next int
		var err error
		for {
			next, err = unix.Openat(fd, p, flags, 0)
			if err != unix.EINTR {
				break
			}
		}
		if fd != dirfd {
			unix.Close(fd)
		}
		if err != nil {
			return nil, err
		}
		if last {
			return os.NewFile(uintptr(next), rel), nil
		}
		fd = next
	}
	panic("unreachable")
}
