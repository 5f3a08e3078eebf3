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
	p.log.Debugf("%d narinfos appeared or changed during the prune", len(fresh))
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
	g := p.g
	cache := p.opt.CacheDir
	garbage := func(n uint32) bool { return g.flags[n]&(fPresent|fKept) == fPresent }

	// Whether the swept directories can be trusted to hold no garbage, as
	// the last prune left them: the same roots, the same narinfos (none
	// read, none gone), none to delete now; checked per directory below.
	p.rootsHash = p.hashRoots()
	present, doomed := 0, 0
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.flags[n]&fPresent != 0 {
			present++
			if garbage(n) {
				doomed++
			}
		}
	}
	unchanged := p.rootsHash == p.prev.rootsHash && p.c.read.Load() == 0 && present == p.prev.stored &&
		doomed == 0 && !p.opt.DryRun

	// 1. Realisations and build traces of outputs that go.
	var auxGone []int
	for i, a := range p.aux {
		if a.info.kind == auxOutPath && !a.young {
			if n, ok := g.lookup(a.info.target); !ok || g.flags[n]&fKept == 0 {
				auxGone = append(auxGone, i)
			}
		}
	}
	p.removeAux(auxGone, fail)
	if err := ctx.Err(); err != nil {
		return err
	}

	// 2. The NARs that may go: those no staying narinfo names. Each goes
	// when its last garbage narinfo has gone; the orphans at once.
	urlsOf := func(stays func(n uint32) bool) *u64set {
		set := newU64Set(present)
		for n := uint32(0); n < uint32(g.len()); n++ {
			if g.flags[n]&fPresent != 0 && stays(n) && g.urlHash[n] != 0 {
				set.add(g.urlHash[n])
			}
		}
		return set
	}
	narPath := filepath.Join(cache, "nar")
	nars, narDir, err := p.listNars(narPath, unchanged, func() *u64set {
		return urlsOf(func(n uint32) bool { return !garbage(n) })
	})
	if err != nil {
		return err
	}
	if narDir != nil {
		defer narDir.close()
	}
	for n := uint32(0); n < uint32(g.len()); n++ {
		if garbage(n) {
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
	var narsLeft atomic.Int64 // candidates that stay (young, failed, still named)
	narCh := make(chan int, 4096)
	var narWorkers sync.WaitGroup
	for w := 0; w < p.unlinkers; w++ {
		narWorkers.Add(1)
		go func() {
			defer narWorkers.Done()
			for i := range narCh {
				if !p.removeOne(narDir, "nar/", nars.names.get(i), fail) {
					narsLeft.Add(1)
				}
			}
		}()
	}
	var feeder sync.WaitGroup
	feeder.Add(1)
	go func() {
		defer feeder.Done()
		for _, i := range orphans {
			if ctx.Err() != nil {
				return
			}
			narCh <- i
		}
	}()
	// A narinfo's NAR may go once no other garbage narinfo names it.
	narinfoGone := func(n uint32) {
		if i, ok := nars.find(g.urlHash[n]); ok && atomic.AddInt32(&nars.owners[i], -1) == 0 {
			narCh <- i
		}
	}

	// 3. Narinfos, referrers before references (Kahn's order over the
	// garbage: store paths refer to each other without cycles, apart from
	// self-references, which are skipped). Workers take narinfos whose
	// garbage referrers are all gone, delete them, and release their
	// references in turn: no rounds, no waiting for the slowest.
	isGarbage := make([]bool, g.len())
	for n := uint32(0); n < uint32(g.len()); n++ {
		isGarbage[n] = garbage(n)
	}
	edges := func(n uint32, fn func(m uint32)) {
		if !g.has(n, fData) {
			return
		}
		for _, r := range g.nodeRefs(n) {
			if r != n && isGarbage[r] {
				fn(r)
			}
		}
		if d := g.deriver[n]; d != 0 && d-1 != n && isGarbage[d-1] {
			fn(d - 1)
		}
	}
	indeg := make([]int32, g.len())
	for n := uint32(0); n < uint32(g.len()); n++ {
		if isGarbage[n] {
			edges(n, func(m uint32) { indeg[m]++ })
		}
	}
	gone := make([]bool, g.len())
	ready := make(chan uint32, doomed) // never blocks: each narinfo is sent once
	var outstanding atomic.Int64       // narinfos sent and not yet done
	for n := uint32(0); n < uint32(g.len()); n++ {
		if isGarbage[n] && indeg[n] == 0 {
			outstanding.Add(1)
			ready <- n
		}
	}
	if outstanding.Load() == 0 {
		close(ready)
	}
	deleteNarInfo := func(n uint32) bool {
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
			p.log.Warnf("keeping %s: it changed during the prune", name)
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
	var narinfoWorkers sync.WaitGroup
	for w := 0; w < p.unlinkers; w++ {
		narinfoWorkers.Add(1)
		go func() {
			defer narinfoWorkers.Done()
			for n := range ready {
				if ctx.Err() == nil && deleteNarInfo(n) {
					gone[n] = true
					narinfoGone(n)
					edges(n, func(m uint32) {
						if atomic.AddInt32(&indeg[m], -1) == 0 {
							outstanding.Add(1)
							ready <- m
						}
					})
				}
				if outstanding.Add(-1) == 0 {
					close(ready)
				}
			}
		}()
	}
	narinfoWorkers.Wait()
	for n, ok := range gone {
		if ok {
			g.flags[n] |= fDeleted
		}
	}
	gone, indeg, isGarbage = nil, nil, nil
	feeder.Wait()
	close(narCh)
	narWorkers.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}
	p.log.Debugf("prune: %d narinfos deleted", p.c.deletedNarInfos.Load())
	for i := range nars.owners {
		if nars.owners[i] != 0 {
			narsLeft.Add(1) // named by a narinfo that stays, or a hash collision
		}
	}
	if narDir != nil && narsLeft.Load() == 0 && !p.opt.DryRun {
		p.sweeps[sweepNar] = stampDir(narPath)
	} else if narDir == nil {
		p.sweeps[sweepNar] = p.prev.sweeps[sweepNar]
	}

	// 4. What else no remaining narinfo needs.
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
			keptURLs = urlsOf(func(n uint32) bool { return g.flags[n]&fDeleted == 0 })
		}
		if !keptURLs.has(a.info.urlHash) {
			debugGone = append(debugGone, i)
		}
	}
	p.removeAux(debugGone, fail)

	// Empty build-trace-v2/<drv>/ directories.
	if !p.opt.DryRun {
		if bt, err := openDir(filepath.Join(cache, "build-trace-v2")); err == nil {
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
	}
	return errs.ErrorOrNil()
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
		p.log.Debugf("prune: %s/ unchanged since the last prune, not listed", sub)
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
		p.log.Debugf("prune: nar/ unchanged since the last prune, not listed")
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
