package serve

import (
	"context"
	"io"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
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
