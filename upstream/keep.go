package upstream

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// KeepMarker is the marker, relative to the cache directory, that roots
// the paths fetched from upstream for Config.Keep after their last read,
// within Config.MaxKept.
const KeepMarker = "gcroots/upstream/recent"

// keeper remembers when each fetched path was last fetched or read, and
// writes the marker that keeps the recent ones. A read is a map update
// under a mutex, on the read of a NAR, never on a narinfo hit; the marker
// is rewritten after a fetch and then at most every keepFlush.
//
// The marker is a plain marker (one store path a line) with a comment
// before each path: "# <unix seconds of the last read> <NAR URL>", from
// which a restarted serve takes up where it left off (the paths' sizes
// and references from their narinfos).
type keeper struct {
	dir      string // the cache directory
	storeDir string
	file     string
	keep     time.Duration // 0: no time limit
	maxKept  int64         // 0: no size limit
	now      func() time.Time

	mu    sync.Mutex
	paths map[string]*keptPath // store path ->
	byURL map[string]string    // NAR URL -> store path
	dirty bool
	// writing serializes the marker's writes.
	writing sync.Mutex
}

type keptPath struct {
	url  string
	last time.Time
	size int64    // of the NAR file
	refs []string // store paths, itself excluded
}

func newKeeper(cacheDir, storeDir string, keep time.Duration, maxKept int64, now func() time.Time) *keeper {
	k := &keeper{dir: cacheDir, storeDir: storeDir, file: filepath.Join(cacheDir, filepath.FromSlash(KeepMarker)),
		keep: keep, maxKept: maxKept, now: now, paths: map[string]*keptPath{}, byURL: map[string]string{}}
	k.load()
	return k
}

// load reads the marker a previous serve wrote; what does not parse is
// dropped, and so is a path whose narinfo is gone.
func (k *keeper) load() {
	data, err := os.ReadFile(k.file)
	if err != nil {
		return
	}
	var last time.Time
	url := ""
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if c, ok := strings.CutPrefix(l, "# "); ok {
			secs, u, _ := strings.Cut(c, " ")
			if n, err := strconv.ParseInt(secs, 10, 64); err == nil && nixcache.CheckNarURL(u) == nil {
				last, url = time.Unix(n, 0), u
			}
			continue
		}
		if strings.HasPrefix(l, "/") && url != "" {
			e := &keptPath{url: url, last: last}
			if k.fromNarInfo(l, e) {
				k.paths[l] = e
				k.byURL[url] = l
			}
		}
		url = ""
	}
}

// fromNarInfo fills e's size and references from the narinfo of
// storePath in the cache; false when it is not there.
func (k *keeper) fromNarInfo(storePath string, e *keptPath) bool {
	base := strings.TrimPrefix(storePath, k.storeDir+"/")
	if len(base) < nixcache.HashLen || !nixcache.IsHashPart(base[:nixcache.HashLen]) {
		return false
	}
	data, err := os.ReadFile(filepath.Join(k.dir, base[:nixcache.HashLen]+".narinfo"))
	if err != nil {
		return false
	}
	ni, err := nixcache.ParseNarInfo(data)
	if err != nil {
		return false
	}
	e.size, e.refs = keptSize(ni), refPaths(k.storeDir, ni)
	return true
}

// keptSize is what a fetched path takes in the cache: its NAR file.
func keptSize(ni *nixcache.NarInfo) int64 {
	if ni.FileSize > 0 {
		return int64(ni.FileSize)
	}
	return int64(ni.NarSize)
}

// refPaths returns the store paths ni references, itself excluded.
func refPaths(storeDir string, ni *nixcache.NarInfo) []string {
	refs := make([]string, 0, len(ni.References))
	for _, r := range ni.References {
		if p := storeDir + "/" + r; p != ni.StorePath {
			refs = append(refs, p)
		}
	}
	return refs
}

// fetched records a path just stored: its keep time starts now, after
// every read of its download.
func (k *keeper) fetched(ni *nixcache.NarInfo) {
	k.mu.Lock()
	k.paths[ni.StorePath] = &keptPath{url: ni.URL, last: k.now(), size: keptSize(ni), refs: refPaths(k.storeDir, ni)}
	k.byURL[ni.URL] = ni.StorePath
	k.dirty = true
	k.mu.Unlock()
}

// used records a read of the NAR at url, if a fetched path has it.
func (k *keeper) used(url string) {
	k.mu.Lock()
	if p, ok := k.byURL[url]; ok {
		k.paths[p].last = k.now()
		k.dirty = true
	}
	k.mu.Unlock()
}

// drop forgets p; the caller holds k.mu.
func (k *keeper) drop(p string) {
	delete(k.byURL, k.paths[p].url)
	delete(k.paths, p)
}

// trim drops the paths not read for keep, and the least recently read
// while those kept take more than maxKept, but never one that another
// kept path references: a prune would keep it anyway, through the
// marker, and what the keeper counts is what the marker keeps. The
// caller holds k.mu.
func (k *keeper) trim(now time.Time) bool {
	var total int64
	expired := false
	for _, e := range k.paths {
		total += e.size
		expired = expired || k.expired(e, now)
	}
	over := func() bool { return k.maxKept > 0 && total > k.maxKept }
	if !expired && !over() {
		return false
	}
	referrers := map[string]int{}
	for _, e := range k.paths {
		for _, r := range e.refs {
			if _, ok := k.paths[r]; ok {
				referrers[r]++
			}
		}
	}
	order := make([]string, 0, len(k.paths))
	for p := range k.paths {
		order = append(order, p)
	}
	sort.Slice(order, func(i, j int) bool {
		a, b := k.paths[order[i]], k.paths[order[j]]
		if !a.last.Equal(b.last) {
			return a.last.Before(b.last)
		}
		return order[i] < order[j]
	})
	// Each pass drops, oldest first, what no kept path references;
	// dropping a referrer frees its references for the next pass.
	changed := false
	for progress := true; progress; {
		progress = false
		for _, p := range order {
			e, ok := k.paths[p]
			if !ok || referrers[p] > 0 || !(k.expired(e, now) || over()) {
				continue
			}
			delete(k.byURL, e.url)
			delete(k.paths, p)
			total -= e.size
			for _, r := range e.refs {
				referrers[r]--
			}
			progress, changed = true, true
		}
	}
	return changed
}

func (k *keeper) expired(e *keptPath, now time.Time) bool {
	return k.keep > 0 && now.Sub(e.last) > k.keep
}

// flush drops what was not read for keep, and the least recently read
// past maxKept, and rewrites the marker when anything changed.
func (k *keeper) flush() error {
	k.writing.Lock()
	defer k.writing.Unlock()
	k.mu.Lock()
	now := k.now()
	changed := k.trim(now) || k.dirty
	if !changed {
		k.mu.Unlock()
		return nil
	}
	k.dirty = false
	names := make([]string, 0, len(k.paths))
	for p := range k.paths {
		names = append(names, p)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString("# kiss-onion serve: paths fetched from upstream")
	if k.keep > 0 {
		fmt.Fprintf(&b, ", kept for %s after their last read", k.keep)
	}
	if k.maxKept > 0 {
		fmt.Fprintf(&b, ", the most recently read within %d bytes", k.maxKept)
	}
	b.WriteString("\n")
	for _, p := range names {
		e := k.paths[p]
		fmt.Fprintf(&b, "# %d %s\n%s\n", e.last.Unix(), e.url, p)
	}
	k.mu.Unlock()
	if err := os.MkdirAll(filepath.Dir(k.file), 0o755); err != nil {
		return err
	}
	if err := atomicfile.WriteFile(k.file, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", KeepMarker, err)
	}
	return nil
}

// KeepLoop rewrites the keep marker (Config.Keep, Config.MaxKept) until
// ctx ends: reads recorded since, and paths whose keep time is over or
// that no longer fit, go into it at most a minute later (sooner for a
// keep time under two minutes). Without either it returns at once.
func (f *Fetcher) KeepLoop(ctx context.Context) {
	if f.keeper == nil {
		return
	}
	every := time.Minute
	if f.cfg.Keep > 0 {
		every = min(f.cfg.Keep/2, every)
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := f.keeper.flush(); err != nil {
			f.log.WithError(err).Error("keep marker not written")
		}
	}
}

// Used records a read of the NAR at url, for the keep time; it implements
// serve.Upstream.
func (f *Fetcher) Used(url string) {
	if f.keeper != nil {
		f.keeper.used(url)
	}
}
