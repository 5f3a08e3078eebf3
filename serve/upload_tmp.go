package serve

import (
	"os"
	"path/filepath"
	"syscall"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/sirupsen/logrus"
)

// tempFile is a temporary upload file being created on a goroutine:
// allocating an inode can cost as much as receiving a small body, so the
// two overlap.
type tempFile struct {
	done chan struct{}
	f    *atomicfile.File
	err  error
	// written and flushed count bytes written, and those handed to
	// writeback, a writebackEvery at a time.
	written, flushed int64
}

// writebackEvery is how much a large upload writes between two starts of
// writeback.
const writebackEvery = 8 << 20

// startTemp starts creating the temporary file that becomes dst.
func (c *Cache) startTemp(dst string) *tempFile {
	tf := &tempFile{done: make(chan struct{})}
	go func() {
		tf.f, tf.err = atomicfile.Create(c.tmpDir, dst, 0o644)
		if tf.err == nil {
			holdTemp(tf.f.File)
		}
		close(tf.done)
	}()
	return tf
}

func (tf *tempFile) get() (*atomicfile.File, error) {
	<-tf.done
	return tf.f, tf.err
}

// abort removes the file, once created; it is a no-op after a commit.
func (tf *tempFile) abort() {
	if f, err := tf.get(); err == nil {
		f.Abort()
	}
}

// Write writes to the file once it exists.
func (tf *tempFile) Write(p []byte) (int, error) {
	f, err := tf.get()
	if err != nil {
		return 0, err
	}
	n, err := f.Write(p)
	tf.written += int64(n)
	if tf.written-tf.flushed >= writebackEvery {
		startWriteback(f.File, tf.flushed, tf.written-tf.flushed)
		tf.flushed = tf.written
	}
	return n, err
}

// holdTemp marks the temporary file as a live upload's with a flock that
// lasts as long as the file is open, so that a serve starting on the same
// cache leaves it alone (removeDeadUploads).
func holdTemp(f *os.File) {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EINTR {
			return
		}
	}
}

// removeDeadUploads removes what killed uploads left in .tmp/: every file
// that no live upload holds (holdTemp). Each is at most an upload's size,
// and a prune would otherwise leave them for a day.
func (c *Cache) removeDeadUploads() {
	ents, err := os.ReadDir(c.tmpDir)
	if err != nil {
		return
	}
	removed := 0
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(c.tmpDir, e.Name())
		f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
		if err != nil {
			continue
		}
		if syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) == nil && os.Remove(p) == nil {
			removed++
		}
		f.Close()
	}
	if removed > 0 {
		c.log.WithFields(logrus.Fields{"dir": c.tmpDir, "files": removed}).Info("removed what killed uploads left")
	}
}
