package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// Upstream fetches into the cache what it lacks; package upstream has the
// one kiss-onion uses. A narinfo that the cache does not have, on either
// role, is asked of it, and answered from disk once stored. A hit never
// reaches it.
type Upstream interface {
	// Fetch brings the store path whose hash part is hash into c, with
	// its closure, through StoreNar and StoreNarInfo: references first,
	// so that the cache stays closed under references. It returns an
	// error wrapping fs.ErrNotExist when no upstream has the path.
	Fetch(ctx context.Context, hash string, c *Cache) error
	// Used records that the NAR file at url (a narinfo's URL) was read:
	// fetched paths are kept for a while after their last read. It is
	// called on every NAR read that finds the file, and must be cheap.
	Used(url string)
}

// upstreamWait bounds what a read waits for a fetch from upstream, the
// closure of the path and its NARs included.
const upstreamWait = 10 * time.Minute

// readUpstream answers a narinfo the cache lacks by fetching it from
// upstream: 404 when no upstream has it or what came was refused.
//
// The whole closure is stored before the narinfo is answered; the NAR is
// not yet streamed to the first client while it is stored.
func (c *Cache) readUpstream(t target, q *query) answer {
	ctx, cancel := context.WithTimeout(context.Background(), upstreamWait)
	defer cancel()
	if err := c.cfg.Upstream.Fetch(ctx, t.name, c); err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			c.log.WithField("path", t.rel).WithError(err).Warn("not fetched from upstream")
		}
		return notFound
	}
	return c.readNow(t, q)
}

// HasNarInfo reports whether the cache holds the narinfo of the store
// path whose hash part is hash, or is storing one.
func (c *Cache) HasNarInfo(hash string) bool {
	if !nixcache.IsHashPart(hash) {
		return false
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
	return c.putStream(r, target{kind: kindNar, rel: url})
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
	tf := c.startTemp(c.path(t))
	c.forgetting.RLock()
	deps, err := c.narInfoDeps(ni, t)
	if err != nil {
		c.forgetting.RUnlock()
		tf.abort()
		return fmt.Errorf("store %s: %w", t.rel, err)
	}
	f, err := tf.get()
	if err != nil {
		c.forgetting.RUnlock()
		return err
	}
	if _, err := f.Write(data); err != nil {
		c.forgetting.RUnlock()
		f.Abort()
		return err
	}
	cm := c.durable.begin(t.rel)
	c.forgetting.RUnlock()
	visible, err := c.commitNarInfo(f, t, data, deps)
	if err != nil && c.narinfos != nil {
		c.narinfos.drop(t.rel)
	}
	cm.end(err, visible)
	if err != nil {
		return fmt.Errorf("store %s: %w", t.rel, err)
	}
	return nil
}
