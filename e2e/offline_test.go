package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// When the cache is away (issue #20): the Tor network out of reach (a
// `serve --tor local` stopped, taking its private network with it: what a
// laptop offline sees), the appliance off and back on the same state. A
// reader's Nix, set up as nixos/proxy.nix sets up the nix-daemon, must carry
// on within seconds and use the cache again once it is back; writers get a
// clear error at once; update skips with exit 75. Every step is timed
// ("timing:" lines in the verbose output).
//
// KISS_ONION_GATEWAY_BINARY runs the gateways from another build (to measure
// another branch's gateway); KISS_ONION_NIX_BIN names a directory holding
// another Nix's nix-build, nix-store and nix (the reader's Nix; the cache
// is filled with the nix on PATH).

// moduleNegativeTTL is what nixos/proxy.nix sets besides the substituter
// and the keys; fallback it leaves off.
const moduleNegativeTTL = "narinfo-cache-negative-ttl = 60"

// offlineCap bounds each timed Nix command: long enough to measure a
// gateway that holds requests for minutes.
const offlineCap = 5 * time.Minute

func gatewayBinary() string {
	if b := os.Getenv("KISS_ONION_GATEWAY_BINARY"); b != "" {
		return b
	}
	return binary
}

// readerNix returns a Nix client set up as the NixOS reader module sets up
// the nix-daemon: the gateway its only substituter, the module's negative
// TTL, and a disk cache of its own that lives as long as the client.
func readerNix(t *testing.T, gw, publicKey string) *nixClient {
	return newNix(t, "substituters = "+gw, "trusted-public-keys = "+publicKey, moduleNegativeTTL)
}

// nixTool returns the program to run for a reader's Nix command.
func nixTool(name string) string {
	if d := os.Getenv("KISS_ONION_NIX_BIN"); d != "" {
		return filepath.Join(d, name)
	}
	return name
}

// nixCmd is a Nix command of a reader, run in the background.
type nixCmd struct {
	cmd   *exec.Cmd
	out   *bytes.Buffer
	began time.Time
	done  chan struct{}
	err   error
}

func startNixCmd(t *testing.T, n *nixClient, name string, args ...string) *nixCmd {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), offlineCap)
	c := &nixCmd{out: &bytes.Buffer{}, done: make(chan struct{})}
	c.cmd = exec.CommandContext(ctx, nixTool(name), append([]string{"--store", n.root}, args...)...)
	c.cmd.Env = n.env()
	if os.Getenv("KISS_ONION_NIX_BIN") != "" {
		// Another Nix: its own configuration, state and log directories.
		for _, d := range []string{"conf", "state", "log"} {
			os.MkdirAll(filepath.Join(n.xdg, "nix-"+d), 0o755)
		}
		c.cmd.Env = append(c.cmd.Env, "NIX_CONF_DIR="+filepath.Join(n.xdg, "nix-conf"),
			"NIX_STATE_DIR="+filepath.Join(n.xdg, "nix-state"), "NIX_LOG_DIR="+filepath.Join(n.xdg, "nix-log"))
	}
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	c.began = time.Now()
	if err := c.cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	go func() { c.err = c.cmd.Wait(); cancel(); close(c.done) }()
	t.Cleanup(func() {
		c.cmd.Process.Kill()
		<-c.done
	})
	return c
}

// wait returns the command's output and error, and how long it ran.
func (c *nixCmd) wait() (string, error, time.Duration) {
	<-c.done
	return c.out.String(), c.err, time.Since(c.began)
}

// timedNix runs a reader's Nix command and logs how long it took.
func timedNix(t *testing.T, what string, n *nixClient, name string, args ...string) (string, error, time.Duration) {
	t.Helper()
	out, err, took := startNixCmd(t, n, name, args...).wait()
	t.Logf("timing: %s: %s %v (%v)", what, name, took.Round(100*time.Millisecond), exitSummary(err))
	return out, err, took
}

func exitSummary(err error) string {
	var ee *exec.ExitError
	switch {
	case err == nil:
		return "ok"
	case errors.As(err, &ee):
		return fmt.Sprintf("exit %d", ee.ExitCode())
	}
	return err.Error()
}

// closures builds distinct closures of closureExpr in a store, to be pushed
// into a cache and built again by readers, whose nix-build then either
// substitutes them or builds them.
type closures struct {
	expr string
	src  *nixClient
}

// closure is one build of closureExpr: the arguments that make it, its
// top path and its closure.
type closure struct {
	args    []string
	top     string
	paths   []string
	dataOut string // the path with the blob
}

func newClosures(t *testing.T) *closures {
	expr := filepath.Join(t.TempDir(), "closure.nix")
	if err := os.WriteFile(expr, []byte(closureExpr), 0o644); err != nil {
		t.Fatal(err)
	}
	return &closures{expr: expr, src: newNix(t)}
}

func (cs *closures) build(t *testing.T, blobKiB int) closure {
	t.Helper()
	nonce := make([]byte, 8)
	rand.Read(nonce)
	c := closure{args: []string{cs.expr, "--argstr", "nonce", hex.EncodeToString(nonce), "--argstr", "blobKiB", strconv.Itoa(blobKiB), "--no-out-link"}}
	c.top = lastLine(cs.src.must("nix-build", c.args...))
	c.paths = strings.Fields(cs.src.must("nix-store", "-qR", c.top))
	for _, p := range c.paths {
		if strings.HasSuffix(p, "-data") {
			c.dataOut = p
		}
	}
	return c
}

// push copies closures into a cache directory (a file:// cache that serve
// serves), signed with key.
func (cs *closures) push(t *testing.T, cacheDir string, key signingKey, cs2 ...closure) {
	t.Helper()
	for _, c := range cs2 {
		cs.src.must("nix", "copy", "--to", "file://"+cacheDir+"?compression=zstd&secret-key="+key.secretFile, c.top)
	}
}

// substituted checks that nix-build's output shows the closure fetched
// from the cache, not built.
func substituted(t *testing.T, out string) {
	t.Helper()
	if strings.Contains(out, "building '") || !strings.Contains(out, "copying path") {
		t.Errorf("nix-build did not substitute from the cache:\n%s", out)
	}
}

// nixHighlights returns the lines of Nix's output that say what it did.
func nixHighlights(out string) string {
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		for _, w := range []string{"warning", "error", "building '", "copying path", "retrying", "disabling"} {
			if strings.Contains(l, w) {
				keep = append(keep, "\t"+l)
				break
			}
		}
	}
	return strings.Join(keep, "\n")
}

// builtLocally checks that nix-build's output shows the closure built.
func builtLocally(t *testing.T, out string) {
	t.Helper()
	if !strings.Contains(out, "building '") {
		t.Errorf("nix-build did not build the closure:\n%s", out)
	}
}

// startGatewayBin is startGateway with the gateway's binary, tor
// configuration and state directory chosen.
func startGatewayBin(t *testing.T, bin, bundle, torrc, stateDir string, extra ...string) *gateway {
	t.Helper()
	addr := freeAddr(t)
	args := append([]string{"proxy", "--bundle", bundle, "--listen", addr, "--state-dir", stateDir, "--tor-config", torrc, "--log-level", "debug"}, extra...)
	p := &proc{cmd: exec.Command(bin, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("gateway %s output:\n%s", bundle, p.out)
		}
	})
	g := &gateway{proc: p, url: "http://" + addr}
	waitReady(t, p, "the proxy listens", time.Minute, func() bool { return answers(g.url+"/-/health", false) })
	return g
}

// timedGet GETs url and returns the status, the gateway's error header
// and how long the answer took.
func timedGet(t *testing.T, url string) (int, string, time.Duration) {
	t.Helper()
	began := time.Now()
	resp, err := (&http.Client{Timeout: offlineCap}).Get(url)
	if err != nil {
		t.Errorf("GET %s: %v after %v", url, err, time.Since(began))
		return 0, "", time.Since(began)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Kiss-Onion-Gateway-Error"), time.Since(began)
}

// localServe is `serve --tor local`: the cache and its own private Tor
// network, which stops with it.
type localServe struct {
	*proc
	torrc string // the lines that join its network
}

func startLocalServe(t *testing.T, stateDir, cacheDir string) *localServe {
	t.Helper()
	p := start(t, "serve", "--tor", "local", "--cache-dir", cacheDir, "--state-dir", stateDir)
	waitReady(t, p, "serve --tor local published its onions", 5*time.Minute, onionsWritten(stateDir))
	return &localServe{proc: p, torrc: filepath.Join(stateDir, "testnet.torrc")}
}

// TestOfflineTorNetworkGone: the reader's and the writer's gateways reach
// the cache over a `serve --tor local` network, which then goes away in
// the middle of a substitution. Readers carry on by building; writers and
// update fail fast, changing nothing.
func TestOfflineTorNetworkGone(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	readerBundle := addKey(t, stateDir, "laptop", "reader")
	writerBundle := addKey(t, stateDir, "ci", "writer")
	key := newSigningKey(t, "cache-1")
	srv := startLocalServe(t, stateDir, cacheDir)

	cs := newClosures(t)
	warm, big, before, restarted, upload := cs.build(t, 64), cs.build(t, 32<<10), cs.build(t, 64), cs.build(t, 64), cs.build(t, 64)
	cs.push(t, cacheDir, key, warm, big, before, restarted)

	readerState := t.TempDir()
	rd := startGatewayBin(t, gatewayBinary(), readerBundle, srv.torrc, readerState)
	wr := startGatewayBin(t, gatewayBinary(), writerBundle, srv.torrc, t.TempDir(), "--write")
	t.Logf("timing: gateways reached the onion in %v and %v", rd.waitReachable(t).Round(time.Millisecond), wr.waitReachable(t).Round(time.Millisecond))

	t.Run("a reader substitutes while the onion is reachable", func(t *testing.T) {
		out, err, _ := timedNix(t, "reachable, substitute", readerNix(t, rd.url, key.public), "nix-build", warm.args...)
		if err != nil {
			t.Fatalf("nix-build: %v\n%s", err, out)
		}
		substituted(t, out)
	})

	t.Run("the Tor network goes away in the middle of a substitution", func(t *testing.T) {
		n := readerNix(t, rd.url, key.public)
		c := startNixCmd(t, n, "nix-build", big.args...)
		// The blob is being written into the store: the NAR is flowing.
		deadline := time.Now().Add(3 * time.Minute)
		for {
			if fi, err := os.Stat(filepath.Join(n.physical(big.dataOut), "share", "blob")); err == nil && fi.Size() > 0 {
				break
			}
			select {
			case <-c.done:
				out, err, _ := c.wait()
				t.Fatalf("nix-build ended before the blob came: %v\n%s", err, out)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatal("the blob's NAR did not start flowing in 3 minutes")
			}
			time.Sleep(20 * time.Millisecond)
		}
		gone := time.Now()
		srv.stop()
		t.Logf("timing: serve and its Tor network stopped in %v", time.Since(gone).Round(time.Millisecond))
		out, err, _ := c.wait()
		took := time.Since(gone)
		t.Logf("timing: network gone mid-substitution: nix-build ended %v after (%s)", took.Round(100*time.Millisecond), exitSummary(err))
		t.Logf("what nix-build said:\n%s", nixHighlights(out))
		if err != nil {
			t.Fatalf("nix-build failed because the cache went away: %v\n%s", err, out)
		}
		builtLocally(t, out)
		if took > time.Minute {
			t.Errorf("nix-build took %v after the network went away, want under a minute", took)
		}
	})

	t.Run("a reader that asks after the network is gone carries on", func(t *testing.T) {
		for _, path := range []string{"/nix-cache-info", "/" + strings.TrimPrefix(before.top, "/nix/store/")[:32] + ".narinfo"} {
			status, marked, took := timedGet(t, rd.url+path)
			t.Logf("timing: network gone: GET %s: %d in %v", path, status, took.Round(time.Millisecond))
			if took > 25*time.Second {
				t.Errorf("GET %s took %v, want an answer within the gateway's dial bound (20 s)", path, took)
			}
			if marked != "unreachable" {
				t.Errorf("GET %s: %d without the gateway's mark", path, status)
			}
		}
		out, err, took := timedNix(t, "network gone, gateway knows", readerNix(t, rd.url, key.public), "nix-build", before.args...)
		if err != nil {
			t.Fatalf("nix-build failed because the cache is away: %v\n%s", err, out)
		}
		builtLocally(t, out)
		if took > 20*time.Second {
			t.Errorf("nix-build took %v, want seconds", took)
		}
		if code, h := rd.health(t); code != 503 || h.Reachable {
			t.Errorf("health: %d %+v, want 503, unreachable", code, h)
		}
		// A path only the cache has (no derivation to build it from): Nix
		// says at once that it cannot get it, instead of retrying.
		out, err, took = timedNix(t, "network gone, nix-store -r of a path only the cache has", readerNix(t, rd.url, key.public), "nix-store", "-r", restarted.top)
		if err == nil || !strings.Contains(out, "don't know how to build") || took > 20*time.Second {
			t.Errorf("nix-store -r %s: %v after %v, want a prompt \"don't know how to build\":\n%s", restarted.top, err, took, out)
		}
	})

	t.Run("writers get a clear error within seconds, and nothing lands", func(t *testing.T) {
		began := time.Now()
		out, err := cs.src.run(nil, "nix", "copy", "--to", wr.url+"?compression=zstd", upload.top)
		took := time.Since(began)
		t.Logf("timing: network gone: nix copy --to the writer's gateway: %v (%s)", took.Round(100*time.Millisecond), exitSummary(err))
		if err == nil || took > 30*time.Second {
			t.Errorf("nix copy: %v after %v, want an error within seconds\n%s", err, took, out)
		}
		for _, tc := range []struct {
			name string
			args []string
		}{
			{"publish", []string{"publish", "--cache", wr.url, "--store", cs.src.root, "web1", upload.top}},
			{"with-lock", []string{"with-lock", wr.url + "/gcroots/web1", upload.top, "--", "true"}},
		} {
			began := time.Now()
			out, code := kissOnion(t, cs.src, tc.args...)
			took := time.Since(began)
			t.Logf("timing: network gone: %s through the writer's gateway: %v (exit %d)", tc.name, took.Round(100*time.Millisecond), code)
			if code == 0 || !strings.Contains(out, "unreachable") || took > 30*time.Second {
				t.Errorf("%s: exit %d after %v, want a failure saying the onion is unreachable within seconds:\n%s", tc.name, code, took, out)
			}
		}
		hash := strings.TrimPrefix(upload.top, "/nix/store/")[:32]
		for _, f := range []string{hash + ".narinfo", "gcroots/web1"} {
			if _, err := os.Stat(filepath.Join(cacheDir, f)); err == nil {
				t.Errorf("%s landed in the cache", f)
			}
		}
		if locks, _ := os.ReadDir(filepath.Join(cacheDir, "gcroots", ".lock")); len(locks) > 0 {
			t.Errorf("locks in the cache: %v", locks)
		}
	})

	t.Run("update skips with exit 75", func(t *testing.T) {
		updateSkipsWhileAway(t, rd.url, readerBundle, srv.torrc)
	})

	t.Run("a gateway restarted while offline answers from what it remembers", func(t *testing.T) {
		rd.stop()
		rd2 := startGatewayBin(t, gatewayBinary(), readerBundle, srv.torrc, readerState)
		status, _, took := timedGet(t, rd2.url+"/nix-cache-info")
		t.Logf("timing: restarted offline: GET /nix-cache-info: %d in %v", status, took.Round(time.Millisecond))
		if status != 200 || took > 25*time.Second {
			t.Errorf("GET /nix-cache-info: %d after %v, want the remembered copy within the dial bound", status, took)
		}
		out, err, took := timedNix(t, "network gone, gateway restarted offline", readerNix(t, rd2.url, key.public), "nix-build", restarted.args...)
		if err != nil {
			t.Fatalf("nix-build failed because the cache is away: %v\n%s", err, out)
		}
		builtLocally(t, out)
		if took > 20*time.Second {
			t.Errorf("nix-build took %v, want seconds", took)
		}
	})
}

// TestOfflineOnionBack: the appliance goes off (serve stops; the Tor
// network stays) and comes back on the same state. One reader, whose Nix
// keeps its disk cache throughout as a nix-daemon does, builds what it
// needs while the cache is away and substitutes from it again within about
// a minute of its return, with no restart.
func TestOfflineOnionBack(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	readerBundle := addKey(t, stateDir, "laptop", "reader")
	key := newSigningKey(t, "cache-1")
	srv := startOnionServer(t, stateDir, cacheDir)

	cs := newClosures(t)
	first, away, asked, after, never := cs.build(t, 64), cs.build(t, 64), cs.build(t, 64), cs.build(t, 64), cs.build(t, 64)
	cs.push(t, cacheDir, key, first, away, asked, after, never)

	rd := startGatewayBin(t, gatewayBinary(), readerBundle, torNetConf, t.TempDir())
	t.Logf("timing: the gateway reached the onion in %v", rd.waitReachable(t).Round(time.Millisecond))
	x := readerNix(t, rd.url, key.public)
	if out, err, _ := timedNix(t, "reachable, substitute", x, "nix-build", first.args...); err != nil {
		t.Fatalf("nix-build: %v\n%s", err, out)
	} else {
		substituted(t, out)
	}

	off := time.Now()
	srv.stop()
	t.Run("the appliance off: nix-build builds locally within seconds", func(t *testing.T) {
		out, err, took := timedNix(t, "appliance off", x, "nix-build", away.args...)
		if err != nil {
			t.Fatalf("nix-build failed because the cache is away: %v\n%s", err, out)
		}
		builtLocally(t, out)
		if took > 30*time.Second {
			t.Errorf("nix-build took %v, want seconds", took)
		}
		// Nix now holds "not there" for asked's paths, for the negative TTL.
		if out, err, _ := timedNix(t, "appliance off, dry run", x, "nix-build", append(asked.args, "--dry-run")...); err != nil || !strings.Contains(out, "will be built") {
			t.Errorf("nix-build --dry-run: %v\n%s", err, out)
		}
		t.Logf("the gateway says it is unreachable %v after serve stopped", time.Since(off).Round(time.Millisecond))
	})

	t.Run("a gateway that never reached the onion: Nix skips the cache", func(t *testing.T) {
		fresh := startGatewayBin(t, gatewayBinary(), readerBundle, torNetConf, t.TempDir())
		out, err, took := timedNix(t, "appliance off, new gateway", readerNix(t, fresh.url, key.public), "nix-build", never.args...)
		if err != nil {
			t.Fatalf("nix-build failed because the cache is away: %v\n%s", err, out)
		}
		builtLocally(t, out)
		if took > time.Minute {
			t.Errorf("nix-build took %v, want well under a minute", took)
		}
	})

	back := time.Now()
	srv = startOnionServer(t, stateDir, cacheDir)
	t.Logf("timing: serve back on the same state in %v", time.Since(back).Round(time.Millisecond))
	t.Run("the onion back: the next substitution uses it, with no restart", func(t *testing.T) {
		rd.waitReachable(t)
		t.Logf("timing: the gateway reached the onion again %v after serve started", time.Since(back).Round(time.Millisecond))
		out, err, _ := timedNix(t, "back, substitute", x, "nix-build", after.args...)
		if err != nil {
			t.Fatalf("nix-build: %v\n%s", err, out)
		}
		substituted(t, out)
		if took := time.Since(back); took > 2*time.Minute {
			t.Errorf("the next substitution came %v after serve started, want about a minute", took)
		}
		if !strings.Contains(rd.out.String(), "onion reachable") {
			t.Errorf("the gateway did not log that the onion is back")
		}
	})
	t.Run("and a path Nix was told was not there is fetched once the negative TTL is over", func(t *testing.T) {
		for {
			out, err, _ := timedNix(t, "back, dry run", x, "nix-build", append(asked.args, "--dry-run")...)
			if err == nil && strings.Contains(out, "will be fetched") && !strings.Contains(out, "will be built") {
				break
			}
			if time.Since(back) > 3*time.Minute {
				t.Fatalf("Nix still builds what the cache has, 3 minutes after it came back:\n%s", out)
			}
			time.Sleep(5 * time.Second)
		}
		took := time.Since(back)
		t.Logf("timing: back: a path asked while away is fetched again %v after serve started", took.Round(time.Second))
		if took > 2*time.Minute {
			t.Errorf("%v, want about a minute (the module's negative TTL)", took)
		}
	})
}

// updateSkipsWhileAway checks that update, through the running gateway at
// gatewayURL and with a gateway of its own that cannot bootstrap, exits 75
// with a warning within seconds and makes no profile.
func updateSkipsWhileAway(t *testing.T, gatewayURL, readerBundle, torrc string) {
	host := newNix(t)
	dir := t.TempDir()
	common := []string{"--allow-unsigned", "--marker", "web1", "--profile", filepath.Join(dir, "profile"), "--store", host.root}
	for _, tc := range []struct {
		name   string
		args   []string
		within time.Duration
	}{
		{"through the running gateway", append([]string{"update", "switch", "--cache", gatewayURL, "--state-dir", filepath.Join(dir, "a")}, common...), 10 * time.Second},
		{"with its own gateway, whose tor cannot bootstrap", append([]string{"update", "switch", "--bundle", readerBundle, "--tor-config", torrc,
			"--state-dir", filepath.Join(dir, "b"), "--wait", "15s"}, common...), 30 * time.Second},
	} {
		began := time.Now()
		out, code := kissOnion(t, host, tc.args...)
		took := time.Since(began)
		t.Logf("timing: network gone: update %s: %v (exit %d)", tc.name, took.Round(100*time.Millisecond), code)
		if code != 75 || !strings.Contains(out, "kiss-onion: warning: ") || !strings.Contains(out, "skipped") || took > tc.within {
			t.Errorf("update %s: exit %d after %v, want 75 with a warning within %v:\n%s", tc.name, code, took, tc.within, out)
		}
		if _, err := os.Lstat(filepath.Join(dir, "profile")); err == nil {
			t.Errorf("update %s made a profile", tc.name)
		}
	}
}
