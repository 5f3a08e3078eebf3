package prune

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/go-multierror"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// recheck runs at the start of the deletion phase, when no upload can
// commit a narinfo or a marker: it re-reads the markers and every narinfo
// that appeared or was replaced since the scan started, and keeps what
// they reach. A narinfo that landed during the prune is kept with its
// closure whatever the markers say.
func (p *pruner) recheck(ctx context.Context) error {
	g := p.g
	keys, err := p.readRoots()
	if err != nil {
		return err
	}
	var stack []uint32
	for _, k := range keys {
		stack = append(stack, g.intern(k))
	}
	p.roots = append(p.roots, stack...)
	g.keep(stack)

	// Creating, renaming or removing an entry sets the directory's
	// modification time: an older one means no narinfo came or went.
	fi, err := os.Stat(p.opt.CacheDir)
	if err != nil {
		return err
	}
	if fi.ModTime().UnixNano() < p.t0.Add(-recheckSlack).UnixNano() {
		return nil
	}
	var fresh []uint32
	err = p.top.each(func(name []byte, ino uint64, typ int) error {
		if name[0] == '.' || typ == typeDir || typ == typeOther {
			return nil
		}
		switch {
		case len(name) == nixcache.HashLen+len(narinfoExt) && bytes.HasSuffix(name, []byte(narinfoExt)):
			k, ok := parseKey(name[:nixcache.HashLen])
			if !ok {
				return nil
			}
			n, seen := g.lookup(k)
			switch {
			case !seen || !g.has(n, fPresent):
			case ino != 0 && g.ino[n] == ino:
				return nil // the same file as the scan's
			case ino == 0:
				fi, err := p.top.stat(string(name))
				if err != nil || fi.ident == g.ident[n] {
					return nil
				}
			}
			n = g.intern(k)
			g.ino[n] = ino
			fresh = append(fresh, n)
		case len(name) == nixcache.HashLen+len(lsExt) && bytes.HasSuffix(name, []byte(lsExt)):
			if k, ok := parseKey(name[:nixcache.HashLen]); ok {
				g.flags[g.intern(k)] |= fLs
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(fresh) == 0 {
		return nil
	}
	p.log.WithField("narinfos", len(fresh)).Debug("narinfos appeared or changed during the prune")
	res := &scanned{}
	var buf []byte
	for _, n := range fresh {
		buf = p.checkNarInfo(scanItem{n: n, k: g.keys[n]}, res, buf)
		g.flags[n] |= fPresent | fRoot
	}
	p.apply(res, nil)
	g.keep(fresh)
	return ctx.Err()
}

// delete removes what the closure did not keep, in an order that leaves a
// valid cache at every instant: realisations and build traces first; then
// narinfos, each only after every garbage narinfo that refers to it, and
// each NAR right after the last narinfo naming it (NARs and narinfos live
// in two directories, so the two deletions run side by side); then the
// listings, logs and debuginfo that no remaining narinfo needs. A narinfo
// that cannot be deleted keeps what it refers to and its NAR.
//
// On a crash (rather than a kill) the order holds as far as the file
// system keeps the order of unlinks, as journalling ones (ext4, XFS) do.
func (p *pruner) delete(ctx context.Context) error {
	var errs *multierror.Error
	var errMu sync.Mutex
	fail := func(err error) {
		errMu.Lock()
		errs = multierror.Append(errs, err)
		errMu.Unlock()
	}

	// Whether the swept directories can be trusted to hold no garbage, as
	// the last prune left them: the same roots, the same narinfos (none
	// read, none gone), none to delete now; checked per directory below.
	p.rootsHash = p.hashRoots()
	present, doomed := p.countNarInfos()
	unchanged := p.rootsHash == p.prev.rootsHash && p.c.read.Load() == 0 && present == p.prev.stored &&
		doomed == 0 && !p.opt.DryRun

	p.removeGoneOutputs(fail)
	if err := ctx.Err(); err != nil {
		return err
	}

	narPath := filepath.Join(p.opt.CacheDir, "nar")
	nars, narDir, err := p.listNars(narPath, unchanged, func() *u64set {
		return p.urlsOf(present, func(n uint32) bool { return !p.g.garbage(n) })
	})
	if err != nil {
		return err
	}
	if narDir != nil {
		defer narDir.close()
	}
	nd := p.startNarDeleter(ctx, nars, narDir, fail)
	p.deleteNarInfos(ctx, doomed, nd.narinfoGone, fail)
	nd.wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	p.log.WithField("narinfos", p.c.deletedNarInfos.Load()).Debug("narinfos deleted")
	// A nar/ left without a candidate holds no garbage: the next prune
	// may skip listing it while nothing changes.
	left := nd.left()
	if narDir != nil && left == 0 && !p.opt.DryRun {
		p.sweeps[sweepNar] = stampDir(narPath)
	} else if narDir == nil {
		p.sweeps[sweepNar] = p.prev.sweeps[sweepNar]
	}

	if err := p.removeUnneeded(ctx, unchanged, present, fail); err != nil {
		return err
	}
	p.removeEmptyBuildTraceDirs()
	return errs.ErrorOrNil()
}

// countNarInfos returns how many narinfos are present, and how many of
// them are garbage.
func (p *pruner) countNarInfos() (present, doomed int) {
	g := p.g
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.flags[n]&fPresent != 0 {
			present++
			if g.garbage(n) {
				doomed++
			}
		}
	}
	return present, doomed
}

// urlsOf returns the URL hashes of the present narinfos that stays
// accepts; present, the number of narinfos, sizes the set.
func (p *pruner) urlsOf(present int, stays func(n uint32) bool) *u64set {
	g := p.g
	set := newU64Set(present)
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.flags[n]&fPresent != 0 && stays(n) && g.urlHash[n] != 0 {
			set.add(g.urlHash[n])
		}
	}
	return set
}

// removeGoneOutputs deletes the realisations and build traces of the
// outputs that go. They go before any narinfo, so that none of them ever
// names a store path the cache no longer has.
func (p *pruner) removeGoneOutputs(fail func(error)) {
	g := p.g
	var gone []int
	for i, a := range p.aux {
		if a.info.kind == auxOutPath && !a.young {
			if n, ok := g.lookup(a.info.target); !ok || g.flags[n]&fKept == 0 {
				gone = append(gone, i)
			}
		}
	}
	p.removeAux(gone, fail)
}

// narDeleter deletes, on workers of its own, the NARs that no staying
// narinfo names: the orphans at once, each of the others right after the
// last garbage narinfo naming it has gone, so that no narinfo is ever
// left without its NAR. NARs live in a directory of their own, so they go
// side by side with the narinfos rather than after them.
type narDeleter struct {
	g       *graph
	nars    *narList
	ch      chan int     // indexes into nars, to delete
	stayed  atomic.Int64 // candidates that stay (young, failed)
	workers sync.WaitGroup
	feeder  sync.WaitGroup
}

// startNarDeleter counts the garbage narinfos naming each NAR of nars (in
// narDir) and starts deleting those that none names.
func (p *pruner) startNarDeleter(ctx context.Context, nars *narList, narDir *dir, fail func(error)) *narDeleter {
	g := p.g
	nd := &narDeleter{g: g, nars: nars, ch: make(chan int, 4096)}
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.garbage(n) {
			if i, ok := nars.find(g.urlHash[n]); ok && nars.owners[i] >= 0 {
				nars.owners[i]++
			}
		}
	}
	var orphans []int
	for i, o := range nars.owners {
		if o == 0 {
			orphans = append(orphans, i)
		}
	}
	if p.uploading && len(orphans) > 0 {
		// Their narinfos may still come: see uploadedWithinGrace.
		p.log.WithField("nars", len(orphans)).Info("NARs no narinfo names kept: uploads are under way")
		nd.stayed.Add(int64(len(orphans)))
		orphans = nil
	}
	for w := 0; w < p.unlinkers; w++ {
		nd.workers.Add(1)
		go func() {
			defer nd.workers.Done()
			for i := range nd.ch {
				if !p.removeOne(narDir, "nar/", nars.names.get(i), fail) {
					nd.stayed.Add(1)
				}
			}
		}()
	}
	nd.feeder.Add(1)
	go func() {
		defer nd.feeder.Done()
		for _, i := range orphans {
			if ctx.Err() != nil {
				return
			}
			nd.ch <- i
		}
	}()
	return nd
}

// narinfoGone tells nd that the narinfo of node n has gone: its NAR may go
// once no other garbage narinfo names it.
func (nd *narDeleter) narinfoGone(n uint32) {
	if i, ok := nd.nars.find(nd.g.urlHash[n]); ok && atomic.AddInt32(&nd.nars.owners[i], -1) == 0 {
		nd.ch <- i
	}
}

// wait returns when the NARs released so far are deleted; narinfoGone
// must not be called after it.
func (nd *narDeleter) wait() {
	nd.feeder.Wait()
	close(nd.ch)
	nd.workers.Wait()
}

// left returns, after wait, how many NARs of the list stay.
func (nd *narDeleter) left() int64 {
	left := nd.stayed.Load()
	for i := range nd.nars.owners {
		if nd.nars.owners[i] != 0 {
			left++ // named by a narinfo that stays, or a hash collision
		}
	}
	return left
}

// deleteNarInfos deletes the doomed garbage narinfos referrers before
// references, so that no narinfo left ever names a missing one, and calls
// gone for each it deleted. It follows Kahn's order over the garbage:
// store paths refer to each other without cycles, apart from
// self-references, which are skipped. Workers take narinfos whose garbage
// referrers are all gone, delete them, and release their references in
// turn: no rounds, no waiting for the slowest. A narinfo that stays keeps
// what it refers to.
func (p *pruner) deleteNarInfos(ctx context.Context, doomed int, gone func(n uint32), fail func(error)) {
	g := p.g
	order := g.garbageOrder()
	deleted := make([]bool, g.len())
	ready := make(chan uint32, doomed) // never blocks: each narinfo is sent once
	var outstanding atomic.Int64       // narinfos sent and not yet done
	for _, n := range order.first() {
		outstanding.Add(1)
		ready <- n
	}
	if outstanding.Load() == 0 {
		close(ready)
	}
	var workers sync.WaitGroup
	for w := 0; w < p.unlinkers; w++ {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for n := range ready {
				if ctx.Err() == nil && p.removeNarInfo(n, fail) {
					deleted[n] = true
					gone(n)
					order.gone(n, func(m uint32) {
						outstanding.Add(1)
						ready <- m
					})
				}
				if outstanding.Add(-1) == 0 {
					close(ready)
				}
			}
		}()
	}
	workers.Wait()
	for n, ok := range deleted {
		if ok {
			g.flags[n] |= fDeleted
		}
	}
}

// removeNarInfo deletes the garbage narinfo of node n, unless it changed
// since the scan judged it, and reports whether it is gone.
func (p *pruner) removeNarInfo(n uint32, fail func(error)) bool {
	g := p.g
	name := g.keys[n].String() + narinfoExt
	fi, err := p.top.stat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return true
	}
	if err != nil {
		fail(err)
		return false
	}
	if fi.ident != g.ident[n] {
		// Rewritten in place since the scan: not what we judged.
		p.log.WithField("path", name).Warn("keeping a narinfo that changed during the prune")
		return false
	}
	if !p.opt.DryRun {
		if err := p.top.remove(name); err != nil {
			fail(err)
			return false
		}
	}
	p.counted(name, fi.size)
	p.c.deletedNarInfos.Add(1)
	return true
}

// removeUnneeded deletes, once the narinfos are settled, what no
// remaining narinfo needs: listings, logs of derivations that no kept
// narinfo names as its deriver, and debuginfo whose NAR no remaining
// narinfo names. unchanged and present are as in delete.
func (p *pruner) removeUnneeded(ctx context.Context, unchanged bool, present int, fail func(error)) error {
	g := p.g
	stays := func(n uint32) bool { return g.flags[n]&(fPresent|fDeleted) == fPresent || g.flags[n]&fKept != 0 }
	var listings names
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.has(n, fLs) && !stays(n) {
			listings.add([]byte(g.keys[n].String() + lsExt))
		}
	}
	p.removeNames(p.top, "", &listings, fail)
	if err := p.sweep(ctx, sweepLog, unchanged, func(name []byte) bool {
		if len(name) <= nixcache.HashLen || name[nixcache.HashLen] != '-' {
			return false
		}
		k, ok := parseKey(name[:nixcache.HashLen])
		if !ok {
			return false
		}
		n, ok := g.lookup(k)
		return ok && (g.flags[n]&fDrvKept != 0 || stays(n))
	}, fail); err != nil {
		return err
	}
	var keptURLs *u64set
	var debugGone []int
	for i, a := range p.aux {
		if a.info.kind != auxNar || a.young {
			continue
		}
		if keptURLs == nil {
			keptURLs = p.urlsOf(present, func(n uint32) bool { return g.flags[n]&fDeleted == 0 })
		}
		if !keptURLs.has(a.info.urlHash) {
			debugGone = append(debugGone, i)
		}
	}
	p.removeAux(debugGone, fail)
	return nil
}

// removeEmptyBuildTraceDirs removes the build-trace-v2/<drv>/ directories
// the deletions left empty; removeDir leaves the others.
func (p *pruner) removeEmptyBuildTraceDirs() {
	if p.opt.DryRun {
		return
	}
	bt, err := openDir(filepath.Join(p.opt.CacheDir, "build-trace-v2"))
	if err != nil {
		return
	}
	var empty names
	bt.each(func(name []byte, ino uint64, typ int) error {
		if typ == typeDir && name[0] != '.' {
			empty.add(name)
		}
		return nil
	})
	for i := range empty.len() {
		bt.removeDir(empty.get(i))
	}
	bt.close()
}

// counted records the deletion of a file (or, in a dry run, the intent).
func (p *pruner) counted(rel string, size int64) {
	p.c.deleted.Add(1)
	p.c.bytes.Add(size)
	if p.opt.Deleted != nil {
		p.opt.Deleted(rel, size)
	}
}

// sweep deletes the files of sweepDirs[which] that keep does not claim
// and that are older than the cutoff. It skips the directory when the
// last prune left it clean, it has not changed since and unchanged says
// nothing else did. A sweep that leaves nothing behind (no young file, no
// failure) stamps the directory for the next prune.
func (p *pruner) sweep(ctx context.Context, which int, unchanged bool, keep func(name []byte) bool, fail func(error)) error {
	sub := sweepDirs[which]
	path := filepath.Join(p.opt.CacheDir, sub)
	if prev := p.prev.sweeps[which]; unchanged && prev != (dirStamp{}) && stampDir(path) == prev {
		p.sweeps[which] = prev
		p.log.WithField("dir", sub).Debug("directory unchanged since the last prune, not listed")
		return nil
	}
	d, err := openDir(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer d.close()
	var doomed names
	clean := true
	err = d.each(func(name []byte, ino uint64, typ int) error {
		if name[0] == '.' || typ == typeDir || keep(name) {
			return nil
		}
		doomed.add(name)
		if doomed.len() >= 64<<10 {
			clean = p.removeNames(d, sub+"/", &doomed, fail) && clean
			doomed.reset()
		}
		return ctx.Err()
	})
	if err != nil {
		return err
	}
	clean = p.removeNames(d, sub+"/", &doomed, fail) && clean
	if clean && !p.opt.DryRun {
		p.sweeps[which] = stampDir(path)
	}
	return nil
}

// removeNames deletes the files of d listed in ns, unless they are young
// or directories; prefix makes their names relative to the cache. It
// reports whether it deleted them all.
func (p *pruner) removeNames(d *dir, prefix string, ns *names, fail func(error)) bool {
	var left atomic.Int64
	p.parallel(ns.len(), func(i int) {
		if !p.removeOne(d, prefix, ns.get(i), fail) {
			left.Add(1)
		}
	})
	return left.Load() == 0
}

// removeOne deletes the file name of d unless it is young or a directory,
// and reports whether it is gone.
func (p *pruner) removeOne(d *dir, prefix, name string, fail func(error)) bool {
	fi, err := d.stat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return true
	}
	if err != nil {
		fail(err)
		return false
	}
	if fi.typ == typeDir || p.isYoung(fi.mtime) {
		return false
	}
	if !p.opt.DryRun {
		if err := d.remove(name); err != nil {
			fail(err)
			return false
		}
	}
	p.counted(prefix+name, fi.size)
	return true
}

// narList is the files of nar/ that no staying narinfo names, found by the
// hash of their URL ("nar/<name>"), with how many garbage narinfos name
// each.
type narList struct {
	names  names
	hashes []uint64
	owners []int32 // garbage narinfos naming it; -1: a hash shared by two names, never deleted
	table  []uint32
}

func (l *narList) find(h uint64) (int, bool) {
	if len(l.table) == 0 || h == 0 {
		return 0, false
	}
	mask := uint64(len(l.table) - 1)
	for i := mix64(h) & mask; ; i = (i + 1) & mask {
		v := l.table[i]
		if v == 0 {
			return 0, false
		}
		if l.hashes[v-1] == h {
			return int(v - 1), true
		}
	}
}

// listNars lists nar/ for the files that the URLs of staying narinfos
// (from kept) do not claim, unless unchanged says nothing can have become
// garbage and nar/ is as the last prune left it: then it returns an empty
// list and a nil dir.
func (p *pruner) listNars(path string, unchanged bool, kept func() *u64set) (*narList, *dir, error) {
	l := &narList{}
	if prev := p.prev.sweeps[sweepNar]; unchanged && prev != (dirStamp{}) && stampDir(path) == prev {
		p.log.Debug("nar/ unchanged since the last prune, not listed")
		return l, nil, nil
	}
	d, err := openDir(path)
	if errors.Is(err, fs.ErrNotExist) {
		return l, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	keptURLs := kept()
	var url []byte
	err = d.each(func(name []byte, ino uint64, typ int) error {
		if name[0] == '.' || typ == typeDir {
			return nil
		}
		url = append(append(url[:0], "nar/"...), name...)
		if h := hashURL(url); !keptURLs.has(h) {
			l.names.add(name)
			l.hashes = append(l.hashes, h)
		}
		return nil
	})
	if err != nil {
		d.close()
		return nil, nil, err
	}
	l.owners = make([]int32, len(l.hashes))
	size := 1 << 10
	for size < 2*len(l.hashes) {
		size <<= 1
	}
	l.table = make([]uint32, size)
	mask := uint64(size - 1)
	for i, h := range l.hashes {
		j := mix64(h) & mask
		for ; l.table[j] != 0; j = (j + 1) & mask {
			if other := l.table[j] - 1; l.hashes[other] == h {
				l.owners[other], l.owners[i] = -1, -1
			}
		}
		l.table[j] = uint32(i) + 1
	}
	return l, d, nil
}

// removeAux deletes the aux files p.aux[i] for i in idx.
func (p *pruner) removeAux(idx []int, fail func(error)) {
	p.parallel(len(idx), func(j int) {
		a := &p.aux[idx[j]]
		full := filepath.Join(p.opt.CacheDir, filepath.FromSlash(a.rel))
		fi, err := os.Lstat(full)
		if errors.Is(err, fs.ErrNotExist) {
			a.deleted = true
			return
		}
		if err != nil {
			fail(err)
			return
		}
		if !fi.Mode().IsRegular() || p.isYoung(fi.ModTime().UnixNano()) {
			return
		}
		if !p.opt.DryRun {
			if err := os.Remove(full); err != nil && !errors.Is(err, fs.ErrNotExist) {
				fail(err)
				return
			}
			a.deleted = true
		}
		p.counted(a.rel, fi.Size())
	})
}

// names is a list of file names in one buffer: no object per name.
type names struct {
	buf  []byte
	ends []uint32
}

func (ns *names) add(name []byte) {
	if len(ns.buf)+len(name) > cap(ns.buf) {
		ns.buf = slices.Grow(ns.buf, max(len(ns.buf), 4096))
	}
	ns.buf = append(ns.buf, name...)
	ns.ends = append(ns.ends, uint32(len(ns.buf)))
}

func (ns *names) len() int { return len(ns.ends) }

func (ns *names) get(i int) string {
	start := uint32(0)
	if i > 0 {
		start = ns.ends[i-1]
	}
	return string(ns.buf[start:ns.ends[i]])
}

func (ns *names) reset() { ns.buf, ns.ends = ns.buf[:0], ns.ends[:0] }
