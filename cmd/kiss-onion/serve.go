package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/s3store"
	"github.com/kiss-onion/kiss-onion/serve"
)

func init() {
	register("serve", "serve the cache (over onions, or local listeners)", runServe)
}

const serveUsage = `
Usage:
	kiss-onion serve [flags]

Serves the cache directory as a Nix binary cache: over two Tor onion
services (read and write), and on optional local listeners.

Arguments:
	none; every flag can also be set in the TOML file given by --config,
	with the flag's name as the key (flags win over the file)

Examples:
	kiss-onion serve --tor off --cache-dir /srv/cache --listen 127.0.0.1:8080 --listen-write 127.0.0.1:8081
	kiss-onion serve --config /etc/kiss-onion.toml
	kiss-onion serve --listen-oidc 127.0.0.1:37513 --oidc-issuer https://token.actions.githubusercontent.com --oidc-audience https://cache.example.org --oidc-writer 'repository=org/infra,ref=refs/heads/main'
	kiss-onion serve --listen-tls 0.0.0.0:8443 --allow-remote --tls-name cache.lan   # the TLS door, docs/tls.md
	kiss-onion serve --upstream https://cache.nixos.org --upstream-key cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
`

// stringList is a repeatable flag.
type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(s string) error { *l = append(*l, s); return nil }

// byteSize is a flag holding a size such as 512M or 8G.
type byteSize int64

func (b *byteSize) String() string { return strconv.FormatInt(int64(*b), 10) }
func (b *byteSize) Set(s string) error {
	n, err := parseByteSize(s)
	if err != nil {
		return err
	}
	*b = byteSize(n)
	return nil
}

func parseByteSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	units := []struct {
		suffix string
		mult   int64
	}{{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40}}
	up := strings.TrimSuffix(strings.ToUpper(s), "IB")
	up = strings.TrimSuffix(up, "B")
	for _, u := range units {
		if strings.HasSuffix(up, u.suffix) {
			mult, up = u.mult, strings.TrimSuffix(up, u.suffix)
			break
		}
	}
	n, err := strconv.ParseInt(up, 10, 64)
	if err != nil || n <= 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size (like 512M or 8G)", s)
	}
	return n * mult, nil
}

type serveFlags struct {
	cacheDir      string
	stateDir      string
	listen        string
	listenWrite   string
	allowRemote   bool
	torMode       string
	priority      int
	wantMassQuery bool
	storeDir      string
	trustedKeys   stringList
	maxUpload     byteSize
	logFormat     string
	logLevel      string
	torBinary     string
	torConfig     string
	publicRead    bool
	clientsFile   string
	pruneEvery    time.Duration
	pruneGrace    time.Duration
	maxRootAge    time.Duration
	metricsListen string
	store         string
	s3            s3Flags
	upstream      upstreamFlags
	oidc          oidcFlags
	tls           tlsFlags
}

func runServe(args []string) error {
	var f serveFlags
	f.maxUpload = 8 << 30
	fs := newFlagSet("serve", serveUsage)
	config := fs.String("config", "", "read settings from this TOML `file`")
	fs.StringVar(&f.cacheDir, "cache-dir", "/var/cache/kiss-onion", "the cache `directory` (created 0755)")
	fs.StringVar(&f.store, "store", "", "keep the cache in a bucket instead of --cache-dir: `s3://BUCKET/PREFIX`[?endpoint=HOST:PORT&region=R&scheme=http] (docs/s3.md)")
	f.s3.register(fs)
	fs.StringVar(&f.stateDir, "state-dir", "/var/lib/kiss-onion", "keys and tor data `directory` (created 0700), never under the cache")
	fs.StringVar(&f.listen, "listen", "", "also serve reads on this local `address` (host:port)")
	fs.StringVar(&f.listenWrite, "listen-write", "", "also take uploads on this local `address` (host:port)")
	fs.BoolVar(&f.allowRemote, "allow-remote", false, "let --listen, --listen-write, --listen-tls and --metrics-listen bind non-loopback addresses")
	fs.StringVar(&f.torMode, "tor", "public", "`mode`: public (the Tor network), local (a private offline Tor network) or off")
	fs.IntVar(&f.priority, "priority", 30, "cache `priority` in nix-cache-info (lower is preferred)")
	fs.BoolVar(&f.wantMassQuery, "want-mass-query", true, "advertise WantMassQuery in nix-cache-info")
	fs.StringVar(&f.storeDir, "store-dir", nixcache.DefaultStoreDir, "the Nix store `directory` the cache is for")
	fs.Var(&f.trustedKeys, "trusted-writer-key", "accept only narinfos signed by this `name:base64` key (repeatable)")
	fs.Var(&f.maxUpload, "max-upload-size", "largest upload `size` accepted (like 512M or 8G)")
	fs.StringVar(&f.torBinary, "tor-binary", "tor", "the tor `program`")
	fs.StringVar(&f.torConfig, "tor-config", "", "extra torrc lines for tor from this `file` (a private network's DirAuthority lines, for one)")
	fs.BoolVar(&f.publicRead, "public-read", false, "publish the read onion without client authorization: anyone who knows its address can read")
	fs.StringVar(&f.clientsFile, "clients-file", "", "also authorize the clients listed in this `file` (the registry's format; for declarative setups)")
	fs.DurationVar(&f.pruneEvery, "prune-interval", 0, "prune the cache this `often` (0: never; see 'kiss-onion prune')")
	fs.DurationVar(&f.pruneGrace, "prune-grace", time.Hour, "scheduled prunes keep files younger than this `age`, for uploads made without a lock")
	fs.DurationVar(&f.maxRootAge, "max-root-age", 0, "scheduled prunes ignore markers older than this `age` (0: markers never expire)")
	fs.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus metrics at http://`address`/metrics (host:port; off when empty)")
	f.upstream.register(fs)
	f.oidc.register(fs)
	f.tls.register(fs)
	fs.StringVar(&f.logFormat, "log-format", "text", "log `format`: text or json")
	fs.StringVar(&f.logLevel, "log-level", "info", "log `level`: debug, info, warn or error")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usagef("serve takes no arguments, got %q", rest[0])
	}
	if *config != "" {
		if err := applyConfigFile(fs, *config); err != nil {
			return err
		}
	}
	log, err := logFlags{f.logFormat, f.logLevel}.daemon(os.Stderr)
	if err != nil {
		return err
	}
	return serveMain(f, log)
}

// checkListenAddr refuses an address that is not on loopback, unless
// remote listeners are allowed: the onions are the way in from outside.
func checkListenAddr(flagName, addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return usagef("--%s %q: %v", flagName, addr, err)
	}
	if allowRemote {
		return nil
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return usagef("--%s %q is not a loopback address; add --allow-remote to listen there", flagName, addr)
}

// listenSpec is a local listener asked for on the command line.
type listenSpec struct {
	flag, addr string
	role       serve.Role
}

func serveMain(f serveFlags, log *logrus.Entry) error {
	switch f.torMode {
	case "off", "public", "local":
	default:
		return usagef("--tor must be public, local or off, not %q", f.torMode)
	}
	// tor is told where the onions' unix sockets are: absolute paths, so
	// that a relative --state-dir works too.
	for _, d := range []*string{&f.stateDir, &f.cacheDir} {
		abs, err := filepath.Abs(*d)
		if err != nil {
			return usagef("%s: %v", *d, err)
		}
		*d = abs
	}
	var listeners []listenSpec
	if f.listen != "" {
		listeners = append(listeners, listenSpec{"listen", f.listen, serve.Read})
	}
	if f.listenWrite != "" {
		listeners = append(listeners, listenSpec{"listen-write", f.listenWrite, serve.Write})
	}
	for _, l := range listeners {
		if err := checkListenAddr(l.flag, l.addr, f.allowRemote); err != nil {
			return err
		}
	}
	if f.metricsListen != "" {
		if err := checkListenAddr("metrics-listen", f.metricsListen, f.allowRemote); err != nil {
			return err
		}
	}
	if err := f.oidc.check(f.tls.listen != ""); err != nil {
		return err
	}
	if err := f.tls.check(f.allowRemote); err != nil {
		return err
	}
	if f.torMode == "off" && len(listeners) == 0 && !f.oidc.listening() && f.tls.listen == "" {
		return usagef("with --tor off, give --listen, --listen-write, --listen-oidc or --listen-tls")
	}
	if f.store == "" {
		if err := checkApart(f.cacheDir, f.stateDir); err != nil {
			return err
		}
	} else if err := checkStoreFlags(f); err != nil {
		return err
	}
	var keys []nixcache.PublicKey
	for _, s := range f.trustedKeys {
		k, err := nixcache.ParsePublicKey(s)
		if err != nil {
			return usagef("--trusted-writer-key: %v", err)
		}
		keys = append(keys, k)
	}
	if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if err := os.Chmod(f.stateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	up, err := f.upstream.fetcher(f.cacheDir, f.store, f.stateDir, f.storeDir, f.torMode, log)
	if err != nil {
		return err
	}
	cache, bkt, err := openCache(f, keys, up, log)
	if err != nil {
		return err
	}
	where := f.cacheDir
	if bkt != nil {
		where = bkt.name
	}
	defer cache.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errc := make(chan error, 4)
	status := newStatusServer(f, cache)
	if bkt != nil {
		status.bucketLocks, status.cacheName = bkt.locks, bkt.name
	}
	metrics := newServeMetrics(registryPaths(f))
	if f.metricsListen != "" {
		if err := serveMetricsOn(ctx, f.metricsListen, metrics, cache, log, errc); err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
	}
	var servers []*serve.Server
	defer func() {
		shutCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, srv := range servers {
			srv.Shutdown(shutCtx)
		}
	}()
	serveOn := func(ln net.Listener, role serve.Role) {
		srv := cache.NewServer(role, log)
		servers = append(servers, srv)
		go func() {
			if err := srv.Serve(ln); err != nil {
				errc <- fmt.Errorf("%s listener: %w", role, err)
			}
		}()
	}
	var tokens serve.Authenticator
	if f.oidc.issuer != "" {
		if tokens, err = f.oidc.authenticator(ctx, log); err != nil {
			return err
		}
	}
	if srv, err := f.oidc.serve(tokens, cache, log, status, errc); err != nil {
		return err
	} else if srv != nil {
		servers = append(servers, srv)
	}
	for _, l := range listeners {
		ln, err := net.Listen("tcp", l.addr)
		if err != nil {
			return fmt.Errorf("--%s: %w", l.flag, err)
		}
		log.WithFields(logrus.Fields{"role": l.role.String(), "url": "http://" + ln.Addr().String()}).Info("listening")
		status.listening(l.role, "http://"+ln.Addr().String())
		serveOn(ln, l.role)
	}
	if srv, err := startTLSDoor(f, tokens, cache, log, status, metrics, errc); err != nil {
		return err
	} else if srv != nil {
		servers = append(servers, srv)
	}

	if f.torMode != "off" {
		o, err := startOnions(ctx, f, log, serveOn, metrics)
		if err != nil {
			return err
		}
		defer o.close()
		f.upstream.tor.use(o.tor.SocksAddr)
		go o.watchClients(ctx)
		status.setOnions(o)
	}
	if err := status.start(log); err != nil {
		log.WithError(err).Warn("no status socket: 'kiss-onion status' will not reach this serve")
	}
	defer status.stop()
	go f.upstream.keepLoop(ctx, cache)
	if f.pruneEvery > 0 {
		go pruneEvery(ctx, f, log, cache, bkt, metrics)
	}
	log.WithField("cache", where).Info("serving")
	select {
	case <-ctx.Done():
		log.Info("shutting down")
		return nil
	case err := <-errc:
		return err
	}
}

// openedBucket is the bucket of --store, for the prunes and status.
type openedBucket struct {
	store *s3store.Store
	locks *bucketlock.Locks
	name  string // the store's URL without keys
}

// openCache opens the cache serve serves: the directory, or the bucket
// of --store with its lock protocol (then bkt is not nil).
func openCache(f serveFlags, keys []nixcache.PublicKey, up serve.Upstream, log *logrus.Entry) (cache *serve.Cache, bkt *openedBucket, err error) {
	cfg := serve.Config{
		Dir:           f.cacheDir,
		StoreDir:      f.storeDir,
		Priority:      f.priority,
		WantMassQuery: f.wantMassQuery,
		TrustedKeys:   keys,
		MaxUploadSize: int64(f.maxUpload),
		StateDir:      f.stateDir,
		Upstream:      up,
		Log:           log,
	}
	if f.store != "" {
		st, sc, err := f.s3.open(f.store, log)
		if err != nil {
			return nil, nil, err
		}
		bkt = &openedBucket{store: st, locks: bucketlock.New(st, log), name: sc.String()}
		cfg.Dir, cfg.Bucket, cfg.BucketLocks, cfg.BucketName = "", st, bkt.locks, bkt.name
	}
	cache, err = serve.New(cfg)
	return cache, bkt, err
}

// checkStoreFlags refuses a --store serve cannot use.
func checkStoreFlags(f serveFlags) error {
	if !isStoreURL(f.store) {
		return usagef("--store %q: want s3://BUCKET/PREFIX", f.store)
	}
	return nil
}

// checkApart refuses a state directory inside the cache directory, where
// readers could fetch the keys, and a cache inside the state directory.
func checkApart(cacheDir, stateDir string) error {
	for _, pair := range [][2]string{{stateDir, cacheDir}, {cacheDir, stateDir}} {
		in, err := inside(pair[0], pair[1])
		if err != nil {
			return usagef("--state-dir or --cache-dir: %v", err)
		}
		if in {
			return usagef("--state-dir %s and --cache-dir %s must not contain each other: the state holds secrets, the cache is public to readers", stateDir, cacheDir)
		}
	}
	return nil
}

// pruneEvery runs the pruner on the cache every f.pruneEvery until ctx
// ends, with the same lock protocol as 'kiss-onion prune', so uploads in
// flight and those under a lock are safe. What it deletes is taken off
// the cache's size, and each run goes to the metrics.
func pruneEvery(ctx context.Context, f serveFlags, log *logrus.Entry, cache *serve.Cache, bkt *openedBucket, metrics *serveMetrics) {
	log = log.WithField("component", "prune")
	// The next prune starts an interval after the last one ended, so
	// that uploads get the cache in between however long a prune takes.
	wait := time.NewTimer(f.pruneEvery)
	defer wait.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-wait.C:
		}
		metrics.pruneRunning.Set(1)
		opt := prune.Options{
			CacheDir:   f.cacheDir,
			StateDir:   f.stateDir,
			MaxRootAge: f.maxRootAge,
			Grace:      f.pruneGrace,
			LockWait:   5 * time.Minute,
			StoreDir:   f.storeDir,
			Log:        log,
			Deleted:    cache.Removed,
		}
		var stats prune.Stats
		var err error
		if bkt != nil {
			opt.CacheDir = ""
			stats, err = prune.RunBucket(ctx, prune.BucketOptions{Options: opt, Store: bkt.store, Name: bkt.name, Locks: bkt.locks, Settle: serve.ForgetSettle})
		} else {
			stats, err = prune.Run(ctx, opt)
		}
		metrics.pruneRunning.Set(0)
		metrics.prune(stats, err)
		wait.Reset(f.pruneEvery)
		if err != nil {
			log.WithError(err).Error("scheduled prune failed")
			continue
		}
		log.Info(stats.String())
	}
}
