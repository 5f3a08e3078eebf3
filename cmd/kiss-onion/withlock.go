package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/publish"
)

func init() {
	register("with-lock", "run a command under an upload lock, then write a GC-root marker", runWithLock)
}

const withLockUsage = `
Usage:
	kiss-onion with-lock [--proxy URL] [--lock-wait DUR] MARKER_URL STORE_PATH -- COMMAND...

Runs COMMAND (typically a 'nix copy --to' of STORE_PATH's closure) while
holding an upload lock on the cache, so that no prune deletes what it
uploads. The lock is refreshed while COMMAND runs. When COMMAND succeeds
and the lock was held throughout, the marker MARKER_URL is written to name
STORE_PATH. The lock is always dropped, and with-lock exits with COMMAND's
status (1 if COMMAND succeeded but the marker could not be written).

Arguments:
	MARKER_URL   the marker on the cache's write role: http://HOST/gcroots/NAME
	             (NAME may have '/'), or a local path CACHEDIR/gcroots/NAME
	STORE_PATH   the store path the marker will name
	COMMAND...   the command to run, after "--"

Examples:
	kiss-onion with-lock --proxy socks5h://127.0.0.1:9050 \
		http://WRITE.onion/gcroots/web1 /nix/store/...-nixos-system-web1 -- \
		nix copy --to 'http://WRITE.onion?compression=zstd' /nix/store/...-nixos-system-web1
	kiss-onion with-lock /srv/cache/gcroots/ci /nix/store/...-app -- \
		nix copy --to 'file:///srv/cache?compression=zstd' /nix/store/...-app
`

func runWithLock(args []string) error {
	fs := newFlagSet("with-lock", withLockUsage)
	var lf logFlags
	lf.add(fs)
	proxy := fs.String("proxy", "", "HTTP proxy `URL` for the cache (http://, socks5h:// for Tor)")
	lockWait := fs.Duration("lock-wait", 30*time.Minute, "how long to retry the lock while a prune holds the cache")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory`")
	netrc := netrcFlag(fs, "the lock's and the marker's requests (COMMAND takes its own)")
	// The command after "--" is COMMAND's own, flags and all.
	dashes := slices.Index(args, "--")
	if dashes < 0 {
		dashes = len(args)
	}
	rest, err := parseArgs(fs, args[:dashes])
	if err != nil {
		return err
	}
	switch {
	case len(rest) != 2:
		return usagef("with-lock needs MARKER_URL, STORE_PATH, -- and a command")
	case dashes+1 >= len(args):
		return usagef(`with-lock needs "--" and a command after STORE_PATH`)
	}
	markerArg, storePath, command := rest[0], rest[1], args[dashes+1:]
	if _, err := nixcache.BaseName(*storeDir, storePath); err != nil {
		return usagef("STORE_PATH: %v", err)
	}
	marker, err := publish.ParseMarkerURL(markerArg, *proxy)
	if err != nil {
		return usagef("%v", err)
	}
	if *netrc != "" {
		if _, err := marker.UseNetrc(*netrc); err != nil {
			return fmt.Errorf("--netrc-file: %w", err)
		}
	}

	log, err := lf.cli(stderr)
	if err != nil {
		return err
	}
	status, err := publish.WithLock(context.Background(), publish.WithLockOptions{
		Marker:    marker,
		StorePath: storePath,
		Command:   command,
		LockWait:  *lockWait,
		Log:       log,
	})
	if err != nil {
		if errors.Is(err, cachelock.ErrBusy) {
			return withHint(err, "a prune is running on %s; retry later or raise --lock-wait", marker)
		}
		if status == 0 {
			return credentialsHint(err, *netrc)
		}
		errorf("%v", err)
	}
	if status != 0 {
		return &exitError{code: status}
	}
	fmt.Fprintf(stderr, "kiss-onion: marker %s now names %s\n", marker, storePath)
	return nil
}
