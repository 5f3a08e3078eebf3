package prune

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

// randomClosure returns n paths named prefix-0.. prefix-(n-1), each
// referring to up to 3 earlier ones (and sometimes itself), and to the
// names in extern.
func randomClosure(rng *rand.Rand, prefix string, n int, extern ...string) []pt.Path {
	paths := make([]pt.Path, n)
	for i := range paths {
		name := fmt.Sprintf("%s-%d", prefix, i)
		var refs []string
		for j := rng.Intn(4); j > 0 && i > 0; j-- {
			refs = append(refs, paths[rng.Intn(i)].Name)
		}
		if rng.Intn(5) == 0 {
			refs = append(refs, name)
		}
		if i == 0 {
			refs = append(refs, extern...)
		}
		paths[i] = pt.Path{Name: name, Refs: refs}
	}
	return paths
}

// closureOf returns the names reachable from roots in paths.
func closureOf(paths []pt.Path, roots ...string) map[string]bool {
	byName := map[string]pt.Path{}
	for _, p := range paths {
		byName[p.Name] = p
	}
	seen := map[string]bool{}
	var visit func(string)
	visit = func(n string) {
		if seen[n] {
			return
		}
		seen[n] = true
		for _, r := range byName[n].Refs {
			visit(r)
		}
	}
	for _, r := range roots {
		visit(r)
	}
	return seen
}

// markerClosureProblems checks that every marker's closure is complete:
// each narinfo, its NAR and each reference's narinfo are there.
func markerClosureProblems(dir string) []string {
	var problems []string
	markers, _ := filepath.Glob(filepath.Join(dir, "gcroots", "*"))
	for _, m := range markers {
		data, err := os.ReadFile(m)
		if err != nil {
			continue
		}
		todo := []string{}
		for _, l := range strings.Fields(string(data)) {
			todo = append(todo, strings.TrimPrefix(l, pt.StoreDir+"/"))
		}
		seen := map[string]bool{}
		for len(todo) > 0 {
			base := todo[len(todo)-1]
			todo = todo[:len(todo)-1]
			if seen[base] {
				continue
			}
			seen[base] = true
			data, err := os.ReadFile(filepath.Join(dir, base[:32]+".narinfo"))
			if err != nil {
				problems = append(problems, fmt.Sprintf("marker %s: %s: %v", filepath.Base(m), base, err))
				continue
			}
			for _, l := range strings.Split(string(data), "\n") {
				if v, ok := strings.CutPrefix(l, "URL: "); ok && !exists(dir, v) {
					problems = append(problems, fmt.Sprintf("marker %s: %s: NAR %s missing", filepath.Base(m), base, v))
				}
				if v, ok := strings.CutPrefix(l, "References: "); ok {
					todo = append(todo, strings.Fields(v)...)
				}
			}
		}
	}
	return problems
}

// uploader emulates serve: NARs are renamed into place from .tmp/, and a
// narinfo or marker is committed under Guard only when what it needs is
// there.
type uploader struct {
	dir   string
	locks *cachelock.Locks
}

var errRefused = errors.New("refused")

func (u *uploader) atomicWrite(rel string, data []byte, check func() error) error {
	tmp, err := os.CreateTemp(filepath.Join(u.dir, ".tmp"), ".up.*")
	if err != nil {
		return err
	}
	tmp.Write(data)
	tmp.Close()
	defer os.Remove(tmp.Name())
	final := filepath.Join(u.dir, filepath.FromSlash(rel))
	if check == nil {
		return os.Rename(tmp.Name(), final)
	}
	return u.locks.Guard(func() error {
		if err := check(); err != nil {
			return err
		}
		return os.Rename(tmp.Name(), final)
	})
}

func (u *uploader) upload(p pt.Path) error {
	if err := u.atomicWrite(pt.NarURL(p.Name), []byte("nar"), nil); err != nil {
		return err
	}
	return u.atomicWrite(pt.NarInfoFile(p.Name), pt.NarInfo(p), func() error {
		if !exists(u.dir, pt.NarURL(p.Name)) {
			return fmt.Errorf("%w: %s: NAR missing", errRefused, p.Name)
		}
		for _, r := range p.Refs {
			if r != p.Name && !exists(u.dir, pt.NarInfoFile(r)) {
				return fmt.Errorf("%w: %s: reference %s missing", errRefused, p.Name, r)
			}
		}
		return nil
	})
}

func (u *uploader) marker(name string, roots ...string) error {
	var b strings.Builder
	for _, r := range roots {
		b.WriteString(pt.StorePath(r) + "\n")
	}
	return u.atomicWrite("gcroots/"+name, []byte(b.String()), func() error {
		for _, r := range roots {
			if !exists(u.dir, pt.NarInfoFile(r)) {
				return fmt.Errorf("%w: marker %s: %s missing", errRefused, name, r)
			}
		}
		return nil
	})
}

// acquire takes the lock, retrying while a prune holds the cache.
func acquire(t *testing.T, l *cachelock.Locks, name string, deadline time.Duration) {
	t.Helper()
	end := time.Now().Add(deadline)
	for {
		err := l.Acquire(name, []byte("test"))
		if err == nil {
			return
		}
		if !errors.Is(err, cachelock.ErrBusy) || time.Now().After(end) {
			t.Fatalf("acquire %s: %v", name, err)
		}
		time.Sleep(time.Duration(5+rand.Intn(20)) * time.Millisecond)
	}
}

func TestUploadsAndPrunesRace(t *testing.T) {
	rounds := 12
	if testing.Short() {
		rounds = 4
	}
	dir := t.TempDir()
	must(t, pt.Init(dir))
	must(t, os.MkdirAll(filepath.Join(dir, ".tmp"), 0o755))
	locks := cachelock.New(dir)
	up := &uploader{dir: dir, locks: locks}
	rng := rand.New(rand.NewSource(1))
	base := randomClosure(rng, "base", 20)
	for _, p := range base {
		must(t, up.upload(p))
	}
	must(t, up.marker("base", "base-19"))
	var live []string // base paths the marker keeps
	for n := range closureOf(base, "base-19") {
		live = append(live, n)
	}

	ctx, stop := context.WithCancel(context.Background())
	var prunes, busy atomic.Int64
	var pruners sync.WaitGroup
	for i := 0; i < 2; i++ {
		pruners.Add(1)
		go func() {
			defer pruners.Done()
			state := t.TempDir()
			for ctx.Err() == nil {
				_, err := Run(context.Background(), Options{CacheDir: dir, StateDir: state, Log: quietLog(), LockWait: 3 * time.Second})
				switch {
				case err == nil:
					prunes.Add(1)
					time.Sleep(time.Duration(rand.Intn(20)) * time.Millisecond)
				case errors.Is(err, cachelock.ErrPruneRunning), errors.Is(err, cachelock.ErrLocksHeld):
					busy.Add(1)
					time.Sleep(time.Millisecond)
				default:
					t.Errorf("prune: %v", err)
				}
			}
		}()
	}

	// An uploader without a lock, like a plain nix copy: its narinfos may
	// be refused (a prune took what they need), never leave a hole.
	var loose sync.WaitGroup
	loose.Add(1)
	go func() {
		defer loose.Done()
		rng := rand.New(rand.NewSource(2))
		for i := 0; ctx.Err() == nil; i++ {
			ps := randomClosure(rng, fmt.Sprintf("loose%d", i), 3, base[rng.Intn(len(base))].Name)
			for _, p := range ps {
				if err := up.upload(p); err != nil && !errors.Is(err, errRefused) {
					t.Errorf("loose upload: %v", err)
				}
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()

	var writers sync.WaitGroup
	for w := 0; w < 3; w++ {
		writers.Add(1)
		go func(w int) {
			defer writers.Done()
			rng := rand.New(rand.NewSource(int64(10 + w)))
			name := fmt.Sprintf("writer%d", w)
			prev := ""
			for r := 0; r < rounds; r++ {
				acquire(t, locks, name, 30*time.Second)
				extern := []string{live[rng.Intn(len(live))]}
				if prev != "" {
					extern = append(extern, prev)
				}
				ps := randomClosure(rng, fmt.Sprintf("%s-r%d", name, r), 6, extern...)
				for i, p := range ps {
					if i == 3 {
						// Refresh the lock halfway, as with-lock does.
						if err := locks.Acquire(name, []byte("refresh")); err != nil {
							t.Errorf("%s: refresh: %v", name, err)
						}
					}
					if err := up.upload(p); err != nil {
						t.Errorf("%s: upload under lock refused: %v", name, err)
					}
				}
				top := ps[len(ps)-1].Name
				// The marker names the whole new closure's top, which
				// reaches the previous round's top through ps[0].
				if err := up.marker(name, append([]string{top}, ps[0].Name)...); err != nil {
					t.Errorf("%s: marker: %v", name, err)
				}
				prev = top
				if err := locks.Release(name); err != nil {
					t.Error(err)
				}
				time.Sleep(time.Duration(rng.Intn(10)) * time.Millisecond)
			}
		}(w)
	}
	writers.Wait()
	stop()
	loose.Wait()
	pruners.Wait()
	if _, err := Run(context.Background(), Options{CacheDir: dir, Log: quietLog()}); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d prunes, %d turned away", prunes.Load(), busy.Load())
	if prunes.Load() == 0 {
		t.Error("no prune ran")
	}
	for _, pr := range append(markerClosureProblems(dir), validate(dir)...) {
		t.Error(pr)
	}
	// The final prune left only what the markers reach.
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".narinfo") && strings.Contains(e.Name(), "loose") {
			t.Errorf("garbage %s survived", e.Name())
		}
	}
}

// TestHelperPruneProcess is the prune process that TestKilledPrune kills;
// it does nothing in a normal test run.
func TestHelperPruneProcess(t *testing.T) {
	dir := os.Getenv("KISS_ONION_PRUNE_HELPER")
	if dir == "" {
		return // only a helper process for TestKilledPrune
	}
	workers, _ := strconv.Atoi(os.Getenv("KISS_ONION_PRUNE_WORKERS"))
	var once sync.Once
	_, err := Run(context.Background(), Options{CacheDir: dir, StateDir: os.Getenv("KISS_ONION_PRUNE_STATE"),
		Log: quietLog(), Workers: workers, Deleted: func(string, int64) {
			// Tell the parent that the deletions have started.
			once.Do(func() { os.Stdout.WriteString("deleting\n") })
		}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

func TestKilledPrune(t *testing.T) {
	dir := t.TempDir()
	state := t.TempDir()
	must(t, pt.Init(dir))
	rng := rand.New(rand.NewSource(3))
	kept := randomClosure(rng, "kept", 500)
	for _, p := range kept {
		must(t, pt.Write(dir, p))
	}
	must(t, pt.WriteMarker(dir, "m", "kept-499", "kept-250"))
	want := closureOf(kept, "kept-499", "kept-250")

	// runHelper runs a prune process and kills it after kill, counted
	// from its start, or from its first deletion if afterDelete.
	runHelper := func(kill time.Duration, afterDelete bool) (killed bool) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPruneProcess$")
		cmd.Env = append(os.Environ(), "KISS_ONION_PRUNE_HELPER="+dir, "KISS_ONION_PRUNE_STATE="+state,
			"KISS_ONION_PRUNE_WORKERS=2")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.StdoutPipe()
		must(t, err)
		must(t, cmd.Start())
		deleting := make(chan struct{})
		go func() {
			buf := make([]byte, 64)
			n, _ := out.Read(buf)
			if strings.Contains(string(buf[:n]), "deleting") {
				close(deleting)
			}
			io.Copy(io.Discard, out)
		}()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		timer := time.After(kill)
		if afterDelete {
			timer = nil
		}
		for {
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("prune process: %v\n%s", err, stderr.String())
				}
				return false
			case <-deleting:
				deleting = nil
				if afterDelete {
					timer = time.After(kill)
				}
			case <-timer:
				cmd.Process.Signal(syscall.SIGKILL)
				<-done
				return true
			}
		}
	}

	countNarInfos := func() int {
		ents, _ := os.ReadDir(dir)
		n := 0
		for _, e := range ents {
			if strings.HasSuffix(e.Name(), ".narinfo") {
				n++
			}
		}
		return n
	}
	kills := 0
	var full time.Duration // a complete run's time, from round 0
	var partial []string
	for round := 0; round <= 8; round++ {
		// Fresh garbage each round: chains, so that the deletion takes
		// several levels.
		garbage := randomClosure(rng, fmt.Sprintf("garbage%d", round), 2000, "kept-499")
		for _, p := range garbage {
			must(t, pt.Write(dir, p))
		}
		backdate(t, dir, time.Hour)
		before := countNarInfos()
		start := time.Now()
		if round == 0 {
			runHelper(time.Minute, false)
			full = time.Since(start)
			continue
		}
		// Odd rounds: anywhere in the run; even rounds: in the deletions.
		var killed bool
		if round%2 == 1 {
			killed = runHelper(time.Duration(rng.Int63n(int64(full))), false)
		} else {
			killed = runHelper(time.Duration(rng.Int63n(int64(15*time.Millisecond))), true)
		}
		if killed {
			kills++
		}
		partial = append(partial, fmt.Sprintf("%d/%d", before-countNarInfos(), before-len(want)))
		for _, pr := range append(markerClosureProblems(dir), validate(dir)...) {
			t.Errorf("round %d: %s", round, pr)
		}
		// A killed prune does not hold the cache.
		if err := cachelock.New(dir).Acquire("after", nil); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		cachelock.New(dir).Release("after")
		// The next prune finishes the job.
		runHelper(time.Minute, false)
		if n := countNarInfos(); n != len(want) {
			t.Errorf("round %d: %d narinfos left after a complete prune, want %d", round, n, len(want))
		}
	}
	t.Logf("%d of 8 prunes killed within %s (a whole run); garbage narinfos deleted before the kill: %s",
		kills, full, strings.Join(partial, " "))
	var keptNames, goneNames []string
	for _, p := range kept {
		if want[p.Name] {
			keptNames = append(keptNames, p.Name)
		} else {
			goneNames = append(goneNames, p.Name)
		}
	}
	(scenario{kept: keptNames, gone: goneNames}).check(t, dir)
	if n := countNarInfos(); n != len(want) {
		t.Errorf("%d narinfos left, want %d", n, len(want))
	}
}
