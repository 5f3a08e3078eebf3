package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
)

// KeepMarker is the marker, relative to the cache, that roots the paths
// fetched from upstream for Config.Keep after their last read, within
// Config.MaxKept.
const KeepMarker = "gcroots/upstream/recent"

// keeper remembers when each fetched path was last fetched or read, and
// writes the marker that keeps the recent ones. A read is a map update
// under a mutex, on the read of a NAR, never on a narinfo hit; the marker
// is rewritten after a fetch and then at most every keepFlush.
//
// The marker is a plain marker (one store path a line) with a comment
// before each path: "# <unix seconds of the last read> <NAR URL>". Each
// rewrite first takes in what the marker holds (a restarted serve takes
// up where it left off; front ends on one bucket share one marker, each
// adding its reads), keeping the later read of a path, and leaves out
// the paths whose narinfo is gone (forgotten, or pruned once they had
// left the marker).
type keeper struct {
	dir      string // the cache directory; empty on a bucket
	storeDir string
	keep     time.Duration // 0: no time limit
	maxKept  int64         // 0: no size limit
	now      func() time.Time

	mu    sync.Mutex
	paths map[string]*keptPath // store path ->
	byURL map[string]string    // NAR URL -> store path
	// writing serializes the marker's rewrites.
	writing sync.Mutex
}

type keptPath struct {
	url  string
	last time.Time
	size int64    // of the NAR file
	refs []string // store paths, itself excluded
}

func newKeeper(cacheDir, storeDir string, keep time.Duration, maxKept int64, now func() time.Time) *keeper {
	k := &keeper{dir: cacheDir, storeDir: storeDir, keep: keep, maxKept: maxKept, now: now,
		paths: map[string]*keptPath{}, byURL: map[string]string{}}
	if cacheDir != "" {
		st := k.store(nil)
		if data, _, err := st.read(); err == nil {
			k.merge(st, data)
		}
	}
	return k
}

// keepStore is where the keep marker lives: a file of the cache
// directory, which one serve writes, or an object of the bucket, which
// every front end rewrites in turn.
type keepStore interface {
	// read returns the marker (nil when there is none) and its version.
	read() (data []byte, version string, err error)
	// write replaces the marker read at version; an error matching
	// fs.ErrExist when it changed meanwhile.
	write(data []byte, version string) error
	// narInfo returns the narinfo of the store path whose hash part is
	// hash.
	narInfo(hash string) ([]byte, error)
	// has reports whether the cache still has that narinfo.
	has(hash string) bool
}

// store returns where the marker of a keeper for c lives.
func (k *keeper) store(c *serve.Cache) keepStore {
	if c != nil && c.OnBucket() {
		return bucketKeep{c}
	}
	return dirKeep{k.dir}
}

type dirKeep struct{ dir string }

func (d dirKeep) read() ([]byte, string, error) {
	if d.dir == "" {
		return nil, "", errors.New("no cache directory for the keep marker")
	}
	data, err := os.ReadFile(filepath.Join(d.dir, filepath.FromSlash(KeepMarker)))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, "", nil
	}
	return data, "", err
}

func (d dirKeep) write(data []byte, _ string) error {
	file := filepath.Join(d.dir, filepath.FromSlash(KeepMarker))
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return err
	}
	return atomicfile.WriteFile(file, data, 0o644)
}

func (d dirKeep) narInfo(hash string) ([]byte, error) {
	return os.ReadFile(filepath.Join(d.dir, hash+".narinfo"))
}

func (d dirKeep) has(hash string) bool {
	_, err := os.Stat(filepath.Join(d.dir, hash+".narinfo"))
	return err == nil
}

type bucketKeep struct{ c *serve.Cache }

func (b bucketKeep) read() ([]byte, string, error) { return b.c.Marker(KeepMarker) }
func (b bucketKeep) write(data []byte, version string) error {
	return b.c.ReplaceMarker(KeepMarker, data, version)
}
func (b bucketKeep) narInfo(hash string) ([]byte, error) { return b.c.ReadNarInfo(hash) }

// has asks the bucket only for a path the index does not list: one
// another front end fetched since the last listing.
func (b bucketKeep) has(hash string) bool { return b.c.Listed(hash) || b.c.HasNarInfo(hash) }

// keptEntry is a path as a keep marker names it.
type keptEntry struct {
	path, url string
	last      time.Time
}

// parseKeepMarker returns the paths of a keep marker; what does not parse
// is dropped.
func parseKeepMarker(data []byte) []keptEntry {
	var out []keptEntry
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
			out = append(out, keptEntry{path: l, url: url, last: last})
		}
		url = ""
	}
	return out
}

// merge takes in the paths of a marker: a path it does not know, with
// its size and references from its narinfo (dropped when that is gone),
// and for one it knows, the later of the two reads.
func (k *keeper) merge(st keepStore, data []byte) {
	entries := parseKeepMarker(data)
	fresh := map[string]*keptPath{}
	for _, e := range entries {
		k.mu.Lock()
		_, known := k.paths[e.path]
		k.mu.Unlock()
		if known {
			continue
		}
		p := &keptPath{url: e.url, last: e.last}
		if k.fromNarInfo(st, e.path, p) {
			fresh[e.path] = p
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, e := range entries {
		if p, ok := k.paths[e.path]; ok {
			if e.last.After(p.last) {
				p.last = e.last
			}
		} else if p, ok := fresh[e.path]; ok {
			k.paths[e.path] = p
			k.byURL[p.url] = e.path
		}
	}
}

// fromNarInfo fills e's size and references from the narinfo of
// storePath in the cache; false when it is not there.
func (k *keeper) fromNarInfo(st keepStore, storePath string, e *keptPath) bool {
	base := strings.TrimPrefix(storePath, k.storeDir+"/")
	if len(base) < nixcache.HashLen || !nixcache.IsHashPart(base[:nixcache.HashLen]) {
		return false
	}
	data, err := st.narInfo(base[:nixcache.HashLen])
	if err != nil {
		return false
	}
	ni, err := nixcache.ParseNarInfo(data)
	if err != nil || ni.StorePath != storePath {
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
	k.mu.Unlock()
}

// used records a read of the NAR at url, if a fetched path has it.
func (k *keeper) used(url string) {
	k.mu.Lock()
	if p, ok := k.byURL[url]; ok {
		k.paths[p].last = k.now()
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

// flush takes in what the marker holds, drops what was not read for
// keep, the least recently read past maxKept and what the cache no
// longer has, and rewrites the marker when that changed it. When another
// front end rewrote it meanwhile, it starts again from that.
func (k *keeper) flush(st keepStore) error {
	k.writing.Lock()
	defer k.writing.Unlock()
	for try := 1; ; try++ {
		cur, version, err := st.read()
		if err != nil {
			return fmt.Errorf("read %s: %w", KeepMarker, err)
		}
		k.merge(st, cur)
		k.dropGone(st)
		data := k.render()
		if bytes.Equal(data, cur) {
			return nil
		}
		err = st.write(data, version)
		if errors.Is(err, fs.ErrExist) && try < 5 {
			continue
		}
		if err != nil {
			return fmt.Errorf("write %s: %w", KeepMarker, err)
		}
		return nil
	}
}

// dropGone forgets the paths whose narinfo the cache no longer has.
func (k *keeper) dropGone(st keepStore) {
	k.mu.Lock()
	names := make([]string, 0, len(k.paths))
	for p := range k.paths {
		names = append(names, p)
	}
	k.mu.Unlock()
	var gone []string
	for _, p := range names {
		base := strings.TrimPrefix(p, k.storeDir+"/")
		if len(base) >= nixcache.HashLen && !st.has(base[:nixcache.HashLen]) {
			gone = append(gone, p)
		}
	}
	k.mu.Lock()
	for _, p := range gone {
		if _, ok := k.paths[p]; ok {
			k.drop(p)
		}
	}
	k.mu.Unlock()
}

// render trims the paths kept and returns the marker that names them.
func (k *keeper) render() []byte {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.trim(k.now())
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
	return []byte(b.String())
}

// KeepLoop rewrites the keep marker (Config.Keep, Config.MaxKept) of c
// until ctx ends: at once, taking in what the marker holds, then reads
// recorded since, and paths whose keep time is over or that no longer
// fit, go into it at most a minute later (sooner for a keep time under
// two minutes). Without either it returns at once.
func (f *Fetcher) KeepLoop(ctx context.Context, c *serve.Cache) {
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
		f.flushKeep(c)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
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
