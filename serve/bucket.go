package serve

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// Locks is the lock protocol a cache follows (package cachelock on a
// directory, bucketlock on a bucket): the upload locks writers take over
// HTTP, and the guard under which a narinfo or a marker is checked and
// published while no prune deletes.
type Locks interface {
	Acquire(name string, body []byte) error
	Release(name string) error
	List() ([]cachelock.LockInfo, error)
	// Guard runs fn unless a prune deletes (an error wrapping
	// cachelock.ErrBusy); fn must be done by its context's deadline.
	Guard(ctx context.Context, fn func(ctx context.Context) error) error
}

// dirLocks is the directory's protocol (cachelock) as Locks: its guard
// is a shared flock, with no deadline.
type dirLocks struct{ *cachelock.Locks }

func (l dirLocks) Guard(ctx context.Context, fn func(ctx context.Context) error) error {
	return l.Locks.Guard(func() error { return fn(ctx) })
}

// bucket is a cache's storage when it is a bucket rather than a
// directory. Uploads go straight to the bucket, each acknowledged once
// the store answered its PUT (S3 is durable then), so the order of the
// requests keeps the cache's rule: a narinfo is PUT only after its NAR's
// PUT returned and its references' narinfos are seen in the bucket.
type bucket struct {
	st    *s3store.Store
	index *bucketIndex
}

// bucketTimeout bounds a store request that carries no body: a Stat, a
// small Get, a Delete. (A body streams for as long as the client's
// request lasts.)
const bucketTimeout = 30 * time.Second

// openBucket completes New for a cache on a bucket: nix-cache-info in
// the bucket, and the index of its narinfos.
func (c *Cache) openBucket(ctx context.Context) error {
	b := &bucket{st: c.cfg.Bucket}
	c.bucket = b
	if c.cfg.BucketLocks == nil {
		return errors.New("a cache on a bucket needs its lock protocol (Config.BucketLocks)")
	}
	c.locks = c.cfg.BucketLocks
	info, err := b.st.Stat(ctx, "nix-cache-info")
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("bucket: %w", err)
	}
	if err != nil || info.Size != int64(len(c.info)) || !b.same(ctx, "nix-cache-info", c.info) {
		if info, err = b.st.Put(ctx, "nix-cache-info", strings.NewReader(string(c.info)), int64(len(c.info))); err != nil {
			return fmt.Errorf("bucket: write nix-cache-info: %w", err)
		}
	}
	c.infoTime = info.ModTime
	b.index = newBucketIndex(b, c.cfg.NarInfoMemory, c.log)
	if err := b.index.load(ctx); err != nil {
		return err
	}
	return nil
}

// same reports whether the object name holds exactly data.
func (b *bucket) same(ctx context.Context, name string, data []byte) bool {
	got, err := b.get(ctx, name, int64(len(data))+1)
	return err == nil && string(got) == string(data)
}

// get reads a small object whole, refusing one over limit bytes.
func (b *bucket) get(ctx context.Context, name string, limit int64) ([]byte, error) {
	data, _, err := b.getInfo(ctx, name, limit)
	return data, err
}

func (b *bucket) getInfo(ctx context.Context, name string, limit int64) ([]byte, s3store.Info, error) {
	ctx, cancel := context.WithTimeout(ctx, bucketTimeout)
	defer cancel()
	rc, info, err := b.st.Get(ctx, name, 0, -1)
	if err != nil {
		return nil, info, err
	}
	defer rc.Close()
	if info.Size > limit {
		return nil, info, fmt.Errorf("%s: %d bytes, over the limit of %d", name, info.Size, limit)
	}
	data := make([]byte, info.Size)
	if _, err := io.ReadFull(rc, data); err != nil {
		return nil, info, fmt.Errorf("%s: %w", name, err)
	}
	return data, info, nil
}

// bucketIndex holds the bucket's narinfos: every name with its ETag from
// a listing, and the narinfos read since, up to a memory bound. An entry
// is trusted for revalidateAfter, as a narinfo held in memory on a
// directory is, then checked against the bucket (a Stat); a name not in
// the index is looked up in the bucket, so that what another front end
// uploaded is never refused. The whole top folder is listed again every
// relistEvery, so that the closure queries and the metrics see what
// other front ends and prunes did.
type bucketIndex struct {
	b   *bucket
	log *logrus.Entry

	mu    sync.RWMutex
	m     map[string]*bucketEntry // by hash part
	bytes int64                   // data held
	limit int64
}

type bucketEntry struct {
	etag     string
	size     int64
	mod      time.Time
	modified string
	data     []byte // nil until read, or when dropped for memory
	checked  time.Time
}

const relistEvery = 30 * time.Second

func newBucketIndex(b *bucket, limit int64, log *logrus.Entry) *bucketIndex {
	if limit < 0 {
		limit = 0
	}
	return &bucketIndex{b: b, log: log, m: map[string]*bucketEntry{}, limit: limit}
}

// load lists the bucket's narinfos into the index, keeping the data of
// entries whose ETag did not change.
func (x *bucketIndex) load(ctx context.Context) error {
	start := time.Now()
	seen := make(map[string]s3store.Info, len(x.m))
	err := x.b.st.ListDir(ctx, "", func(page []s3store.Info) error {
		for _, in := range page {
			if h, ok := strings.CutSuffix(in.Name, ".narinfo"); ok && validNarInfoHash(h) {
				seen[h] = in
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("bucket: list narinfos: %w", err)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	for h, e := range x.m {
		// An entry checked after the listing began is newer than it.
		if _, ok := seen[h]; !ok && e.checked.Before(start) {
			x.bytes -= int64(len(e.data))
			delete(x.m, h)
		}
	}
	for h, in := range seen {
		if e, ok := x.m[h]; ok && (e.etag == in.ETag || e.checked.After(start)) {
			continue
		}
		x.setLocked(h, in, nil, time.Time{})
	}
	x.log.WithFields(logrus.Fields{"narinfos": len(x.m), "elapsed": time.Since(start).Round(time.Millisecond)}).Debug("bucket narinfos listed")
	return nil
}

// relist lists the bucket again every relistEvery until ctx ends.
func (x *bucketIndex) relist(ctx context.Context) {
	t := time.NewTicker(relistEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := x.load(ctx); err != nil && ctx.Err() == nil {
				x.log.WithError(err).Warn("listing the bucket's narinfos failed")
			}
		}
	}
}

func (x *bucketIndex) setLocked(h string, in s3store.Info, data []byte, checked time.Time) *bucketEntry {
	if old, ok := x.m[h]; ok {
		x.bytes -= int64(len(old.data))
	}
	if data != nil && x.bytes+int64(len(data)) > x.limit {
		x.dropDataLocked(int64(len(data)))
		if x.bytes+int64(len(data)) > x.limit {
			data = nil
		}
	}
	e := &bucketEntry{etag: in.ETag, size: in.Size, mod: in.ModTime, modified: in.ModTime.UTC().Format(http.TimeFormat), data: data, checked: checked}
	x.m[h] = e
	x.bytes += int64(len(data))
	return e
}

// dropDataLocked frees at least n bytes of narinfo data, arbitrary
// entries first; the names stay in the index.
func (x *bucketIndex) dropDataLocked(n int64) {
	for _, e := range x.m {
		if x.bytes+n <= x.limit {
			return
		}
		if e.data != nil {
			x.bytes -= int64(len(e.data))
			e.data = nil
		}
	}
}

// stored records a narinfo this process just wrote.
func (x *bucketIndex) stored(h string, in s3store.Info, data []byte) {
	x.mu.Lock()
	x.setLocked(h, in, data, time.Now())
	x.mu.Unlock()
}

func (x *bucketIndex) drop(h string) {
	x.mu.Lock()
	if e, ok := x.m[h]; ok {
		x.bytes -= int64(len(e.data))
		delete(x.m, h)
	}
	x.mu.Unlock()
}

// size returns the size of hash's narinfo as of the last listing or
// check, and whether the index lists it.
func (x *bucketIndex) size(h string) (int64, bool) {
	x.mu.RLock()
	defer x.mu.RUnlock()
	e, ok := x.m[h]
	if !ok {
		return 0, false
	}
	return e.size, true
}

// get returns the narinfo of hash h: from memory when it was checked
// within revalidateAfter, else after checking it against the bucket. A
// missing narinfo is an error matching fs.ErrNotExist.
func (x *bucketIndex) get(ctx context.Context, h string) (bucketEntry, error) {
	now := time.Now()
	x.mu.RLock()
	e, ok := x.m[h]
	var cp bucketEntry
	if ok {
		cp = *e
	}
	x.mu.RUnlock()
	if ok && cp.data != nil && now.Sub(cp.checked) < revalidateAfter {
		return cp, nil
	}
	name := h + ".narinfo"
	if ok && cp.data != nil {
		sctx, cancel := context.WithTimeout(ctx, bucketTimeout)
		in, err := x.b.st.Stat(sctx, name)
		cancel()
		switch {
		case errors.Is(err, fs.ErrNotExist):
			x.drop(h)
			return bucketEntry{}, err
		case err != nil:
			return bucketEntry{}, err
		case in.ETag == cp.etag:
			x.mu.Lock()
			if cur := x.m[h]; cur == e {
				e.checked = now
			}
			x.mu.Unlock()
			cp.checked = now
			return cp, nil
		}
	}
	data, in, err := x.b.getInfo(ctx, name, maxNarInfoSize)
	if errors.Is(err, fs.ErrNotExist) {
		x.drop(h)
		return bucketEntry{}, err
	}
	if err != nil {
		return bucketEntry{}, err
	}
	x.mu.Lock()
	ne := x.setLocked(h, in, data, now)
	cp = *ne
	cp.data = data
	x.mu.Unlock()
	return cp, nil
}

// len is the number of narinfos the index lists.
func (x *bucketIndex) len() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.m)
}

// validNarInfoHash reports whether h can be a store path's hash part.
func validNarInfoHash(h string) bool {
	return len(h) == 32 && isNarInfoName([]byte(h+".narinfo"))
}
