package serve

import (
	"errors"
	"hash"
	"io"
	"sync"
)

// copyChunk is the unit in which upload bodies are read, written and
// hashed: large enough that a 100 MB NAR takes few system calls.
const copyChunk = 256 << 10

// copyInFlight is how many chunks a large copy uses: one being read and
// written while the others wait for, or go through, the hash.
const copyInFlight = 3

var chunkPool = sync.Pool{New: func() any { b := make([]byte, copyChunk); return &b }}

// copyHashed copies r to w and, when sum is not nil, feeds the same bytes
// to sum. A body larger than one chunk is hashed on another goroutine, so
// that the hash (as costly as the rest of the copy) overlaps reading the
// socket and writing the file.
func copyHashed(w io.Writer, r io.Reader, sum hash.Hash) (int64, error) {
	buf := chunkPool.Get().(*[]byte)
	n, err := readChunk(r, *buf)
	if err != nil && !errors.Is(err, io.EOF) {
		chunkPool.Put(buf)
		return 0, err
	}
	if err == nil && sum != nil {
		return copyHashedLarge(w, r, sum, buf, n)
	}
	defer chunkPool.Put(buf)
	if sum != nil {
		sum.Write((*buf)[:n])
	}
	m, werr := w.Write((*buf)[:n])
	if werr != nil || err != nil {
		return int64(m), werr
	}
	// More to come, with nothing to hash. The wrapper hides w's
	// ReadFrom, which would not use buf.
	rest, err := io.CopyBuffer(struct{ io.Writer }{w}, r, *buf)
	return int64(m) + rest, err
}

// readChunk fills buf from r. It returns io.EOF, alone, when r ended
// before filling buf.
func readChunk(r io.Reader, buf []byte) (int, error) {
	n, err := io.ReadFull(r, buf)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.EOF
	}
	return n, err
}

type hashChunk struct {
	buf *[]byte
	n   int
}

// copyHashedLarge goes on from a full first chunk, with the hash on a
// goroutine of its own. A chunk is reused only once both the file write
// and the hash are done with it.
func copyHashedLarge(w io.Writer, r io.Reader, sum hash.Hash, cur *[]byte, n int) (int64, error) {
	toHash := make(chan hashChunk, copyInFlight)
	hashed := make(chan *[]byte, copyInFlight)
	go func() {
		for c := range toHash {
			sum.Write((*c.buf)[:c.n])
			hashed <- c.buf
		}
		close(hashed)
	}()
	taken := 1 // chunks this copy took from the pool
	var total int64
	var err, readErr error
	for {
		m, werr := w.Write((*cur)[:n])
		total += int64(m)
		if werr != nil {
			err = werr
			break
		}
		toHash <- hashChunk{cur, n}
		cur = nil
		if readErr != nil { // io.EOF: that was the last chunk
			break
		}
		if taken < copyInFlight {
			taken++
			cur = chunkPool.Get().(*[]byte)
		} else {
			cur = <-hashed
		}
		n, readErr = readChunk(r, *cur)
		if readErr != nil && (!errors.Is(readErr, io.EOF) || n == 0) {
			if !errors.Is(readErr, io.EOF) {
				err = readErr
			}
			break
		}
	}
	close(toHash)
	for b := range hashed {
		chunkPool.Put(b)
	}
	if cur != nil {
		chunkPool.Put(cur)
	}
	return total, err
}
