package serve

import (
	"os"

	"golang.org/x/sys/unix"
)

// startWriteback asks the kernel to start writing a range of f to disk,
// so that the fsync at the end of a large upload finds little left to
// write. The call can block while the disk's queue is full, so it runs
// beside the copy; Control keeps the descriptor open meanwhile.
func startWriteback(f *os.File, off, n int64) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	go rc.Control(func(fd uintptr) {
		unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
	})
}
