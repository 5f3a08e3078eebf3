package serve

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"math/rand"
	"testing"
	"testing/iotest"
)

func TestCopyHashed(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, size := range []int{0, 1, 1000, copyChunk - 1, copyChunk, copyChunk + 1, 3*copyChunk + 5, 10*copyChunk + 1} {
		data := make([]byte, size)
		rng.Read(data)
		want := sha256.Sum256(data)
		for _, tt := range []struct {
			name string
			r    func() io.Reader
			hash bool
		}{
			{"hashed", func() io.Reader { return bytes.NewReader(data) }, true},
			{"hashed, short reads", func() io.Reader { return iotest.HalfReader(bytes.NewReader(data)) }, true},
			{"hashed, data with EOF", func() io.Reader { return iotest.DataErrReader(bytes.NewReader(data)) }, true},
			{"not hashed", func() io.Reader { return bytes.NewReader(data) }, false},
		} {
			var out bytes.Buffer
			var sum hash.Hash
			if tt.hash {
				sum = sha256.New()
			}
			n, err := copyHashed(&out, tt.r(), sum)
			if err != nil || n != int64(size) || !bytes.Equal(out.Bytes(), data) {
				t.Errorf("%d bytes, %s: copied %d, err %v, equal %v", size, tt.name, n, err, bytes.Equal(out.Bytes(), data))
			}
			if sum != nil && !bytes.Equal(sum.Sum(nil), want[:]) {
				t.Errorf("%d bytes, %s: wrong hash", size, tt.name)
			}
		}
	}
}

type failingWriter struct{ left int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.left {
		n := w.left
		w.left = 0
		return n, errors.New("disk full")
	}
	w.left -= len(p)
	return len(p), nil
}

func TestCopyHashedErrors(t *testing.T) {
	data := make([]byte, 5*copyChunk)
	readErr := errors.New("connection reset")
	for _, tt := range []struct {
		name    string
		w       io.Writer
		r       io.Reader
		wantErr string
	}{
		{"read error in the first chunk", io.Discard, io.MultiReader(bytes.NewReader(data[:100]), iotest.ErrReader(readErr)), "connection reset"},
		{"read error in a later chunk", io.Discard, io.MultiReader(bytes.NewReader(data[:3*copyChunk+7]), iotest.ErrReader(readErr)), "connection reset"},
		{"write error in the first chunk", &failingWriter{left: 10}, bytes.NewReader(data), "disk full"},
		{"write error in a later chunk", &failingWriter{left: 2*copyChunk + 10}, bytes.NewReader(data), "disk full"},
		{"write error of a small body", &failingWriter{left: 10}, bytes.NewReader(data[:100]), "disk full"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := copyHashed(tt.w, tt.r, sha256.New())
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("err %v, want %s", err, tt.wantErr)
			}
		})
	}
}
