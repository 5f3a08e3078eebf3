package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	kogateway "github.com/kiss-onion/kiss-onion/gateway"
)

// The client side on the private Tor network: `kiss-onion proxy` as the
// nix-daemon's substituter and as nix copy's target, and pull-based
// deployment with publish and update (each starting its own gateway, or
// going through a running proxy with --cache).

// gateway is a running `kiss-onion proxy`.
type gateway struct {
	*proc
	url string
}

// startGateway starts `kiss-onion proxy` with bundle on a free port, its tor
// on the private network; it returns once the gateway listens, which may be
// before the onion is reachable.
func startGateway(t *testing.T, bundle string, extra ...string) *gateway {
	t.Helper()
	addr := freeAddr(t)
	args := append([]string{"proxy", "--bundle", bundle, "--listen", addr, "--state-dir", t.TempDir(),
		"--tor-config", torNetConf, "--log-level", "debug"}, extra...)
	g := &gateway{proc: start(t, args...), url: "http://" + addr}
	waitReady(t, g.proc, "the proxy listens", time.Minute, func() bool { return answers(g.url+"/-/health", false) })
	return g
}

// gatewayHealth is the gateway's /-/health.
type gatewayHealth struct {
	Reachable bool      `json:"reachable"`
	Since     time.Time `json:"since"`
	LastError string    `json:"last_error"`
	Circuits  int       `json:"circuits"`
	InFlight  int       `json:"in_flight"`
}

func (g *gateway) health(t *testing.T) (int, gatewayHealth) {
	t.Helper()
	code, body := httpDo(t, "GET", g.url+"/-/health", nil)
	var h gatewayHealth
	if err := json.Unmarshal([]byte(body), &h); err != nil {
		t.Fatalf("/-/health: %d %q: %v", code, body, err)
	}
	return code, h
}

// waitReachable polls the gateway's health until the onion is reachable.
func (g *gateway) waitReachable(t *testing.T) time.Duration {
	t.Helper()
	began := time.Now()
	deadline := began.Add(4 * time.Minute)
	for {
		code, h := g.health(t)
		if code == 200 && h.Reachable {
			return time.Since(began)
		}
		if time.Now().After(deadline) {
			t.Fatalf("gateway %s: onion not reachable after 4 minutes: %+v\n%s", g.url, h, g.out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// stubSystemExpr is a "NixOS system" for update: bin/switch-to-configuration
// is a busybox script that appends its argument and where the profile
// points (the generation link and its target) to log, outside the store.
// It references a second path, so that realising it substitutes a closure.
const stubSystemExpr = `{ nonce, log, profile }:
let
  bb = "` + busybox + `";
  etc = derivation { name = "etc"; inherit nonce; system = builtins.currentSystem; builder = bb; args = [ "sh" "-c" "echo etc > $out" ]; };
in derivation {
  name = "nixos-system-stub";
  inherit nonce;
  system = builtins.currentSystem;
  builder = bb;
  activate = ''
    #!${bb} sh
    # ${etc}
    link=$(${bb} readlink ${profile})
    echo "$1 $link $(${bb} readlink $(${bb} dirname ${profile})/$link)" >> ${log}
  '';
  args = [ "sh" "-c" "${bb} mkdir -p $out/bin; echo \"$activate\" > $out/bin/switch-to-configuration; ${bb} chmod +x $out/bin/switch-to-configuration" ];
}
`

// buildSystem builds a new stub system in n's store.
func buildSystem(t *testing.T, n *nixClient, log, profile string) string {
	t.Helper()
	expr := filepath.Join(t.TempDir(), "system.nix")
	if err := os.WriteFile(expr, []byte(stubSystemExpr), 0o644); err != nil {
		t.Fatal(err)
	}
	nonce := make([]byte, 8)
	rand.Read(nonce)
	return lastLine(n.must("nix-build", expr, "--argstr", "nonce", hex.EncodeToString(nonce),
		"--argstr", "log", log, "--argstr", "profile", profile, "--no-out-link"))
}

// kissOnion runs the binary with env added to n's nix environment (so that
// the nix commands it runs see n's settings) and returns its output and
// exit code.
func kissOnion(t *testing.T, n *nixClient, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = n.env()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return out.String(), ee.ExitCode()
	case err != nil:
		t.Fatalf("run kiss-onion %v: %v\n%s", args, err, out.String())
	}
	return out.String(), 0
}

func mustKissOnion(t *testing.T, n *nixClient, args ...string) string {
	t.Helper()
	began := time.Now()
	out, code := kissOnion(t, n, args...)
	if code != 0 {
		t.Fatalf("kiss-onion %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	t.Logf("kiss-onion %s: %v", args[0], time.Since(began).Round(time.Millisecond))
	return out
}

// TestDeploy runs the client side against one onion server: the gateways
// first (one of them started before the server), then publish and update.
// The steps share the server and the gateways.
func TestDeploy(t *testing.T) {
	d := deployGateways(t)
	deployUpdates(t, newDeployHost(t, d))
}

// deployment is the onion server of TestDeploy, its clients' bundles and
// gateways, and the store the systems are built in.
type deployment struct {
	cacheDir     string
	writerBundle string
	readerBundle string
	key          signingKey // signs the narinfos
	reader       *gateway
	writer       *gateway   // with --write
	src          *nixClient // where the closures and the systems are built
}

// deployGateways starts the onion server and a gateway for each of its
// clients, the reader's before the server, and copies a closure through
// them both ways.
func deployGateways(t *testing.T) *deployment {
	stateDir := filepath.Join(t.TempDir(), "state")
	d := &deployment{
		cacheDir:     filepath.Join(t.TempDir(), "cache"),
		writerBundle: addKey(t, stateDir, "ci", "writer"),
		readerBundle: addKey(t, stateDir, "web1", "reader"),
		key:          newSigningKey(t, "cache-1"),
	}

	// The reader's gateway starts before the cache serves anything.
	began := time.Now()
	d.reader = startGateway(t, d.readerBundle)
	t.Run("a gateway answers 502 while the onion is unreachable", func(t *testing.T) {
		code, body := httpDo(t, "GET", d.reader.url+"/nix-cache-info", nil)
		if code != 502 || !strings.Contains(body, ".onion is unreachable") {
			t.Errorf("GET /nix-cache-info before serve: %d %q, want 502 saying the onion is unreachable", code, body)
		}
		if code, h := d.reader.health(t); code != 503 || h.Reachable || h.LastError == "" {
			t.Errorf("health before serve: %d %+v, want 503, unreachable, with the last error", code, h)
		}
	})
	startOnionServer(t, stateDir, d.cacheDir)
	t.Run("and recovers once the onion is published", func(t *testing.T) {
		waited := d.reader.waitReachable(t)
		t.Logf("the reader's gateway reached the onion %v after serve started (%v after the gateway)", waited.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
		code, body := httpDo(t, "GET", d.reader.url+"/nix-cache-info", nil)
		if code != 200 || !strings.Contains(body, "StoreDir: /nix/store") {
			t.Errorf("GET /nix-cache-info: %d %q", code, body)
		}
	})
	d.writer = startGateway(t, d.writerBundle, "--write")
	t.Logf("the writer's gateway reached the onion in %v", d.writer.waitReachable(t).Round(time.Millisecond))

	d.src = newNix(t)
	top, closure := d.src.buildClosure(512)
	t.Run("a writer gateway takes a nix copy --to", func(t *testing.T) {
		began := time.Now()
		if out, err := d.src.run(nil, "nix", "copy", "--to", d.writer.url+"?compression=zstd&secret-key="+d.key.secretFile, top); err != nil {
			t.Fatalf("nix copy --to the writer's gateway: %v\n%s", err, out)
		}
		t.Logf("nix copy of %d paths through the gateway: %v", len(closure), time.Since(began).Round(time.Millisecond))
		for _, p := range closure {
			hash := strings.TrimPrefix(p, "/nix/store/")[:32]
			if _, err := visibleFile(t, d.cacheDir, hash+".narinfo"); err != nil {
				t.Errorf("%s not in the cache after nix copy", p)
			}
		}
	})
	t.Run("nix substitutes a closure through the gateway", func(t *testing.T) {
		dst := newNix(t, "substituters = "+d.reader.url, "trusted-public-keys = "+d.key.public)
		began := time.Now()
		if out, err := dst.run(nil, "nix-store", "--realise", top); err != nil {
			t.Fatalf("nix-store --realise through the gateway: %v\n%s", err, out)
		}
		t.Logf("nix-store --realise of %d paths through the gateway: %v", len(closure), time.Since(began).Round(time.Millisecond))
		for _, p := range closure {
			sameTree(t, d.src, dst, p)
		}
		if code, h := d.reader.health(t); code != 200 || !h.Reachable || h.Circuits != kogateway.DefaultCircuits || h.InFlight != 0 {
			t.Errorf("health after the download: %d %+v", code, h)
		}
	})
	return d
}

// deployHost is a host of TestDeploy (its store its own, its profile a
// scratch one) that follows the marker "web1", and the systems published
// for it.
type deployHost struct {
	*deployment
	host        *nixClient
	work        string
	profile     string
	activations string // the log of the systems' switch-to-configuration
	updateState string
	publisher   signingKey // signs the markers
	impostor    signingKey // same name, other key
	systems     []string
}

func newDeployHost(t *testing.T, d *deployment) *deployHost {
	work := t.TempDir()
	h := &deployHost{
		deployment:  d,
		host:        newNix(t),
		work:        work,
		profile:     filepath.Join(work, "profiles", "system"),
		activations: filepath.Join(work, "activations"),
		updateState: filepath.Join(work, "update-state"),
		publisher:   newSigningKey(t, "fleet-1"),
		impostor:    newSigningKey(t, "fleet-1"),
		systems:     make([]string, 5),
	}
	for i := range h.systems {
		h.systems[i] = buildSystem(t, d.src, h.activations, h.profile)
	}
	return h
}

// marker returns the marker web1 as the cache holds it.
func (h *deployHost) marker() string {
	b, _ := os.ReadFile(filepath.Join(h.cacheDir, "gcroots", "web1"))
	return string(b)
}

// activated returns the host's activations, one line each.
func (h *deployHost) activated() []string {
	b, _ := os.ReadFile(h.activations)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// profileTarget returns the system the host's profile points at.
func (h *deployHost) profileTarget() string { return profileTarget(h.profile) }

// profileTarget returns the system a profile points at, through its
// generation link; "" when there is none.
func profileTarget(profile string) string {
	link, err := os.Readlink(profile)
	if err != nil {
		return ""
	}
	target, _ := os.Readlink(filepath.Join(filepath.Dir(profile), link))
	return target
}

// publishVia returns publish's arguments, through its embedded gateway or,
// with extra starting "--cache", a running proxy.
func (h *deployHost) publishVia(extra ...string) []string {
	if len(extra) > 0 && extra[0] == "--cache" {
		return append([]string{"publish", "--store", h.src.root, "--cache-key", h.key.secretFile}, extra...)
	}
	return append([]string{"publish", "--bundle", h.writerBundle, "--tor-config", torNetConf, "--state-dir", filepath.Join(h.work, "publish-tor"),
		"--store", h.src.root, "--cache-key", h.key.secretFile}, extra...)
}

// updateVia returns the arguments of an update switch through the
// reader's running proxy.
func (h *deployHost) updateVia(extra ...string) []string {
	return append([]string{"update", "switch", "--cache", h.reader.url, "--marker", "web1", "--profile", h.profile, "--state-dir", h.updateState,
		"--store", h.host.root, "--nix-option", "trusted-public-keys=" + h.key.public}, extra...)
}

// refused checks that a signed update fails saying wantSays and leaves the
// host on systems[2].
func (h *deployHost) refused(t *testing.T, wantSays string) {
	t.Helper()
	out, code := kissOnion(t, h.host, h.updateVia("--publisher-key", h.publisher.public)...)
	if code != 1 || !strings.Contains(out, wantSays) || !strings.Contains(out, "kiss-onion: error: ") {
		t.Errorf("update exit %d, want 1 saying %q:\n%s", code, wantSays, out)
	}
	if h.profileTarget() != h.systems[2] || len(h.activated()) != 2 {
		t.Errorf("a refused update changed the host: profile at %s, activations %q", h.profileTarget(), h.activated())
	}
}

// deployUpdates publishes systems for the host, through publish's own
// gateway and the writer's proxy, and updates the host to them, signed
// and not, refusing what it must.
func deployUpdates(t *testing.T, h *deployHost) {
	systems, host, src, writer := h.systems, h.host, h.src, h.writer
	signed := []string{"--publisher-key", h.publisher.public}

	t.Run("publish then update switches the host", func(t *testing.T) {
		mustKissOnion(t, src, h.publishVia("web1", systems[0])...)
		if h.marker() != systems[0]+"\n" {
			t.Fatalf("marker after publish: %q", h.marker())
		}
		out := mustKissOnion(t, host, "update", "switch", "--bundle", h.readerBundle, "--tor-config", torNetConf, "--state-dir", h.updateState,
			"--marker", "web1", "--profile", h.profile, "--store", host.root, "--nix-option", "trusted-public-keys="+h.key.public, "--allow-unsigned")
		for _, step := range []string{"read marker (cache=", "marker=web1)", "nix-store --realise " + systems[0], "nix-env --profile " + h.profile + " --set " + systems[0], "switch-to-configuration switch", "done"} {
			if !strings.Contains(out, step) {
				t.Errorf("update did not log %q:\n%s", step, out)
			}
		}
		if got := h.activated(); len(got) != 1 || !strings.HasPrefix(got[0], "switch system-1-link "+systems[0]) {
			t.Errorf("activations %q, want one switch with the profile at %s", got, systems[0])
		}
		if !host.hasPath(systems[0]) {
			t.Errorf("%s not realised in the host's store", systems[0])
		}
	})
	t.Run("a second update is a no-op", func(t *testing.T) {
		out := mustKissOnion(t, host, h.updateVia("--allow-unsigned")...)
		if !strings.Contains(out, "nothing to do") || strings.Contains(out, "nix-store --realise") {
			t.Errorf("second update:\n%s", out)
		}
		if got := h.activated(); len(got) != 1 {
			t.Errorf("activations %q, want still one", got)
		}
	})
	var older string // a signed marker, replayed later
	t.Run("a newer signed publish is picked up", func(t *testing.T) {
		mustKissOnion(t, src, h.publishVia("--cache", writer.url, "--signing-key", h.publisher.secretFile, "web1", systems[1])...)
		older = h.marker()
		mustKissOnion(t, src, h.publishVia("--cache", writer.url, "--signing-key", h.publisher.secretFile, "web1", systems[2])...)
		if !strings.HasPrefix(h.marker(), systems[2]+"\n# kiss-onion-statement: ") {
			t.Fatalf("marker after a signed publish:\n%s", h.marker())
		}
		out := mustKissOnion(t, host, h.updateVia(signed...)...)
		if !strings.Contains(out, "publisher=fleet-1") {
			t.Errorf("update did not log the signer:\n%s", out)
		}
		got := h.activated()
		if len(got) != 2 || !strings.HasPrefix(got[1], "switch system-2-link "+systems[2]) || h.profileTarget() != systems[2] {
			t.Errorf("activations %q, profile at %s, want a second switch to %s", got, h.profileTarget(), systems[2])
		}
		out = mustKissOnion(t, host, h.updateVia(signed...)...)
		if !strings.Contains(out, "nothing to do") || len(h.activated()) != 2 {
			t.Errorf("a second signed update was not a no-op:\n%s", out)
		}
	})

	t.Run("a replayed older generation is refused", func(t *testing.T) {
		code, body := httpDo(t, "PUT", writer.url+"/gcroots/web1", strings.NewReader(older))
		if code/100 != 2 {
			t.Fatalf("PUT the old marker: %d %s", code, body)
		}
		h.refused(t, "a rollback")
	})
	t.Run("a marker signed by another key is refused", func(t *testing.T) {
		mustKissOnion(t, src, h.publishVia("--cache", writer.url, "--signing-key", h.impostor.secretFile, "web1", systems[3])...)
		h.refused(t, "signature does not verify")
	})
	t.Run("an unsigned marker is refused with a publisher key", func(t *testing.T) {
		mustKissOnion(t, src, h.publishVia("--cache", writer.url, "web1", systems[3])...)
		h.refused(t, "not signed")
	})
	t.Run("a failing nix copy writes no marker", func(t *testing.T) {
		before := h.marker()
		missing := "/nix/store/" + strings.Repeat("0", 32) + "-not-built"
		out, code := kissOnion(t, src, h.publishVia("web1", missing)...)
		if code != 1 || !strings.Contains(out, "the marker was not written") {
			t.Errorf("publish of a path that is not there: exit %d\n%s", code, out)
		}
		if h.marker() != before {
			t.Errorf("marker changed to %q", h.marker())
		}
		locks, _ := os.ReadDir(filepath.Join(h.cacheDir, "gcroots", ".lock"))
		for _, l := range locks {
			if !strings.HasPrefix(l.Name(), ".") {
				t.Errorf("lock left behind: %s", l.Name())
			}
		}
		t.Logf("publish's output:\n%s", out)
	})
	t.Run("a failed realise leaves the profile unchanged", func(t *testing.T) {
		mustKissOnion(t, src, h.publishVia("--cache", writer.url, "--signing-key", h.publisher.secretFile, "web1", systems[4])...)
		// The cache loses the system's NAR: nix cannot substitute it.
		hash := strings.TrimPrefix(systems[4], "/nix/store/")[:32]
		ni, err := os.ReadFile(filepath.Join(h.cacheDir, hash+".narinfo"))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(ni), "\n") {
			if u, ok := strings.CutPrefix(l, "URL: "); ok {
				os.Remove(filepath.Join(h.cacheDir, u))
			}
		}
		out, code := kissOnion(t, host, h.updateVia(signed...)...)
		if code != 1 || !strings.Contains(out, "the profile is unchanged") {
			t.Errorf("update with a lost NAR: exit %d\n%s", code, out)
		}
		if h.profileTarget() != systems[2] || len(h.activated()) != 2 {
			t.Errorf("a failed realise changed the host: profile at %s, activations %q", h.profileTarget(), h.activated())
		}
	})
}

// TestDeployCommandLine runs proxy, publish and update with bad arguments:
// each says what is wrong in the house voice, with exit 2 for a usage
// error and 1 for a failure, before starting any tor.
func TestDeployCommandLine(t *testing.T) {
	dir := t.TempDir()
	stateDir := filepath.Join(dir, "state")
	reader := addKey(t, stateDir, "laptop", "reader")
	noKey := filepath.Join(dir, "nokey.bundle")
	if out, code := runKissOnion(t, "keys", "export", "laptop", "--out", noKey, "--state-dir", stateDir); code != 0 {
		t.Fatalf("keys export: %d\n%s", code, out)
	}
	sys := "/nix/store/" + strings.Repeat("0", 32) + "-nixos-system-web1"
	for _, tc := range []struct {
		name string
		args []string
		code int
		says []string
	}{
		{"proxy needs a bundle", []string{"proxy"}, 2, []string{"kiss-onion: error: proxy needs --bundle DIR", "kiss-onion: hint:"}},
		{"proxy listens on loopback only", []string{"proxy", "--bundle", reader, "--listen", "0.0.0.0:37510"}, 2, []string{"not a loopback address"}},
		{"proxy --write needs a writer", []string{"proxy", "--bundle", reader, "--write", "--state-dir", filepath.Join(dir, "p")}, 1, []string{"cannot reach the write onion"}},
		{"proxy needs the private key", []string{"proxy", "--bundle", noKey, "--state-dir", filepath.Join(dir, "p")}, 1, []string{"has no client.key"}},
		{"proxy with a missing bundle", []string{"proxy", "--bundle", filepath.Join(dir, "none")}, 1, []string{"kiss-onion.toml", "kiss-onion: hint:"}},
		{"publish needs a path", []string{"publish", "--bundle", reader, "web1"}, 2, []string{"NAME and at least one STORE_PATH"}},
		{"publish refuses a bad store path", []string{"publish", "--bundle", reader, "web1", "/tmp/x"}, 2, []string{"STORE_PATH"}},
		{"publish refuses a bad marker name", []string{"publish", "--bundle", reader, ".hidden", sys}, 2, []string{"NAME"}},
		{"publish needs a writer", []string{"publish", "--bundle", reader, "--state-dir", filepath.Join(dir, "p"), "web1", sys}, 1, []string{"cannot reach the write onion"}},
		{"publish needs a bundle or a cache", []string{"publish", "web1", sys}, 2, []string{"--bundle"}},
		{"publish's netrc is for --cache", []string{"publish", "--bundle", reader, "--netrc-file", filepath.Join(dir, "netrc"), "web1", sys}, 2, []string{"--netrc-file is for --cache"}},
		{"publish with a bad signing key", []string{"publish", "--bundle", reader, "--signing-key", filepath.Join(reader, "kiss-onion.toml"), "web1", sys}, 1, []string{"secret key", "hint: make one"}},
		{"update needs an action", []string{"update"}, 2, []string{"switch or boot"}},
		{"update refuses an unknown action", []string{"update", "reboot"}, 2, []string{`unknown action "reboot"`}},
		{"update needs a key or --allow-unsigned", []string{"update", "switch", "--bundle", reader}, 2, []string{"--publisher-key", "--allow-unsigned"}},
		{"update refuses both", []string{"update", "switch", "--bundle", reader, "--allow-unsigned", "--publisher-key", "k:AAAA"}, 2, []string{"contradict"}},
		{"update refuses a bad publisher key", []string{"update", "boot", "--bundle", reader, "--publisher-key", "nokey"}, 2, []string{"--publisher-key"}},
		{"update needs a bundle or a cache", []string{"update", "switch", "--allow-unsigned"}, 2, []string{"--bundle"}},
		{"update refuses bundle and cache", []string{"update", "switch", "--allow-unsigned", "--bundle", reader, "--cache", "http://127.0.0.1:1", "--state-dir", filepath.Join(dir, "u")}, 2, []string{"not both"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := runKissOnion(t, tc.args...)
			if code != tc.code {
				t.Errorf("exit %d, want %d\n%s", code, tc.code, out)
			}
			for _, s := range tc.says {
				if !strings.Contains(out, s) {
					t.Errorf("output does not say %q:\n%s", s, out)
				}
			}
		})
	}
	// A cache that does not answer: update fails and says so.
	out, code := runKissOnion(t, "update", "switch", "--cache", "http://"+freeAddr(t), "--allow-unsigned", "--marker", "web1",
		"--state-dir", filepath.Join(dir, "u"), "--profile", filepath.Join(dir, "profile"))
	if code != 1 || !strings.Contains(out, "kiss-onion: error: update: read marker web1") {
		t.Errorf("update from a dead cache: exit %d\n%s", code, out)
	}
}
