package s3store

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/minio/minio-go/v7"
)

// List calls fn with the objects whose names start with prefix, a page
// (up to 1000) at a time in key order, through every level of folders.
// An error from fn stops the listing and is returned.
func (s *Store) List(ctx context.Context, prefix string, fn func(page []Info) error) error {
	return s.list(ctx, prefix, "", fn)
}

// ListDir is List of the objects directly in the folder dir ("" for the
// top, else ending in "/"): the narinfos beside nar/, without what is in
// nar/.
func (s *Store) ListDir(ctx context.Context, dir string, fn func(page []Info) error) error {
	if dir != "" && !strings.HasSuffix(dir, "/") {
		return fmt.Errorf("s3 list %q: a folder name ends in /", dir)
	}
	return s.list(ctx, dir, "/", fn)
}

func (s *Store) list(ctx context.Context, prefix, delim string, fn func(page []Info) error) error {
	token := ""
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		res, err := s.core.ListObjectsV2(s.bucket, s.prefix+prefix, "", token, delim, listPage)
		if err != nil {
			return fmt.Errorf("s3 list %q: %w", prefix, err)
		}
		page := make([]Info, 0, len(res.Contents))
		for _, o := range res.Contents {
			name, ok := strings.CutPrefix(o.Key, s.prefix)
			if !ok {
				return fmt.Errorf("s3 list %q: the store answered key %q outside the prefix", prefix, o.Key)
			}
			page = append(page, Info{Name: name, Size: o.Size, ETag: o.ETag, ModTime: o.LastModified})
		}
		if len(page) > 0 {
			if err := fn(page); err != nil {
				return err
			}
		}
		if !res.IsTruncated {
			return nil
		}
		if res.NextContinuationToken == "" || res.NextContinuationToken == token {
			return fmt.Errorf("s3 list %q: the store said there is more but gave no new continuation token", prefix)
		}
		token = res.NextContinuationToken
	}
}

// Delete deletes the named objects, a thousand per request. A name that is
// not there is no error. It returns once every batch is done, with an
// error naming each object it could not delete; batches go in the order
// of names, but the objects of one batch in any order, so a caller that
// must delete referrers first calls Delete once per tier.
func (s *Store) Delete(ctx context.Context, names []string) error {
	keys := make([]string, len(names))
	for i, name := range names {
		k, err := s.key(name)
		if err != nil {
			return err
		}
		keys[i] = k
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan minio.ObjectInfo)
	go func() {
		defer close(ch)
		for _, k := range keys {
			select {
			case ch <- minio.ObjectInfo{Key: k}:
			case <-ctx.Done():
				return
			}
		}
	}()
	var errs []error
	for res := range s.client.RemoveObjectsWithResult(ctx, s.bucket, ch, minio.RemoveObjectsOptions{}) {
		if res.Err != nil {
			errs = append(errs, fmt.Errorf("s3 delete %s: %w", strings.TrimPrefix(res.ObjectName, s.prefix), res.Err))
		}
	}
	if err := ctx.Err(); err != nil && len(errs) == 0 {
		return fmt.Errorf("s3 delete: %w", err)
	}
	return errors.Join(errs...)
}

// Create stores body under name only if no object has that name
// (If-None-Match: *), and fails with an error matching fs.ErrExist if one
// has. On a store that honours the condition, of writers racing for a
// name exactly one succeeds: the base of a lock on the bucket. A store
// that ignores it (see Probe) lets the last writer win.
func (s *Store) Create(ctx context.Context, name string, body []byte) (Info, error) {
	key, err := s.key(name)
	if err != nil {
		return Info{}, err
	}
	var opts minio.PutObjectOptions
	opts.SetMatchETagExcept("*")
	return s.putOne(ctx, name, key, bytes.NewReader(body), int64(len(body)), opts)
}

// Probe reports whether the store honours Create's condition: it creates
// an object of a random name under the prefix twice, and deletes it.
func (s *Store) Probe(ctx context.Context) (conditional bool, err error) {
	var r [8]byte
	rand.Read(r[:])
	name := ".probe-" + hex.EncodeToString(r[:])
	defer func() {
		if derr := s.Delete(context.WithoutCancel(ctx), []string{name}); derr != nil && err == nil {
			err = derr
		}
	}()
	if _, err := s.Create(ctx, name, []byte("1")); err != nil {
		return false, fmt.Errorf("s3 probe conditional writes: %w", err)
	}
	_, err = s.Create(ctx, name, []byte("2"))
	switch {
	case errors.Is(err, fs.ErrExist):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("s3 probe conditional writes: %w", err)
	}
	return false, nil
}
