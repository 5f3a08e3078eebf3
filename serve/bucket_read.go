package serve

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net/http"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// readBucket answers a GET or HEAD of t from the bucket: a narinfo from
// the index, any other file by a Stat and then a Get of the range asked
// for, streamed to the client as it arrives.
func (c *Cache) readBucket(t target, q *query) answer {
	ctx := context.Background()
	switch t.kind {
	case kindNarInfo:
		e, err := c.bucket.index.get(ctx, t.name)
		if err != nil {
			return bucketErr(err)
		}
		return respond(q, narInfoType, quoteETag(e.etag), e.modified, e.mod, e.data, nil)
	case kindRoot:
		data, info, err := c.bucket.getInfo(ctx, t.rel, maxMarkerRead)
		if err != nil {
			return bucketErr(err)
		}
		if _, err := nixcache.ParseMarker(data, c.cfg.StoreDir); err != nil {
			return notFound
		}
		return respond(q, contentType[t.kind], quoteETag(info.ETag), info.ModTime.UTC().Format(http.TimeFormat), info.ModTime, data, nil)
	}
	if !q.head && q.rng == "" && q.ifMatch == "" && q.ifUnmodifiedSince == "" && q.ifNoneMatch == "" && q.ifModifiedSince == "" {
		// The common case, a plain GET: one request to the store, whose
		// answer has the size and the ETag.
		return c.getWhole(t)
	}
	sctx, cancel := context.WithTimeout(ctx, bucketTimeout)
	info, err := c.bucket.st.Stat(sctx, t.rel)
	cancel()
	if err != nil {
		return bucketErr(err)
	}
	etag := quoteETag(info.ETag)
	body := &sized{size: info.Size, open: func(off, n int64) (io.ReadCloser, error) {
		// No deadline: the body streams for as long as the client reads;
		// closing it ends the request to the store.
		rc, got, err := c.bucket.st.Get(context.Background(), t.rel, off, n)
		if err == nil && quoteETag(got.ETag) != etag {
			// Replaced between the Stat and the Get: the range would mix
			// two objects.
			rc.Close()
			return nil, errReplaced
		}
		return rc, err
	}}
	return respond(q, contentType[t.kind], etag, info.ModTime.UTC().Format(http.TimeFormat), info.ModTime, nil, body)
}

// getWhole answers a plain GET of t with the whole object, streamed.
func (c *Cache) getWhole(t target) answer {
	rc, info, err := c.bucket.st.Get(context.Background(), t.rel, 0, -1)
	if err != nil {
		return bucketErr(err)
	}
	a := answer{status: http.StatusOK, ctype: contentType[t.kind], etag: quoteETag(info.ETag),
		modified: info.ModTime.UTC().Format(http.TimeFormat), length: info.Size}
	if info.Size == 0 {
		rc.Close()
		a.data = []byte{}
		return a
	}
	a.stream, a.ranges = rc, true
	return a
}

// errReplaced is an object written again while a read of it began.
var errReplaced = errors.New("replaced while being read")

// bucketErr is the answer to a read the bucket failed.
func bucketErr(err error) answer {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return notFound
	case errors.Is(err, errReplaced):
		return answer{status: http.StatusServiceUnavailable, msg: "the file changed while being read: ask again"}
	}
	return answer{status: http.StatusBadGateway, msg: "the cache's storage failed to answer", err: err}
}

// quoteETag makes a store's ETag an HTTP entity tag.
func quoteETag(etag string) string { return `"` + etag + `"` }

// narInfoBytesBucket returns the narinfo of hash, as a GET would.
func (c *Cache) narInfoBytesBucket(hash string) ([]byte, error) {
	e, err := c.bucket.index.get(context.Background(), hash)
	return e.data, err
}
