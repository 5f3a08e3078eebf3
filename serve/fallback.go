package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"strconv"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// Upstream fetches into the cache what it lacks; package upstream has the
// one kiss-onion uses. A narinfo that the cache does not have, on either
// role, is asked of it; so is a NAR that the cache does not have, which
// may be downloading. A hit never reaches it.
type Upstream interface {
	// Lookup returns the narinfo of the store path whose hash part is
	// hash once it and its closure are known to be upstream (bounding
	// that wait itself: ctx has no deadline), and brings
	// them into c in the background, through StoreNar and StoreNarInfo:
	// references first, so that the cache on disk stays closed under
	// references. It returns nil and no error when c has the path, and
	// an error wrapping fs.ErrNotExist when no upstream has it.
	Lookup(ctx context.Context, hash string, c *Cache) ([]byte, error)
	// OpenNar returns a reader of the NAR file at url (a narinfo's URL)
	// while it downloads, from its first byte; false when no download of
	// it is under way.
	OpenNar(url string, c *Cache) (NarDownload, bool)
	// Used records that the NAR file at url (a narinfo's URL) was read:
	// fetched paths are kept for a while after their last read. It is
	// called on every NAR read that finds the file, and must be cheap.
	Used(url string)
}

// NarDownload reads a NAR file as it downloads from upstream. A Read
// waits for the bytes it asks for, and fails when the download does:
// what it gave may not be trusted before its io.EOF, which comes only
// once the whole file is checked.
type NarDownload interface {
	io.ReadCloser
	// Size is the file's size, -1 when its narinfo does not say.
	Size() int64
	// Narrow makes the reader give the n bytes from offset start only
	// (a Range), before its first Read.
	Narrow(start, n int64)
}

// readUpstream answers a narinfo the cache lacks from upstream: 404 when
// no upstream has it or what came was refused. It is answered as soon as
// the narinfos of its closure are checked, from memory, while the NARs
// download; it becomes visible on disk once they are stored.
func (c *Cache) readUpstream(t target, q *query) answer {
	data, err := c.cfg.Upstream.Lookup(context.Background(), t.name, c)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			c.log.WithField("path", t.rel).WithError(err).Warn("not fetched from upstream")
		}
		return notFound
	}
	if data == nil {
		return c.readNow(t, q)
	}
	now := time.Now()
	return respond(q, narInfoType, etagOf(int64(len(data)), now), now.UTC().Format(http.TimeFormat), now, data, nil)
}

// readUpstreamNar answers a NAR the cache lacks from its download from
// upstream, as it comes: 200 with the whole file, or 206 with a single
// range when the file's size is known (each byte sent once it arrived),
// cut off if the download fails.
func (c *Cache) readUpstreamNar(t target, q *query) answer {
	d, ok := c.cfg.Upstream.OpenNar(t.rel, c)
	if !ok {
		// It may have been stored meanwhile, or be on its way there.
		a := c.readNow(t, q)
		if a.status == http.StatusNotFound && c.bucket == nil && c.durable.visible(t.rel, pendingWait) {
			a = c.readNow(t, q)
		}
		if a.status < 300 && !q.head {
			c.cfg.Upstream.Used(t.rel)
		}
		return a
	}
	size := d.Size()
	a := answer{status: http.StatusOK, ctype: contentType[kindNar], length: size}
	// No validator yet: an If-Range cannot match, and gets the whole file.
	if q.rng != "" && size > 0 && rangeApplies(q.ifRange, "", time.Time{}) {
		s, l, ok := parseRange(q.rng, size)
		switch {
		case !ok:
			// A malformed or multiple range is ignored: the whole body.
		case l < 0:
			d.Close()
			return answer{status: http.StatusRequestedRangeNotSatisfiable, contentRange: "bytes */" + strconv.FormatInt(size, 10),
				msg: "range not satisfiable: the file has " + strconv.FormatInt(size, 10) + " bytes"}
		default:
			d.Narrow(s, l)
			a.status, a.length = http.StatusPartialContent, l
			a.contentRange = "bytes " + strconv.FormatInt(s, 10) + "-" + strconv.FormatInt(s+l-1, 10) + "/" + strconv.FormatInt(size, 10)
		}
	}
	if q.head || a.length == 0 {
		d.Close()
		return a
	}
	a.stream = d
	return a
}

// HasNarInfo reports whether the cache holds the narinfo of the store
// path whose hash part is hash, or is storing one.
func (c *Cache) HasNarInfo(hash string) bool {
	if !nixcache.IsHashPart(hash) {
		return false
	}
	if c.bucket != nil {
		return c.hasNarInfoBucket(hash)
	}
	_, err := c.durable.find(c.cfg.Dir, hash+".narinfo")
	return err == nil
}

// HasNar reports whether the cache holds the file a narinfo's URL names,
// or is storing it.
func (c *Cache) HasNar(url string) bool {
	if nixcache.CheckNarURL(url) != nil {
		return false
	}
	if c.bucket != nil {
		return c.hasObjectBucket(url)
	}
	_, err := c.durable.find(c.cfg.Dir, url)
	return err == nil
}

// StoreNar stores the file a narinfo's URL names from r, atomically: it is
// discarded when r fails, and when the name is a file hash that the
// content does not match. It becomes visible once durable, moments after
// StoreNar returns; a StoreNarInfo naming it waits for that.
func (c *Cache) StoreNar(url string, r io.Reader) error {
	if err := nixcache.CheckNarURL(url); err != nil {
		return fmt.Errorf("store %s: %w", url, err)
	}
	t := target{kind: kindNar, rel: url}
	if c.bucket != nil {
		return c.storeBucket(r, t)
	}
	return c.putStream(r, t, time.Now())
}

// StoreListing stores the listing (<hash>.ls) of the store path whose
// hash part is hash from r, atomically: it is discarded when r fails.
// The caller checked what r gives: a listing carries no signature.
func (c *Cache) StoreListing(hash string, r io.Reader) error {
	if !nixcache.IsHashPart(hash) {
		return fmt.Errorf("store listing: %q is not a store hash", hash)
	}
	t := target{kind: kindListing, rel: hash + ".ls", name: hash}
	if c.bucket != nil {
		return c.storeBucket(r, t)
	}
	return c.putStream(r, t, time.Now())
}

// StoreNarInfo stores the narinfo of the store path whose hash part is
// hash, whose NAR and references must be in the cache, and returns once
// it is visible and durable. Unlike an upload it is not held to the
// writer keys: the caller checked its signature against its own keys.
func (c *Cache) StoreNarInfo(hash string, data []byte) error {
	if !nixcache.IsHashPart(hash) {
		return fmt.Errorf("store narinfo: %q is not a store hash", hash)
	}
	t := target{kind: kindNarInfo, rel: hash + ".narinfo", name: hash}
	ni, err := nixcache.ParseNarInfo(data)
	if err == nil {
		err = ni.Validate(c.cfg.StoreDir, hash)
	}
	if err != nil {
		return fmt.Errorf("store %s: %w", t.rel, err)
	}
	if c.bucket != nil {
		if err := c.storeNarInfoBucket(ni, data, t); err != nil {
			return fmt.Errorf("store %s: %w", t.rel, err)
		}
		return nil
	}
	tf := c.startTemp(c.path(t))
	f, cm, deps, err := c.stageNarInfo(tf, t, data, func() ([]dependency, error) { return c.narInfoDeps(ni, t) })
	if err != nil {
		return fmt.Errorf("store %s: %w", t.rel, err)
	}
	visible, err := c.commitNarInfo(f, t, data, deps, time.Now())
	if err != nil && c.narinfos != nil {
		c.narinfos.drop(t.rel)
	}
	cm.end(err, visible)
	if err != nil {
		return fmt.Errorf("store %s: %w", t.rel, err)
	}
	return nil
}
