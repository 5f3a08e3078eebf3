package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/publish"
)

func init() {
	register("publish", "push store paths to the cache and point a GC-root marker at them", runPublish)
}

const publishUsage = `
Usage:
	kiss-onion publish --bundle DIR [--signing-key FILE] [--cache-key FILE] [--tor-config FILE] NAME STORE_PATH...
	kiss-onion publish --cache URL [--netrc-file FILE] [--signing-key FILE] NAME STORE_PATH...

Pushes the closures of the store paths to the cache and then points the
marker gcroots/NAME at them, through a gateway to the write onion started
for the run (or the cache's write URL given by --cache). It holds the
cache's upload lock from before the push until the marker is written, so
no prune deletes what it uploads. A failed push writes no marker.

On a terminal a bar shows the paths pushed and their size (the NAR sizes
'nix path-info' gives, uncompressed); elsewhere, and with --log-format
json, nix's own lines pass as they are. A line at the end says what was
pushed.

With --signing-key the marker also carries, in comment lines after the
store paths, a statement of NAME, the paths and a generation that only
grows, signed with the key: 'kiss-onion update --publisher-key' then
refuses any other signer and any older generation (a rollback).

Arguments:
	NAME           the marker's name under gcroots/ (usually the host's name)
	STORE_PATH...  what the marker names: for 'update', one NixOS system

Examples:
	kiss-onion publish --bundle /var/lib/kiss-onion-secrets/ci.bundle \
		--signing-key /var/lib/kiss-onion-secrets/fleet-1.sec \
		web1 $(nix build --no-link --print-out-paths .#nixosConfigurations.web1.config.system.build.toplevel)
	kiss-onion publish --cache http://127.0.0.1:8081 ci-tools /nix/store/...-tools
	kiss-onion publish --cache https://cache.example.org --netrc-file "$RUNNER_TEMP/netrc" \
		--cache-key "$RUNNER_TEMP/cache-key.sec" web1 /nix/store/...-nixos-system-web1
`

func runPublish(args []string) error {
	fs := newFlagSet("publish", publishUsage)
	var lf logFlags
	lf.add(fs)
	var g gatewayFlags
	g.add(fs, "/var/lib/kiss-onion-publish", "tor's data")
	cacheURL := fs.String("cache", "", "the cache's write `URL` (a running 'proxy --write', or serve's --listen-write) instead of a gateway from --bundle")
	signingKey := fs.String("signing-key", "", "sign the marker with this Nix secret key `file` (nix-store --generate-binary-cache-key)")
	cacheKey := fs.String("cache-key", "", "also sign the narinfos with this Nix secret key `file` (nix copy's secret-key=)")
	compression := fs.String("compression", "zstd", "the NARs' `compression` (zstd, xz, none, ...)")
	wait := fs.Duration("wait", 2*time.Minute, "how long to wait for the onion to answer (a descriptor fetch can take a minute)")
	lockWait := fs.Duration("lock-wait", 30*time.Minute, "how long to retry the lock while a prune holds the cache")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory`")
	netrc := netrcFlag(fs, "publish's requests and nix copy's")
	nix := nixFlags(fs)
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if *netrc != "" && *cacheURL == "" {
		return usagef("--netrc-file is for --cache: a bundle's gateway needs no password")
	}
	if len(rest) < 2 {
		return usagef("publish needs NAME and at least one STORE_PATH")
	}
	name, paths := rest[0], rest[1:]
	for _, p := range paths {
		if _, err := nixcache.BaseName(*storeDir, p); err != nil {
			return usagef("STORE_PATH: %v", err)
		}
	}
	if err := nixcache.CheckMarkerName(name); err != nil {
		return usagef("NAME: %v", err)
	}
	var key *nixcache.SecretKey
	if *signingKey != "" {
		data, err := os.ReadFile(*signingKey)
		if err != nil {
			return fmt.Errorf("read --signing-key: %w", err)
		}
		k, err := nixcache.ParseSecretKey(string(data))
		if err != nil {
			return withHint(fmt.Errorf("%s: %w", *signingKey, err), "make one with 'nix-store --generate-binary-cache-key NAME SECRET_FILE PUBLIC_FILE'")
		}
		key = &k
	}
	if *cacheKey != "" {
		if _, err := os.Stat(*cacheKey); err != nil {
			return fmt.Errorf("--cache-key: %w", err)
		}
	}
	n, err := nix()
	if err != nil {
		return err
	}

	// The push's progress: a bar on a terminal, a line at the end.
	push, logOut := newPushProgress(lf.format)
	log, err := lf.cli(logOut)
	if err != nil {
		return err
	}
	push.log = log
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	push.measure(ctx, n, paths)
	n.Output = push
	cache, done, err := g.openCache(ctx, *cacheURL, true, *wait, log)
	if err != nil {
		return err
	}
	defer done()
	_, err = publish.Publish(ctx, publish.Options{
		Cache:        cache,
		Name:         name,
		Paths:        paths,
		StoreDir:     *storeDir,
		SigningKey:   key,
		CacheKeyFile: *cacheKey,
		Compression:  *compression,
		Nix:          n,
		NetrcFile:    *netrc,
		LockWait:     *lockWait,
		Log:          log,
	})
	push.end(err)
	if errors.Is(err, cachelock.ErrBusy) {
		return withHint(err, "a prune is running on the cache; retry later or raise --lock-wait")
	}
	return credentialsHint(err, *netrc)
}

// credentialsHint says what to do when the cache asked for credentials
// that were not sent.
func credentialsHint(err error, netrc string) error {
	var se *publish.StatusError
	if netrc == "" && errors.As(err, &se) && se.Status == http.StatusUnauthorized {
		return withHint(err, "the cache asks for credentials: give --netrc-file FILE, with a line 'machine HOST login ci password TOKEN' (docs/oidc.md)")
	}
	return err
}

// nixFlags adds --store and --nix-option, and returns a function that
// builds the publish.Nix they describe once the flags are parsed.
func nixFlags(fs *flag.FlagSet) func() (publish.Nix, error) {
	var store string
	var options stringList
	fs.StringVar(&store, "store", "", "run nix commands with --store `STORE` (a chroot store DIR, for tests)")
	fs.Var(&options, "nix-option", "pass --option `NAME=VALUE` to nix commands (repeatable)")
	return func() (publish.Nix, error) {
		n := publish.Nix{Store: store, Output: stderr}
		for _, o := range options {
			kv, err := publish.ParseNixOption(o)
			if err != nil {
				return publish.Nix{}, usagef("--nix-option: %v", err)
			}
			n.Options = append(n.Options, kv)
		}
		return n, nil
	}
}

// netrcFlag registers --netrc-file, whose entry for the cache's host goes
// with what's requests: how an OIDC door takes a token.
func netrcFlag(fs *flag.FlagSet, what string) *string {
	return fs.String("netrc-file", "", "send the login and password of this netrc `file`'s entry for the cache's host (an OIDC token as the password) with "+what)
}
