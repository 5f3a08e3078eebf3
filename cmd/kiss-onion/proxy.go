package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/gateway"
)

func init() {
	register("proxy", "a local gateway into the cache's onion, for nix and the nix-daemon", runProxy)
}

const proxyUsage = `
Usage:
	kiss-onion proxy --bundle DIR [--listen 127.0.0.1:37510] [--write] [--via tls|onion] [--state-dir DIR] [--tor-config FILE]
	                 [--cache-dir DIR --cache-size SIZE] [--metrics-listen 127.0.0.1:37513] [--allow-remote]

Runs a Tor client holding the key of the bundle DIR and serves the cache's
read onion (the write onion with --write) as plain HTTP on a loopback
address, so that nix and the nix-daemon reach the cache with no torsocks,
no system tor and no proxy settings:

	substituters = http://127.0.0.1:37510

Requests are spread over a few isolated Tor circuits that are kept warm.
When the onion cannot be reached (the cache is off, this machine is
offline) a request waits at most 20 s for Tor, and from then on, until a
background probe reaches the onion again, the gateway answers at once from
what it knows, so that Nix carries on without the cache: nix-cache-info
from the copy it keeps in --state-dir, 404 ("not there") for narinfos and
NARs, 421 to an upload (Nix reports it instead of retrying), 502 to
anything else. GET /-/health answers whether the onion is reachable, and
since when (JSON; 200 when reachable, 503 when not).

A bundle of a cache with several front ends (serves over one store,
'keys add --frontend DIR') lists each one's onions: the gateway spreads
its circuits over them all, stops sending to a front end that fails
(until its probe answers again), sends a request that failed before any
answer to another one, and takes a NAR download that broke up on another
front end with a Range request. Nix sees one substituter.

A bundle from 'kiss-onion keys add --tls' also reaches the cache's TLS
door (serve --listen-tls), directly with its client certificate and no
tor: the gateway goes that way by default (--via tls), through the
onion with --via onion. The door decides the role by the certificate.

Reading, the gateway spares Nix a round trip over Tor per path: on a
narinfo it does not know, it asks the cache for the narinfos of the path's
whole closure at once, answers Nix's next narinfo requests from that
answer (for 30 s), and starts the closure's NARs over the circuits before
Nix asks for them (--prefetch=false turns both off). NARs are checked
against their names and kept in --state-dir within 1 GiB, or, with
--cache-dir, in a cache that outlives the gateway, within --cache-size: a
LAN cache, which fetches each NAR over Tor once for all the machines
behind it, and serves the paths it holds whole while the onion is away.
Serving other machines needs --listen on a LAN address and --allow-remote:
whoever reaches that address reads the cache, as this bundle's key would.

--metrics-listen serves the gateway's Prometheus metrics at
http://ADDRESS/metrics: whether the onion (or the TLS door) is reachable
and since when (and each front end's, by its index in the bundle), the circuits, the requests (forwarded, answered from what
it holds, or its own answers for an onion away), its NAR store's hits and
size, the bytes to and from the cache, failed dials. Off by default; a
loopback address unless --allow-remote.

Arguments:
	none

Examples:
	kiss-onion proxy --bundle /var/lib/kiss-onion-secrets/laptop.bundle
	kiss-onion proxy --bundle ci.bundle --write --listen 127.0.0.1:37511 --state-dir ~/.cache/kiss-onion-proxy
	kiss-onion proxy --bundle lan.bundle --listen 192.168.1.2:37510 --allow-remote --cache-dir /var/cache/kiss-onion --cache-size 50G
	nix copy --to 'http://127.0.0.1:37511?compression=zstd' ./result
`

// gatewayFlags are the flags of the commands that start a gateway.
type gatewayFlags struct {
	bundle    string
	stateDir  string
	torConfig string
	torBinary string
	circuits  int
	via       string // "", gateway.DoorTLS or gateway.DoorOnion
	// Read gateways only (proxy sets them; the defaults suit update).
	noPrefetch bool
	cacheDir   string
	cacheSize  byteSize
	// metrics, when not nil, gets the gateway's metrics (proxy only).
	metrics prometheus.Registerer
}

// add adds the flags; stateDir is --state-dir's default and stateUse what
// the command keeps there.
func (g *gatewayFlags) add(fs *flag.FlagSet, stateDir, stateUse string) {
	fs.StringVar(&g.bundle, "bundle", "", "the key bundle `directory` (from 'kiss-onion keys add' or 'keys export')")
	fs.StringVar(&g.stateDir, "state-dir", stateDir, "`directory` for "+stateUse+" (created 0700)")
	fs.StringVar(&g.torConfig, "tor-config", "", "extra torrc lines for tor from this `file` (a private network's DirAuthority lines, for one)")
	fs.StringVar(&g.torBinary, "tor-binary", "tor", "the tor `program`")
	fs.IntVar(&g.circuits, "circuits", gateway.DefaultCircuits, "spread requests over this `many` isolated Tor circuits")
}

// start loads the bundle and starts a gateway to its read onion (the
// write onion with write) on listen.
func (g *gatewayFlags) start(ctx context.Context, write bool, listen string, log, torLog *logrus.Entry) (*gateway.Gateway, error) {
	if g.circuits < 1 {
		return nil, usagef("--circuits must be at least 1")
	}
	b, err := clientauth.LoadBundle(g.bundle)
	if err != nil {
		return nil, withHint(err, "--bundle names a directory from 'kiss-onion keys add NAME --out DIR' or 'keys export'")
	}
	door, err := g.door(b)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(g.stateDir, 0o700); err != nil {
		return nil, withHint(fmt.Errorf("create state directory: %w", err), "choose a writable one with --state-dir")
	}
	var prefetch *gateway.PrefetchConfig
	if !write && (!g.noPrefetch || g.cacheDir != "") {
		prefetch = &gateway.PrefetchConfig{Dir: filepath.Join(g.stateDir, "prefetch"), Ahead: !g.noPrefetch, Size: int64(g.cacheSize)}
		if g.cacheDir != "" {
			prefetch.Dir, prefetch.Keep = g.cacheDir, true
		}
	}
	if door == gateway.DoorTLS {
		if write && b.Role != clientauth.RoleWriter {
			return nil, withHint(fmt.Errorf("bundle %s is a %s's (%s): it cannot write", g.bundle, b.Role, b.Name), "use a writer's bundle")
		}
		return gateway.Start(ctx, gateway.Config{Bundle: b, Door: door, Write: write, Listen: listen, StateDir: g.stateDir, Circuits: g.circuits, Prefetch: prefetch, Metrics: g.metrics, Log: log})
	}
	if b.Key == nil {
		return nil, withHint(fmt.Errorf("bundle %s has no client.key", g.bundle), "export it with the key: 'kiss-onion keys export %s --key FILE'", b.Name)
	}
	if write && b.WriteOnion == "" {
		return nil, withHint(fmt.Errorf("bundle %s is a %s's (%s): it cannot reach the write onion", g.bundle, b.Role, b.Name), "use a writer's bundle")
	}
	var lines []string
	if g.torConfig != "" {
		if lines, err = readTorrcLines(g.torConfig); err != nil {
			return nil, err
		}
	}
	role := "read"
	if write {
		role = "write"
	}
	return gateway.Start(ctx, gateway.Config{
		Bundle:     b,
		Write:      write,
		Listen:     listen,
		TorBinary:  g.torBinary,
		TorDataDir: filepath.Join(g.stateDir, "tor-"+role),
		TorrcLines: lines,
		StateDir:   g.stateDir,
		Circuits:   g.circuits,
		Prefetch:   prefetch,
		Metrics:    g.metrics,
		Log:        log,
		TorLog:     torLog,
	})
}

// door returns the door to reach b's cache through: --via, or by default
// the TLS door when b has a client certificate, else the onion.
func (g *gatewayFlags) door(b clientauth.Bundle) (string, error) {
	hasTLS := b.TLS != nil && b.TLS.Cert != nil
	switch g.via {
	case "":
		if hasTLS {
			return gateway.DoorTLS, nil
		}
		return gateway.DoorOnion, nil
	case gateway.DoorOnion:
		return gateway.DoorOnion, nil
	case gateway.DoorTLS:
		if !hasTLS {
			return "", withHint(fmt.Errorf("bundle %s has no TLS client certificate", g.bundle), "mint a client with 'kiss-onion keys add NAME --tls', or use --via onion")
		}
		return gateway.DoorTLS, nil
	}
	return "", usagef("--via must be tls or onion, not %q", g.via)
}

// errCacheAway is wrapped by openCache's error when the onion could not be
// reached within --wait: tor did not bootstrap, or the onion did not answer.
var errCacheAway = errors.New("the cache is unreachable")

// openCache returns the URL to reach the cache at: cacheURL as it is, or
// a gateway started from the flags once the onion answers (within wait,
// tor's start included). done stops the gateway.
func (g *gatewayFlags) openCache(ctx context.Context, cacheURL string, write bool, wait time.Duration, log *logrus.Entry) (url string, done func(), err error) {
	switch {
	case cacheURL != "" && g.bundle != "":
		return "", nil, usagef("give --bundle or --cache, not both")
	case cacheURL != "":
		return cacheURL, func() {}, nil
	case g.bundle == "":
		return "", nil, usagef("give --bundle DIR (or --cache URL)")
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	const hint = "is this machine online, the cache serving, and this bundle's key authorized ('kiss-onion keys list' on the cache)? raise --wait to wait longer"
	// tor's warnings (running as root, a private network) are noise here;
	// why the onion cannot be reached comes from the gateway.
	gw, err := g.start(wctx, write, "", log, quieter(log, logrus.ErrorLevel))
	if err != nil {
		if wctx.Err() != nil && ctx.Err() == nil {
			return "", nil, withHint(fmt.Errorf("%w: tor did not bootstrap within %v: %v", errCacheAway, wait, err), hint)
		}
		return "", nil, err
	}
	if err := gw.WaitReachable(wctx); err != nil {
		gw.Close()
		if ctx.Err() == nil {
			err = fmt.Errorf("%w: %w", errCacheAway, err)
		}
		return "", nil, withHint(err, hint)
	}
	return gw.URL(), func() { gw.Close() }, nil
}

func runProxy(args []string) error {
	fs := newFlagSet("proxy", proxyUsage)
	var g gatewayFlags
	g.add(fs, "/var/lib/kiss-onion-proxy", "tor's data")
	listen := fs.String("listen", "127.0.0.1:37510", "serve on this loopback `address`")
	write := fs.Bool("write", false, "forward to the write onion (a writer's bundle): nix copy --to then uploads")
	fs.StringVar(&g.via, "via", "", "reach the cache through this `door`: tls or onion (default: tls when the bundle has a TLS certificate)")
	prefetch := fs.Bool("prefetch", true, "ask for a closure's narinfos at once and fetch its NARs ahead of Nix")
	fs.StringVar(&g.cacheDir, "cache-dir", "", "keep fetched NARs and narinfos in this `directory` across restarts (a LAN cache)")
	g.cacheSize = 10 << 30
	fs.Var(&g.cacheSize, "cache-size", "bound --cache-dir to this `size` (like 512M or 50G), least recently used first")
	allowRemote := fs.Bool("allow-remote", false, "let --listen (to serve other machines) and --metrics-listen bind non-loopback addresses")
	metricsListen := fs.String("metrics-listen", "", "serve Prometheus metrics at http://`address`/metrics (host:port; off when empty)")
	var lf logFlags
	lf.add(fs)
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usagef("proxy takes no arguments, got %q", rest[0])
	}
	if g.bundle == "" {
		return usagef("proxy needs --bundle DIR")
	}
	if err := checkListenAddr("listen", *listen, *allowRemote); err != nil {
		return err
	}
	g.noPrefetch = !*prefetch
	if g.cacheDir == "" {
		g.cacheSize = 0 // the prefetch store's own bound
	} else if *write {
		return usagef("--cache-dir is for reading: not with --write")
	} else if g.cacheDir, err = filepath.Abs(g.cacheDir); err != nil {
		return err
	}
	if *metricsListen != "" {
		if err := checkListenAddr("metrics-listen", *metricsListen, *allowRemote); err != nil {
			return err
		}
	}
	log, err := lf.daemon(os.Stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// The metrics come first: they say the onion is not reachable yet
	// while tor bootstraps.
	errc := make(chan error, 1)
	if *metricsListen != "" {
		reg := newProcessRegistry()
		if err := serveRegistry(ctx, *metricsListen, reg, log, errc); err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		g.metrics = reg
	}
	gw, err := g.start(ctx, *write, *listen, log, nil)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer gw.Close()
	log.WithField("listen", gw.URL()).Info("gateway ready")
	select {
	case <-ctx.Done():
		log.Info("stopping")
		return nil
	case err := <-errc:
		return fmt.Errorf("serve metrics on %s: %w", *metricsListen, err)
	case err := <-gw.Err():
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return fmt.Errorf("serve %s: %w", *listen, err)
	}
}
