package prune

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

// forgetScenario is a cache, a forget to run on it and what it must find
// and leave.
type forgetScenario struct {
	sc   scenario // the cache, and what stays and goes
	args []string
	opts func(o *ForgetOptions)

	wantErr       error    // nil, or what the error wraps
	wantPaths     []string // names, in deletion order where order matters
	wantReferrers []string // names
	wantMarkers   []string // "gcroots/<m> <name>"
	wantAbsent    []string
}

func forgetScenarios() []struct {
	name string
	fs   forgetScenario
} {
	rel, relJSON := pt.RealisationFile("a.drv", "out", "a")
	bt, btJSON := pt.BuildTraceFile("a.drv", "out", "a")
	dbg, dbgJSON := pt.DebugInfoFile("0123456789abcdef0123456789abcdef01234567", "a")
	dbgB, dbgBJSON := pt.DebugInfoFile("fedcba9876543210fedcba9876543210fedcba98", "b")
	chain := []pt.Path{p("c"), p("b", "c"), p("a", "b", "c")}
	sp := pt.StorePath
	return []struct {
		name string
		fs   forgetScenario
	}{
		{"a leaf goes with its NAR and listing, the rest stays", forgetScenario{
			sc: scenario{paths: chain, markers: map[string][]string{"m": {"a"}},
				files:     map[string]string{pt.ListingFile("a"): "{}", pt.ListingFile("b"): "{}"},
				gone:      []string{"a"},
				kept:      []string{"b", "c"},
				goneFiles: []string{pt.ListingFile("a")},
				keptFiles: []string{pt.ListingFile("b"), "gcroots/m"}},
			args:        []string{sp("a")},
			wantPaths:   []string{"a"},
			wantMarkers: []string{"gcroots/m a"},
		}},
		{"a referenced path is refused and nothing changes", forgetScenario{
			sc: scenario{paths: append(chain, p("other")),
				markers: map[string][]string{"web/1": {"a"}, "unrelated": {"other"}},
				kept:    []string{"a", "b", "c", "other"}},
			args:          []string{sp("c")},
			wantErr:       ErrReferenced,
			wantReferrers: []string{"a", "b"},
			wantMarkers:   []string{"gcroots/web/1 a"},
		}},
		{"with referrers, they go first", forgetScenario{
			sc: scenario{paths: append(chain, p("d"), p("e", "d")),
				markers: map[string][]string{"m": {"a"}},
				gone:    []string{"a", "b", "c"},
				kept:    []string{"d", "e"}},
			args:          []string{sp("c")},
			opts:          func(o *ForgetOptions) { o.WithReferrers = true },
			wantPaths:     []string{"a", "b", "c"},
			wantReferrers: []string{"a", "b"},
			wantMarkers:   []string{"gcroots/m a"},
		}},
		{"a path and its referrer asked together", forgetScenario{
			sc:        scenario{paths: chain, gone: []string{"a", "b"}, kept: []string{"c"}},
			args:      []string{sp("b"), sp("a")},
			wantPaths: []string{"a", "b"},
		}},
		{"a self-reference is no referrer", forgetScenario{
			sc:        scenario{paths: []pt.Path{p("s", "s", "t"), p("t")}, gone: []string{"s"}, kept: []string{"t"}},
			args:      []string{sp("s")},
			wantPaths: []string{"s"},
		}},
		{"a NAR another narinfo names stays", forgetScenario{
			sc: scenario{paths: []pt.Path{p("twin")},
				files:     map[string]string{pt.NarInfoFile("x"): sharingNar("x", "twin")},
				keptFiles: []string{pt.NarURL("twin"), pt.NarInfoFile("twin")},
				goneFiles: []string{pt.NarInfoFile("x")}},
			args:      []string{sp("x")},
			wantPaths: []string{"x"},
		}},
		{"realisations, build traces, debuginfo and the deriver's log go with the path", forgetScenario{
			sc: scenario{
				paths: []pt.Path{withDeriver(p("a"), "a.drv"), withDeriver(p("b"), "b.drv"), withDeriver(p("b2"), "b.drv")},
				files: map[string]string{rel: string(relJSON), bt: string(btJSON), dbg: string(dbgJSON), dbgB: string(dbgBJSON),
					pt.LogFile("a.drv"): "built\n", pt.LogFile("b.drv"): "built\n"},
				gone:      []string{"a", "b"},
				kept:      []string{"b2"},
				goneFiles: []string{rel, bt, dbg, dbgB, pt.LogFile("a.drv")},
				keptFiles: []string{pt.LogFile("b.drv")}},
			args:      []string{sp("a"), sp("b")},
			wantPaths: []string{"a", "b"},
		}},
		{"a NAR modified since the forget began stays", forgetScenario{
			sc: scenario{paths: []pt.Path{p("a")},
				ages:      map[string]time.Duration{pt.NarURL("a"): -time.Hour},
				goneFiles: []string{pt.NarInfoFile("a")},
				keptFiles: []string{pt.NarURL("a")}},
			args:      []string{sp("a")},
			wantPaths: []string{"a"},
		}},
		{"paths absent from the cache are reported", forgetScenario{
			sc:         scenario{paths: chain, gone: []string{"a"}, kept: []string{"b", "c"}},
			args:       []string{sp("a"), sp("nowhere")},
			wantPaths:  []string{"a"},
			wantAbsent: []string{sp("nowhere")},
		}},
		{"a path given as base name, hash or a file inside it", forgetScenario{
			sc:        scenario{paths: []pt.Path{p("a"), p("b"), p("c"), p("d")}, gone: []string{"a", "b", "c"}, kept: []string{"d"}},
			args:      []string{pt.BaseName("a"), pt.HashPart("b"), sp("c") + "/bin/tool"},
			wantPaths: []string{"a", "b", "c"},
		}},
		{"a dry run deletes nothing", forgetScenario{
			sc:            scenario{paths: chain, kept: []string{"a", "b", "c"}},
			args:          []string{sp("b")},
			opts:          func(o *ForgetOptions) { o.WithReferrers, o.DryRun = true, true },
			wantPaths:     []string{"a", "b"},
			wantReferrers: []string{"a"},
		}},
	}
}

// sharingNar returns a narinfo for name that names twin's NAR.
func sharingNar(name, twin string) string {
	ni := string(pt.NarInfo(p(name)))
	return strings.Replace(ni, pt.NarURL(name), pt.NarURL(twin), 1)
}

func TestForget(t *testing.T) {
	for _, tc := range forgetScenarios() {
		t.Run(tc.name, func(t *testing.T) {
			fs := tc.fs
			dir := fs.sc.build(t)
			var deleted []string
			var mu sync.Mutex
			o := ForgetOptions{CacheDir: dir, Paths: fs.args, Log: quietLog(), LockWait: time.Second,
				Deleted: func(rel string, _ int64) { mu.Lock(); deleted = append(deleted, rel); mu.Unlock() }}
			if fs.opts != nil {
				fs.opts(&o)
			}
			res, err := Forget(context.Background(), o)
			if fs.wantErr == nil && err != nil || fs.wantErr != nil && !errors.Is(err, fs.wantErr) {
				t.Fatalf("Forget: %v, want %v", err, fs.wantErr)
			}
			if got, want := res.Paths, storePaths(fs.wantPaths); !slices.Equal(got, want) {
				t.Errorf("Paths = %q, want %q", got, want)
			}
			wantReferrers := storePaths(fs.wantReferrers)
			slices.Sort(wantReferrers)
			if !slices.Equal(res.Referrers, wantReferrers) {
				t.Errorf("Referrers = %q, want %q", res.Referrers, wantReferrers)
			}
			var markers []string
			for _, m := range res.Markers {
				markers = append(markers, m.Marker+" "+m.Root)
			}
			var wantMarkers []string
			for _, m := range fs.wantMarkers {
				name, path, _ := strings.Cut(m, " ")
				wantMarkers = append(wantMarkers, name+" "+pt.StorePath(path))
			}
			if !slices.Equal(markers, wantMarkers) {
				t.Errorf("Markers = %q, want %q", markers, wantMarkers)
			}
			if !slices.Equal(res.Absent, fs.wantAbsent) {
				t.Errorf("Absent = %q, want %q", res.Absent, fs.wantAbsent)
			}
			if int(res.Files) != len(deleted) {
				t.Errorf("Files = %d, but Deleted was called %d times: %q", res.Files, len(deleted), deleted)
			}
			fs.sc.check(t, dir)
		})
	}
}

func storePaths(names []string) []string {
	var out []string
	for _, n := range names {
		out = append(out, pt.StorePath(n))
	}
	return out
}

func TestForgetRefusesBadArguments(t *testing.T) {
	dir := scenario{paths: []pt.Path{p("a")}}.build(t)
	for _, arg := range []string{"", "/elsewhere/x", pt.StoreDir + "/short", "not-a-hash", pt.HashPart("a")[:31]} {
		if _, err := Forget(context.Background(), ForgetOptions{CacheDir: dir, Paths: []string{arg}, Log: quietLog()}); err == nil {
			t.Errorf("Forget(%q) accepted it", arg)
		}
	}
	if !exists(dir, pt.NarInfoFile("a")) {
		t.Error("a refused forget deleted something")
	}
	if _, err := Forget(context.Background(), ForgetOptions{CacheDir: t.TempDir(), Paths: []string{pt.StorePath("a")}, Log: quietLog()}); err == nil {
		t.Error("Forget accepted a directory that is not a cache")
	}
}

func TestForgetWaitsForLocksAndPrunes(t *testing.T) {
	dir := scenario{paths: []pt.Path{p("a")}}.build(t)
	locks := cachelock.New(dir)
	must(t, locks.Acquire("upload", []byte("ci")))
	o := ForgetOptions{CacheDir: dir, Paths: []string{pt.StorePath("a")}, Log: quietLog(), LockWait: 200 * time.Millisecond}
	if _, err := Forget(context.Background(), o); !errors.Is(err, cachelock.ErrLocksHeld) {
		t.Fatalf("Forget beside a fresh lock: %v, want ErrLocksHeld", err)
	}
	if !exists(dir, pt.NarInfoFile("a")) {
		t.Fatal("deleted while a lock was held")
	}
	must(t, locks.Release("upload"))

	// A prune's hold: the forget waits for it to end.
	h, err := locks.Hold(context.Background(), 0, nil)
	must(t, err)
	go func() { time.Sleep(300 * time.Millisecond); h.Release() }()
	o.LockWait = 10 * time.Second
	start := time.Now()
	if _, err := Forget(context.Background(), o); err != nil {
		t.Fatalf("Forget after a prune: %v", err)
	}
	if time.Since(start) < 250*time.Millisecond {
		t.Error("Forget did not wait for the prune's hold")
	}
	if exists(dir, pt.NarInfoFile("a")) {
		t.Error("not forgotten")
	}
}

// TestForgetSeesReferrersCommittedDuringIt commits a referrer while the
// forget waits to delete: it must see it and refuse.
func TestForgetSeesReferrersCommittedDuringIt(t *testing.T) {
	dir := scenario{paths: []pt.Path{p("lib")}}.build(t)
	locks := cachelock.New(dir)
	must(t, os.MkdirAll(filepath.Join(dir, ".tmp"), 0o755))
	up := &uploader{dir: dir, locks: locks}
	release := make(chan struct{})
	guarded := make(chan struct{})
	go locks.Guard(func() error { close(guarded); <-release; return nil })
	<-guarded
	done := make(chan error, 1)
	go func() {
		_, err := Forget(context.Background(), ForgetOptions{CacheDir: dir, Paths: []string{pt.StorePath("lib")}, Log: quietLog(), LockWait: time.Second})
		done <- err
	}()
	time.Sleep(300 * time.Millisecond) // the scan is done; the forget waits for the guard
	must(t, up.atomicWrite(pt.NarURL("app"), []byte("nar"), nil))
	// As serve does: the narinfo's rename under the guard it already holds.
	must(t, os.WriteFile(filepath.Join(dir, pt.NarInfoFile("app")), pt.NarInfo(p("app", "lib")), 0o644))
	close(release)
	if err := <-done; !errors.Is(err, ErrReferenced) {
		t.Fatalf("Forget: %v, want ErrReferenced", err)
	}
	if problems := validate(dir); len(problems) > 0 {
		t.Errorf("cache left invalid: %q", problems)
	}
}

// TestForgetUploadsAndPrunesRace runs forgets, uploads (under a lock and
// without) and prunes at once: the cache must stay closed under
// references, and no upload under a lock may be refused.
func TestForgetUploadsAndPrunesRace(t *testing.T) {
	rounds := 10
	if testing.Short() {
		rounds = 4
	}
	dir := t.TempDir()
	must(t, pt.Init(dir))
	must(t, os.MkdirAll(filepath.Join(dir, ".tmp"), 0o755))
	locks := cachelock.New(dir)
	up := &uploader{dir: dir, locks: locks}
	rng := rand.New(rand.NewSource(4))
	base := randomClosure(rng, "base", 20)
	for _, p := range base {
		must(t, up.upload(p))
	}
	must(t, up.marker("base", "base-19"))
	live := []string{}
	for n := range closureOf(base, "base-19") {
		live = append(live, n)
	}

	ctx, stop := context.WithCancel(context.Background())
	var background sync.WaitGroup
	var forgot, refused, prunes atomic.Int64
	tolerated := func(err error) bool {
		return errors.Is(err, cachelock.ErrPruneRunning) || errors.Is(err, cachelock.ErrLocksHeld)
	}
	background.Add(1)
	go func() { // prunes
		defer background.Done()
		state := t.TempDir()
		for ctx.Err() == nil {
			_, err := Run(context.Background(), Options{CacheDir: dir, StateDir: state, Log: quietLog(), LockWait: 2 * time.Second})
			if err != nil && !tolerated(err) {
				t.Errorf("prune: %v", err)
			}
			if err == nil {
				prunes.Add(1)
			}
			time.Sleep(time.Duration(rand.Intn(30)) * time.Millisecond)
		}
	}()
	for w := 0; w < 2; w++ {
		background.Add(1)
		go func(w int) { // forgets of whatever is there but the base
			defer background.Done()
			rng := rand.New(rand.NewSource(int64(20 + w)))
			for ctx.Err() == nil {
				ents, _ := os.ReadDir(dir)
				var names []string
				for _, e := range ents {
					if strings.HasSuffix(e.Name(), ".narinfo") {
						names = append(names, e.Name())
					}
				}
				var args []string
				for i := 0; i < 2 && len(names) > 0; i++ {
					name := names[rng.Intn(len(names))]
					data, err := os.ReadFile(filepath.Join(dir, name))
					if err != nil || strings.Contains(strings.SplitN(string(data), "\n", 2)[0], "-base-") {
						continue // the base stays: the writers refer to it
					}
					args = append(args, strings.TrimSuffix(name, ".narinfo"))
				}
				if len(args) == 0 {
					time.Sleep(5 * time.Millisecond)
					continue
				}
				_, err := Forget(context.Background(), ForgetOptions{CacheDir: dir, Paths: args,
					WithReferrers: rng.Intn(2) == 0, Log: quietLog(), LockWait: 2 * time.Second})
				switch {
				case err == nil:
					forgot.Add(1)
				case errors.Is(err, ErrReferenced) || tolerated(err):
					refused.Add(1)
				default:
					t.Errorf("forget: %v", err)
				}
				time.Sleep(time.Duration(rng.Intn(10)) * time.Millisecond)
			}
		}(w)
	}
	background.Add(1)
	go func() { // loose uploads, as a plain nix copy: refusals are fine
		defer background.Done()
		rng := rand.New(rand.NewSource(5))
		for i := 0; ctx.Err() == nil; i++ {
			for _, p := range randomClosure(rng, fmt.Sprintf("loose%d", i), 3, live[rng.Intn(len(live))]) {
				if err := up.upload(p); err != nil && !errors.Is(err, errRefused) {
					t.Errorf("loose upload: %v", err)
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	var writers sync.WaitGroup
	for w := 0; w < 2; w++ {
		writers.Add(1)
		go func(w int) { // uploads under a lock: never refused
			defer writers.Done()
			rng := rand.New(rand.NewSource(int64(10 + w)))
			name := fmt.Sprintf("writer%d", w)
			for r := 0; r < rounds; r++ {
				acquire(t, locks, name, 30*time.Second)
				ps := randomClosure(rng, fmt.Sprintf("%s-r%d", name, r), 6, live[rng.Intn(len(live))])
				for _, p := range ps {
					if err := up.upload(p); err != nil {
						t.Errorf("%s: upload under lock refused: %v", name, err)
					}
				}
				if err := up.marker(name, ps[len(ps)-1].Name); err != nil {
					t.Errorf("%s: marker: %v", name, err)
				}
				must(t, locks.Release(name))
				time.Sleep(time.Duration(rng.Intn(10)) * time.Millisecond)
			}
		}(w)
	}
	writers.Wait()
	for end := time.Now().Add(20 * time.Second); forgot.Load() < 10 && time.Now().Before(end); {
		time.Sleep(10 * time.Millisecond)
	}
	stop()
	background.Wait()
	t.Logf("%d forgets done, %d refused or turned away; %d prunes", forgot.Load(), refused.Load(), prunes.Load())
	if forgot.Load() == 0 {
		t.Error("no forget ran")
	}
	for _, pr := range validate(dir) {
		t.Error(pr)
	}
}
