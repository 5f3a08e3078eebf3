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
// the paths fetched from upstream for Config.Keep after their last read.
const KeepMarker = "gcroots/upstream/recent"

// keeper remembers when each fetched path was last fetched or read, and
// writes the marker that keeps the recent ones. A read is a map update
// under a mutex, on the read of a NAR, never on a narinfo hit; the marker
// is rewritten after a fetch and then at most every keepFlush.
//
// The marker is a plain marker (one store path a line) with a comment
// before each path: "# <unix seconds of the last read> <NAR URL>", from
// which a restarted serve takes up where it left off.
type keeper struct {
	file string
	keep time.Duration
	now  func() time.Time

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
}

func newKeeper(cacheDir string, keep time.Duration, now func() time.Time) *keeper {
	k := &keeper{file: filepath.Join(cacheDir, filepath.FromSlash(KeepMarker)), keep: keep, now: now,
		paths: map[string]*keptPath{}, byURL: map[string]string{}}
	k.load()
	return k
}

// load reads the marker a previous serve wrote; what does not parse is
// dropped.
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
			k.paths[l] = &keptPath{url: url, last: last}
			k.byURL[url] = l
		}
		url = ""
	}
}

// fetched records a path just stored.
func (k *keeper) fetched(storePath, url string) {
	k.mu.Lock()
	k.paths[storePath] = &keptPath{url: url, last: k.now()}
	k.byURL[url] = storePath
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

// flush drops what was not read for keep and rewrites the marker when
// anything changed.
func (k *keeper) flush() error {
	k.writing.Lock()
	defer k.writing.Unlock()
	k.mu.Lock()
	now := k.now()
	changed := k.dirty
	for p, e := range k.paths {
		if now.Sub(e.last) > k.keep {
			delete(k.paths, p)
			delete(k.byURL, e.url)
			changed = true
		}
	}
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
	fmt.Fprintf(&b, "# kiss-onion serve: paths fetched from upstream, kept for %s after their last read\n", k.keep)
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

// KeepLoop rewrites the keep marker (Config.Keep) until ctx ends: reads
// recorded since, and paths whose keep time is over, go into it at most
// a minute later (sooner for a keep time under two minutes). Without
// Config.Keep it returns at once.
func (f *Fetcher) KeepLoop(ctx context.Context) {
	if f.keeper == nil {
		return
	}
	every := min(f.cfg.Keep/2, time.Minute)
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
