package upstream

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// verifier is a NAR file from upstream read through a check of what the
// narinfo says of it: its size and hash when given, and the size and
// hash of the NAR inside, which the signature covers. Its last Read
// returns an error instead of io.EOF when a check fails, so that
// serve.Cache.StoreNar discards the file.
type verifier struct {
	r        io.Reader
	n        int64 // file bytes so far
	fileSum  hash.Hash
	fileWant []byte
	fileSize int64
	max      int64

	pw   *io.PipeWriter // into the decompressor
	done chan error     // the decompressor's verdict on the NAR
	err  error          // the verdict, once given
}

// newVerifier returns a verifier of r for ni; max bounds the file and the
// NAR.
func newVerifier(r io.Reader, ni *nixcache.NarInfo, max int64) (*verifier, error) {
	narWant, err := nixcache.SHA256Digest(ni.NarHash)
	if err != nil {
		return nil, fmt.Errorf("NarHash: %w", err)
	}
	v := &verifier{r: r, fileSum: sha256.New(), fileSize: int64(ni.FileSize), max: max, done: make(chan error, 1)}
	if ni.FileHash != "" {
		// Validate took it; another algorithm than sha256 goes unchecked,
		// the NAR's hash below is the one that counts.
		v.fileWant, _ = nixcache.SHA256Digest(ni.FileHash)
	}
	if !checkable(ni.Compression) {
		return nil, fmt.Errorf("compression %q is not one the cache can check", ni.Compression)
	}
	pr, pw := io.Pipe()
	v.pw = pw
	narSize := int64(ni.NarSize)
	go func() {
		// The decompressor starts here: it may read its header at once.
		dec, err := decompressor(ni.Compression, pr)
		var n int64
		sum := sha256.New()
		if err == nil {
			n, err = io.Copy(sum, io.LimitReader(dec, narSize+1))
			if c, ok := dec.(io.Closer); ok {
				c.Close()
			}
		}
		switch {
		case err != nil:
			err = fmt.Errorf("decompress (%s): %w", ni.Compression, err)
		case n != narSize:
			err = fmt.Errorf("NAR of %d bytes or more, not the signed NarSize %d", n, narSize)
		case !bytes.Equal(sum.Sum(nil), narWant):
			err = errors.New("NAR does not match the signed NarHash")
		}
		if err != nil {
			// The writer must never block: it is refused from now on.
			pr.CloseWithError(err)
		} else {
			// Bytes after the compressed stream: the file's checks cover them.
			io.Copy(io.Discard, pr)
		}
		v.done <- err
	}()
	return v, nil
}

func (v *verifier) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if n > 0 {
		v.n += int64(n)
		if v.n > v.max || (v.fileSize > 0 && v.n > v.fileSize) {
			return 0, v.fail(fmt.Errorf("file longer than its FileSize %d or the limit of %d bytes", v.fileSize, v.max))
		}
		v.fileSum.Write(p[:n])
		if _, werr := v.pw.Write(p[:n]); werr != nil {
			// The decompressor stopped early: it has its verdict.
			v.pw.Close()
			if verdict := <-v.done; verdict != nil {
				return 0, v.fail(verdict)
			}
			return 0, v.fail(errors.New("NAR ends before its file does"))
		}
	}
	if err == io.EOF {
		return n, v.finish()
	}
	if err != nil {
		return n, v.fail(err)
	}
	return n, nil
}

// finish checks the whole file and waits for the NAR's verdict.
func (v *verifier) finish() error {
	v.pw.Close()
	verdict := <-v.done
	switch {
	case v.fileSize > 0 && v.n != v.fileSize:
		return v.fail(fmt.Errorf("file of %d bytes, not its FileSize %d", v.n, v.fileSize))
	case v.fileWant != nil && !bytes.Equal(v.fileSum.Sum(nil), v.fileWant):
		return v.fail(errors.New("file does not match its FileHash"))
	case verdict != nil:
		return v.fail(verdict)
	}
	v.err = io.EOF
	return io.EOF
}

func (v *verifier) fail(err error) error {
	v.err = err
	v.pw.CloseWithError(err)
	return err
}

// Close stops the decompressor when the file was not read to its end.
func (v *verifier) Close() error {
	if v.err == nil {
		v.fail(errors.New("download abandoned"))
		<-v.done
	}
	return nil
}

// checkable reports whether decompressor takes method.
func checkable(method string) bool {
	switch method {
	case "none", "", "xz", "zstd", "bzip2", "br", "gzip":
		return true
	}
	return false
}

// decompressor returns a reader of the NAR in a file compressed with
// method, as a narinfo's Compression names it.
func decompressor(method string, r io.Reader) (io.Reader, error) {
	switch method {
	case "none", "":
		return r, nil
	case "xz":
		return xz.NewReader(r)
	case "zstd":
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(1<<31))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	case "bzip2":
		return bzip2.NewReader(r), nil
	case "br":
		return brotli.NewReader(r), nil
	case "gzip":
		return gzip.NewReader(r)
	}
	return nil, fmt.Errorf("compression %q is not one the cache can check", method)
}
