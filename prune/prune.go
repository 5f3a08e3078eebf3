package prune

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/sirupsen/logrus"
)

// Options configure a prune.
type Options struct {
	// CacheDir is the binary cache directory; it must hold nix-cache-info.
	CacheDir string
	// StateDir holds the metadata cache (prune-<id>.meta) and the record
	// of the last prune (prune-<id>.last, see LastRun). Empty means no
	// metadata cache: every narinfo is read every time.
	StateDir string
	// GCRoots are more directories of markers besides CacheDir/gcroots.
	// Each must exist.
	GCRoots []string
	// MaxRootAge, when positive, is the age (by modification time) after
	// which a marker no longer counts.
	MaxRootAge time.Duration
	// Grace, when positive, keeps files modified less than Grace before the
	// prune started: narinfos (with their closure), NARs, listings, logs.
	// It protects uploads that run without a lock. NARs that no narinfo
	// names stay, whatever their age, while the cache saw upload activity
	// within Grace: Nix 2.35 sends a copy's narinfos only after all its
	// NARs. Files that appear while the prune runs are always kept.
	Grace time.Duration
	// DryRun deletes nothing; Deleted is still called for each file that
	// would go. A dry run takes no lock.
	DryRun bool
	// LockWait is how long to wait for upload locks to be released.
	LockWait time.Duration
	// StoreDir is the Nix store directory markers and narinfos name;
	// /nix/store when empty.
	StoreDir string
	// Workers bounds the goroutines that read files, and those that
	// delete files in each directory; 0 picks numbers from GOMAXPROCS
	// for reading and more for deleting.
	Workers int
	// Log receives warnings (malformed files, expired markers) and
	// progress notes; the standard logrus logger when nil.
	Log *logrus.Entry
	// Progress, when not nil, is called about every ProgressInterval while
	// the prune runs, and once at the end.
	Progress func(Stats)
	// Deleted, when not nil, is called (from several goroutines at once)
	// for each file deleted, or that a dry run would delete, with its path
	// relative to CacheDir and its size.
	Deleted func(rel string, size int64)
}

// ProgressInterval is how often Run calls Options.Progress.
const ProgressInterval = 250 * time.Millisecond

// Phases of a prune, as Stats.Phase reports them.
const (
	PhaseWaiting  = "waiting for upload locks"
	PhaseScanning = "scanning"
	PhaseDeleting = "deleting"
	PhaseDone     = "done"
)

// Stats count what a prune did. In a dry run, the deletions are the ones
// it would make.
type Stats struct {
	Phase           string
	Markers         int   // markers that count
	ExpiredMarkers  int   // markers older than MaxRootAge
	Roots           int   // store paths the markers name
	Scanned         int64 // narinfos found
	Read            int64 // narinfos read (the others the metadata cache answered)
	Malformed       int64 // narinfos kept because they do not parse or validate
	Kept            int64 // narinfos kept
	Deleted         int64 // files deleted, narinfos included
	DeletedNarInfos int64 // narinfos deleted
	BytesFreed      int64 // total size of the files deleted
	TmpRemoved      int64 // stale partial uploads removed from .tmp/
	Elapsed         time.Duration
	// Waited is the part of Elapsed spent waiting for upload locks to be
	// released.
	Waited time.Duration
}

// String returns the one-line summary of a prune.
func (s Stats) String() string {
	return fmt.Sprintf("%d narinfos scanned (%d read), %d kept, %d deleted; %d files deleted, %s freed in %s",
		s.Scanned, s.Read, s.Kept, s.DeletedNarInfos, s.Deleted, FormatBytes(s.BytesFreed), s.Elapsed.Round(time.Millisecond))
}

// FormatBytes prints a byte count with a binary unit.
func FormatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// counters are Stats updated from several goroutines.
type counters struct {
	phase                                   atomic.Value
	markers, expired, roots                 atomic.Int64
	scanned, read, malformed, kept          atomic.Int64
	deleted, deletedNarInfos, bytes, tmpDel atomic.Int64
	waited                                  atomic.Int64 // ns
}

// Timestamps on Linux file systems move with the kernel's coarse clock,
// a few milliseconds behind the time a prune reads: a file modified less
// than timeSlack before the prune started counts as new (it is kept), and
// the cache directory modified less than recheckSlack before it is listed
// again before deleting. (On a file system with whole-second timestamps a
// narinfo landing in the prune's first second may be judged like an old
// one: deleted if garbage, referrers first, so the cache stays valid.)
const (
	timeSlack    = 10 * time.Millisecond
	recheckSlack = time.Second
)

// Size limits of files a prune reads.
const (
	maxNarInfoSize = 1 << 20
	maxAuxSize     = 1 << 20
	maxMarkerSize  = 16 << 20
)

// MaxMarkerSize is the largest marker a prune reads; one larger fails it.
const MaxMarkerSize = maxMarkerSize

var errTooBig = errors.New("file too large")

type pruner struct {
	opt       Options
	log       *logrus.Entry
	locks     *cachelock.Locks
	workers   int // reading
	unlinkers int // deleting, per directory

	t0     time.Time
	cutoff int64 // Unix ns: files modified at or after it are kept
	// uploading is set when the cache saw upload activity within the
	// grace: NARs that no narinfo names then stay, whatever their age.
	uploading bool

	top *dir // the cache directory

	mu    sync.Mutex // guards g while the scan runs
	g     *graph
	roots []uint32
	aux   []auxFile

	metaFile  string
	cacheID   uint64
	metaDirty bool
	prev      *meta               // the metadata cache as loaded
	listed    []uint32            // narinfo nodes in listing order
	rootsHash uint64              // of the final roots
	sweeps    [numSweeps]dirStamp // directories this prune left clean

	c counters
}

// Run prunes the cache: it keeps the closure of the GC roots and deletes
// the rest, following the lock protocol unless it is a dry run. It
// returns what it did, also when it fails midway.
func Run(ctx context.Context, opt Options) (Stats, error) {
	p := newPruner(opt)
	return p.report(opt.CacheDir, func() error { return p.run(ctx) })
}

// report runs a prune of the cache named cache (a directory or a store
// URL), reporting its progress and recording its outcome as Options ask.
func (p *pruner) report(cache string, run func() error) (Stats, error) {
	start := time.Now()
	opt := p.opt
	p.c.phase.Store(PhaseScanning)

	done := make(chan struct{})
	var reporter sync.WaitGroup
	if opt.Progress != nil {
		reporter.Add(1)
		go func() {
			defer reporter.Done()
			t := time.NewTicker(ProgressInterval)
			defer t.Stop()
			for {
				select {
				case <-done:
					return
				case <-t.C:
					st := p.stats()
					st.Elapsed = time.Since(start)
					opt.Progress(st)
				}
			}
		}()
	}
	err := run()
	close(done)
	reporter.Wait()
	p.c.phase.Store(PhaseDone)
	st := p.stats()
	st.Elapsed = time.Since(start)
	if opt.Progress != nil {
		opt.Progress(st)
	}
	// Another prune's outcome is its own to record.
	if !opt.DryRun && opt.StateDir != "" && !errors.Is(err, cachelock.ErrPruneRunning) {
		if rerr := saveRecord(opt.StateDir, cache, start, st, err); rerr != nil {
			p.log.WithError(rerr).Warn("the prune's record for 'kiss-onion status' not written")
		}
	}
	return st, err
}

// newPruner returns a pruner for opt, with its defaults filled in.
func newPruner(opt Options) *pruner {
	if opt.StoreDir == "" {
		opt.StoreDir = nixcache.DefaultStoreDir
	}
	p := &pruner{opt: opt, log: opt.Log, locks: cachelock.New(opt.CacheDir), workers: opt.Workers, unlinkers: opt.Workers}
	if p.log == nil {
		p.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if p.workers <= 0 {
		// Reading cached files is CPU work; a few more than the CPUs
		// cover the reads that wait for the disk.
		p.workers = max(8, 4*runtime.GOMAXPROCS(0))
	}
	if p.unlinkers <= 0 {
		// An unlink spends most of its time waiting, after the directory's
		// lock is dropped: for the journal, or on a disk mounted with
		// discard for the device to discard the freed block. Only many in
		// flight keep the device busy (on a 2-CPU VM, 64 per directory
		// deleted a quarter faster than 16).
		p.unlinkers = max(64, 16*runtime.GOMAXPROCS(0))
	}
	return p
}

func (p *pruner) stats() Stats {
	c := &p.c
	return Stats{
		Phase:           c.phase.Load().(string),
		Markers:         int(c.markers.Load()),
		ExpiredMarkers:  int(c.expired.Load()),
		Roots:           int(c.roots.Load()),
		Scanned:         c.scanned.Load(),
		Read:            c.read.Load(),
		Malformed:       c.malformed.Load(),
		Kept:            c.kept.Load(),
		Deleted:         c.deleted.Load(),
		DeletedNarInfos: c.deletedNarInfos.Load(),
		BytesFreed:      c.bytes.Load(),
		TmpRemoved:      c.tmpDel.Load(),
		Waited:          time.Duration(c.waited.Load()),
	}
}

// run is Run without the progress reports: it takes the locks, reads
// the roots, scans, computes the closure, deletes and saves the metadata
// cache.
func (p *pruner) run(ctx context.Context) error {
	cache := p.opt.CacheDir
	if cache == "" {
		return errors.New("no cache directory")
	}
	if fi, err := os.Stat(filepath.Join(cache, "nix-cache-info")); err != nil || !fi.Mode().IsRegular() {
		return errors.New("not a binary cache: no nix-cache-info in it")
	}
	top, err := openDir(cache)
	if err != nil {
		return err
	}
	defer top.close()
	p.top = top

	if !p.opt.DryRun {
		p.c.phase.Store(PhaseWaiting)
		lastLog := time.Time{}
		began := time.Now()
		h, err := p.locks.Hold(ctx, p.opt.LockWait, func(names []string) {
			if time.Since(lastLog) > 10*time.Second {
				lastLog = time.Now()
				p.log.WithField("locks", names).Info("waiting for upload locks to be released")
			}
		})
		p.c.waited.Store(int64(time.Since(began)))
		if err != nil {
			return err
		}
		defer h.Release()
	}
	p.c.phase.Store(PhaseScanning)
	p.t0 = time.Now()
	p.cutoff = p.t0.Add(-p.opt.Grace - timeSlack).UnixNano()
	p.uploading = p.uploadedWithinGrace()

	p.loadPrev()
	rootKeys, err := p.readRoots()
	if err != nil {
		return err
	}
	for _, k := range rootKeys {
		p.roots = append(p.roots, p.g.intern(k))
	}
	if len(rootKeys) == 0 {
		p.log.WithField("dir", filepath.Join(cache, "gcroots")).
			Warn("no GC roots (no markers, or none naming a store path): every store path is garbage")
	}
	p.log.WithField("elapsed", time.Since(p.t0).Round(time.Millisecond)).Debug("metadata cache and markers read")
	t := time.Now()
	if err := p.scanNarInfos(ctx); err != nil {
		return err
	}
	p.log.WithFields(logrus.Fields{"narinfos": p.c.scanned.Load(), "read": p.c.read.Load(),
		"elapsed": time.Since(t).Round(time.Millisecond)}).Debug("narinfos scanned")
	if err := p.scanAux(ctx, p.prev.aux); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	p.closure()

	p.c.phase.Store(PhaseDeleting)
	t = time.Now()
	if p.opt.DryRun {
		err = p.delete(ctx)
	} else {
		err = p.locks.Exclusive(func() error {
			if err := p.recheck(ctx); err != nil {
				return err
			}
			return p.delete(ctx)
		})
	}
	if err != nil {
		return err
	}
	p.log.WithFields(logrus.Fields{"files": p.c.deleted.Load(), "elapsed": time.Since(t).Round(time.Millisecond)}).
		Debug("files deleted")
	p.cleanTmp()
	p.countKept()
	if p.opt.DryRun {
		for n := range p.g.flags {
			p.g.flags[n] &^= fDeleted
		}
	}
	p.saveNext()
	return nil
}

// loadPrev loads the metadata cache the last prune left, when there is a
// state directory. A bad one counts as empty, and is rewritten.
func (p *pruner) loadPrev() {
	p.prev = emptyMeta()
	if p.opt.StateDir != "" {
		p.metaFile = metaPath(p.opt.StateDir, p.opt.CacheDir)
		p.cacheID = cacheIDOf(p.opt.CacheDir, p.opt.StoreDir)
		m, err := loadMeta(p.metaFile, p.cacheID)
		switch {
		case err != nil:
			p.log.WithError(err).WithField("path", p.metaFile).Warn("rebuilding the metadata cache")
			p.metaDirty = true
		case m.g.len() == 0:
			p.metaDirty = true
		}
		p.prev = m
	}
	p.g = p.prev.g
}

// saveNext writes the metadata cache for the next prune, unless the file
// says all it would say already.
func (p *pruner) saveNext() {
	if p.metaFile != "" && (p.metaDirty || p.c.read.Load() > 0 || p.c.deletedNarInfos.Load() > 0 ||
		p.sweeps != p.prev.sweeps || p.rootsHash != p.prev.rootsHash) {
		next := &meta{g: p.g, aux: make(map[string]auxInfo, len(p.aux)), rootsHash: p.rootsHash, sweeps: p.sweeps}
		for _, a := range p.aux {
			if !a.deleted {
				next.aux[a.rel] = a.info
			}
		}
		t := time.Now()
		if err := saveMeta(p.metaFile, p.cacheID, next, p.listed); err != nil {
			// The prune itself succeeded; the next one reads more.
			p.log.WithError(err).Warn("metadata cache not written")
		}
		p.log.WithField("elapsed", time.Since(t).Round(time.Millisecond)).Debug("metadata cache written")
	}
}

// closure marks what the roots reach as kept: the markers' paths, and the
// narinfos kept whatever the markers say (malformed, new).
func (p *pruner) closure() {
	g := p.g
	stack := append([]uint32(nil), p.roots...)
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.has(n, fPresent) && g.flags[n]&(fRoot|fMalformed) != 0 {
			stack = append(stack, n)
		}
	}
	g.keep(stack)
}

// hashRoots returns an order-independent hash of the set of root nodes.
func (p *pruner) hashRoots() uint64 {
	roots := slices.Clone(p.roots)
	slices.Sort(roots)
	roots = slices.Compact(roots)
	h := uint64(len(roots))
	for _, n := range roots {
		h += mix64(p.g.keys[n].hash() + 0x9e3779b97f4a7c15)
	}
	return h
}

// countKept counts the narinfos left.
func (p *pruner) countKept() {
	g := p.g
	var kept int64
	for n := range g.flags {
		if g.flags[n]&(fPresent|fDeleted) == fPresent {
			kept++
		}
	}
	p.c.kept.Store(kept)
}

// isYoung reports whether a file modified at mtime is kept by the grace
// period or because it appeared while the prune ran.
func (p *pruner) isYoung(mtime int64) bool { return mtime >= p.cutoff }

// parallel runs fn(i) for i in [0, n) on the prune's workers.
func (p *pruner) parallel(n int, fn func(i int)) { parallelOn(p.workers, n, fn) }

// parallelOn runs fn(i) for i in [0, n) on up to workers goroutines.
func parallelOn(workers, n int, fn func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < min(workers, n); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				fn(i)
			}
		}()
	}
	wg.Wait()
}

// cleanTmp removes files under .tmp/ untouched for a day: partial uploads
// of a process that died. Leftovers of atomic writes in gcroots/.lock go
// the same way.
func (p *pruner) cleanTmp() {
	old := time.Now().Add(-24 * time.Hour)
	tmp := filepath.Join(p.opt.CacheDir, ".tmp")
	filepath.WalkDir(tmp, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil || !fi.ModTime().Before(old) {
			return nil
		}
		rel, _ := filepath.Rel(p.opt.CacheDir, path)
		if !p.opt.DryRun {
			if err := os.Remove(path); err != nil {
				return nil
			}
		}
		p.c.tmpDel.Add(1)
		p.c.bytes.Add(fi.Size())
		if p.opt.Deleted != nil {
			p.opt.Deleted(filepath.ToSlash(rel), fi.Size())
		}
		return nil
	})
	if p.opt.DryRun {
		return
	}
	p.locks.RemoveTemp(old)
}

// uploadedWithinGrace reports whether the cache saw upload activity less
// than the grace before the prune started, by the modification time of
// .tmp/, where every upload creates its file and from which it renames it
// (serve's, in this process or another).
//
// Nix 2.35 uploads every NAR of a copy first and the narinfos after, so a
// NAR may wait hours for the narinfo that names it while other NARs
// arrive: the grace of such a NAR counts from the last upload activity,
// not from its own arrival.
func (p *pruner) uploadedWithinGrace() bool {
	if p.opt.Grace <= 0 {
		return false
	}
	fi, err := os.Stat(filepath.Join(p.opt.CacheDir, ".tmp"))
	return err == nil && fi.ModTime().UnixNano() >= p.cutoff
}
