package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/serve"
	"github.com/kiss-onion/kiss-onion/upstream"
	"github.com/schollz/progressbar/v3"
)

func init() {
	register("mirror", "fetch closures from upstream into the cache ahead of time, and root them", runMirror)
}

const mirrorUsage = `
Usage:
	kiss-onion mirror [--cache-dir DIR] [--from URL --upstream-key NAME:KEY] [--proxy URL] [--name NAME] STORE_PATH... [--closure-file F]

Fetches store paths with their closures from upstream caches into the
cache directory, as serve --upstream does on a miss (signatures checked
against the upstream keys and kept unchanged), and then writes the marker
gcroots/mirror/NAME naming them, so that prunes keep them: for a fleet
that will be cut off from upstream. It holds an upload lock while it
fetches, beside a running serve. A path that no upstream has fails the
run, and no marker is written. Without --from it fetches from
https://cache.nixos.org, trusting its key cache.nixos.org-1; --proxy
(socks5h://127.0.0.1:9050 for a system tor) reaches upstream through a
proxy.

Arguments:
	STORE_PATH...  store paths (/nix/store/HASH-NAME) to fetch with their
	               closures; --closure-file adds those listed in a file,
	               one a line (the output of nix-store -qR, or a marker)

Examples:
	kiss-onion mirror --from https://cache.nixos.org \
		--upstream-key cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= \
		--name web1 /nix/store/...-nixos-system-web1
	nix-store -qR ./result > closure.txt && kiss-onion mirror --from https://cache.nixos.org --upstream-key ... --closure-file closure.txt
`

func runMirror(args []string) error {
	fs := newFlagSet("mirror", mirrorUsage)
	var lf logFlags
	lf.add(fs)
	cacheDir := fs.String("cache-dir", "/var/cache/kiss-onion", "the cache `directory` to fetch into")
	var from, keys, closureFiles stringList
	fs.Var(&from, "from", "upstream cache `URL` (repeatable, tried in order)")
	fs.Var(&keys, "upstream-key", "accept only paths signed by this `name:base64` key (repeatable)")
	fs.Var(&closureFiles, "closure-file", "also fetch the store paths listed in this `file` (repeatable)")
	name := fs.String("name", "default", "the marker's `name`: gcroots/mirror/NAME")
	proxy := fs.String("proxy", "", "reach upstream through this proxy `URL` (http://, socks5h:// for Tor)")
	timeout := fs.Duration("upstream-timeout", 0, "connect and answer `timeout` of upstream requests (0: 5s)")
	lockWait := fs.Duration("lock-wait", 30*time.Minute, "how long to retry the upload lock while a prune holds the cache")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory` the cache is for")
	paths, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(from) == 0 {
		from = stringList{defaultUpstream}
		if len(keys) == 0 {
			keys = stringList{defaultUpstreamKey}
		}
	}
	if len(keys) == 0 {
		return usagef("mirror needs --upstream-key: what comes from upstream must be signed")
	}
	if err := nixcache.CheckMarkerName("mirror/" + *name); err != nil {
		return usagef("--name: %v", err)
	}
	for _, f := range closureFiles {
		listed, err := readClosureFile(f, *storeDir)
		if err != nil {
			return err
		}
		paths = append(paths, listed...)
	}
	if len(paths) == 0 {
		return usagef("mirror needs store paths, or --closure-file")
	}
	for _, p := range paths {
		if _, err := nixcache.BaseName(*storeDir, p); err != nil {
			return usagef("STORE_PATH %q: %v", p, err)
		}
	}
	var pub []nixcache.PublicKey
	for _, s := range keys {
		k, err := nixcache.ParsePublicKey(s)
		if err != nil {
			return usagef("--upstream-key: %v", err)
		}
		pub = append(pub, k)
	}

	bar := newTermBar(lf.format, -1, progressbar.OptionSetDescription("fetching"))
	var logOut io.Writer = stderr
	if bar != nil {
		logOut = bar
		defer bar.finish()
	}
	log, err := lf.cli(logOut)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cache, err := serve.New(serve.Config{Dir: *cacheDir, StoreDir: *storeDir, NarInfoMemory: -1, Log: log})
	if err != nil {
		return err
	}
	var mu sync.Mutex // Fetched is called from the fetches running at once
	fetched, bytes := 0, uint64(0)
	cfg := upstream.Config{URLs: from, Keys: pub, StoreDir: *storeDir, Timeout: *timeout, Log: log.WithField("component", "upstream")}
	cfg.Fetched = func(p string, size uint64) {
		mu.Lock()
		defer mu.Unlock()
		fetched++
		bytes += size
		if bar != nil {
			bar.describe(fmt.Sprintf("fetched %d paths (%s)", fetched, prune.FormatBytes(int64(bytes))))
			bar.set(int64(fetched), -1)
		}
	}
	if *proxy != "" {
		u, err := url.Parse(*proxy)
		if err != nil || u.Host == "" {
			return usagef("--proxy %q is not a URL", *proxy)
		}
		cfg.Proxy = http.ProxyURL(u)
	}
	fetcher, err := upstream.New(cfg)
	if err != nil {
		return usagef("--from: %v", err)
	}

	locks := cachelock.New(*cacheDir)
	lockName := "mirror-" + strconv.Itoa(os.Getpid())
	if err := acquireMirrorLock(ctx, locks, lockName, *lockWait); err != nil {
		return fmt.Errorf("mirror into %s: %w", *cacheDir, err)
	}
	defer locks.Release(lockName)
	refresh := time.NewTicker(cachelock.StaleAfter / 3)
	defer refresh.Stop()

	for i, p := range paths {
		select {
		case <-refresh.C:
			if err := locks.Acquire(lockName, []byte("kiss-onion mirror\n")); err != nil {
				return fmt.Errorf("refresh the upload lock: %w", err)
			}
		default:
		}
		base, _ := nixcache.BaseName(*storeDir, p)
		if err := fetcher.Fetch(ctx, base[:nixcache.HashLen], cache); err != nil {
			return fmt.Errorf("mirror %s (%d of %d): %w", p, i+1, len(paths), err)
		}
	}
	if bar != nil {
		bar.finish()
	}
	marker := filepath.Join(*cacheDir, "gcroots", "mirror", *name)
	if err := os.MkdirAll(filepath.Dir(marker), 0o755); err != nil {
		return err
	}
	data := []byte(strings.Join(paths, "\n") + "\n")
	if err := locks.Guard(func() error { return atomicfile.WriteFile(marker, data, 0o644) }); err != nil {
		return fmt.Errorf("write marker: %w", err)
	}
	fmt.Fprintf(os.Stdout, "kiss-onion: mirrored %d store paths into %s (%d fetched, %s), rooted by gcroots/mirror/%s\n",
		len(paths), *cacheDir, fetched, prune.FormatBytes(int64(bytes)), *name)
	return nil
}

// The upstream mirror fetches from without --from, as Nix's default
// substituter.
const (
	defaultUpstream    = "https://cache.nixos.org"
	defaultUpstreamKey = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
)

// acquireMirrorLock takes the upload lock name, retrying while a prune
// holds the cache, for at most wait.
func acquireMirrorLock(ctx context.Context, locks *cachelock.Locks, name string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := locks.Acquire(name, []byte("kiss-onion mirror\n"))
		if err == nil || !errors.Is(err, cachelock.ErrBusy) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
	}
}

// readClosureFile reads store paths one a line; blank lines and comments
// (#) are skipped.
func readClosureFile(path, storeDir string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("closure file: %w", err)
	}
	defer f.Close()
	var paths []string
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if _, err := nixcache.BaseName(storeDir, l); err != nil {
			return nil, fmt.Errorf("closure file %s, line %d: %v", path, n, err)
		}
		paths = append(paths, l)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("closure file %s: %w", path, err)
	}
	return paths, nil
}
