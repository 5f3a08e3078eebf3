package serve

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// putBucket stores an upload in the bucket, acknowledged once the store
// has it. size is the body's length, or -1 when unknown (chunked, or
// decoded from a Content-Encoding).
func (c *Cache) putBucket(ctx context.Context, body io.Reader, t target, size int64, start time.Time) error {
	switch t.kind {
	case kindNarInfo:
		return c.putNarInfoBucket(ctx, body, t, start)
	case kindRoot:
		return c.putMarkerBucket(ctx, body, t, start)
	}
	if t.kind == kindNar {
		if want := nixcache.NarURLHash(t.rel); want != "" {
			body = &checkedBody{r: body, sum: sha256.New(), want: want, rel: t.rel, size: size}
		}
	}
	// The request's context: a client that goes away cancels the upload,
	// and a multipart upload is then aborted, never completed.
	info, err := c.bucket.st.Put(ctx, t.rel, body, size)
	if err != nil {
		var he *httpError
		if errors.As(err, &he) {
			return he
		}
		return err
	}
	kind := uploadOther
	if t.kind == kindNar {
		kind = uploadNar
	}
	c.metrics.stored(kind, start, -1, info.Size)
	return nil
}

// checkedBody passes a NAR's bytes on while hashing them, and fails the
// read that would complete the body when the content does not match the
// hash in its name: the store then never gets the whole object, so a
// corrupt NAR never appears, whether it goes up in one PUT or in parts.
type checkedBody struct {
	r    io.Reader
	sum  hash.Hash
	want string
	rel  string
	size int64 // -1: unknown, checked at EOF
	n    int64
}

func (b *checkedBody) Read(p []byte) (int, error) {
	if b.size >= 0 && b.n >= b.size {
		return 0, io.EOF
	}
	n, err := b.r.Read(p)
	b.sum.Write(p[:n])
	b.n += int64(n)
	if err == io.EOF || (b.size >= 0 && b.n >= b.size) {
		if got := nixcache.Base32(b.sum.Sum(nil)); got != b.want {
			return 0, refusef(http.StatusBadRequest, "%s: content has sha256 %s, not the hash in its name", b.rel, got)
		}
	}
	return n, err
}

// putNarInfoBucket checks a narinfo and PUTs it once its NAR and its
// references' narinfos are in the bucket, under the guard against a
// prune: the guard's deadline bounds how long after the check the PUT may
// land, which a prune waits out before it deletes.
func (c *Cache) putNarInfoBucket(ctx context.Context, body io.Reader, t target, start time.Time) error {
	data, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	ni, err := c.parseNarInfoUpload(data, t)
	if err != nil {
		return err
	}
	return c.commitNarInfoBucket(ctx, ni, data, t, start)
}

// commitNarInfoBucket PUTs a checked narinfo once its NAR and its
// references' narinfos are in the bucket, under the guard against a
// prune.
func (c *Cache) commitNarInfoBucket(ctx context.Context, ni *nixcache.NarInfo, data []byte, t target, start time.Time) error {
	return c.locks.Guard(ctx, func(ctx context.Context) error {
		if _, err := c.bucket.st.Stat(ctx, ni.URL); errors.Is(err, fs.ErrNotExist) {
			return refusef(http.StatusConflict, "%s: its URL %s was not uploaded first", t.rel, ni.URL)
		} else if err != nil {
			return fmt.Errorf("%s: its URL: %w", t.rel, err)
		}
		for _, ref := range ni.References {
			h := ref[:nixcache.HashLen]
			if h == t.name {
				continue
			}
			if _, err := c.bucket.index.get(ctx, h); errors.Is(err, fs.ErrNotExist) {
				return refusef(http.StatusConflict, "%s: reference %s is not in the cache (upload references first)", t.rel, ref)
			} else if err != nil {
				return fmt.Errorf("%s: reference %s: %w", t.rel, ref, err)
			}
		}
		info, err := c.bucket.st.Put(ctx, t.rel, bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return err
		}
		old := int64(-1)
		if size, ok := c.bucket.index.size(t.name); ok {
			old = size // a replacement
		}
		c.bucket.index.stored(t.name, info, data)
		c.metrics.stored(uploadNarInfo, start, old, int64(len(data)))
		return nil
	})
}

// putMarkerBucket PUTs a marker once every root it names has its narinfo
// in the bucket, under the guard, as a narinfo.
func (c *Cache) putMarkerBucket(ctx context.Context, body io.Reader, t target, start time.Time) error {
	data, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	roots, err := nixcache.ParseMarker(data, c.cfg.StoreDir)
	if err != nil {
		return refusef(http.StatusBadRequest, "%s: %v", t.rel, err)
	}
	return c.locks.Guard(ctx, func(ctx context.Context) error {
		for _, root := range roots {
			if _, err := c.bucket.index.get(ctx, root[:nixcache.HashLen]); errors.Is(err, fs.ErrNotExist) {
				return refusef(http.StatusConflict, "%s: %s is not in the cache", t.rel, root)
			} else if err != nil {
				return fmt.Errorf("%s: %s: %w", t.rel, root, err)
			}
		}
		old := c.bucket.sizeOf(ctx, t.rel)
		if _, err := c.bucket.st.Put(ctx, t.rel, bytes.NewReader(data), int64(len(data))); err != nil {
			return err
		}
		c.metrics.stored(uploadOther, start, old, int64(len(data)))
		return nil
	})
}

// deleteMarkerBucket deletes a marker; a missing one is fs.ErrNotExist.
func (c *Cache) deleteMarkerBucket(t target) error {
	ctx, cancel := context.WithTimeout(context.Background(), bucketTimeout)
	defer cancel()
	info, err := c.bucket.st.Stat(ctx, t.rel)
	if err != nil {
		return err
	}
	if err := c.bucket.st.Delete(ctx, []string{t.rel}); err != nil {
		return err
	}
	c.metrics.resized(info.Size, -1)
	return nil
}

// countSizeBucket counts the bucket's objects and bytes once, as
// countSize does a directory's.
func (c *Cache) countSizeBucket() {
	var files, size, narinfos int64
	err := c.bucket.st.List(context.Background(), "", func(page []s3store.Info) error {
		for _, in := range page {
			if !countedFile(in.Name) || strings.HasSuffix(in.Name, "/") {
				continue
			}
			files++
			size += in.Size
			if topNarInfo(in.Name) {
				narinfos++
			}
		}
		return nil
	})
	if err != nil {
		c.log.WithError(err).Warn("counting the bucket's size failed")
		return
	}
	c.metrics.counts(files, size, narinfos)
}
