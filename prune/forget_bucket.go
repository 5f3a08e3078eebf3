package prune

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// ForgetBucketOptions configure a ForgetBucket.
type ForgetBucketOptions struct {
	// ForgetOptions as for a directory, but CacheDir, which is unused;
	// StateDir holds the metadata cache that prunes of the bucket keep
	// under Name, which the forget reads (never writes).
	ForgetOptions
	// Store is the bucket and prefix that hold the cache.
	Store *s3store.Store
	// Name is the cache's store URL (s3store.Config.String()), for the
	// metadata cache and the errors; empty: no metadata cache.
	Name string
	// Locks is the lock protocol to hold the cache with; nil: one over
	// Store (serve passes the one its uploads use).
	Locks *bucketlock.Locks
	// SinglePruner lets the forget run on a store without conditional
	// writes: the caller says no prune or other forget runs on the bucket.
	SinglePruner bool
	// Settle is how long the hold stays, still deleting, after the last
	// narinfo went: a front end that checks an upload's references
	// against its index of narinfos trusts an entry that long
	// (serve.ForgetSettle), and publishes nothing while the hold deletes.
	// So no upload is accepted on the strength of a forgotten narinfo.
	Settle time.Duration
}

// holdPoll is how often a forget on a bucket tries again to hold the
// cache while a prune holds it: each try is a conditional write.
const holdPoll = time.Second

// ForgetBucket is Forget on a cache in a bucket: the same paths go, with
// the same files, and it refuses and reports alike.
//
// It follows package bucketlock's protocol as RunBucket does: it takes
// the prune marker (waiting up to LockWait for the upload locks held, and
// for a prune or another forget that holds the cache), scans, marks the
// cache as deleting (Hold.Deleting, which waits out every upload that
// checked before), then rereads the narinfos that came or changed
// meanwhile and the markers, and plans again before it deletes. The
// bucket stays a valid cache at every instant: realisations first, then
// narinfos referrers first, a tier of requests at a time, then the NARs.
// A NAR modified since the forget began (by the store's clock, to a
// second or two) stays: an upload may be about to name it.
func ForgetBucket(ctx context.Context, opt ForgetBucketOptions) (ForgetResult, error) {
	began := time.Now()
	f, err := newForgetter(opt.ForgetOptions)
	if err != nil {
		return ForgetResult{}, err
	}
	if opt.Store == nil {
		return ForgetResult{}, errors.New("forget on a bucket: no store")
	}
	o := Options{StateDir: opt.StateDir, StoreDir: f.opt.StoreDir, DryRun: opt.DryRun,
		Workers: opt.Workers, Log: opt.Log, Deleted: opt.Deleted}
	if opt.Name == "" {
		o.StateDir = ""
	}
	b := &bucketPruner{pruner: newPruner(o), st: opt.Store, name: opt.Name, bl: opt.Locks, settle: opt.Settle}
	if opt.Workers <= 0 {
		// Reading an object is a request that mostly waits for the store.
		b.workers = max(32, 8*runtime.GOMAXPROCS(0))
	}
	if b.bl == nil {
		b.bl = bucketlock.New(opt.Store, b.log)
	}
	if opt.SinglePruner {
		b.bl.SetSinglePruner(true)
	}
	b.cutoff = began.Add(-bucketSlack).UnixNano()
	f.p = b.pruner
	f.readNarInfo = func(name string) (uint64, []byte, error) {
		data, info, err := b.readObject(ctx, name, maxNarInfoSize)
		return etagIdent(info), data, err
	}
	bf := &bucketForgetter{forgetter: f, b: b}
	f.eachMarker = func(fn func(rel string, data []byte)) { bf.eachMarker(ctx, fn) }
	return bf.run(ctx)
}

// bucketForgetter is a forgetter whose cache is a bucket: the planning is
// the directory's, the scan and the deletion a bucket pruner's.
type bucketForgetter struct {
	*forgetter
	b *bucketPruner
}

// cacheName names the cache in errors.
func (bf *bucketForgetter) cacheName() string {
	if bf.b.name != "" {
		return bf.b.name
	}
	return "the bucket"
}

func (bf *bucketForgetter) run(ctx context.Context) (ForgetResult, error) {
	b := bf.b
	if _, err := b.st.Stat(ctx, "nix-cache-info"); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return ForgetResult{}, fmt.Errorf("%s is not a binary cache: no nix-cache-info in it", bf.cacheName())
		}
		return ForgetResult{}, err
	}
	dctx := ctx
	var hold *bucketlock.Hold
	if !b.opt.DryRun {
		h, err := holdRetrying(ctx, bf.opt.LockWait, holdPoll, b.log, b.bl.Hold)
		if err != nil {
			return ForgetResult{}, err
		}
		defer h.Release()
		hold = h
		b.skew = h.Skew()
		// Deletions stop when the hold is lost, as well as with ctx.
		var cancel context.CancelFunc
		dctx, cancel = context.WithCancel(ctx)
		defer cancel()
		stop := context.AfterFunc(h.Context(), cancel)
		defer stop()
		if bf.opt.Quiesce != nil {
			resume := bf.opt.Quiesce()
			defer resume()
		}
	}
	b.dctx = dctx
	b.t0 = time.Now()
	b.prev = emptyMeta()
	if b.opt.StateDir != "" {
		m, err := loadMeta(metaPath(b.opt.StateDir, b.name), cacheIDOf(b.name, b.opt.StoreDir))
		if err != nil {
			b.log.WithError(err).Debug("metadata cache not used")
		}
		b.prev = m
	}
	b.g = b.prev.g
	if err := b.scanBucketNarInfos(ctx); err != nil {
		return ForgetResult{}, err
	}
	if err := b.scanBucketAux(ctx, b.prev.aux); err != nil {
		return ForgetResult{}, err
	}
	if err := ctx.Err(); err != nil {
		return ForgetResult{}, err
	}
	// A plan before the deletion's wait: what is absent or refused now
	// is answered without it.
	pl := bf.plan()
	res := bf.result(pl)
	if len(pl.targets) == 0 {
		return res, nil
	}
	if err := bf.refused(pl, &res); err != nil {
		return res, err
	}
	if hold != nil {
		// Uploads went on during the scan; from here on none is
		// published until the hold ends, and what was is reread.
		if err := hold.Deleting(dctx); err != nil {
			return ForgetResult{}, err
		}
		if err := bf.recheck(ctx); err != nil {
			return ForgetResult{}, err
		}
		pl = bf.plan()
		res = bf.result(pl) // the markers read again
		if len(pl.targets) == 0 {
			return res, nil
		}
		if err := bf.refused(pl, &res); err != nil {
			return res, err
		}
	}
	if bf.opt.Planned != nil {
		bf.opt.Planned(res)
	}
	err := bf.delete(dctx, pl, &res)
	if hold != nil && res.Files > 0 {
		// The hold, still deleting, is released (deferred) after this.
		t := time.NewTimer(bf.b.settle)
		select {
		case <-t.C:
		case <-dctx.Done():
			t.Stop()
		}
	}
	return res, err
}

// eachMarker is the forgetter's eachMarker on the bucket: the objects
// under gcroots/, as readBucketRoots takes them.
func (bf *bucketForgetter) eachMarker(ctx context.Context, fn func(rel string, data []byte)) {
	b := bf.b
	var names []string
	err := b.st.List(ctx, "gcroots/", func(page []s3store.Info) error {
		for _, o := range page {
			rel := strings.TrimPrefix(o.Name, "gcroots/")
			if rel == "" || strings.HasPrefix(rel, ".") || strings.Contains(rel, "/.") || o.Size > maxMarkerSize {
				continue
			}
			names = append(names, o.Name)
		}
		return nil
	})
	if err != nil {
		b.log.WithError(err).Warn("markers not listed: the report leaves them out")
		return
	}
	for _, name := range names {
		if data, _, err := b.readObject(ctx, name, maxMarkerSize); err == nil {
			fn(name, data)
		}
	}
}

// recheck runs once the hold has waited out every upload that checked
// before the mark: it lists the top folder again and reads the narinfos
// that appeared or changed since the scan, and forgets those that went,
// so that the plan made again sees every referrer and deletes only what
// is there.
func (bf *bucketForgetter) recheck(ctx context.Context) error {
	b := bf.b
	g := b.g
	listed := make(map[string]objMeta, len(b.names))
	var fresh []bucketItem
	err := b.st.ListDir(ctx, "", func(page []s3store.Info) error {
		for _, o := range page {
			k, narinfo, listing := topObject(o.Name)
			if !narinfo && !listing {
				continue
			}
			listed[o.Name] = objMeta{o.Size, b.young(o.ModTime)}
			if listing {
				g.flags[g.intern(k)] |= fLs
				continue
			}
			n, seen := g.lookup(k)
			if seen && g.has(n, fPresent|fData) && g.ident[n] == etagIdent(o) {
				continue
			}
			fresh = append(fresh, bucketItem{n: g.intern(k), k: k, name: o.Name})
		}
		return nil
	})
	if err != nil {
		return err
	}
	for name := range b.names {
		if _, ok := listed[name]; ok {
			continue
		}
		if k, narinfo, _ := topObject(name); narinfo {
			if n, ok := g.lookup(k); ok {
				g.flags[n] &^= fPresent
			}
		}
	}
	b.names = listed
	if len(fresh) == 0 {
		return ctx.Err()
	}
	b.log.WithField("narinfos", len(fresh)).Debug("narinfos appeared or changed during the forget")
	res := &scanned{}
	for _, it := range fresh {
		delete(bf.info, it.n)
		g.flags[it.n] |= fPresent
		b.readNarInfo(ctx, it, res)
	}
	b.apply(res, nil)
	return ctx.Err()
}

// delete deletes what pl dooms from the bucket, in tiers that keep it a
// valid cache at every instant, and fills res's counts. A tier that fails
// stops the deletion there.
func (bf *bucketForgetter) delete(ctx context.Context, pl forgetPlan, res *ForgetResult) error {
	b := bf.b
	g := b.g
	defer func() {
		res.Files, res.Bytes = b.c.deleted.Load(), b.c.bytes.Load()
	}()

	// Realisations and build traces naming a doomed path go first: none
	// may name a path the cache no longer has.
	var outs []int
	for i, a := range b.aux {
		if a.info.kind != auxOutPath {
			continue
		}
		if n, ok := g.lookup(a.info.target); ok && pl.inDoomed[n] {
			outs = append(outs, i)
		}
	}
	if err := b.removeBucketAux(ctx, outs); err != nil {
		return err
	}

	// The narinfos, referrers first, each with its listing: a tier is
	// those no doomed narinfo still there refers to.
	order := g.orderOf(pl.inDoomed)
	gone := make([]bool, g.len())
	tier := order.first()
	for {
		if len(tier) == 0 {
			// What is left is a cycle (no real store has one): it goes
			// in one tier.
			for _, n := range pl.doomed {
				if !gone[n] {
					tier = append(tier, n)
				}
			}
			if len(tier) == 0 {
				break
			}
		}
		var names []string
		var sizes []int64
		for _, n := range tier {
			for _, name := range []string{g.keys[n].String() + narinfoExt, g.keys[n].String() + lsExt} {
				if m, ok := b.names[name]; ok {
					names, sizes = append(names, name), append(sizes, m.size)
				}
			}
		}
		if err := b.removeObjects(ctx, names, sizes); err != nil {
			return err
		}
		for _, n := range tier {
			gone[n] = true
		}
		var next []uint32
		for _, n := range tier {
			order.gone(n, func(m uint32) {
				if !gone[m] {
					next = append(next, m)
				}
			})
		}
		tier = next
	}

	// Then the debuginfo entries into the NARs that no narinfo left
	// names and the logs of the derivers no narinfo left names; then
	// those NARs, unless modified since the forget began.
	nars, logs := bf.leftovers(pl)
	var names []string
	var sizes []int64
	for _, u := range nars {
		h := hashURL(u)
		for i, a := range b.aux {
			if a.info.kind == auxNar && a.info.urlHash == h {
				names, sizes = append(names, a.rel), append(sizes, b.auxSizes[i])
			}
		}
	}
	logNames, logSizes, err := bf.present(ctx, logs, false)
	if err != nil {
		return err
	}
	if err := b.removeObjects(ctx, append(names, logNames...), append(sizes, logSizes...)); err != nil {
		return err
	}
	narNames, narSizes, err := bf.present(ctx, nars, true)
	if err != nil {
		return err
	}
	return b.removeObjects(ctx, narNames, narSizes)
}

// present returns those of names that are in the bucket, with their
// sizes; with old, only those modified before the forget began.
func (bf *bucketForgetter) present(ctx context.Context, names []string, old bool) ([]string, []int64, error) {
	b := bf.b
	infos := make([]s3store.Info, len(names))
	errs := make([]error, len(names))
	b.parallel(len(names), func(i int) {
		infos[i], errs[i] = b.st.Stat(ctx, names[i])
	})
	var out []string
	var sizes []int64
	for i, name := range names {
		switch {
		case errors.Is(errs[i], fs.ErrNotExist):
		case errs[i] != nil:
			return nil, nil, errs[i]
		case old && b.young(infos[i].ModTime):
			b.log.WithField("path", name).Info("keeping a NAR uploaded during the forget")
		default:
			out, sizes = append(out, name), append(sizes, infos[i].Size)
		}
	}
	return out, sizes, nil
}
