package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/sirupsen/logrus"
)

// abortTimeout bounds the clean-up of a failed multipart upload, which
// runs even when the caller's context is what failed it.
const abortTimeout = 30 * time.Second

// Put stores what r yields under name: size bytes, or until EOF when size
// is negative. The object appears whole, replacing any object of that
// name, or not at all: a body over PartSize goes up as a multipart upload
// that is completed only after its last part, and aborted on any error,
// also when ctx is cancelled. Memory stays bounded: a body of known size
// streams through, one of unknown size is read a part at a time.
func (s *Store) Put(ctx context.Context, name string, r io.Reader, size int64) (Info, error) {
	key, err := s.key(name)
	if err != nil {
		return Info{}, err
	}
	if size >= 0 && size <= s.partSize {
		return s.putOne(ctx, name, key, r, size, minio.PutObjectOptions{})
	}
	var first []byte
	if size < 0 {
		buf := make([]byte, s.partSize)
		n, err := io.ReadFull(r, buf)
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			return s.putOne(ctx, name, key, bytes.NewReader(buf[:n]), int64(n), minio.PutObjectOptions{})
		case err != nil:
			return Info{}, fmt.Errorf("s3 put %s: read body: %w", name, err)
		}
		first = buf
	}
	return s.putParts(ctx, name, key, first, r, size)
}

// putOne stores a body of known size with one PUT.
func (s *Store) putOne(ctx context.Context, name, key string, r io.Reader, size int64, opts minio.PutObjectOptions) (Info, error) {
	ui, err := s.core.PutObject(ctx, s.bucket, key, r, size, "", "", opts)
	if err != nil {
		return Info{}, wrapErr("put", name, err)
	}
	return Info{Name: name, Size: size, ETag: ui.ETag, ModTime: ui.LastModified}, nil
}

// putParts stores a body over one part as a multipart upload. first is the
// first part, already read, when the size is unknown; later parts of an
// unknown size are read into it in turn.
func (s *Store) putParts(ctx context.Context, name, key string, first []byte, r io.Reader, size int64) (info Info, err error) {
	id, err := s.core.NewMultipartUpload(ctx, s.bucket, key, minio.PutObjectOptions{})
	if err != nil {
		return Info{}, wrapErr("put", name, err)
	}
	defer func() {
		if err != nil {
			s.abort(ctx, name, key, id)
		}
	}()
	var parts []minio.CompletePart
	var total int64
	for n := 1; ; n++ {
		var body io.Reader
		var length int64
		switch {
		case size >= 0:
			length = min(s.partSize, size-total)
			body = io.LimitReader(r, length)
		case n == 1:
			length, body = int64(len(first)), bytes.NewReader(first)
		default:
			m, rerr := io.ReadFull(r, first)
			if rerr != nil && rerr != io.EOF && rerr != io.ErrUnexpectedEOF {
				return Info{}, fmt.Errorf("s3 put %s: read body: %w", name, rerr)
			}
			length, body = int64(m), bytes.NewReader(first[:m])
		}
		if length == 0 {
			break
		}
		if n > maxParts {
			return Info{}, fmt.Errorf("s3 put %s: body over %d parts of %d bytes", name, maxParts, s.partSize)
		}
		p, err := s.core.PutObjectPart(ctx, s.bucket, key, id, n, body, length, minio.PutObjectPartOptions{})
		if err != nil {
			return Info{}, wrapErr("put", fmt.Sprintf("%s (part %d)", name, n), err)
		}
		parts = append(parts, minio.CompletePart{PartNumber: n, ETag: p.ETag})
		total += length
		if size >= 0 && total == size || size < 0 && length < s.partSize {
			break
		}
	}
	// The context may have been cancelled after the last part: completing
	// then would make visible what the caller gave up on.
	if err := ctx.Err(); err != nil {
		return Info{}, fmt.Errorf("s3 put %s: %w", name, err)
	}
	ui, err := s.core.CompleteMultipartUpload(ctx, s.bucket, key, id, parts, minio.PutObjectOptions{})
	if err != nil {
		return Info{}, wrapErr("put", name, err)
	}
	return Info{Name: name, Size: total, ETag: ui.ETag, ModTime: ui.LastModified}, nil
}

// abort drops a failed multipart upload's parts, with a context of its
// own: ctx is often why the upload failed. What it cannot drop stays
// invisible until AbortUploads.
func (s *Store) abort(ctx context.Context, name, key, id string) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abortTimeout)
	defer cancel()
	if err := s.core.AbortMultipartUpload(actx, s.bucket, key, id); err != nil {
		s.log.WithFields(logrus.Fields{"name": name, "error": err}).Warn("could not abort a failed multipart upload")
	}
}

// AbortUploads aborts the multipart uploads under the prefix begun more
// than olderThan ago: what killed processes left, invisible but taking
// space. It returns how many it aborted.
func (s *Store) AbortUploads(ctx context.Context, olderThan time.Duration) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	aborted := 0
	var errs []error
	for u := range s.client.ListIncompleteUploads(ctx, s.bucket, s.prefix, true) {
		if u.Err != nil {
			return aborted, fmt.Errorf("s3 list multipart uploads: %w", u.Err)
		}
		if time.Since(u.Initiated) < olderThan {
			continue
		}
		if err := s.core.AbortMultipartUpload(ctx, s.bucket, u.Key, u.UploadID); err != nil {
			errs = append(errs, fmt.Errorf("s3 abort upload of %s: %w", u.Key, err))
			continue
		}
		aborted++
	}
	return aborted, errors.Join(errs...)
}
