package serve

import (
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
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
