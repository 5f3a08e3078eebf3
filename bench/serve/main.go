// Command serve benchmarks kiss-onion's cache serving against nginx on the
// same directory, alternating between them in one run. See ../README.md.
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
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var (
	binary   = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	workDir  = flag.String("dir", "/tmp/kiss-onion-bench", "work directory (the built closure is reused)")
	nPaths   = flag.Int("paths", 300, "store paths in the closure")
	rounds   = flag.Int("rounds", 3, "rounds of each measurement (the best counts)")
	duration = flag.String("duration", "10s", "wrk duration")
	only     = flag.String("only", "", "run only the reads or only the writes (reads|writes)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// result is one line of the table: a value for each server.
type result struct {
	what, unit   string
	kiss, nginx  float64
	higherBetter bool
	rss          int64 // kiss-onion's peak RSS in KiB during the measurement
}

func run() error {
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*workDir, 0o755); err != nil {
		return err
	}
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

	var results []result
	for _, comp := range []string{"zstd", "none"} {
		if *only == "writes" {
			break
		}
		dir := caches[comp]
		kiss, err := startKiss(bin, dir, false)
		if err != nil {
			return err
		}
		ngx, err := startNginx(dir, false)
		if err != nil {
			kiss.stop()
			return err
		}
		rs, err := measureReads(comp, dir, top, kiss, ngx)
		kiss.stop()
		ngx.stop()
		if err != nil {
			return err
		}
		results = append(results, rs...)
	}
	if *only != "reads" {
		w, err := measureWrites(bin, top)
		if err != nil {
			return err
		}
		results = append(results, w)
	}
	printTable(results)
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
// earlier ones, with sizes from a few hundred bytes to 100 MB.
func buildClosure() (string, error) {
	marker := filepath.Join(*workDir, fmt.Sprintf("closure-%d", *nPaths))
	if b, err := os.ReadFile(marker); err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	r := rand.New(rand.NewSource(1))
	var b strings.Builder
	b.WriteString("let bb = \"/bin/busybox\";\n  mk = name: kib: refs: derivation { inherit name; system = builtins.currentSystem; builder = bb; args = [ \"sh\" \"-c\" (\"${bb} mkdir $out; ${bb} dd if=/dev/urandom of=$out/data bs=1024 count=${kib} 2>/dev/null; echo \" + builtins.concatStringsSep \" \" refs + \" > $out/refs\") ]; };\n")
	for i := 0; i < *nPaths; i++ {
		kib := 1 + r.Intn(32) // most paths are small
		switch {
		case i == *nPaths/2:
			kib = 100 << 10 // one 100 MB path
		case i%40 == 7:
			kib = 10 << 10
		case i%10 == 3:
			kib = 1 << 10
		}
		var refs []string
		for j := 0; j < 3 && i > 0; j++ {
			refs = append(refs, fmt.Sprintf("p%d", r.Intn(i)))
		}
		fmt.Fprintf(&b, "  p%d = mk \"p%d\" \"%d\" [ %s ];\n", i, i, kib, strings.Join(wrapRefs(refs), " "))
	}
	b.WriteString("in mk \"top\" \"1\" [ ")
	for i := 0; i < *nPaths; i++ {
		fmt.Fprintf(&b, "p%d ", i)
	}
	b.WriteString("]\n")
	expr := filepath.Join(*workDir, "closure.nix")
	if err := os.WriteFile(expr, []byte(strings.Replace(b.String(), "let bb", "let\n  bb", 1)), 0o644); err != nil {
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

func wrapRefs(refs []string) []string {
	out := make([]string, len(refs))
	for i, r := range refs {
		out[i] = "\"${" + r + "}\""
	}
	return out
}

// server is a running kiss-onion or nginx.
type server struct {
	name string
	url  string
	cmd  *exec.Cmd
	pid  func() int
	stop func()
}

func freePort() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func startKiss(bin, dir string, write bool) (*server, error) {
	addr := freePort()
	listen := "--listen"
	if write {
		listen = "--listen-write"
	}
	cmd := exec.Command(bin, "serve", "--tor", "off", "--cache-dir", dir, "--state-dir", filepath.Join(*workDir, "state"), listen, addr, "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: "kiss-onion", url: "http://" + addr, cmd: cmd, pid: func() int { return cmd.Process.Pid }}
	s.stop = func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }
	return s, waitUp(s.url)
}

func startNginx(dir string, dav bool) (*server, error) {
	addr := freePort()
	ndir := filepath.Join(*workDir, "nginx-"+strconv.Itoa(rand.Int()))
	os.MkdirAll(ndir, 0o755)
	davConf := ""
	if dav {
		davConf = "dav_methods PUT; create_full_put_path on; client_max_body_size 0; client_body_temp_path " + ndir + "/body;"
	}
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // workers must write where the benchmark writes
	}
	conf := fmt.Sprintf(`daemon off;
%[5]s
worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  types { text/x-nix-narinfo narinfo; }
  default_type application/octet-stream;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen %[2]s;
    root %[3]s;
    %[4]s
  }
}
`, ndir, addr, dir, davConf, user)
	confPath := filepath.Join(ndir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command("nginx", "-c", confPath, "-e", filepath.Join(ndir, "error.log"))
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{name: "nginx", url: "http://" + addr, cmd: cmd, pid: func() int { return cmd.Process.Pid }}
	s.stop = func() { cmd.Process.Signal(syscall.SIGQUIT); cmd.Wait() }
	if err := waitPort(addr); err != nil {
		return nil, err
	}
	return s, nil
}

func waitUp(url string) error {
	for i := 0; i < 200; i++ {
		if resp, err := http.Get(url + "/nix-cache-info"); err == nil {
			resp.Body.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not come up", url)
}

func waitPort(addr string) error {
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not come up", addr)
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

// cacheFiles lists the narinfo and NAR URLs of a cache directory.
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

// best runs f once per round for each server, alternating, and keeps the
// best value of each (and kiss-onion's peak RSS over the rounds).
func best(what, unit string, higher bool, kiss, ngx *server, f func(s *server) (float64, error)) (result, error) {
	return bestOf(*rounds, what, unit, higher, kiss, ngx, f)
}

// bestOf is best with n rounds.
func bestOf(n int, what, unit string, higher bool, kiss, ngx *server, f func(s *server) (float64, error)) (result, error) {
	r := result{what: what, unit: unit, higherBetter: higher}
	for i := 0; i < n; i++ {
		for _, s := range []*server{kiss, ngx} {
			if s == kiss {
				resetPeak(s.pid())
			}
			v, err := f(s)
			if err != nil {
				return r, fmt.Errorf("%s on %s: %w", what, s.name, err)
			}
			p := &r.nginx
			if s == kiss {
				p = &r.kiss
				r.rss = max(r.rss, peakKiB(s.pid()))
			}
			if i == 0 || (higher && v > *p) || (!higher && v < *p) {
				*p = v
			}
		}
	}
	fmt.Fprintf(os.Stderr, "%-45s kiss-onion %10.3f  nginx %10.3f %s\n", what, r.kiss, r.nginx, unit)
	return r, nil
}

func measureReads(comp, dir, top string, kiss, ngx *server) ([]result, error) {
	narinfos, nars, sizes, err := cacheFiles(dir)
	if err != nil {
		return nil, err
	}
	var out []result
	label := func(s string) string { return s + " (" + comp + ")" }

	// curl is Nix's HTTP client: it does the fetching here, as in Nix. One
	// series takes about 25 ms, so a stall of the VM weighs on it more than
	// on the others: it gets 5 times the rounds.
	r, err := bestOf(5**rounds, label(fmt.Sprintf("%d narinfos, 1 keep-alive connection (curl)", len(narinfos))), "s", false, kiss, ngx, func(s *server) (float64, error) {
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
		os.WriteFile(script, []byte(lua.String()), 0o644)
		r, err = best("narinfo GETs at 64 connections (wrk)", "req/s", true, kiss, ngx, func(s *server) (float64, error) {
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
		r, err = best(fmt.Sprintf("NAR throughput, 1 connection (%d MB NAR x3, curl)", sizes[biggest]>>20), "MB/s", true, kiss, ngx, func(s *server) (float64, error) {
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
		r, err = best(fmt.Sprintf("NAR throughput, 16 connections (%d NARs, %d MB, curl)", len(all), total>>20), "MB/s", true, kiss, ngx, func(s *server) (float64, error) {
			d, err := curlTime(s.url, all, 16)
			return float64(total) / 1e6 / d, err
		})
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}

	r, err = best(label("nix copy --from the closure (real client)"), "s", false, kiss, ngx, func(s *server) (float64, error) {
		store := filepath.Join(*workDir, "dst-"+strconv.Itoa(rand.Int()))
		defer os.RemoveAll(store)
		cmd := exec.Command("nix", "copy", "--store", store, "--from", s.url, top)
		cmd.Env = append(os.Environ(), "NIX_CONFIG=experimental-features = nix-command\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0", "XDG_CACHE_HOME="+store+"-xdg")
		defer os.RemoveAll(store + "-xdg")
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

func measureWrites(bin, top string) (result, error) {
	r := result{what: "nix copy --to the closure (zstd)", unit: "s"}
	for i := 0; i < *rounds; i++ {
		for _, which := range []string{"kiss-onion", "nginx"} {
			dir := filepath.Join(*workDir, "upload-"+strconv.Itoa(rand.Int()))
			os.MkdirAll(dir, 0o755)
			var s *server
			var err error
			if which == "kiss-onion" {
				s, err = startKiss(bin, dir, true)
			} else {
				s, err = startNginx(dir, true)
			}
			if err != nil {
				return r, err
			}
			if which == "kiss-onion" {
				resetPeak(s.pid())
			}
			cmd := nixCmd("nix", "copy", "--to", s.url+"?compression=zstd", top)
			t0 := time.Now()
			out, err := cmd.CombinedOutput()
			d := time.Since(t0).Seconds()
			if which == "kiss-onion" {
				r.rss = max(r.rss, peakKiB(s.pid()))
			}
			s.stop()
			os.RemoveAll(dir)
			if err != nil {
				return r, fmt.Errorf("nix copy --to %s: %v\n%s", which, err, out)
			}
			p := &r.nginx
			if which == "kiss-onion" {
				p = &r.kiss
			}
			if i == 0 || d < *p {
				*p = d
			}
		}
	}
	fmt.Fprintf(os.Stderr, "%-45s kiss-onion %10.3f  nginx %10.3f s\n", r.what, r.kiss, r.nginx)
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

func printTable(rs []result) {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	host, _ := os.Hostname()
	fmt.Fprintf(w, "\n%s, %s, %d paths, best of %d rounds\n\n", time.Now().Format("2006-01-02"), host, *nPaths+1, *rounds)
	fmt.Fprintln(w, "| measurement | kiss-onion | nginx | kiss-onion / nginx | kiss-onion peak RSS |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	for _, r := range rs {
		ratio := r.nginx / r.kiss // >1: kiss-onion is faster
		if r.higherBetter {
			ratio = r.kiss / r.nginx
		}
		fmt.Fprintf(w, "| %s | %s %s | %s %s | %.2fx | %d MiB |\n", r.what, fmtNum(r.kiss), r.unit, fmtNum(r.nginx), r.unit, ratio, r.rss>>10)
	}
	fmt.Fprintln(w, "\nRatio: kiss-onion's speed relative to nginx's (above 1 is faster).")
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
