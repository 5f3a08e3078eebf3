package prune

import (
	"context"
	"errors"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// deleteBucket removes what the closure did not keep, in tiers that leave
// a valid cache at every instant, each tier's requests returning before
// the next tier's start: the realisations and build traces of outputs
// that go; then the garbage narinfos, referrers first (each tier the
// narinfos no remaining garbage narinfo refers to); then the NARs, the
// listings, the logs and the debuginfo that no remaining narinfo needs.
// A tier that fails stops the narinfos' deletion there, so what a
// narinfo left behind refers to, and its NAR, stay.
func (b *bucketPruner) deleteBucket(ctx context.Context) error {
	b.rootsHash = b.hashRoots()
	present, _ := b.countNarInfos()
	g := b.g

	var gone []int
	for i, a := range b.aux {
		if a.info.kind == auxOutPath && !a.young {
			if n, ok := g.lookup(a.info.target); !ok || g.flags[n]&fKept == 0 {
				gone = append(gone, i)
			}
		}
	}
	if err := b.removeBucketAux(ctx, gone); err != nil {
		return err
	}
	if err := b.deleteNarInfoTiers(ctx); err != nil {
		return err
	}
	var errs []error
	if err := b.deleteNars(ctx, present); err != nil {
		errs = append(errs, err)
	}
	if err := b.deleteUnneeded(ctx, present); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// deleteRequests bounds the delete requests of a prune in flight.
const deleteRequests = 8

// removeObjects deletes the named objects (in a dry run, only counts
// them), sizes[i] being the size of names[i].
func (b *bucketPruner) removeObjects(ctx context.Context, names []string, sizes []int64) error {
	if len(names) == 0 {
		return ctx.Err()
	}
	if !b.opt.DryRun {
		// A request deletes a thousand keys; a few in flight keep the
		// store busy while each waits for its answer.
		const batch = 1000
		errs := make([]error, (len(names)+batch-1)/batch)
		parallelOn(deleteRequests, len(errs), func(i int) {
			errs[i] = b.st.Delete(ctx, names[i*batch:min(len(names), (i+1)*batch)])
		})
		if err := errors.Join(errs...); err != nil {
			return err
		}
	}
	for i, name := range names {
		b.counted(name, sizes[i])
	}
	return nil
}

// removeBucketAux deletes the aux objects b.aux[i] for i in idx.
func (b *bucketPruner) removeBucketAux(ctx context.Context, idx []int) error {
	var names []string
	var sizes []int64
	for _, i := range idx {
		names, sizes = append(names, b.aux[i].rel), append(sizes, b.auxSizes[i])
	}
	if err := b.removeObjects(ctx, names, sizes); err != nil {
		return err
	}
	for _, i := range idx {
		b.aux[i].deleted = !b.opt.DryRun
	}
	return nil
}

// deleteNarInfoTiers deletes the garbage narinfos in Kahn's order over
// the references and derivers among them: each tier is the narinfos that
// no garbage narinfo still there refers to (self-references aside), in
// one batch of requests.
func (b *bucketPruner) deleteNarInfoTiers(ctx context.Context) error {
	g := b.g
	order := g.garbageOrder()
	tier := order.first()
	tiers := 0
	defer func() {
		b.log.WithFields(logrus.Fields{"narinfos": b.c.deletedNarInfos.Load(), "tiers": tiers}).Debug("narinfos deleted")
	}()
	for ; len(tier) > 0; tiers++ {
		names := make([]string, len(tier))
		sizes := make([]int64, len(tier))
		for i, n := range tier {
			names[i] = g.keys[n].String() + narinfoExt
			sizes[i] = b.names[names[i]].size
		}
		if err := b.removeObjects(ctx, names, sizes); err != nil {
			return err
		}
		var next []uint32
		for _, n := range tier {
			g.flags[n] |= fDeleted
			b.c.deletedNarInfos.Add(1)
			order.gone(n, func(m uint32) { next = append(next, m) })
		}
		tier = next
	}
	return nil
}

// deleteNars lists nar/ and deletes the NARs that no remaining narinfo
// names, unless young; NARs that no narinfo named at all stay while
// uploads are under way (see uploadedWithinGrace).
func (b *bucketPruner) deleteNars(ctx context.Context, present int) error {
	g := b.g
	kept := b.urlsOf(present, func(n uint32) bool { return g.flags[n]&fDeleted == 0 })
	var named *u64set
	var names, orphans []string
	var sizes, orphanSizes []int64
	err := b.st.ListDir(ctx, "nar/", func(page []s3store.Info) error {
		for _, o := range page {
			base := strings.TrimPrefix(o.Name, "nar/")
			if base == "" || base[0] == '.' {
				continue
			}
			if b.young(o.ModTime) {
				b.recent = true
				continue
			}
			h := hashURL(o.Name)
			if kept.has(h) {
				continue
			}
			if named == nil {
				named = b.urlsOf(present, func(uint32) bool { return true })
			}
			if named.has(h) {
				names, sizes = append(names, o.Name), append(sizes, o.Size)
			} else {
				orphans, orphanSizes = append(orphans, o.Name), append(orphanSizes, o.Size)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if b.opt.Grace > 0 && b.recent && len(orphans) > 0 {
		b.log.WithField("nars", len(orphans)).Info("NARs no narinfo names kept: uploads are under way")
	} else {
		names, sizes = append(names, orphans...), append(sizes, orphanSizes...)
	}
	return b.removeObjects(ctx, names, sizes)
}

// deleteUnneeded deletes, once the narinfos are settled, the listings of
// paths that stay nowhere, the logs of derivations that no kept narinfo
// names as its deriver, and the debuginfo whose NAR no remaining narinfo
// names.
func (b *bucketPruner) deleteUnneeded(ctx context.Context, present int) error {
	g := b.g
	stays := func(n uint32) bool { return g.flags[n]&(fPresent|fDeleted) == fPresent || g.flags[n]&fKept != 0 }
	var names []string
	var sizes []int64
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.has(n, fLs) && !stays(n) {
			name := g.keys[n].String() + lsExt
			if m, ok := b.names[name]; ok && !m.young {
				names, sizes = append(names, name), append(sizes, m.size)
			}
		}
	}
	err := b.st.ListDir(ctx, "log/", func(page []s3store.Info) error {
		for _, o := range page {
			base := strings.TrimPrefix(o.Name, "log/")
			if base == "" || base[0] == '.' || b.young(o.ModTime) {
				continue
			}
			if len(base) > nixcache.HashLen && base[nixcache.HashLen] == '-' {
				if k, ok := parseKey(base[:nixcache.HashLen]); ok {
					if n, ok := g.lookup(k); ok && (g.flags[n]&fDrvKept != 0 || stays(n)) {
						continue
					}
				}
			}
			names, sizes = append(names, o.Name), append(sizes, o.Size)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := b.removeObjects(ctx, names, sizes); err != nil {
		return err
	}
	keptURLs := b.urlsOf(present, func(n uint32) bool { return g.flags[n]&fDeleted == 0 })
	var debugGone []int
	for i, a := range b.aux {
		if a.info.kind == auxNar && !a.young && !keptURLs.has(a.info.urlHash) {
			debugGone = append(debugGone, i)
		}
	}
	return b.removeBucketAux(ctx, debugGone)
}
