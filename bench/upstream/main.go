// Command upstream benchmarks kiss-onion serve --upstream: the time for
// the real nix to substitute a closure of about a hundred store paths into
// a fresh store (a) cold, through serve, which fetches every path from an
// upstream cache as nix asks (the cache empty of it), (b) warm, from
// serve's cache after (a), the upstream stopped, and (c) straight from the
// upstream server. The upstream is nginx serving a cache filled by
// `nix copy --to file://...?secret-key=`, signed with its own key; serve
// and nix both check that signature. With -tor, it also does (a) and (b)
// through the read onion on a private Tor network, nix reaching it through
// `kiss-onion proxy`. Run by hand, never in CI; see README.md.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/onion/testnet"
)

var (
	binary  = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	workDir = flag.String("dir", "/tmp/kiss-onion-upstream-bench", "work directory (the built closures and the upstream cache are reused)")
	nPaths  = flag.Int("paths", 99, "store paths in each closure, besides its top")
	bigMiB  = flag.Int("big-mib", 4, "size of every 20th path, in MiB (the rest are 1-32 KiB)")
	rounds  = flag.Int("rounds", 5, "rounds (each a fresh closure, cold then warm, and the upstream straight)")
	maxJobs = flag.Int("max-jobs", 16, "nix's max-jobs (Nix 2.8 substitutes at most this many paths at once)")
	viaTor  = flag.Bool("tor", false, "also measure through the read onion, on a private Tor network")
	useHTTP = flag.Bool("no-nginx", false, "serve the upstream with a second kiss-onion serve instead of nginx")
)

// killUpstream stops the running nginx at once on SIGINT or SIGTERM: its
// workers outlive a master that is killed.
var killUpstream atomic.Pointer[func()]

func main() {
	flag.Parse()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		if kill := killUpstream.Load(); kill != nil {
			(*kill)()
		}
		os.Exit(1)
	}()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// series is one measurement, a time per round.
type series struct {
	name  string
	times []time.Duration
}

func (s *series) add(d time.Duration) { s.times = append(s.times, d) }

func run() error {
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*workDir, 0o755); err != nil {
		return err
	}
	if !*useHTTP {
		if _, err := exec.LookPath("nginx"); err != nil {
			return errors.New("nginx not found: install nginx-light, or run with -no-nginx")
		}
	}
	perRound := 1
	if *viaTor {
		perRound = 2
	}
	tops, err := buildClosures(*rounds * perRound)
	if err != nil {
		return err
	}
	key, err := upstreamKey()
	if err != nil {
		return err
	}
	upDir := filepath.Join(*workDir, fmt.Sprintf("upstream-%d-%d", *nPaths, *bigMiB))
	if err := fillUpstream(upDir, key, tops); err != nil {
		return err
	}
	closures := make([][]string, len(tops))
	for i, top := range tops {
		if closures[i], err = closureOf(top); err != nil {
			return err
		}
	}
	nars, size := closureSize(upDir, closures[0])
	fmt.Fprintf(os.Stderr, "each closure: %d paths, %.1f MiB of zstd NARs\n", len(closures[0]), float64(size)/(1<<20))

	run := filepath.Join(*workDir, "run")
	os.RemoveAll(run)
	os.MkdirAll(run, 0o755)
	// Kept after a failure, with the logs.
	ok := false
	defer func() {
		if ok {
			os.RemoveAll(run)
		} else {
			fmt.Fprintf(os.Stderr, "logs in %s\n", run)
		}
	}()

	upAddr := freeAddr()
	up, err := startUpstream(bin, run, upDir, upAddr)
	if err != nil {
		return err
	}
	defer func() { up.stop() }()

	// serve, its cache empty, fetching from the upstream.
	cacheDir := filepath.Join(run, "cache")
	state := filepath.Join(run, "state")
	local := freeAddr()
	serveArgs := []string{"serve", "--cache-dir", cacheDir, "--state-dir", state, "--listen", local, "--log-level", "warn",
		"--upstream", up.url, "--upstream-key", key.public}
	var onion *onionWay
	if *viaTor {
		if onion, err = startOnion(bin, run, state, &serveArgs); err != nil {
			return err
		}
		defer onion.close()
	} else {
		serveArgs = append(serveArgs, "--tor", "off")
	}
	serve, err := startProc(filepath.Join(run, "serve.log"), bin, serveArgs...)
	if err != nil {
		return err
	}
	defer serve.stop()
	// With tor, serve listens once its onions are up.
	if err := waitHTTP("http://"+local, 4*time.Minute); err != nil {
		return err
	}
	if onion != nil {
		if err := onion.connect(bin, run); err != nil {
			return err
		}
	}

	cold := &series{name: "(a) cold: through serve --upstream, cache empty"}
	warm := &series{name: "(b) warm: from serve's cache, upstream stopped"}
	direct := &series{name: "(c) straight from the upstream (" + up.name + ")"}
	coldTor := &series{name: "(a) cold, through the read onion (gateway)"}
	warmTor := &series{name: "(b) warm, through the read onion (gateway)"}
	all := []*series{cold, warm, direct}
	if onion != nil {
		all = append(all, coldTor, warmTor)
	}
	sub := func(s *series, url string, r, closure int) error {
		d, err := substitute(url, key.public, tops[closure], r)
		if err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		s.add(d)
		fmt.Fprintf(os.Stderr, "round %d: %-50s %6.2f s\n", r+1, s.name, d.Seconds())
		return nil
	}
	coldWarm := func(r, closure int, url string, c, w *series) error {
		if err := sub(c, url, r, closure); err != nil {
			return err
		}
		// The last narinfos are stored moments after nix has the NARs.
		if err := waitCached(cacheDir, closures[closure], time.Minute); err != nil {
			return err
		}
		up.stop()
		werr := sub(w, url, r, closure)
		// Back at the address serve knows.
		if up, err = startUpstream(bin, run, upDir, upAddr); err != nil {
			return err
		}
		return werr
	}
	for r := 0; r < *rounds; r++ {
		// The upstream straight goes first every other round, so that
		// neither meets its files in the page cache always.
		if r%2 == 1 {
			if err := sub(direct, up.url, r, r*perRound); err != nil {
				return err
			}
		}
		if err := coldWarm(r, r*perRound, "http://"+local, cold, warm); err != nil {
			return err
		}
		if r%2 == 0 {
			if err := sub(direct, up.url, r, r*perRound); err != nil {
				return err
			}
		}
		if onion != nil {
			if err := coldWarm(r, r*perRound+1, onion.url, coldTor, warmTor); err != nil {
				return err
			}
		}
	}

	fmt.Printf("\nnix-store --realise of a %d-path closure (%d NARs, %.1f MiB zstd) into a fresh store,\n", len(closures[0]), nars, float64(size)/(1<<20))
	fmt.Printf("Nix 2.8, max-jobs = %d, upstream %s on loopback, %d rounds (best / median):\n\n", *maxJobs, up.name, *rounds)
	fmt.Printf("| %-50s | %8s | %8s |\n|---|---:|---:|\n", "substitution", "best", "median")
	for _, s := range all {
		t := slices.Clone(s.times)
		slices.Sort(t)
		fmt.Printf("| %-50s | %6.2f s | %6.2f s |\n", s.name, t[0].Seconds(), t[len(t)/2].Seconds())
	}
	ok = true
	return nil
}

// onionWay is the read onion on a private Tor network and a gateway to it.
type onionWay struct {
	network *testnet.Network
	torrc   string
	bundle  string
	proxy   *proc
	url     string
}

// startOnion starts a private Tor network, adds a reader key to serve's
// state, and adds to serveArgs what puts serve's read onion on it.
func startOnion(bin, run, state string, serveArgs *[]string) (*onionWay, error) {
	o := &onionWay{torrc: filepath.Join(run, "testnet.torrc"), bundle: filepath.Join(run, "reader.bundle")}
	if out, err := exec.Command(bin, "keys", "add", "reader", "--role", "reader", "--state-dir", state, "--out", o.bundle).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("keys add: %v\n%s", err, out)
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	began := time.Now()
	network, err := testnet.Start(context.Background(), filepath.Join(run, "testnet"), logrus.NewEntry(log))
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "private tor network ready in %v\n", time.Since(began).Round(time.Millisecond))
	o.network = network
	if err := os.WriteFile(o.torrc, []byte(strings.Join(network.TorrcLines(), "\n")+"\n"), 0o644); err != nil {
		network.Close()
		return nil, err
	}
	*serveArgs = append(*serveArgs, "--tor", "public", "--tor-config", o.torrc)
	return o, nil
}

// connect starts a gateway to serve's read onion and waits until it
// reaches it.
func (o *onionWay) connect(bin, run string) error {
	addr := freeAddr()
	p, err := startProc(filepath.Join(run, "proxy.log"), bin, "proxy", "--bundle", o.bundle, "--listen", addr,
		"--tor-config", o.torrc, "--state-dir", filepath.Join(run, "proxy"), "--log-level", "warn")
	if err != nil {
		return err
	}
	o.proxy, o.url = p, "http://"+addr
	return waitGateway(o.url, 4*time.Minute)
}

func (o *onionWay) close() {
	if o.proxy != nil {
		o.proxy.stop()
	}
	o.network.Close()
}

// upstreamServer is the upstream cache's server.
type upstreamServer struct {
	name string
	url  string
	stop func()
}

// startUpstream serves dir at addr with nginx, or with a second
// kiss-onion serve under -no-nginx.
func startUpstream(bin, run, dir, addr string) (*upstreamServer, error) {
	if *useHTTP {
		p, err := startProc(filepath.Join(run, "upstream.log"), bin, "serve", "--tor", "off", "--cache-dir", dir,
			"--state-dir", filepath.Join(run, "upstream-state"), "--listen", addr, "--log-level", "warn")
		if err != nil {
			return nil, err
		}
		u := &upstreamServer{name: "a second kiss-onion serve", url: "http://" + addr, stop: p.stop}
		return u, waitHTTP(u.url, time.Minute)
	}
	ndir := filepath.Join(run, "nginx")
	os.MkdirAll(ndir, 0o755)
	user := ""
	if os.Geteuid() == 0 {
		user = "user root;" // workers must read where the benchmark wrote
	}
	conf := fmt.Sprintf(`daemon off;
%[4]s
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
  }
}
`, ndir, addr, dir, user)
	confPath := filepath.Join(ndir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	cmd := exec.Command("nginx", "-c", confPath, "-e", filepath.Join(ndir, "error.log"))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	u := &upstreamServer{name: "nginx", url: "http://" + addr, stop: func() { cmd.Process.Signal(syscall.SIGQUIT); cmd.Wait() }}
	kill := func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() }
	killUpstream.Store(&kill)
	return u, waitHTTP(u.url, time.Minute)
}

// signingKey is the upstream's key pair.
type signingKey struct{ secretFile, public string }

func upstreamKey() (signingKey, error) {
	k := signingKey{secretFile: filepath.Join(*workDir, "upstream.sec")}
	pub := filepath.Join(*workDir, "upstream.pub")
	if _, err := os.Stat(pub); err != nil {
		if out, err := exec.Command("nix-store", "--generate-binary-cache-key", "bench-upstream-1", k.secretFile, pub).CombinedOutput(); err != nil {
			return k, fmt.Errorf("generate a key: %v\n%s", err, out)
		}
	}
	b, err := os.ReadFile(pub)
	k.public = strings.TrimSpace(string(b))
	return k, err
}

// fillUpstream copies the closures into the upstream cache (once), signed.
func fillUpstream(dir string, key signingKey, tops []string) error {
	done := filepath.Join(dir, ".bench-tops")
	if b, err := os.ReadFile(done); err == nil && string(b) == strings.Join(tops, "\n") {
		return nil
	}
	fmt.Fprintf(os.Stderr, "copying %d closures into %s\n", len(tops), dir)
	args := append([]string{"copy", "--to", "file://" + dir + "?compression=zstd&secret-key=" + key.secretFile}, tops...)
	if out, err := nixCmd(filepath.Join(*workDir, "store"), "nix", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("nix copy: %v\n%s", err, out)
	}
	return os.WriteFile(done, []byte(strings.Join(tops, "\n")), 0o644)
}

// closureOf lists the store paths of top's closure, in the build store.
func closureOf(top string) ([]string, error) {
	out, err := nixCmd(filepath.Join(*workDir, "store"), "nix-store", "-qR", top).Output()
	if err != nil {
		return nil, fmt.Errorf("nix-store -qR %s: %v", top, err)
	}
	return strings.Fields(string(out)), nil
}

func hashPart(storePath string) string { return strings.TrimPrefix(storePath, "/nix/store/")[:32] }

// closureSize sums the NAR files of a closure in a cache.
func closureSize(cacheDir string, closure []string) (n int, size int64) {
	for _, p := range closure {
		f, err := os.Open(filepath.Join(cacheDir, hashPart(p)+".narinfo"))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "FileSize: "); ok {
				s, _ := strconv.ParseInt(v, 10, 64)
				n, size = n+1, size+s
			}
		}
		f.Close()
	}
	return n, size
}

// waitCached waits until the cache holds every narinfo of closure.
func waitCached(cacheDir string, closure []string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for _, p := range closure {
		for {
			if _, err := os.Stat(filepath.Join(cacheDir, hashPart(p)+".narinfo")); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s not in serve's cache %v after the cold substitution", p, limit)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// substitute realises top into a fresh store from url and returns the
// time; nix checks the upstream's signatures.
func substitute(url, pub, top string, round int) (time.Duration, error) {
	dir := filepath.Join(*workDir, "run", fmt.Sprintf("dst-%d-%d", round, rand.Int()))
	defer func() {
		exec.Command("chmod", "-R", "u+w", dir).Run()
		os.RemoveAll(dir)
	}()
	cmd := nixCmd(filepath.Join(dir, "store"), "nix-store", "--realise", top,
		"--option", "substituters", url, "--option", "max-jobs", strconv.Itoa(*maxJobs),
		"--option", "require-sigs", "true", "--option", "trusted-public-keys", pub)
	began := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(began)
	if err != nil {
		return 0, fmt.Errorf("nix-store --realise: %v\n%s", err, out)
	}
	return d, nil
}

// nixCmd runs a nix program on the chroot store at store, with a fresh
// narinfo cache.
func nixCmd(store, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, append([]string{"--store", store}, args...)...)
	xdg := filepath.Join(*workDir, "xdg", strconv.Itoa(rand.Int()))
	cmd.Env = append(os.Environ(),
		"NIX_CONFIG=experimental-features = nix-command\nbuild-users-group =\nsandbox-paths = /bin/busybox\nsubstituters =\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0\nconnect-timeout = 60",
		"XDG_CACHE_HOME="+xdg, "HOME="+xdg)
	return cmd
}

// buildClosures builds (once) n closures of the same shape and sizes,
// each of -paths store paths referencing up to three earlier ones (most
// of a few KiB, every 20th of -big-mib MiB) and a top referencing all,
// and returns their tops.
func buildClosures(n int) ([]string, error) {
	marker := filepath.Join(*workDir, fmt.Sprintf("closures-%d-%d-%d", n, *nPaths, *bigMiB))
	if b, err := os.ReadFile(marker); err == nil {
		return strings.Fields(string(b)), nil
	}
	r := rand.New(rand.NewSource(1))
	var b strings.Builder
	b.WriteString("let\n  bb = \"/bin/busybox\";\n  mk = name: kib: refs: derivation { inherit name; system = builtins.currentSystem; builder = bb; args = [ \"sh\" \"-c\" (\"${bb} mkdir $out; ${bb} dd if=/dev/urandom of=$out/data bs=1024 count=${kib} 2>/dev/null; echo \" + builtins.concatStringsSep \" \" refs + \" > $out/refs\") ]; };\n")
	b.WriteString("  closure = tag: let\n")
	for i := 0; i < *nPaths; i++ {
		kib := 1 + r.Intn(32)
		if i%20 == 10 {
			kib = *bigMiB << 10
		}
		var refs []string
		for j := 0; j < 3 && i > 0; j++ {
			refs = append(refs, fmt.Sprintf("\"${p%d}\"", r.Intn(i)))
		}
		fmt.Fprintf(&b, "    p%d = mk \"${tag}-p%d\" \"%d\" [ %s ];\n", i, i, kib, strings.Join(refs, " "))
	}
	b.WriteString("  in mk \"${tag}-top\" \"1\" [ ")
	for i := 0; i < *nPaths; i++ {
		fmt.Fprintf(&b, "\"${p%d}\" ", i)
	}
	b.WriteString("];\nin [ ")
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "(closure \"up%d\") ", i)
	}
	b.WriteString("]\n")
	expr := filepath.Join(*workDir, "closures.nix")
	if err := os.WriteFile(expr, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "building %d closures of %d paths\n", n, *nPaths+1)
	out, err := nixCmd(filepath.Join(*workDir, "store"), "nix-build", expr, "--no-out-link", "-j", "2").Output()
	if err != nil {
		return nil, fmt.Errorf("nix-build: %v", err)
	}
	tops := strings.Fields(string(out))
	if len(tops) != n {
		return nil, fmt.Errorf("nix-build gave %d paths, not %d", len(tops), n)
	}
	return tops, os.WriteFile(marker, []byte(strings.Join(tops, "\n")), 0o644)
}

// proc is a process the benchmark started, its output in a log file.
type proc struct{ cmd *exec.Cmd }

func startProc(logFile, name string, args ...string) (*proc, error) {
	f, err := os.Create(logFile)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	return &proc{cmd: cmd}, nil
}

func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// waitHTTP polls a cache's nix-cache-info until it answers.
func waitHTTP(u string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		resp, err := http.Get(u + "/nix-cache-info")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not answering after %v: %v", u, limit, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitGateway polls a gateway's health until the onion is reachable.
func waitGateway(u string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		var h struct {
			Reachable bool   `json:"reachable"`
			LastError string `json:"last_error"`
		}
		resp, err := http.Get(u + "/-/health")
		if err == nil {
			json.NewDecoder(resp.Body).Decode(&h)
			resp.Body.Close()
			if h.Reachable {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gateway %s: onion not reachable after %v: %v %s", u, limit, err, h.LastError)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
