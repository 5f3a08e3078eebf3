package prune

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

// scenario is a cache to build, the prune to run on it and what must
// remain of it.
type scenario struct {
	paths    []pt.Path
	markers  map[string][]string // gcroots/<rel> -> path names
	files    map[string]string   // more files: rel -> content
	symlinks map[string]string   // rel -> link target
	ages     map[string]time.Duration
	opts     func(dir string, o *Options)

	kept      []string // paths whose narinfo and NAR stay
	gone      []string // paths whose narinfo and NAR go
	keptFiles []string // files that stay
	goneFiles []string // files that go
	invalidOK bool     // the scenario itself leaves a narinfo without its references
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// capturingLog returns a logger whose warnings (and debug notes, at
// debug level) are collected, each as its message followed by its fields
// ("key=value", sorted by key).
func capturingLog() (*logrus.Entry, func() []string) {
	l := logrus.New()
	l.SetOutput(io.Discard)
	h := &warnHook{}
	l.AddHook(h)
	return logrus.NewEntry(l), func() []string {
		h.mu.Lock()
		defer h.mu.Unlock()
		return append([]string(nil), h.msgs...)
	}
}

type warnHook struct {
	mu   sync.Mutex
	msgs []string
}

func (h *warnHook) Levels() []logrus.Level {
	return []logrus.Level{logrus.WarnLevel, logrus.DebugLevel}
}
func (h *warnHook) Fire(e *logrus.Entry) error {
	keys := make([]string, 0, len(e.Data))
	for k := range e.Data {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	msg := e.Message
	for _, k := range keys {
		msg += fmt.Sprintf(" %s=%v", k, e.Data[k])
	}
	h.mu.Lock()
	h.msgs = append(h.msgs, msg)
	h.mu.Unlock()
	return nil
}

// build writes the scenario's cache into a new directory, every file
// dated an hour ago (or its age in ages).
func (sc scenario) build(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	must(t, pt.Init(dir))
	for _, p := range sc.paths {
		must(t, pt.Write(dir, p))
	}
	for rel, names := range sc.markers {
		must(t, pt.WriteMarker(dir, rel, names...))
	}
	for rel, content := range sc.files {
		must(t, pt.WriteFile(dir, rel, []byte(content)))
	}
	for rel, target := range sc.symlinks {
		must(t, os.MkdirAll(filepath.Dir(filepath.Join(dir, rel)), 0o755))
		must(t, os.Symlink(target, filepath.Join(dir, rel)))
	}
	backdate(t, dir, time.Hour)
	for rel, age := range sc.ages {
		old := time.Now().Add(-age)
		must(t, os.Chtimes(filepath.Join(dir, filepath.FromSlash(rel)), old, old))
	}
	return dir
}

// backdate sets the modification time of every file under dir to age ago.
func backdate(t *testing.T, dir string, age time.Duration) {
	t.Helper()
	old := time.Now().Add(-age)
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			os.Chtimes(p, old, old)
		}
		return nil
	})
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func exists(dir, rel string) bool {
	_, err := os.Lstat(filepath.Join(dir, filepath.FromSlash(rel)))
	return err == nil
}

// check verifies what remains of the scenario's cache.
func (sc scenario) check(t *testing.T, dir string) {
	t.Helper()
	for _, n := range sc.kept {
		if !exists(dir, pt.NarInfoFile(n)) {
			t.Errorf("narinfo of %s was deleted, want kept", n)
		}
		if !exists(dir, pt.NarURL(n)) {
			t.Errorf("NAR of %s was deleted, want kept", n)
		}
	}
	for _, n := range sc.gone {
		if exists(dir, pt.NarInfoFile(n)) {
			t.Errorf("narinfo of %s was kept, want deleted", n)
		}
		if exists(dir, pt.NarURL(n)) {
			t.Errorf("NAR of %s was kept, want deleted", n)
		}
	}
	for _, rel := range sc.keptFiles {
		if !exists(dir, rel) {
			t.Errorf("%s was deleted, want kept", rel)
		}
	}
	for _, rel := range sc.goneFiles {
		if exists(dir, rel) {
			t.Errorf("%s was kept, want deleted", rel)
		}
	}
	if problems := validate(dir); len(problems) > 0 && !sc.invalidOK {
		t.Errorf("cache left invalid:\n%s", strings.Join(problems, "\n"))
	}
}

func (sc scenario) run(t *testing.T, dir string) Stats {
	t.Helper()
	o := Options{CacheDir: dir, Log: quietLog(), LockWait: time.Second}
	if sc.opts != nil {
		sc.opts(dir, &o)
	}
	st, err := Run(context.Background(), o)
	if err != nil {
		t.Fatalf("prune: %v", err)
	}
	return st
}

func p(name string, refs ...string) pt.Path { return pt.Path{Name: name, Refs: refs} }

func withDeriver(pa pt.Path, drv string) pt.Path { pa.Deriver = drv; return pa }

func TestPruneKeepsExactlyTheClosure(t *testing.T) {
	for _, tc := range append(rootScenarios(), fileScenarios()...) {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.sc.build(t)
			tc.sc.run(t, dir)
			tc.sc.check(t, dir)
		})
	}
}

// namedScenario is a scenario with the name of its subtest.
type namedScenario struct {
	name string
	sc   scenario
}

// rootScenarios are about what the markers make roots, and what the
// closure of the roots keeps.
func rootScenarios() []namedScenario {
	return []namedScenario{
		{"shared dependencies and a diamond", scenario{
			paths: []pt.Path{
				p("d"), p("b", "d"), p("c", "d"), p("a", "b", "c"),
				p("g1", "d"), p("g2"), p("g3", "g2", "b"),
			},
			markers: map[string][]string{"web": {"a"}},
			kept:    []string{"a", "b", "c", "d"},
			gone:    []string{"g1", "g2", "g3"},
		}},
		{"self-references", scenario{
			paths:   []pt.Path{p("s", "s", "t"), p("t", "t"), p("x", "x")},
			markers: map[string][]string{"m": {"s"}},
			kept:    []string{"s", "t"},
			gone:    []string{"x"},
		}},
		{"multi-line and nested markers", scenario{
			paths:   []pt.Path{p("a"), p("b"), p("c"), p("z")},
			markers: map[string][]string{"team/web/prod": {"a", "b"}, "deep/er/still/m": {"c"}},
			kept:    []string{"a", "b", "c"},
			gone:    []string{"z"},
		}},
		{"comments, junk lines and paths inside store paths", scenario{
			paths: []pt.Path{p("a"), p("b"), p("z")},
			files: map[string]string{"gcroots/m": "# a comment\n\nnot a path\n/elsewhere/x\n" +
				pt.StorePath("a") + "/bin/tool\r\n  " + pt.StorePath("b") + "  \n"},
			kept: []string{"a", "b"},
			gone: []string{"z"},
		}},
		{"symlinked and hidden markers are ignored", scenario{
			paths: []pt.Path{p("a"), p("b"), p("c"), p("d")},
			files: map[string]string{
				"outside/marker":      pt.StorePath("b") + "\n",
				"outside/dir/marker":  pt.StorePath("c") + "\n",
				"gcroots/.hidden":     pt.StorePath("d") + "\n",
				"gcroots/.lock/upl":   pt.StorePath("d") + "\n",
				"gcroots/.dir/marker": pt.StorePath("d") + "\n",
			},
			symlinks: map[string]string{
				"gcroots/link":    "../outside/marker",
				"gcroots/linkdir": "../outside/dir",
			},
			markers: map[string][]string{"m": {"a"}},
			kept:    []string{"a"},
			gone:    []string{"b", "c", "d"},
		}},
		{"markers past their age", scenario{
			paths:   []pt.Path{p("new", "shared"), p("old", "shared"), p("shared")},
			markers: map[string][]string{"fresh": {"new"}, "stale": {"old"}},
			ages:    map[string]time.Duration{"gcroots/fresh": time.Hour, "gcroots/stale": 49 * time.Hour},
			opts:    func(_ string, o *Options) { o.MaxRootAge = 48 * time.Hour },
			kept:    []string{"new", "shared"},
			gone:    []string{"old"},
		}},
		{"extra gcroots directories", scenario{
			paths:   []pt.Path{p("a"), p("b"), p("z")},
			markers: map[string][]string{"m": {"a"}},
			files:   map[string]string{"extra/sub/m": pt.StorePath("b") + "\n"},
			opts:    func(dir string, o *Options) { o.GCRoots = []string{filepath.Join(dir, "extra")} },
			kept:    []string{"a", "b"},
			gone:    []string{"z"},
		}},
		{"no markers: everything goes", scenario{
			paths: []pt.Path{p("a", "b"), p("b")},
			gone:  []string{"a", "b"},
		}},
	}
}

// fileScenarios are about the files around the narinfos and NARs:
// derivers' logs, listings, realisations, build traces, debuginfo,
// malformed narinfos, the cache's own files and recent files.
func fileScenarios() []namedScenario {
	rel, relJSON := pt.RealisationFile("a.drv", "out", "a")
	relG, relGJSON := pt.RealisationFile("g.drv", "out", "g")
	bt, btJSON := pt.BuildTraceFile("a.drv", "out", "a")
	btG, btGJSON := pt.BuildTraceFile("g.drv", "out", "g")
	dbg, dbgJSON := pt.DebugInfoFile("0123456789abcdef0123456789abcdef01234567", "a")
	dbgG, dbgGJSON := pt.DebugInfoFile("fedcba9876543210fedcba9876543210fedcba98", "g")

	return []namedScenario{
		{"derivers are kept with their closure, and their logs", scenario{
			paths: []pt.Path{
				withDeriver(p("a"), "a.drv"), p("a.drv", "src.drv"), p("src.drv"),
				withDeriver(p("g"), "g.drv"), p("g.drv"),
			},
			markers:   map[string][]string{"m": {"a"}},
			files:     map[string]string{pt.LogFile("a.drv"): "built\n", pt.LogFile("g.drv"): "built\n", "log/junk": "x"},
			kept:      []string{"a", "a.drv", "src.drv"},
			gone:      []string{"g", "g.drv"},
			keptFiles: []string{pt.LogFile("a.drv")},
			goneFiles: []string{pt.LogFile("g.drv"), "log/junk"},
		}},
		{"a log is kept for a deriver whose narinfo is absent", scenario{
			paths:     []pt.Path{withDeriver(p("a"), "a.drv"), withDeriver(p("g"), "g.drv")},
			markers:   map[string][]string{"m": {"a"}},
			files:     map[string]string{pt.LogFile("a.drv"): "built\n", pt.LogFile("g.drv"): "built\n"},
			kept:      []string{"a"},
			gone:      []string{"g"},
			keptFiles: []string{pt.LogFile("a.drv")},
			goneFiles: []string{pt.LogFile("g.drv")},
		}},
		{"listings, realisations, build traces, debuginfo", scenario{
			paths:   []pt.Path{p("a"), p("g")},
			markers: map[string][]string{"m": {"a"}},
			files: map[string]string{
				pt.ListingFile("a"): "{}", pt.ListingFile("g"): "{}", pt.ListingFile("never"): "{}",
				rel: string(relJSON), relG: string(relGJSON),
				bt: string(btJSON), btG: string(btGJSON),
				dbg: string(dbgJSON), dbgG: string(dbgGJSON),
				"realisations/broken.doi": "{not json",
			},
			kept:      []string{"a"},
			gone:      []string{"g"},
			keptFiles: []string{pt.ListingFile("a"), rel, bt, dbg, "realisations/broken.doi"},
			goneFiles: []string{pt.ListingFile("g"), pt.ListingFile("never"), relG, btG, filepath.ToSlash(filepath.Dir(btG)), dbgG},
		}},
		{"malformed narinfos are kept with their URL's file", scenario{
			paths:   []pt.Path{p("a"), p("g")},
			markers: map[string][]string{"m": {"a"}},
			files: map[string]string{
				pt.HashPart("bad1") + ".narinfo": "this is not a narinfo\nURL: nar/bad1.nar\n",
				"nar/bad1.nar":                   "nar",
				pt.HashPart("bad2") + ".narinfo": "StorePath: /nix/store/" + pt.HashPart("other") + "-x\nURL: nar/bad2.nar\nNarHash: sha256:x\nNarSize: 1\n",
				"nar/bad2.nar":                   "nar",
				"nar/orphan.nar.zst":             "nar",
			},
			kept:      []string{"a"},
			gone:      []string{"g"},
			keptFiles: []string{pt.HashPart("bad1") + ".narinfo", "nar/bad1.nar", pt.HashPart("bad2") + ".narinfo", "nar/bad2.nar"},
			goneFiles: []string{"nar/orphan.nar.zst"},
		}},
		{"cache metadata and uploads in progress are never touched", scenario{
			paths: []pt.Path{p("a")},
			files: map[string]string{
				".tmp/.x.narinfo.123": "partial", ".tmp/.y.nar.456": "partial",
				"unknown-file": "x", "nar/.hidden": "x", "gcroots/.lock/ci": "",
			},
			ages: map[string]time.Duration{".tmp/.y.nar.456": 25 * time.Hour},
			gone: []string{"a"},
			keptFiles: []string{"nix-cache-info", "gcroots", ".tmp/.x.narinfo.123", "unknown-file", "nar/.hidden",
				"gcroots/.lock/ci"},
			goneFiles: []string{".tmp/.y.nar.456"},
			opts: func(dir string, o *Options) {
				// The upload lock is stale: the prune goes on.
				old := time.Now().Add(-cachelock.StaleAfter - time.Minute)
				os.Chtimes(filepath.Join(dir, "gcroots/.lock/ci"), old, old)
			},
		}},
		{"grace keeps recent files", scenario{
			paths:     []pt.Path{p("a"), p("young", "dep"), p("dep"), p("old")},
			markers:   map[string][]string{"m": {"a"}},
			files:     map[string]string{"nar/young-orphan.nar": "x", "nar/old-orphan.nar": "x"},
			ages:      map[string]time.Duration{pt.NarInfoFile("young"): time.Minute, "nar/young-orphan.nar": time.Minute},
			opts:      func(_ string, o *Options) { o.Grace = 10 * time.Minute },
			kept:      []string{"a", "young", "dep"},
			gone:      []string{"old"},
			keptFiles: []string{"nar/young-orphan.nar"},
			goneFiles: []string{"nar/old-orphan.nar"},
		}},
		// Nix 2.35 uploads every NAR first, then the narinfos: a NAR may
		// wait hours for its narinfo while other NARs arrive.
		{"NARs no narinfo names stay while uploads are under way", scenario{
			paths:     []pt.Path{p("a"), p("old")},
			markers:   map[string][]string{"m": {"a"}},
			files:     map[string]string{"nar/waiting.nar": "x", ".tmp/.next.nar.1": "arriving"},
			opts:      func(_ string, o *Options) { o.Grace = 10 * time.Minute },
			kept:      []string{"a"},
			gone:      []string{"old"},
			keptFiles: []string{"nar/waiting.nar", ".tmp/.next.nar.1"},
		}},
		{"NARs no narinfo names go once uploads were quiet for the grace", scenario{
			paths:     []pt.Path{p("a"), p("old")},
			markers:   map[string][]string{"m": {"a"}},
			files:     map[string]string{"nar/waiting.nar": "x", ".tmp/.next.nar.1": "arriving"},
			ages:      map[string]time.Duration{".tmp": 20 * time.Minute},
			opts:      func(_ string, o *Options) { o.Grace = 10 * time.Minute },
			kept:      []string{"a"},
			gone:      []string{"old"},
			keptFiles: []string{".tmp/.next.nar.1"},
			goneFiles: []string{"nar/waiting.nar"},
		}},
	}
}

func TestPruneStatsAndDryRun(t *testing.T) {
	sc := scenario{
		paths:   []pt.Path{p("a", "b"), p("b"), p("g1", "g2"), p("g2")},
		markers: map[string][]string{"m": {"a"}},
	}
	dir := sc.build(t)
	var mu sync.Mutex
	var would []string
	st, err := Run(context.Background(), Options{CacheDir: dir, Log: quietLog(), DryRun: true,
		Deleted: func(rel string, size int64) {
			mu.Lock()
			would = append(would, rel)
			mu.Unlock()
		}})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(would)
	want := []string{pt.NarURL("g1"), pt.NarURL("g2"), pt.NarInfoFile("g1"), pt.NarInfoFile("g2")}
	sort.Strings(want)
	if strings.Join(would, " ") != strings.Join(want, " ") {
		t.Errorf("dry run would delete %v, want %v", would, want)
	}
	sc.kept = []string{"a", "b", "g1", "g2"}
	sc.check(t, dir)
	if st.Scanned != 4 || st.Kept != 2 || st.DeletedNarInfos != 2 || st.Deleted != 4 {
		t.Errorf("dry run stats = %+v", st)
	}

	st = sc.run(t, dir)
	sc.kept, sc.gone = []string{"a", "b"}, []string{"g1", "g2"}
	sc.check(t, dir)
	if st.Scanned != 4 || st.Kept != 2 || st.DeletedNarInfos != 2 || st.Deleted != 4 || st.BytesFreed == 0 ||
		st.Markers != 1 || st.Roots != 1 || st.Phase != PhaseDone {
		t.Errorf("stats = %+v", st)
	}
}

func TestPruneRefusesWhatIsNotACache(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, pt.HashPart("x")+".narinfo"), []byte("x"), 0o644)
	if _, err := Run(context.Background(), Options{CacheDir: dir, Log: quietLog()}); err == nil {
		t.Error("prune of a directory without nix-cache-info succeeded")
	}
	must(t, pt.Init(dir))
	if _, err := Run(context.Background(), Options{CacheDir: dir, Log: quietLog(), GCRoots: []string{filepath.Join(dir, "missing")}}); err == nil {
		t.Error("prune with a missing --gcroots directory succeeded")
	}
	if !exists(dir, pt.HashPart("x")+".narinfo") {
		t.Error("a failed prune deleted something")
	}
}

func TestMalformedNarInfoIsReported(t *testing.T) {
	sc := scenario{files: map[string]string{pt.HashPart("bad") + ".narinfo": "garbage\n"}}
	dir := sc.build(t)
	log, warnings := capturingLog()
	st, err := Run(context.Background(), Options{CacheDir: dir, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	if st.Malformed != 1 || len(warnings()) == 0 || !strings.Contains(strings.Join(warnings(), "\n"), pt.HashPart("bad")) {
		t.Errorf("malformed = %d, warnings %q", st.Malformed, warnings())
	}
}

// validate returns what makes a cache invalid: a narinfo whose URL file
// or whose references' narinfos are missing.
func validate(dir string) []string {
	var problems []string
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".narinfo") || strings.HasPrefix(name, ".") {
			continue
		}
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			continue
		}
		url, refs := "", []string(nil)
		for _, l := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "URL: "); ok {
				url = v
			}
			if v, ok := strings.CutPrefix(l, "References: "); ok {
				refs = strings.Fields(v)
			}
		}
		if !strings.HasPrefix(string(data), "StorePath: ") {
			continue // malformed on purpose
		}
		if url == "" || !exists(dir, url) {
			problems = append(problems, name+": its URL "+url+" is missing")
		}
		for _, r := range refs {
			if len(r) > 32 && !exists(dir, r[:32]+".narinfo") {
				problems = append(problems, name+": its reference "+r+" is missing")
			}
		}
	}
	return problems
}
