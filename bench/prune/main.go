// Command prune benchmarks `kiss-onion prune` on a generated cache of N
// narinfos with a realistic reference graph, about half of it garbage: a
// cold prune (no metadata cache, deletions included), then a warm prune of
// the same cache right after (nothing left to delete), each with the
// process's peak RSS; with -s3, the same on a bucket of SeaweedFS beside
// the directory. Run by hand, never in CI; see README.md.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

var (
	binary      = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary (built with 'go build -o' when missing)")
	workDir     = flag.String("dir", "/tmp/kiss-onion-prune-bench", "work directory (its cache/ and state/ are recreated)")
	n           = flag.Int("n", 1000000, "narinfos in the generated cache")
	generations = flag.Int("generations", 20, "system generations the paths are spread over")
	seed        = flag.Int64("seed", 1, "random seed of the generated graph")
	genWorkers  = flag.Int("gen-workers", 4, "goroutines writing the generated cache")
	dropCaches  = flag.Bool("drop-caches", false, "drop the kernel's page cache before the cold prune (needs root; slows the whole machine)")
	skipGen     = flag.Bool("skip-generate", false, "reuse the cache left in -dir by an earlier run (then the cold prune has nothing to delete)")
	s3          = flag.Bool("s3", false, "also upload the cache to a bucket of a SeaweedFS started here, and prune both, side by side")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// graph is the generated store: path i refers to refs[off[i]:off[i+1]].
type graph struct {
	off  []int32
	refs []int32
}

func name(i int32) string { return fmt.Sprintf("pkg%d", i) }

// generate builds the reference graph: paths come in generations (a
// system rebuilt after a nixpkgs update); within one, a path refers to a
// few earlier ones, the oldest (base libraries) most; now and then to a
// path of an older generation that did not change. The last path of each
// generation is its system, referring to the generation's most recent
// hundred paths (the top-level packages).
func generate(total, gens int, rng *rand.Rand) *graph {
	g := &graph{off: make([]int32, 0, total+1)}
	per := total / gens
	for i := 0; i < total; i++ {
		g.off = append(g.off, int32(len(g.refs)))
		gen := min(i/per, gens-1)
		start := gen * per
		j := i - start // index within the generation
		if j == per-1 || i == total-1 {
			for r := max(start, i-100); r < i; r++ {
				g.refs = append(g.refs, int32(r))
			}
			continue
		}
		if j == 0 {
			continue
		}
		k := 0
		if rng.Intn(10) != 0 {
			k = 1 + int(rng.ExpFloat64()*4)
		}
		for ; k > 0; k-- {
			var r int
			if gen > 0 && rng.Intn(10) < 2 {
				// A path carried over from an older generation: mostly recent ones.
				og := gen - 1 - int(float64(gen)*rng.Float64()*rng.Float64()*rng.Float64())
				u := rng.Float64()
				r = og*per + int(float64(per-1)*u*u)
			} else {
				u := rng.Float64()
				r = start + int(float64(j)*u*u)
			}
			g.refs = append(g.refs, int32(r))
		}
		if rng.Intn(20) == 0 {
			g.refs = append(g.refs, int32(i)) // a self-reference
		}
	}
	g.off = append(g.off, int32(len(g.refs)))
	return g
}

// closure marks what roots reach and returns how many paths it holds.
func (g *graph) closure(roots []int32, kept []bool) int {
	count := 0
	stack := append([]int32(nil), roots...)
	for len(stack) > 0 {
		i := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if kept[i] {
			continue
		}
		kept[i] = true
		count++
		for _, r := range g.refs[g.off[i]:g.off[i+1]] {
			if !kept[r] {
				stack = append(stack, r)
			}
		}
	}
	return count
}

func run() error {
	if _, err := os.Stat(*binary); err != nil {
		fmt.Fprintf(os.Stderr, "building %s\n", *binary)
		build := exec.Command("go", "build", "-o", *binary, "./cmd/kiss-onion")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build: %w", err)
		}
	}
	bin, _ := filepath.Abs(*binary)
	cache := filepath.Join(*workDir, "cache")
	state := filepath.Join(*workDir, "state")

	total, gens := *n, *generations
	if total < 10*gens {
		return fmt.Errorf("-n %d is too small for %d generations", total, gens)
	}
	g := generate(total, gens, rand.New(rand.NewSource(*seed)))
	per := total / gens
	kept := make([]bool, total)
	var roots []int32
	keptCount := 0
	for gen := gens - 1; gen >= 0 && keptCount < total/2; gen-- {
		sys := int32(min(gen*per+per-1, total-1))
		if gen == gens-1 {
			sys = int32(total - 1)
		}
		roots = append(roots, sys)
		keptCount = g.closure(roots, kept)
	}
	fmt.Printf("graph: %d paths, %d references, %d generations; %d markers keep %d paths (%.1f%%), %d garbage\n",
		total, len(g.refs), gens, len(roots), keptCount, 100*float64(keptCount)/float64(total), total-keptCount)

	if !*skipGen {
		start := time.Now()
		if err := removeAll(*workDir); err != nil {
			return err
		}
		if d := time.Since(start); d > time.Second {
			fmt.Printf("removed the last run's files in %s\n", d.Round(time.Second))
		}
		if err := pt.Init(cache); err != nil {
			return err
		}
		start = time.Now()
		if err := writeCache(cache, g, roots); err != nil {
			return err
		}
		fmt.Printf("generated %s in %s\n", cache, time.Since(start).Round(time.Second))
		// Write the generated files back first: the prune should not pay
		// for the generator's writeback.
		start = time.Now()
		syscall.Sync()
		fmt.Printf("synced in %s\n", time.Since(start).Round(time.Second))
		// Files modified just before the prune's start count as new.
		time.Sleep(100 * time.Millisecond)
	}
	os.RemoveAll(state)

	if *dropCaches {
		exec.Command("sync").Run()
		if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0o200); err != nil {
			return fmt.Errorf("drop caches: %w", err)
		}
	}
	if *s3 {
		return runS3(bin, cache, state, keptCount)
	}
	cold, err := measure(bin, cache, state)
	if err != nil {
		return err
	}
	warm, err := measure(bin, cache, state)
	if err != nil {
		return err
	}
	left := countNarInfos(cache)
	fmt.Println()
	fmt.Printf("machine: %d CPUs (GOMAXPROCS %d), %s, %s\n", runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version(), kernel())
	fmt.Printf("command: %s prune --state-dir %s %s\n", bin, state, cache)
	fmt.Printf("%-6s %10s %10s %10s %8s %12s  %s\n", "prune", "wall", "scan", "delete", "CPU", "peak RSS", "summary")
	for _, r := range []struct {
		what string
		m    measurement
	}{{"cold", cold}, {"warm", warm}} {
		fmt.Printf("%-6s %9.2fs %9.2fs %9.2fs %7.1fs %8d MiB  %s\n", r.what, r.m.wall.Seconds(), r.m.scan.Seconds(),
			(r.m.wall - r.m.scan).Seconds(), r.m.cpu.Seconds(), r.m.maxRSS>>20, r.m.summary)
	}
	for _, r := range []struct {
		what string
		m    measurement
	}{{"cold", cold}, {"warm", warm}} {
		if d := r.m.dev.String(); d != "" {
			fmt.Printf("%-6s %s\n", r.what, d)
		}
	}
	fmt.Printf("narinfos left: %d (expected %d)\n", left, keptCount)
	if left != keptCount {
		return fmt.Errorf("the prune left %d narinfos, the graph keeps %d", left, keptCount)
	}
	return nil
}

// writeCache writes every path (NAR, then narinfo) and the markers, on
// several goroutines.
func writeCache(cache string, g *graph, roots []int32) error {
	total := len(g.off) - 1
	var next atomic.Int64
	var done atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, *genWorkers)
	for w := 0; w < *genWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int32(next.Add(1) - 1)
				if int(i) >= total {
					return
				}
				refs := g.refs[g.off[i]:g.off[i+1]]
				names := make([]string, len(refs))
				for k, r := range refs {
					names[k] = name(r)
				}
				p := pt.Path{Name: name(i), Refs: names, Deriver: name(i) + ".drv", NarSize: 64 + int(i%449)}
				if err := pt.Write(cache, p); err != nil {
					errs <- err
					return
				}
				if d := done.Add(1); d%100000 == 0 {
					fmt.Fprintf(os.Stderr, "\rwritten %d/%d", d, total)
				}
			}
		}()
	}
	wg.Wait()
	fmt.Fprintln(os.Stderr)
	select {
	case err := <-errs:
		return err
	default:
	}
	for k, r := range roots {
		if err := pt.WriteMarker(cache, fmt.Sprintf("gen-%d", k), name(r)); err != nil {
			return err
		}
	}
	return nil
}

type measurement struct {
	wall    time.Duration
	scan    time.Duration // until the first deletion; the whole wall time if none
	maxRSS  int64
	cpu     time.Duration // user and system time of the prune
	dev     devDelta
	summary string
}

func measure(bin, cache, state string) (measurement, error) {
	cmd := exec.Command(bin, "prune", "--state-dir", state, cache)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return measurement{}, err
	}
	dev0 := readDevStat(cache)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return measurement{}, err
	}
	stop := make(chan struct{})
	firstDelete := make(chan time.Duration, 1)
	go func() { firstDelete <- watchFirstDelete(cache, start, stop) }()
	var summary string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		summary = strings.TrimPrefix(sc.Text(), "kiss-onion: ")
	}
	err = cmd.Wait()
	wall := time.Since(start)
	close(stop)
	scan := <-firstDelete
	if err != nil {
		return measurement{}, fmt.Errorf("prune: %w", err)
	}
	m := measurement{wall: wall, scan: scan, summary: summary, dev: readDevStat(cache).minus(dev0)}
	if scan == 0 {
		m.scan = wall
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		m.maxRSS = ru.Maxrss << 10 // KiB on Linux
		m.cpu = time.Duration(syscall.TimevalToNsec(ru.Utime) + syscall.TimevalToNsec(ru.Stime))
	}
	return m, nil
}

// watchFirstDelete returns how long after start the cache directory or
// nar/ first changed (the prune's first unlink: it creates nothing there),
// or 0 if neither did before stop. It polls, so it is late by up to the
// polling interval.
func watchFirstDelete(cache string, start time.Time, stop chan struct{}) time.Duration {
	dirs := []string{cache, filepath.Join(cache, "nar")}
	mtime := func(d string) int64 {
		var st syscall.Stat_t
		if syscall.Stat(d, &st) != nil {
			return 0
		}
		return st.Mtim.Nano()
	}
	first := make([]int64, len(dirs))
	for i, d := range dirs {
		first[i] = mtime(d)
	}
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return 0
		case <-t.C:
		}
		for i, d := range dirs {
			if mtime(d) != first[i] {
				return time.Since(start)
			}
		}
	}
}

// devDelta is what the block device under the cache did during a prune,
// from /sys/dev/block/M:m/stat (zero when it cannot be read).
type devDelta struct {
	writes, writeSectors, discards, discardMerges int64
	busy                                          time.Duration // io_ticks: time with requests in flight
	ok                                            bool
}

func (d devDelta) minus(e devDelta) devDelta {
	return devDelta{d.writes - e.writes, d.writeSectors - e.writeSectors, d.discards - e.discards,
		d.discardMerges - e.discardMerges, d.busy - e.busy, d.ok && e.ok}
}

func (d devDelta) String() string {
	if !d.ok {
		return ""
	}
	return fmt.Sprintf("device: %d discards (%d merged), %d writes (%d MiB), busy %.1fs",
		d.discards, d.discardMerges, d.writes, d.writeSectors>>11, d.busy.Seconds())
}

func readDevStat(path string) devDelta {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return devDelta{}
	}
	data, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%d:%d/stat", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil {
		return devDelta{}
	}
	f := strings.Fields(string(data))
	if len(f) < 15 {
		return devDelta{}
	}
	num := func(i int) int64 {
		var v int64
		fmt.Sscan(f[i], &v)
		return v
	}
	return devDelta{writes: num(4), writeSectors: num(6), discards: num(11), discardMerges: num(12),
		busy: time.Duration(num(9)) * time.Millisecond, ok: true}
}

// removeAll removes dir like os.RemoveAll, emptying the two big
// directories of a generated cache first on many goroutines: one unlink
// at a time, a million files take minutes on a disk with discard.
func removeAll(dir string) error {
	for _, sub := range []string{"cache/nar", "cache"} {
		d, err := os.Open(filepath.Join(dir, sub))
		if err != nil {
			continue
		}
		names, _ := d.Readdirnames(-1)
		fd := int(d.Fd())
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < 64; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1) - 1)
					if i >= len(names) {
						return
					}
					unix.Unlinkat(fd, names[i], 0) // directories fail here; RemoveAll takes them
				}
			}()
		}
		wg.Wait()
		d.Close()
	}
	return os.RemoveAll(dir)
}

func countNarInfos(dir string) int {
	f, err := os.Open(dir)
	if err != nil {
		return -1
	}
	defer f.Close()
	count := 0
	for {
		names, err := f.Readdirnames(4096)
		for _, nm := range names {
			if strings.HasSuffix(nm, ".narinfo") {
				count++
			}
		}
		if err != nil {
			return count
		}
	}
}

func kernel() string {
	data, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return runtime.GOOS
	}
	return "Linux " + strings.TrimSpace(string(data))
}
