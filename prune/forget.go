package prune

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// ErrReferenced is the error (wrapped) of a Forget that refused: paths
// that stay in the cache refer to those it was asked to forget.
var ErrReferenced = errors.New("still referenced by paths in the cache")

// ForgetOptions configure a Forget.
type ForgetOptions struct {
	// CacheDir is the binary cache directory; it must hold nix-cache-info.
	CacheDir string
	// StateDir is where Run keeps its metadata cache: Forget reads it
	// (never writes it) to skip the narinfos it describes. Empty: every
	// narinfo is read.
	StateDir string
	// StoreDir is the Nix store directory; /nix/store when empty.
	StoreDir string
	// Paths are the store paths to forget: absolute, base names or hash
	// parts.
	Paths []string
	// WithReferrers also forgets every path in the cache that refers to
	// one of Paths, directly or through others. Without it, a Forget that
	// finds such a path deletes nothing and fails with ErrReferenced.
	WithReferrers bool
	// DryRun deletes nothing and takes no lock; Deleted is still called
	// for each file that would go.
	DryRun bool
	// LockWait is how long to wait for upload locks to be released, and
	// for a prune (or another forget) that holds the cache to end.
	LockWait time.Duration
	// Quiesce, when not nil, is called once the cache is held, before it
	// is scanned, and the function it returns once the Forget is done. A
	// serve that runs the Forget itself passes a function that stops
	// checking narinfo uploads and waits for those acknowledged to be
	// stored: then no narinfo is checked against what the Forget deletes.
	Quiesce func() (resume func())
	// Workers bounds the goroutines that read narinfos; see Options.
	Workers int
	// Log receives warnings (malformed files) and notes; the standard
	// logrus logger when nil.
	Log *logrus.Entry
	// Planned, when not nil, is called once what goes is settled, before
	// anything is deleted, with the result to be.
	Planned func(ForgetResult)
	// Deleted, when not nil, is called right after each file is deleted
	// (or, in a dry run, for each file that would be), with its path
	// relative to CacheDir and its size.
	Deleted func(rel string, size int64)
}

// MarkerRoot is a marker that names a store path a Forget is about.
type MarkerRoot struct {
	Marker string `json:"marker"` // relative to the cache: gcroots/<name>
	Root   string `json:"root"`   // the store path it names
}

// ForgetResult is what a Forget found and did.
type ForgetResult struct {
	// Paths are the store paths whose narinfos went (or would go, in a
	// dry run), referrers before what they refer to.
	Paths []string
	// Absent are the arguments of ForgetOptions.Paths that have no
	// narinfo in the cache.
	Absent []string
	// Referrers are the store paths in the cache that refer to one of
	// ForgetOptions.Paths, directly or not, sorted. With WithReferrers
	// they are among Paths.
	Referrers []string
	// Markers are the markers that name one of the paths to forget or
	// their referrers: they root them.
	Markers []MarkerRoot
	// Files and Bytes count the files deleted, narinfos included.
	Files, Bytes int64
}

// Forget deletes store paths from the cache: each one's narinfo and
// listing, and its NAR unless a narinfo that stays names it, along with
// the realisations and build traces that name it, the debuginfo entries
// into its NAR and its deriver's log when no path that stays names that
// deriver. It refuses (ErrReferenced) when a path that stays refers to one
// of them, unless WithReferrers, and reports in the result the referrers
// and the markers that root them.
//
// It follows the lock protocol as Run does: it holds the cache (no new
// upload lock, the held ones released first), scans every narinfo, and
// deletes while no narinfo is committed, after looking again at those that
// came meanwhile. The cache stays valid at every instant: realisations
// first, then narinfos referrers first, then the NARs. A NAR modified
// since the Forget began stays: an upload may be about to name it.
func Forget(ctx context.Context, opt ForgetOptions) (ForgetResult, error) {
	began := time.Now()
	f, err := newForgetter(opt)
	if err != nil {
		return ForgetResult{}, err
	}
	f.p = newPruner(Options{CacheDir: opt.CacheDir, StateDir: opt.StateDir, StoreDir: f.opt.StoreDir,
		DryRun: opt.DryRun, Workers: opt.Workers, Log: opt.Log, Deleted: opt.Deleted})
	// A NAR modified after this may be one an upload is about to name.
	f.p.cutoff = began.Add(-timeSlack).UnixNano()
	f.readNarInfo = func(name string) (uint64, []byte, error) {
		st, data, err := f.p.top.statRead(name, nil, maxNarInfoSize)
		return st.ident, data, err
	}
	f.eachMarker = f.dirMarkers
	return f.run(ctx)
}

// newForgetter checks the paths of opt and returns a forgetter of them,
// without its pruner or its ways of reading the cache.
func newForgetter(opt ForgetOptions) (*forgetter, error) {
	if opt.StoreDir == "" {
		opt.StoreDir = nixcache.DefaultStoreDir
	}
	if len(opt.Paths) == 0 {
		return nil, errors.New("no store path to forget")
	}
	f := &forgetter{opt: opt, info: map[uint32]*forgetInfo{}}
	for _, arg := range opt.Paths {
		k, err := forgetKey(opt.StoreDir, arg)
		if err != nil {
			return nil, err
		}
		f.wanted = append(f.wanted, k)
		f.args = append(f.args, arg)
	}
	return f, nil
}

// PathHash returns the hash part of a store path given as ForgetOptions.Paths
// takes them: an absolute path under storeDir (or a file inside one), a
// base name or a hash part.
func PathHash(storeDir, arg string) (string, error) {
	s := arg
	if strings.HasPrefix(s, "/") {
		base, ok := markerLine(s, strings.TrimSuffix(storeDir, "/")+"/")
		if !ok {
			return "", fmt.Errorf("%q is not a store path under %s", arg, storeDir)
		}
		s = base
	}
	if len(s) > nixcache.HashLen {
		if err := nixcache.CheckBaseName(s); err != nil {
			return "", fmt.Errorf("%q: %w", arg, err)
		}
	}
	if !nixcache.IsHashPart(s[:min(len(s), nixcache.HashLen)]) {
		return "", fmt.Errorf("%q is neither a store path nor a store path's hash", arg)
	}
	return s[:nixcache.HashLen], nil
}

// forgetKey returns the key of a store path given as PathHash takes it.
func forgetKey(storeDir, arg string) (key, error) {
	h, err := PathHash(storeDir, arg)
	if err != nil {
		return key{}, err
	}
	k, _ := parseKey(h)
	return k, nil
}

// forgetter is one Forget: a pruner's scan and graph, put to another use.
type forgetter struct {
	opt    ForgetOptions
	p      *pruner
	wanted []key
	args   []string
	info   map[uint32]*forgetInfo // narinfos read to name or delete them

	// readNarInfo reads the narinfo name of the cache, with an identity
	// that changes whenever it is written.
	readNarInfo func(name string) (ident uint64, data []byte, err error)
	// eachMarker calls fn with each marker under gcroots/ (none of whose
	// path parts starts with '.'), in lexical order: its path relative
	// to the cache and its content. What cannot be read is left out.
	eachMarker func(fn func(rel string, data []byte))
}

// forgetInfo is what a Forget read of a narinfo.
type forgetInfo struct {
	ident     uint64
	storePath string // "" when the narinfo does not parse
	url       string
	deriver   string
}

// forgetPlan is what goes: nodes of the pruner's graph.
type forgetPlan struct {
	targets   []uint32 // the present narinfos asked for
	absent    []string // the arguments not present
	referrers []uint32 // present narinfos referring to targets, not targets
	doomed    []uint32 // in deletion order: referrers first
	inDoomed  []bool
}

func (f *forgetter) run(ctx context.Context) (ForgetResult, error) {
	p := f.p
	cache := p.opt.CacheDir
	if cache == "" {
		return ForgetResult{}, errors.New("no cache directory")
	}
	if fi, err := os.Stat(filepath.Join(cache, "nix-cache-info")); err != nil || !fi.Mode().IsRegular() {
		return ForgetResult{}, errors.New("not a binary cache: no nix-cache-info in it")
	}
	top, err := openDir(cache)
	if err != nil {
		return ForgetResult{}, err
	}
	defer top.close()
	p.top = top

	if !p.opt.DryRun {
		h, err := f.hold(ctx)
		if err != nil {
			return ForgetResult{}, err
		}
		defer h.Release()
		if f.opt.Quiesce != nil {
			resume := f.opt.Quiesce()
			defer resume()
		}
	}
	p.t0 = time.Now()
	p.prev = emptyMeta()
	if p.opt.StateDir != "" {
		m, err := loadMeta(metaPath(p.opt.StateDir, cache), cacheIDOf(cache, p.opt.StoreDir))
		if err != nil {
			p.log.WithError(err).Debug("metadata cache not used")
		}
		p.prev = m
	}
	p.g = p.prev.g
	if err := p.scanNarInfos(ctx); err != nil {
		return ForgetResult{}, err
	}
	if err := p.scanAux(ctx, p.prev.aux); err != nil {
		return ForgetResult{}, err
	}
	if err := ctx.Err(); err != nil {
		return ForgetResult{}, err
	}
	pl := f.plan()
	res := f.result(pl)
	if len(pl.targets) == 0 {
		return res, nil
	}
	if err := f.refused(pl, &res); err != nil {
		return res, err
	}
	if p.opt.DryRun {
		if f.opt.Planned != nil {
			f.opt.Planned(res)
		}
		err := f.delete(ctx, pl, &res)
		return res, err
	}
	err = p.locks.Exclusive(func() error {
		if err := f.recheck(ctx); err != nil {
			return err
		}
		pl = f.plan()
		res = f.result(pl)
		if len(pl.targets) == 0 {
			return nil
		}
		if err := f.refused(pl, &res); err != nil {
			return err
		}
		if f.opt.Planned != nil {
			f.opt.Planned(res)
		}
		return f.delete(ctx, pl, &res)
	})
	return res, err
}

// hold holds the cache as a prune does, waiting (up to LockWait in all)
// for a prune or another forget that holds it to end.
func (f *forgetter) hold(ctx context.Context) (*cachelock.Hold, error) {
	return holdRetrying(ctx, f.opt.LockWait, 100*time.Millisecond, f.p.log, f.p.locks.Hold)
}

// holdRetrying calls hold (a cachelock or bucketlock Hold) until it holds
// the cache, fails otherwise than because a prune (or another forget)
// holds it, or wait is over; it tries again every poll.
func holdRetrying[H any](ctx context.Context, wait, poll time.Duration, log *logrus.Entry,
	hold func(ctx context.Context, wait time.Duration, waiting func([]string)) (H, error)) (H, error) {
	deadline := time.Now().Add(wait)
	lastLog := time.Time{}
	for {
		h, err := hold(ctx, max(0, time.Until(deadline)), func(names []string) {
			if time.Since(lastLog) > 10*time.Second {
				lastLog = time.Now()
				log.WithField("locks", names).Info("waiting for upload locks to be released")
			}
		})
		if err == nil || !errors.Is(err, cachelock.ErrPruneRunning) || !time.Now().Before(deadline) {
			return h, err
		}
		t := time.NewTimer(min(poll, time.Until(deadline)))
		select {
		case <-ctx.Done():
			t.Stop()
			var none H
			return none, ctx.Err()
		case <-t.C:
		}
	}
}

// plan finds the targets, their referrers and the order of deletion.
func (f *forgetter) plan() forgetPlan {
	g := f.p.g
	var pl forgetPlan
	isTarget := make([]bool, g.len())
	for i, k := range f.wanted {
		n, ok := g.lookup(k)
		if !ok || g.flags[n]&fPresent == 0 {
			pl.absent = append(pl.absent, f.args[i])
			continue
		}
		if !isTarget[n] {
			isTarget[n] = true
			pl.targets = append(pl.targets, n)
		}
	}

	// The referrers: a walk of the reversed references of the narinfos
	// present, from the targets. Self-references are no edges.
	live := func(n uint32) bool { return g.flags[n]&(fPresent|fData) == fPresent|fData }
	off := make([]uint32, g.len()+1)
	for n := uint32(0); n < uint32(g.len()); n++ {
		if live(n) {
			for _, r := range g.nodeRefs(n) {
				if r != n {
					off[r+1]++
				}
			}
		}
	}
	for i := 1; i < len(off); i++ {
		off[i] += off[i-1]
	}
	rev := make([]uint32, off[len(off)-1])
	fill := append([]uint32(nil), off[:len(off)-1]...)
	for n := uint32(0); n < uint32(g.len()); n++ {
		if live(n) {
			for _, r := range g.nodeRefs(n) {
				if r != n {
					rev[fill[r]] = n
					fill[r]++
				}
			}
		}
	}
	reached := append([]bool(nil), isTarget...)
	todo := append([]uint32(nil), pl.targets...)
	for len(todo) > 0 {
		n := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		for _, m := range rev[off[n]:off[n+1]] {
			if !reached[m] {
				reached[m] = true
				pl.referrers = append(pl.referrers, m)
				todo = append(todo, m)
			}
		}
	}

	// The order: Kahn's over the doomed, referrers first.
	pl.inDoomed = isTarget
	doomed := pl.targets
	if f.opt.WithReferrers {
		pl.inDoomed = reached
		doomed = append(append([]uint32(nil), pl.referrers...), pl.targets...)
	}
	indeg := make(map[uint32]int, len(doomed))
	edges := func(n uint32, fn func(m uint32)) {
		if !live(n) {
			return
		}
		for _, r := range g.nodeRefs(n) {
			if r != n && pl.inDoomed[r] {
				fn(r)
			}
		}
	}
	for _, n := range doomed {
		edges(n, func(m uint32) { indeg[m]++ })
	}
	// Ties go the same way on any storage: the targets in the order
	// asked, after the referrers in the order of their hash parts.
	rank := make(map[uint32]int, len(doomed))
	for i, n := range pl.targets {
		rank[n] = len(pl.referrers) + i
	}
	byHash := slices.Clone(pl.referrers)
	sort.Slice(byHash, func(i, j int) bool { return g.keys[byHash[i]].String() < g.keys[byHash[j]].String() })
	for i, n := range byHash {
		rank[n] = i
	}
	sort.SliceStable(doomed, func(i, j int) bool { return rank[doomed[i]] < rank[doomed[j]] })
	var ready []uint32
	for _, n := range doomed {
		if indeg[n] == 0 {
			ready = append(ready, n)
		}
	}
	done := make(map[uint32]bool, len(doomed))
	for len(ready) > 0 {
		n := ready[0]
		ready = ready[1:]
		done[n] = true
		pl.doomed = append(pl.doomed, n)
		edges(n, func(m uint32) {
			if indeg[m]--; indeg[m] == 0 {
				ready = append(ready, m)
			}
		})
	}
	// A cycle (no real store has one) goes in any order after the rest.
	for _, n := range doomed {
		if !done[n] {
			pl.doomed = append(pl.doomed, n)
		}
	}
	return pl
}

// read returns what the narinfo of node n says, reading it once.
func (f *forgetter) read(n uint32) *forgetInfo {
	if fi := f.info[n]; fi != nil {
		return fi
	}
	name := f.p.g.keys[n].String() + narinfoExt
	info := &forgetInfo{}
	ident, data, err := f.readNarInfo(name)
	if err == nil {
		info.ident = ident
		if ni, err := nixcache.ParseNarInfo(data); err == nil {
			info.storePath, info.url, info.deriver = ni.StorePath, ni.URL, ni.Deriver
		}
	}
	f.info[n] = info
	return info
}

// name returns the store path of node n, as its narinfo says.
func (f *forgetter) name(n uint32) string {
	if sp := f.read(n).storePath; sp != "" {
		return sp
	}
	return strings.TrimSuffix(f.p.opt.StoreDir, "/") + "/" + f.p.g.keys[n].String()
}

// result describes pl.
func (f *forgetter) result(pl forgetPlan) ForgetResult {
	res := ForgetResult{Absent: pl.absent}
	for _, n := range pl.doomed {
		res.Paths = append(res.Paths, f.name(n))
	}
	for _, n := range pl.referrers {
		res.Referrers = append(res.Referrers, f.name(n))
	}
	sort.Strings(res.Referrers)
	concerned := make([]bool, f.p.g.len())
	for _, n := range append(append([]uint32(nil), pl.targets...), pl.referrers...) {
		concerned[n] = true
	}
	res.Markers = f.markers(concerned)
	return res
}

// markers returns the markers under gcroots/ that name a path of a node
// marked in concerned. Since the referrers of the targets are all
// concerned, these are exactly the markers whose closures hold one.
func (f *forgetter) markers(concerned []bool) []MarkerRoot {
	g := f.p.g
	prefix := strings.TrimSuffix(f.p.opt.StoreDir, "/") + "/"
	var out []MarkerRoot
	f.eachMarker(func(rel string, data []byte) {
		for _, l := range strings.Split(string(data), "\n") {
			base, ok := markerLine(strings.TrimSpace(l), prefix)
			if !ok {
				continue
			}
			k, _ := parseKey(base[:nixcache.HashLen])
			if n, ok := g.lookup(k); ok && concerned[n] {
				out = append(out, MarkerRoot{Marker: rel, Root: prefix + base})
			}
		}
	})
	return out
}

// dirMarkers is eachMarker on the cache directory.
func (f *forgetter) dirMarkers(fn func(rel string, data []byte)) {
	cache := f.p.opt.CacheDir
	top := filepath.Join(cache, "gcroots")
	filepath.WalkDir(top, func(file string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // a report: what cannot be read is left out
		}
		if file != top && strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		if fi, err := d.Info(); err != nil || fi.Size() > maxMarkerSize {
			return nil
		}
		data, err := os.ReadFile(file)
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(cache, file)
		fn(filepath.ToSlash(rel), data)
		return nil
	})
}

// refused returns an error wrapping ErrReferenced when pl leaves
// referrers, and then clears the paths that go from res: none do.
func (f *forgetter) refused(pl forgetPlan, res *ForgetResult) error {
	if len(pl.referrers) == 0 || f.opt.WithReferrers {
		return nil
	}
	res.Paths = nil
	var names []string
	for _, n := range pl.targets {
		names = append(names, f.name(n))
	}
	markers := ""
	if len(res.Markers) > 0 {
		markers = fmt.Sprintf(", rooted by %d marker(s)", len(res.Markers))
	}
	return fmt.Errorf("%s: %w: %d referrer(s)%s", strings.Join(names, ", "), ErrReferenced, len(pl.referrers), markers)
}

// recheck runs once no narinfo can be committed: it reads the narinfos
// that appeared or were replaced since the scan began, so that the plan
// made again sees every referrer.
func (f *forgetter) recheck(ctx context.Context) error {
	p := f.p
	g := p.g
	fi, err := os.Stat(p.opt.CacheDir)
	if err != nil {
		return err
	}
	if fi.ModTime().UnixNano() < p.t0.Add(-recheckSlack).UnixNano() {
		return nil // no entry came, went or was replaced
	}
	var fresh []uint32
	err = p.top.each(func(name []byte, ino uint64, typ int) error {
		if name[0] == '.' || typ == typeDir || typ == typeOther ||
			len(name) != nixcache.HashLen+len(narinfoExt) || string(name[nixcache.HashLen:]) != narinfoExt {
			return nil
		}
		k, ok := parseKey(name[:nixcache.HashLen])
		if !ok {
			return nil
		}
		n, seen := g.lookup(k)
		switch {
		case !seen || !g.has(n, fPresent):
		case ino != 0 && g.ino[n] == ino:
			return nil
		case ino == 0:
			fi, err := p.top.stat(string(name))
			if err != nil || fi.ident == g.ident[n] {
				return nil
			}
		}
		n = g.intern(k)
		g.ino[n] = ino
		g.flags[n] |= fPresent
		fresh = append(fresh, n)
		return nil
	})
	if err != nil {
		return err
	}
	res := &scanned{}
	var buf []byte
	for _, n := range fresh {
		delete(f.info, n)
		buf = p.checkNarInfo(scanItem{n: n, k: g.keys[n]}, res, buf)
	}
	p.apply(res, nil)
	if len(fresh) > 0 {
		p.log.WithField("narinfos", len(fresh)).Debug("narinfos appeared or changed during the forget")
	}
	return ctx.Err()
}

// delete deletes what pl dooms, in an order that keeps the cache valid at
// every instant, and fills res's counts.
func (f *forgetter) delete(ctx context.Context, pl forgetPlan, res *ForgetResult) error {
	p := f.p
	g := p.g
	cache := p.opt.CacheDir
	defer func() {
		res.Files, res.Bytes = p.c.deleted.Load(), p.c.bytes.Load()
	}()
	// remove deletes the file rel of the cache unless it is a directory,
	// or young (a NAR); it reports whether the file is gone.
	remove := func(rel string, young bool) (bool, error) {
		full := filepath.Join(cache, filepath.FromSlash(rel))
		fi, err := os.Lstat(full)
		if errors.Is(err, fs.ErrNotExist) {
			return true, nil
		}
		if err != nil {
			return false, err
		}
		if fi.IsDir() || young && p.isYoung(fi.ModTime().UnixNano()) {
			return false, nil
		}
		if !p.opt.DryRun {
			if err := os.Remove(full); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return false, err
			}
		}
		p.counted(rel, fi.Size())
		return true, nil
	}

	// Realisations and build traces naming a doomed path go first: none
	// may name a path the cache no longer has.
	for _, a := range p.aux {
		if a.info.kind != auxOutPath {
			continue
		}
		if n, ok := g.lookup(a.info.target); ok && pl.inDoomed[n] {
			if _, err := remove(a.rel, false); err != nil {
				return err
			}
		}
	}

	// The narinfos, referrers first, each with its listing.
	for _, n := range pl.doomed {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := g.keys[n].String() + narinfoExt
		st, err := p.top.stat(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		if info := f.read(n); info.ident != 0 && st.ident != info.ident {
			return fmt.Errorf("%s changed during the forget: nothing more deleted", name)
		}
		if !p.opt.DryRun {
			if err := p.top.remove(name); err != nil {
				return err
			}
		}
		p.counted(name, st.size)
		if _, err := remove(g.keys[n].String()+lsExt, false); err != nil {
			return err
		}
	}
	if !p.opt.DryRun {
		// The narinfos' removal is durable before their NARs go.
		if err := p.top.sync(); err != nil {
			return err
		}
	}

	// The NARs that no narinfo left names, each after the debuginfo
	// entries into it; then the logs of derivers no narinfo left names.
	nars, logs := f.leftovers(pl)
	for _, u := range nars {
		h := hashURL(u)
		for _, a := range p.aux {
			if a.info.kind == auxNar && a.info.urlHash == h {
				if _, err := remove(a.rel, false); err != nil {
					return err
				}
			}
		}
		gone, err := remove(u, true)
		if err != nil {
			return err
		}
		if !gone {
			p.log.WithField("path", u).Info("keeping a NAR uploaded during the forget")
		}
	}
	for _, l := range logs {
		if _, err := remove(l, false); err != nil {
			return err
		}
	}
	return nil
}

// leftovers returns what the narinfos pl dooms leave that no narinfo
// that stays needs: the URLs of their NARs (under nar/, each once) and
// the logs of their derivers (log/<drv>), in the order of pl.doomed.
func (f *forgetter) leftovers(pl forgetPlan) (nars, logs []string) {
	g := f.p.g
	staying := newU64Set(g.len())
	stayingDrv := make([]bool, g.len())
	for n := uint32(0); n < uint32(g.len()); n++ {
		if g.flags[n]&fPresent != 0 && !pl.inDoomed[n] {
			staying.add(g.urlHash[n])
			if d := g.deriver[n]; d != 0 {
				stayingDrv[d-1] = true
			}
		}
	}
	logged := map[string]bool{}
	for _, n := range pl.doomed {
		info := f.read(n)
		if u := path.Clean(info.url); info.url != "" && strings.HasPrefix(u, "nar/") && filepath.IsLocal(u) {
			if h := hashURL(u); !staying.has(h) {
				staying.add(h) // once
				nars = append(nars, u)
			}
		}
		if d := info.deriver; nixcache.CheckBaseName(d) == nil && !logged[d] {
			k, _ := parseKey(d[:nixcache.HashLen])
			if m, ok := g.lookup(k); !ok || !stayingDrv[m] {
				logged[d] = true
				logs = append(logs, "log/"+d)
			}
		}
	}
	return nars, logs
}
