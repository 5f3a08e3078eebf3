package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
)

// What the upstream fetcher stores on a bucket goes the way an upload
// does: a NAR checked against the hash in its name as it streams, a
// narinfo PUT under the guard once its NAR and its references are there.
// Each is in the bucket once the store answered its PUT: nothing is
// pending afterwards.

// hasNarInfoBucket reports whether the bucket holds hash's narinfo,
// through the index, which looks a miss up in the bucket.
func (c *Cache) hasNarInfoBucket(hash string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), bucketTimeout)
	defer cancel()
	_, err := c.bucket.index.get(ctx, hash)
	return err == nil
}

// hasObjectBucket reports whether the bucket holds the object name.
func (c *Cache) hasObjectBucket(name string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), bucketTimeout)
	defer cancel()
	_, err := c.bucket.st.Stat(ctx, name)
	return err == nil
}

// storeNarInfoBucket PUTs a narinfo whose signature the caller checked.
func (c *Cache) storeNarInfoBucket(ni *nixcache.NarInfo, data []byte, t target) error {
	return c.commitNarInfoBucket(context.Background(), ni, data, t, time.Now())
}

// storeBucket streams r into the bucket as t (a NAR or a listing).
func (c *Cache) storeBucket(r io.Reader, t target) error {
	return c.putBucket(context.Background(), r, t, -1, time.Now())
}

// OnBucket reports whether the cache is kept in a bucket.
func (c *Cache) OnBucket() bool { return c.bucket != nil }

// Listed reports whether a cache on a bucket lists the narinfo of the
// store path whose hash part is hash, as of its last listing and its own
// writes since: a check that costs no request, for a marker of many
// roots. HasNarInfo asks the bucket.
func (c *Cache) Listed(hash string) bool {
	if c.bucket == nil {
		return false
	}
	_, ok := c.bucket.index.size(hash)
	return ok
}

// ReadNarInfo returns the narinfo of the store path whose hash part is
// hash from a cache on a bucket; an error matching fs.ErrNotExist when
// there is none.
func (c *Cache) ReadNarInfo(hash string) ([]byte, error) {
	if c.bucket == nil {
		return nil, errors.New("read narinfo: the cache is not on a bucket")
	}
	ctx, cancel := context.WithTimeout(context.Background(), bucketTimeout)
	defer cancel()
	e, err := c.bucket.index.get(ctx, hash)
	return e.data, err
}

// Marker returns the marker rel (gcroots/...) of a cache on a bucket and
// its version for ReplaceMarker; nil and "" when there is none.
func (c *Cache) Marker(rel string) (data []byte, version string, err error) {
	if err := c.markerName(rel); err != nil {
		return nil, "", err
	}
	data, info, err := c.bucket.getInfo(context.Background(), rel, prune.MaxMarkerSize)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", err
	}
	return data, info.ETag, nil
}

// ReplaceMarker writes the marker rel of a cache on a bucket if it is
// still at version (from Marker; "" when there was none), under the guard
// against a prune, as a marker upload is written. When another front end
// wrote or deleted it meanwhile, it writes nothing and returns an error
// matching fs.ErrExist. The caller checked that its roots are in the
// cache.
func (c *Cache) ReplaceMarker(rel string, data []byte, version string) error {
	if err := c.markerName(rel); err != nil {
		return err
	}
	if len(data) > prune.MaxMarkerSize {
		return fmt.Errorf("%s: %d bytes, over the %d a prune reads", rel, len(data), prune.MaxMarkerSize)
	}
	if _, err := nixcache.ParseMarker(data, c.cfg.StoreDir); err != nil {
		return fmt.Errorf("%s: %w", rel, err)
	}
	start := time.Now()
	return c.locks.Guard(context.Background(), func(ctx context.Context) error {
		old := c.bucket.sizeOf(ctx, rel)
		var err error
		if version == "" {
			_, err = c.bucket.st.Create(ctx, rel, data)
		} else {
			_, err = c.bucket.st.Replace(ctx, rel, data, version)
		}
		if errors.Is(err, fs.ErrNotExist) {
			err = fmt.Errorf("%s: deleted meanwhile: %w", rel, fs.ErrExist)
		}
		if err != nil {
			return err
		}
		c.metrics.stored(uploadOther, start, old, int64(len(data)))
		return nil
	})
}

// sizeOf returns the size of the object name, -1 when there is none (or
// the store does not say): what a write replaces, for the metrics.
func (b *bucket) sizeOf(ctx context.Context, name string) int64 {
	in, err := b.st.Stat(ctx, name)
	if err != nil {
		return -1
	}
	return in.Size
}

// markerName refuses what is not a marker's name on a bucket.
func (c *Cache) markerName(rel string) error {
	if c.bucket == nil {
		return errors.New("markers through the cache: the cache is not on a bucket")
	}
	if t, err := route(&url.URL{Path: "/" + rel}); err != nil || t.kind != kindRoot {
		return fmt.Errorf("%q is not a marker's name (gcroots/...)", rel)
	}
	return nil
}
