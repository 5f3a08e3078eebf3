package prune

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"runtime"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// BucketOptions configure a prune of a cache in an S3-compatible bucket.
type BucketOptions struct {
	// Options as for a directory, but CacheDir, which is unused: GCRoots
	// are local directories of more markers; StateDir keeps the metadata
	// cache, keyed by ETag, and the record of the last prune under Name.
	Options
	// Store is the bucket and prefix that hold the cache.
	Store *s3store.Store
	// Name is the cache's store URL (s3store.Config.String()): it names
	// the state files, and LastRun finds the record by it.
	Name string
	// Locks is the lock protocol to hold the cache with; nil: one over
	// Store (serve passes the one its uploads use).
	Locks *bucketlock.Locks
	// SinglePruner lets the prune run on a store without conditional
	// writes: the caller says no other prune or forget runs on the bucket.
	SinglePruner bool
	// Settle is how long the hold stays, still deleting, after the last
	// narinfo went, as for ForgetBucketOptions.Settle: a front end trusts
	// a narinfo it checked that long (serve.ForgetSettle), and would
	// otherwise accept an upload referring to one the prune deleted.
	Settle time.Duration
}

// bucketSlack is how much younger than the prune's start an object's
// LastModified may be and still count as old: stores round it to the
// second, and the clock skew is known to about that.
const bucketSlack = 2 * time.Second

// bucketPruner is a pruner whose cache is objects in a bucket. It shares
// the graph, the counters, the parsers and the metadata cache with the
// directory's; the listing, reading and deleting are its own.
type bucketPruner struct {
	*pruner
	st    *s3store.Store
	name  string
	bl    *bucketlock.Locks
	skew  time.Duration // the store's clock minus this machine's
	dctx  context.Context
	names map[string]objMeta // narinfos and listings the scan listed
	// recent is set when a NAR is younger than the grace: uploads are
	// under way (Nix 2.35 sends every NAR of a copy before its narinfos),
	// and NARs no narinfo names yet stay.
	recent   bool
	auxSizes []int64 // of b.aux[i]
	// settle is how long the hold stays, deleting, after the last
	// narinfo went (BucketOptions.Settle).
	settle time.Duration
}

// objMeta is what a prune remembers of a listed object.
type objMeta struct {
	size  int64
	young bool
}

// RunBucket prunes the cache in a bucket as Run prunes a directory: it
// keeps the closure of the GC roots (the markers under gcroots/ and in
// the GCRoots directories) and deletes the rest, referrers first, so the
// bucket is a valid cache at every instant. Objects are young by their
// LastModified, on the store's clock. Unless it is a dry run it holds
// the cache with package bucketlock's protocol, and aborts the multipart
// uploads begun more than a day ago. It returns what it did, also when it
// fails midway.
func RunBucket(ctx context.Context, opt BucketOptions) (Stats, error) {
	opt.Options.CacheDir = ""
	b := &bucketPruner{pruner: newPruner(opt.Options), st: opt.Store, name: opt.Name, bl: opt.Locks, settle: opt.Settle}
	if opt.Workers <= 0 {
		// Reading an object is a request that mostly waits for the store.
		b.workers = max(32, 8*runtime.GOMAXPROCS(0))
	}
	if b.bl == nil && opt.Store != nil {
		b.bl = bucketlock.New(opt.Store, b.log)
	}
	if b.bl != nil && opt.SinglePruner {
		b.bl.SetSinglePruner(true)
	}
	return b.report(opt.Name, func() error { return b.run(ctx) })
}

func (b *bucketPruner) run(ctx context.Context) error {
	if b.st == nil || b.name == "" {
		return errors.New("prune of a bucket: no store, or no name for it")
	}
	if _, err := b.st.Stat(ctx, "nix-cache-info"); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%s is not a binary cache: no nix-cache-info in it", b.name)
		}
		return err
	}
	b.dctx = ctx
	var hold *bucketlock.Hold
	if !b.opt.DryRun {
		b.c.phase.Store(PhaseWaiting)
		lastLog := time.Time{}
		began := time.Now()
		h, err := b.bl.Hold(ctx, b.opt.LockWait, func(names []string) {
			if time.Since(lastLog) > 10*time.Second {
				lastLog = time.Now()
				b.log.WithField("locks", names).Info("waiting for upload locks to be released")
			}
		})
		b.c.waited.Store(int64(time.Since(began)))
		if err != nil {
			return err
		}
		defer h.Release()
		hold = h
		b.skew = h.Skew()
		// Deletions stop when the hold is lost, as well as with ctx.
		dctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(h.Context(), cancel)
		defer stop()
		b.dctx = dctx
	}
	b.c.phase.Store(PhaseScanning)
	b.t0 = time.Now()
	b.cutoff = b.t0.Add(-b.opt.Grace - bucketSlack).UnixNano()
	b.loadBucketPrev()

	rootKeys, err := b.readBucketRoots(ctx)
	if err != nil {
		return err
	}
	for _, k := range rootKeys {
		b.roots = append(b.roots, b.g.intern(k))
	}
	if len(rootKeys) == 0 {
		b.log.WithField("store", b.name).
			Warn("no GC roots (no markers, or none naming a store path): every store path is garbage")
	}
	t := time.Now()
	if err := b.scanBucketNarInfos(ctx); err != nil {
		return err
	}
	b.log.WithFields(logrus.Fields{"narinfos": b.c.scanned.Load(), "read": b.c.read.Load(),
		"elapsed": time.Since(t).Round(time.Millisecond)}).Debug("narinfos scanned")
	if err := b.scanBucketAux(ctx, b.prev.aux); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	b.closure()

	b.c.phase.Store(PhaseDeleting)
	if hold != nil {
		// Uploads went on during the scan; from here on serve publishes
		// nothing until the hold ends, and what it published is reread.
		if err := hold.Deleting(b.dctx); err != nil {
			return err
		}
		if err := b.recheckBucket(ctx); err != nil {
			return err
		}
	}
	if err := b.deleteBucket(b.dctx); err != nil {
		return err
	}
	if hold != nil && b.c.deletedNarInfos.Load() > 0 {
		// The hold, still deleting, is released (deferred) after this.
		t := time.NewTimer(b.settle)
		select {
		case <-t.C:
		case <-b.dctx.Done():
			t.Stop()
		}
	}
	if !b.opt.DryRun {
		n, err := b.st.AbortUploads(b.dctx, 24*time.Hour)
		b.c.tmpDel.Add(int64(n))
		if err != nil {
			b.log.WithError(err).Warn("multipart uploads left by dead processes not all aborted")
		}
	}
	b.countKept()
	if b.opt.DryRun {
		for n := range b.g.flags {
			b.g.flags[n] &^= fDeleted
		}
	}
	b.saveNext()
	return nil
}

// loadBucketPrev loads the metadata cache the last prune of this bucket
// left; its identity column holds hashes of ETags.
func (b *bucketPruner) loadBucketPrev() {
	b.prev = emptyMeta()
	if b.opt.StateDir != "" {
		b.metaFile = metaPath(b.opt.StateDir, b.name)
		b.cacheID = cacheIDOf(b.name, b.opt.StoreDir)
		m, err := loadMeta(b.metaFile, b.cacheID)
		switch {
		case err != nil:
			b.log.WithError(err).WithField("path", b.metaFile).Warn("rebuilding the metadata cache")
			b.metaDirty = true
		case m.g.len() == 0:
			b.metaDirty = true
		}
		b.prev = m
	}
	b.g = b.prev.g
}

// young reports whether an object modified at mtime (the store's clock)
// is kept by the grace or because it came while the prune ran.
func (b *bucketPruner) young(mtime time.Time) bool {
	return b.isYoung(mtime.Add(-b.skew).UnixNano())
}

// etagIdent is the metadata cache's identity of an object: its ETag and
// size. Any write of the object changes it.
func etagIdent(o s3store.Info) uint64 {
	return hashURL(fmt.Sprintf("%s\x00%d", strings.Trim(o.ETag, `"`), o.Size))
}

// readObject reads a whole object of at most limit bytes.
func (b *bucketPruner) readObject(ctx context.Context, name string, limit int64) ([]byte, s3store.Info, error) {
	rc, info, err := b.st.Get(ctx, name, 0, -1)
	if err != nil {
		return nil, info, err
	}
	defer rc.Close()
	if info.Size > limit {
		return nil, info, fmt.Errorf("%s: %w (%d bytes)", name, errTooBig, info.Size)
	}
	data, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err == nil && int64(len(data)) > limit {
		err = fmt.Errorf("%s: %w", name, errTooBig)
	}
	return data, info, err
}

// readBucketRoots reads the markers: the objects under gcroots/ (none of
// whose path parts starts with '.') and the files of the GCRoots
// directories. A marker that cannot be read fails the prune.
func (b *bucketPruner) readBucketRoots(ctx context.Context) ([]key, error) {
	roots, err := b.readRoots() // the GCRoots directories
	if err != nil {
		return nil, err
	}
	now := time.Now()
	var markers []s3store.Info
	err = b.st.List(ctx, "gcroots/", func(page []s3store.Info) error {
		for _, o := range page {
			rel := strings.TrimPrefix(o.Name, "gcroots/")
			if rel == "" || strings.HasPrefix(rel, ".") || strings.Contains(rel, "/.") {
				continue
			}
			if b.opt.MaxRootAge > 0 && now.Sub(o.ModTime.Add(-b.skew)) > b.opt.MaxRootAge {
				b.c.expired.Add(1)
				b.log.WithFields(logrus.Fields{"path": o.Name, "max_root_age": b.opt.MaxRootAge}).
					Info("marker older than the maximum root age: it no longer counts")
				continue
			}
			markers = append(markers, o)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list gcroots: %w", err)
	}
	for _, o := range markers {
		data, _, err := b.readObject(ctx, o.Name, maxMarkerSize)
		if errors.Is(err, fs.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("read marker %s: %w", o.Name, err)
		}
		b.c.markers.Add(1)
		roots = b.parseMarker(o.Name, data, roots)
	}
	b.c.roots.Store(int64(len(roots)))
	return roots, nil
}
