// Command s3serve benchmarks `kiss-onion serve` on a flat cache directory
// against `kiss-onion serve --store s3://...` on a SeaweedFS it starts
// itself, the same closure in both, alternating between them in one run.
// See ../README.md.
package main

import (
	"bufio"
	"bytes"
	"flag"
	"fmt"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

var (
	binary   = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	weedBin  = flag.String("weed", os.Getenv("KISS_ONION_WEED"), "the weed binary (run.sh passes what scripts/seaweedfs prints)")
	workDir  = flag.String("dir", "/tmp/kiss-onion-s3-bench", "work directory (the built closure is reused; the SeaweedFS data is made afresh)")
	nPaths   = flag.Int("paths", 300, "store paths in the closure")
	rounds   = flag.Int("rounds", 3, "rounds of each measurement (the best counts)")
	duration = flag.String("duration", "10s", "wrk duration")
	only     = flag.String("only", "", "run only the reads, only the writes, or only the store alone (reads|writes|probe)")
	memLimit = flag.String("weed-memlimit", "192MiB", "weed's GOMEMLIMIT, as internal/s3test sets it (off: none)")
)

func main() {
	flag.Parse()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		cleanup()
		os.Exit(1)
	}()
	err := run()
	cleanup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// running holds how to stop what the benchmark started and has not
// stopped yet, so that an interrupt leaves no serve or weed behind.
var running = struct {
	sync.Mutex
	m map[int]func()
}{m: map[int]func(){}}

func track(pid int, stop func()) func() {
	running.Lock()
	running.m[pid] = stop
	running.Unlock()
	return func() {
		running.Lock()
		delete(running.m, pid)
		running.Unlock()
		stop()
	}
}

func cleanup() {
	running.Lock()
	m := running.m
	running.m = map[int]func(){}
	running.Unlock()
	for _, stop := range m {
		stop()
	}
}

// result is one line of the table: a value for the directory and one for
// the bucket, with the peak RSS of each serve and of weed.
type result struct {
	what, unit             string
	dir, bkt               float64
	higherBetter           bool
	rssDir, rssBkt, rssWee int64 // KiB
	// CPU seconds a run, on average: serve on the directory, serve on
	// the bucket, and weed during the bucket's runs.
	cpuDir, cpuBkt, cpuWee float64
}

// bench is what the measurements share.
type bench struct {
	bin, creds string
	w          *weed
}

func run() error {
	if *weedBin == "" {
		return fmt.Errorf("give -weed (or KISS_ONION_WEED): the path scripts/seaweedfs prints")
	}
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*workDir, 0o755); err != nil {
		return err
	}
	loadBefore := loadAvg()
	start := time.Now()
	top, err := buildClosure()
	if err != nil {
		return err
	}
	caches := map[string]string{}
	for _, comp := range []string{"zstd", "none"} {
		dir := filepath.Join(*workDir, "cache-"+comp)
		if _, err := os.Stat(filepath.Join(dir, "nix-cache-info")); err != nil {
			fmt.Fprintf(os.Stderr, "copying the closure into %s\n", dir)
			if out, err := nixCmd("nix", "copy", "--to", "file://"+dir+"?compression="+comp, top).CombinedOutput(); err != nil {
				return fmt.Errorf("nix copy to %s: %v\n%s", dir, err, out)
			}
		}
		caches[comp] = dir
	}

	fmt.Fprintln(os.Stderr, "starting SeaweedFS")
	w, err := startWeed(*weedBin, filepath.Join(*workDir, "weed"))
	if err != nil {
		return err
	}
	b := &bench{bin: bin, creds: filepath.Join(*workDir, "s3-credentials"), w: w}
	if err := w.writeCredentials(b.creds); err != nil {
		return err
	}

	var results []result
	for _, comp := range []string{"zstd", "none"} {
		if *only == "writes" || (*only == "probe" && comp != "none") {
			continue
		}
		t0 := time.Now()
		if err := w.fill(caches[comp], comp); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "filled the bucket's %s/ from %s in %s\n", comp, caches[comp], time.Since(t0).Round(time.Millisecond))
		if *only == "probe" {
			continue
		}
		rs, err := b.reads(comp, caches[comp], top)
		if err != nil {
			return err
		}
		results = append(results, rs...)
	}
	var probes []probe
	if *only != "writes" {
		if probes, err = b.probeStore(caches["none"]); err != nil {
			return err
		}
	}
	if *only == "" || *only == "writes" {
		r, err := b.writes(top)
		if err != nil {
			return err
		}
		results = append(results, r)
	}
	printTable(results, probes, loadBefore, loadAvg(), time.Since(start))
	return nil
}

// nixCmd runs nix on the benchmark's own chroot store.
func nixCmd(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, append([]string{"--store", filepath.Join(*workDir, "store")}, args...)...)
	cmd.Env = append(os.Environ(),
		"NIX_CONFIG=experimental-features = nix-command\nbuild-users-group =\nsandbox-paths = /bin/busybox\nsubstituters =\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0",
		"XDG_CACHE_HOME="+filepath.Join(*workDir, "xdg-"+strconv.Itoa(rand.Int())))
	return cmd
}

// buildClosure builds (once) N store paths, each referencing up to three
// earlier ones, with sizes from a few hundred bytes to 100 MB: the same
// closure as bench/serve's.
func buildClosure() (string, error) {
	marker := filepath.Join(*workDir, fmt.Sprintf("closure-%d", *nPaths))
	if b, err := os.ReadFile(marker); err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	r := rand.New(rand.NewSource(1))
	var b strings.Builder
	b.WriteString("let\n  bb = \"/bin/busybox\";\n  mk = name: kib: refs: derivation { inherit name; system = builtins.currentSystem; builder = bb; args = [ \"sh\" \"-c\" (\"${bb} mkdir $out; ${bb} dd if=/dev/urandom of=$out/data bs=1024 count=${kib} 2>/dev/null; echo \" + builtins.concatStringsSep \" \" refs + \" > $out/refs\") ]; };\n")
	for i := 0; i < *nPaths; i++ {
		kib := 1 + r.Intn(32)
		switch {
		case i == *nPaths/2:
			kib = 100 << 10
		case i%40 == 7:
			kib = 10 << 10
		case i%10 == 3:
			kib = 1 << 10
		}
		var refs []string
		for j := 0; j < 3 && i > 0; j++ {
			refs = append(refs, fmt.Sprintf("\"${p%d}\"", r.Intn(i)))
		}
		fmt.Fprintf(&b, "  p%d = mk \"p%d\" \"%d\" [ %s ];\n", i, i, kib, strings.Join(refs, " "))
	}
	b.WriteString("in mk \"top\" \"1\" [ ")
	for i := 0; i < *nPaths; i++ {
		fmt.Fprintf(&b, "p%d ", i)
	}
	b.WriteString("]\n")
	expr := filepath.Join(*workDir, "closure.nix")
	if err := os.WriteFile(expr, []byte(b.String()), 0o644); err != nil {
		return "", err
	}
	fmt.Fprintf(os.Stderr, "building a closure of %d paths\n", *nPaths+1)
	out, err := nixCmd("nix-build", expr, "--no-out-link", "-j", "2").Output()
	if err != nil {
		return "", fmt.Errorf("nix-build: %v", err)
	}
	top := strings.TrimSpace(string(out))
	return top, os.WriteFile(marker, []byte(top), 0o644)
}

// server is a running kiss-onion serve, on a directory or on the bucket.
type server struct {
	name string
	url  string
	cmd  *exec.Cmd
	stop func()
}

func (s *server) pid() int { return s.cmd.Process.Pid }

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// startServe starts kiss-onion serve on a directory (dir) or on the
// bucket's prefix (prefix), for reads or for uploads.
func (b *bench) startServe(dir, prefix string, write bool) (*server, error) {
	addr, err := freePort()
	if err != nil {
		return nil, err
	}
	listen := "--listen"
	if write {
		listen = "--listen-write"
	}
	name := "directory"
	where := []string{"--cache-dir", dir}
	if prefix != "" {
		name = "bucket"
		where = []string{"--store", b.w.storeURL(prefix), "--s3-credentials", b.creds}
	}
	state := filepath.Join(*workDir, "state-"+name)
	args := append([]string{"serve", "--tor", "off", "--state-dir", state, listen, addr, "--log-level", "warn"}, where...)
	cmd := exec.Command(b.bin, args...)
	cmd.Stderr = os.Stderr
	// The keys come from the credentials file only.
	cmd.Env = withoutAWS(os.Environ())
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: name, url: "http://" + addr, cmd: cmd}
	s.stop = track(cmd.Process.Pid, func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	if err := waitUp(s.url); err != nil {
		s.stop()
		return nil, fmt.Errorf("serve on the %s: %w", name, err)
	}
	return s, nil
}

func withoutAWS(env []string) []string {
	var out []string
	for _, e := range env {
		if !strings.HasPrefix(e, "AWS_") {
			out = append(out, e)
		}
	}
	return out
}

func waitUp(url string) error {
	for i := 0; i < 600; i++ {
		if resp, err := http.Get(url + "/nix-cache-info"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not come up", url)
}

// resetPeak resets a process's peak RSS (VmHWM), see proc(5) clear_refs.
func resetPeak(pid int) { os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0) }

// peakKiB reads a process's peak RSS.
func peakKiB(pid int) int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// cacheFiles lists the narinfo and NAR URLs of a cache directory, the
// NARs biggest first.
func cacheFiles(dir string) (narinfos, nars []string, sizes map[string]int64, err error) {
	sizes = map[string]int64{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".narinfo") {
			narinfos = append(narinfos, "/"+e.Name())
		}
	}
	ents, err = os.ReadDir(filepath.Join(dir, "nar"))
	if err != nil {
		return nil, nil, nil, err
	}
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			return nil, nil, nil, err
		}
		nars = append(nars, "/nar/"+e.Name())
		sizes["/nar/"+e.Name()] = fi.Size()
	}
	sort.Slice(nars, func(i, j int) bool { return sizes[nars[i]] > sizes[nars[j]] })
	return narinfos, nars, sizes, nil
}

// bestOf runs f n times on each server, alternating, and keeps the best
// value of each, the peak RSS of each serve and weed's peak.
func (b *bench) bestOf(n int, what, unit string, higher bool, dir, bkt *server, f func(s *server) (float64, error)) (result, error) {
	r := result{what: what, unit: unit, higherBetter: higher}
	resetPeak(b.w.pid())
	for i := 0; i < n; i++ {
		for _, s := range []*server{dir, bkt} {
			resetPeak(s.pid())
			c0, w0 := cpuSeconds(s.pid()), cpuSeconds(b.w.pid())
			v, err := f(s)
			if err != nil {
				return r, fmt.Errorf("%s on the %s: %w", what, s.name, err)
			}
			p, rss := &r.dir, &r.rssDir
			if s == bkt {
				p, rss = &r.bkt, &r.rssBkt
				r.cpuBkt += (cpuSeconds(s.pid()) - c0) / float64(n)
				r.cpuWee += (cpuSeconds(b.w.pid()) - w0) / float64(n)
			} else {
				r.cpuDir += (cpuSeconds(s.pid()) - c0) / float64(n)
			}
			*rss = max(*rss, peakKiB(s.pid()))
			if i == 0 || (higher && v > *p) || (!higher && v < *p) {
				*p = v
			}
		}
	}
	r.rssWee = peakKiB(b.w.pid())
	fmt.Fprintf(os.Stderr, "%-60s directory %10.3f  bucket %10.3f %s\n", what, r.dir, r.bkt, unit)
	return r, nil
}

func (b *bench) best(what, unit string, higher bool, dir, bkt *server, f func(s *server) (float64, error)) (result, error) {
	return b.bestOf(*rounds, what, unit, higher, dir, bkt, f)
}

// reads measures both serves of one cache (zstd or uncompressed).
func (b *bench) reads(comp, cacheDir, top string) ([]result, error) {
	dir, err := b.startServe(cacheDir, "", false)
	if err != nil {
		return nil, err
	}
	defer dir.stop()
	bkt, err := b.startServe("", comp, false)
	if err != nil {
		return nil, err
	}
	defer bkt.stop()
	narinfos, nars, sizes, err := cacheFiles(cacheDir)
	if err != nil {
		return nil, err
	}
	var out []result
	label := func(s string) string { return s + " (" + comp + ")" }

	// Back to back: a narinfo read or checked within the last second
	// (serve's revalidation period) is answered from memory; on the
	// bucket a series longer than that second revalidates every narinfo.
	r, err := b.bestOf(5**rounds, label(fmt.Sprintf("%d narinfos, 1 keep-alive connection, back to back", len(narinfos))), "s", false, dir, bkt, func(s *server) (float64, error) {
		return curlTime(s.url, narinfos, 1)
	})
	if err != nil {
		return nil, err
	}
	out = append(out, r)
	// After more than a second each narinfo is checked again: a stat on
	// the directory, a HEAD (Stat) to the store on the bucket.
	r, err = b.best(label(fmt.Sprintf("%d narinfos, 1 keep-alive connection, after 1.1 s idle", len(narinfos))), "s", false, dir, bkt, func(s *server) (float64, error) {
		time.Sleep(1100 * time.Millisecond)
		return curlTime(s.url, narinfos, 1)
	})
	if err != nil {
		return nil, err
	}
	out = append(out, r)

	if comp == "zstd" {
		script := filepath.Join(*workDir, "narinfos.lua")
		var lua strings.Builder
		lua.WriteString("paths = {\n")
		for _, u := range narinfos {
			fmt.Fprintf(&lua, "  %q,\n", u)
		}
		lua.WriteString("}\ni = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(\"GET\", paths[(i % #paths) + 1])\nend\n")
		if err := os.WriteFile(script, []byte(lua.String()), 0o644); err != nil {
			return nil, err
		}
		r, err = b.best("narinfo GETs at 64 connections (wrk)", "req/s", true, dir, bkt, func(s *server) (float64, error) {
			out, err := exec.Command("wrk", "-t2", "-c64", "-d"+*duration, "-s", script, s.url).CombinedOutput()
			if err != nil {
				return 0, fmt.Errorf("wrk: %v\n%s", err, out)
			}
			m := regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`).FindSubmatch(out)
			if m == nil {
				return 0, fmt.Errorf("wrk said:\n%s", out)
			}
			if bytes.Contains(out, []byte("Non-2xx")) {
				return 0, fmt.Errorf("wrk got errors:\n%s", out)
			}
			return strconv.ParseFloat(string(m[1]), 64)
		})
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}

	if comp == "none" {
		biggest := nars[0]
		r, err = b.best(fmt.Sprintf("NAR throughput, 1 connection (%d MB NAR x3)", sizes[biggest]>>20), "MB/s", true, dir, bkt, func(s *server) (float64, error) {
			d, err := curlTime(s.url, []string{biggest, biggest, biggest}, 1)
			return float64(3*sizes[biggest]) / 1e6 / d, err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, r)

		var all []string
		var total int64
		for i := 0; i < 2; i++ {
			for _, u := range nars {
				all = append(all, u)
				total += sizes[u]
			}
		}
		r, err = b.best(fmt.Sprintf("NAR throughput, 16 connections (%d NARs, %d MB)", len(all), total>>20), "MB/s", true, dir, bkt, func(s *server) (float64, error) {
			d, err := curlTime(s.url, all, 16)
			return float64(total) / 1e6 / d, err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}

	r, err = b.best(label("nix copy --from the closure"), "s", false, dir, bkt, func(s *server) (float64, error) {
		store := filepath.Join(*workDir, "dst-"+strconv.Itoa(rand.Int()))
		defer os.RemoveAll(store)
		defer os.RemoveAll(store + "-xdg")
		cmd := exec.Command("nix", "copy", "--store", store, "--from", s.url, top)
		cmd.Env = append(os.Environ(), "NIX_CONFIG=experimental-features = nix-command\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0", "XDG_CACHE_HOME="+store+"-xdg")
		t0 := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("%v\n%s", err, out)
		}
		return time.Since(t0).Seconds(), nil
	})
	if err != nil {
		return nil, err
	}
	return append(out, r), nil
}

// writes times `nix copy --to` of the closure into a fresh directory and
// a fresh prefix of the bucket, alternating.
func (b *bench) writes(top string) (result, error) {
	r := result{what: "nix copy --to the closure (zstd)", unit: "s"}
	for i := 0; i < *rounds; i++ {
		for _, which := range []string{"directory", "bucket"} {
			tag := "upload-" + strconv.Itoa(rand.Int())
			dir, prefix := filepath.Join(*workDir, tag), ""
			if which == "bucket" {
				dir, prefix = "", tag
			} else if err := os.MkdirAll(dir, 0o755); err != nil {
				return r, err
			}
			s, err := b.startServe(dir, prefix, true)
			if err != nil {
				return r, err
			}
			resetPeak(s.pid())
			resetPeak(b.w.pid())
			c0, w0 := cpuSeconds(s.pid()), cpuSeconds(b.w.pid())
			cmd := nixCmd("nix", "copy", "--to", s.url+"?compression=zstd", top)
			t0 := time.Now()
			out, err := cmd.CombinedOutput()
			d := time.Since(t0).Seconds()
			p, rss := &r.dir, &r.rssDir
			if which == "bucket" {
				p, rss = &r.bkt, &r.rssBkt
				r.rssWee = max(r.rssWee, peakKiB(b.w.pid()))
				r.cpuBkt += (cpuSeconds(s.pid()) - c0) / float64(*rounds)
				r.cpuWee += (cpuSeconds(b.w.pid()) - w0) / float64(*rounds)
			} else {
				r.cpuDir += (cpuSeconds(s.pid()) - c0) / float64(*rounds)
			}
			*rss = max(*rss, peakKiB(s.pid()))
			s.stop()
			if dir != "" {
				os.RemoveAll(dir)
			}
			if err != nil {
				return r, fmt.Errorf("nix copy --to the %s: %v\n%s", which, err, out)
			}
			if i == 0 || d < *p {
				*p = d
			}
		}
	}
	fmt.Fprintf(os.Stderr, "%-60s directory %10.3f  bucket %10.3f s\n", r.what, r.dir, r.bkt)
	return r, nil
}

// curlTime fetches paths from base with one curl, over at most conns
// connections, and returns the wall time.
func curlTime(base string, paths []string, conns int) (float64, error) {
	var cfg strings.Builder
	for _, p := range paths {
		fmt.Fprintf(&cfg, "url = \"%s%s\"\noutput = \"/dev/null\"\n", base, p)
	}
	args := []string{"-s", "-f", "-K", "-"}
	if conns > 1 {
		args = append(args, "--parallel", "--parallel-max", strconv.Itoa(conns))
	}
	cmd := exec.Command("curl", args...)
	cmd.Stdin = strings.NewReader(cfg.String())
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("curl: %v\n%s", err, out)
	}
	return time.Since(t0).Seconds(), nil
}

func printTable(rs []result, probes []probe, loadBefore, loadAfter string, took time.Duration) {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	host, _ := os.Hostname()
	fmt.Fprintf(w, "\n%s, %s, %d paths, best of %d rounds, weed GOMEMLIMIT %s, %s; load average %s before, %s after\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), host, *nPaths+1, *rounds, *memLimit, took.Round(time.Second), loadBefore, loadAfter)
	fmt.Fprintln(w, "| measurement | directory | bucket | bucket / directory | serve peak RSS (directory / bucket) | weed peak RSS | CPU a run: serve (directory / bucket) + weed |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, r := range rs {
		ratio := r.dir / r.bkt // >1: the bucket is faster
		if r.higherBetter {
			ratio = r.bkt / r.dir
		}
		fmt.Fprintf(w, "| %s | %s %s | %s %s | %.2fx | %d / %d MiB | %d MiB | %.2f / %.2f + %.2f s |\n", r.what, fmtNum(r.dir), r.unit, fmtNum(r.bkt), r.unit, ratio, r.rssDir>>10, r.rssBkt>>10, r.rssWee>>10, r.cpuDir, r.cpuBkt, r.cpuWee)
	}
	fmt.Fprintln(w, "\nRatio: the bucket's speed relative to the directory's (above 1 is faster).")
	if len(probes) > 0 {
		fmt.Fprintln(w, "\n| SeaweedFS alone, through s3store (no serve) | |\n|---|---|")
		for _, p := range probes {
			fmt.Fprintf(w, "| %s | %s |\n", p.what, p.value)
		}
	}
}

func fmtNum(v float64) string {
	switch {
	case v >= 1000:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 3, 64)
}
