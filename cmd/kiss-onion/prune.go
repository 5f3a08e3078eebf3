package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
)

func init() {
	register("prune", "delete what no GC root reaches from a cache directory", runPrune)
}

const pruneUsage = `
Usage:
	kiss-onion prune [--dry-run] [--lock-wait DUR] [--max-root-age DUR] [--grace DUR]
	                 [--gcroots DIR ...] [--state-dir DIR] CACHEDIR

Deletes from the binary cache in CACHEDIR every store path that no GC root
reaches, with its NAR, listing, logs, realisations and debuginfo. The roots
are the store paths named, one a line, in the plain files under
CACHEDIR/gcroots/ and the --gcroots directories (symlinks and names
starting with '.' are ignored). Their closure through References and
Deriver stays.

It follows the upload lock protocol, so it is safe beside a running
'kiss-onion serve': new upload locks are refused while it runs, and it
waits up to --lock-wait for the ones held to be released.

On a terminal a bar shows the phase, the narinfos scanned and kept, the
files deleted and the bytes freed; elsewhere, and with --log-format json,
it logs a line at each phase.

Arguments:
	CACHEDIR   the cache directory, the one holding nix-cache-info

Examples:
	kiss-onion prune --dry-run /srv/cache
	kiss-onion prune --max-root-age 720h --gcroots /etc/kiss-onion/roots /srv/cache
`

func runPrune(args []string) error {
	var roots stringList
	fs := newFlagSet("prune", pruneUsage)
	var lf logFlags
	lf.add(fs)
	dryRun := fs.Bool("dry-run", false, "delete nothing; print what would be deleted")
	lockWait := fs.Duration("lock-wait", 5*time.Minute, "how long to wait for upload locks to be released")
	maxAge := fs.Duration("max-root-age", 0, "markers older than this (by modification time) no longer count; 0: no limit")
	grace := fs.Duration("grace", 0, "keep files modified less than this before the prune (uploads made without with-lock)")
	fs.Var(&roots, "gcroots", "another `directory` of markers (repeatable)")
	stateDir := fs.String("state-dir", defaultPruneStateDir(), "`directory` of the metadata cache that makes the next prune fast; empty for none")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory` the cache is for")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	switch len(rest) {
	case 1:
	case 0:
		return usagef("prune needs the cache directory")
	default:
		return usagef("prune takes one cache directory, got %d arguments", len(rest))
	}
	cacheDir := rest[0]

	// On a terminal, a bar with the phase and the counts; else log lines.
	bar := newTermBar(lf.format, -1)
	logOut := stderr
	if bar != nil {
		logOut = bar
	}
	log, err := lf.cli(logOut)
	if err != nil {
		return err
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	opt := prune.Options{
		CacheDir:   cacheDir,
		StateDir:   *stateDir,
		GCRoots:    roots,
		MaxRootAge: *maxAge,
		Grace:      *grace,
		DryRun:     *dryRun,
		LockWait:   *lockWait,
		StoreDir:   *storeDir,
		Log:        log,
		Progress:   pruneProgress(bar, log),
	}
	if *dryRun {
		var mu sync.Mutex
		opt.Deleted = func(rel string, size int64) {
			mu.Lock()
			defer mu.Unlock()
			line := func() { fmt.Fprintf(os.Stdout, "would delete %s (%s)\n", rel, prune.FormatBytes(size)) }
			if bar != nil {
				bar.above(line)
			} else {
				line()
			}
		}
	}
	st, err := prune.Run(ctx, opt)
	if bar != nil {
		bar.finish()
	}
	if err != nil {
		if errors.Is(err, cachelock.ErrPruneRunning) {
			return withHint(fmt.Errorf("prune %s: %w", cacheDir, err), "wait for it to finish, or stop it")
		}
		if errors.Is(err, cachelock.ErrLocksHeld) {
			return withHint(fmt.Errorf("prune %s: %w", cacheDir, err), "retry later, or raise --lock-wait")
		}
		if st.Deleted > 0 {
			fmt.Fprintf(stderr, "kiss-onion: prune stopped after deleting %d files (%s)\n", st.Deleted, prune.FormatBytes(st.BytesFreed))
		}
		return fmt.Errorf("prune %s: %w", cacheDir, err)
	}
	if *dryRun {
		fmt.Fprintf(os.Stdout, "kiss-onion: dry run of %s: %d narinfos scanned, %d would stay, %d would go; %d files (%s) would be deleted\n",
			cacheDir, st.Scanned, st.Kept, st.DeletedNarInfos, st.Deleted, prune.FormatBytes(st.BytesFreed))
		return nil
	}
	fmt.Fprintf(os.Stdout, "kiss-onion: pruned %s: %s\n", cacheDir, st)
	return nil
}

// defaultPruneStateDir is where the CLI keeps the metadata cache when
// --state-dir is not given: the user's cache directory.
func defaultPruneStateDir() string {
	d, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(d, "kiss-onion")
}

// isTerminal reports whether f is a character device, as a terminal is.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
