package upstream

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
)

// fileSize is the FileSize of p's narinfo in an upstream cache.
func (u *upstreamCache) fileSize(p path) int64 {
	u.t.Helper()
	b, err := os.ReadFile(filepath.Join(u.dir, p.hash+".narinfo"))
	if err != nil {
		u.t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "FileSize: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	u.t.Fatalf("%s: no FileSize", p.base)
	return 0
}

// TestMaxKept: past the size bound, the least recently read fetched paths
// leave the keep marker, never one that a kept path references, and a
// real prune then deletes them, but not one another root keeps.
func TestMaxKept(t *testing.T) {
	key := testKey(t, "upstream-1")
	up := newUpstreamCache(t)
	lib := up.add("lib", nil, "xz", &key)
	app := up.add("app", []string{lib.base}, "xz", &key)
	a := up.add("a", nil, "xz", &key)
	b := up.add("b", nil, "xz", &key)
	c := up.add("c", nil, "xz", &key)
	cache, dir := newCache(t)
	half := up.fileSize(a) / 2
	for _, tt := range []struct {
		name      string
		order     []path // fetched in this order, a minute apart; then app is read
		maxKept   int64
		restarted int64 // when set, serve restarts with this bound before the flush
		want      []path
		deleted   []path // by the prune
	}{
		{"under the bound", []path{app, a, b, c}, 1 << 30, 0, []path{lib, app, a, b, c}, nil},
		{"over the bound", []path{a, b, app, c}, up.fileSize(lib) + up.fileSize(app) + up.fileSize(c) + half, 0,
			[]path{lib, app, c}, []path{a}},
		// lib was read least recently, but app, read last, references it.
		{"lowered, after a restart", []path{app, a, b, c}, 1 << 30, up.fileSize(lib) + up.fileSize(app) + half,
			[]path{lib, app}, []path{a, c}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			now := time.Now()
			newF := func(maxKept int64) *Fetcher {
				f, err := New(Config{URLs: []string{up.srv.URL}, Keys: []nixcache.PublicKey{key.PublicKey()},
					MaxKept: maxKept, CacheDir: dir, Log: quietLog()})
				if err != nil {
					t.Fatal(err)
				}
				f.now = func() time.Time { return now }
				return f
			}
			f := newF(tt.maxKept)
			for _, p := range tt.order {
				now = now.Add(time.Minute)
				if err := f.Fetch(context.Background(), p.hash, cache); err != nil {
					t.Fatal(err)
				}
			}
			now = now.Add(time.Minute)
			f.Used(app.narURL)
			if tt.restarted > 0 {
				f.keeper.flush(f.keeper.store(cache))
				f = newF(tt.restarted)
			}
			if err := f.keeper.flush(f.keeper.store(cache)); err != nil {
				t.Fatal(err)
			}
			data, err := os.ReadFile(filepath.Join(dir, KeepMarker))
			if err != nil {
				t.Fatal(err)
			}
			got, err := nixcache.ParseMarker(data, "/nix/store")
			if err != nil {
				t.Fatal(err)
			}
			var want []string
			for _, p := range tt.want {
				want = append(want, p.base)
			}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("marker: %v, want %v", got, want)
			}

			// A prune keeps what appeared while it ran, by modification
			// time: the fetches were minutes ago.
			backdate(t, dir, time.Hour)
			// b is rooted by another marker: the prune keeps it.
			other := filepath.Join(dir, "gcroots", "mine")
			os.MkdirAll(filepath.Dir(other), 0o755)
			os.WriteFile(other, []byte("/nix/store/"+b.base+"\n"), 0o644)
			if _, err := prune.Run(context.Background(), prune.Options{CacheDir: dir, Log: quietLog()}); err != nil {
				t.Fatal(err)
			}
			for _, p := range []path{lib, app, a, b, c} {
				ni, nar := stored(dir, p)
				gone := slices.ContainsFunc(tt.deleted, func(d path) bool { return d.hash == p.hash })
				if ni == gone || nar == gone {
					t.Errorf("%s after the prune: narinfo %v, NAR %v; want deleted %v", p.base, ni, nar, gone)
				}
			}
			// The next case starts from an empty cache.
			os.Remove(other)
			os.Remove(filepath.Join(dir, KeepMarker))
			if _, err := prune.Run(context.Background(), prune.Options{CacheDir: dir, Log: quietLog()}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// backdate sets back the modification times of the narinfos and NARs in
// dir by d.
func backdate(t *testing.T, dir string, d time.Duration) {
	t.Helper()
	old := time.Now().Add(-d)
	for _, pattern := range []string{"*.narinfo", "nar/*"} {
		names, _ := filepath.Glob(filepath.Join(dir, pattern))
		for _, n := range names {
			if err := os.Chtimes(n, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
}
