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

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/serve"
)

func init() {
	register("prune", "delete what no GC root reaches from a cache directory or bucket", runPrune)
}

const pruneUsage = `
Usage:
	kiss-onion prune [--dry-run] [--lock-wait DUR] [--max-root-age DUR] [--grace DUR]
	                 [--gcroots DIR ...] [--state-dir DIR] CACHEDIR
	kiss-onion prune [same flags] [--s3-endpoint ADDR] [--s3-region R] [--single-pruner]
	                 s3://BUCKET/PREFIX?endpoint=URL

Deletes from the binary cache in CACHEDIR every store path that no GC root
reaches, with its NAR, listing, logs, realisations and debuginfo. The roots
are the store paths named, one a line, in the plain files under
CACHEDIR/gcroots/ and the --gcroots directories (symlinks and names
starting with '.' are ignored). Their closure through References and
Deriver stays.

It follows the upload lock protocol, so it is safe beside a running
'kiss-onion serve': new upload locks are refused while it runs, and it
waits up to --lock-wait for the ones held to be released.

The cache may be a bucket of an S3-compatible store, named by its URL
as Nix names it (s3://BUCKET/PREFIX?endpoint=http://host:port&region=R;
keys from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the AWS
credentials file). The markers are then the objects under gcroots/, ages
go by LastModified, and the lock protocol lives in gcroots/.lock/ of the
bucket: the prune takes the marker gcroots/.lock/.prune with a
conditional write, waits half a minute for uploads that checked before
it, and deletes in batches, referrers first. On a store that does not
honour conditional writes it refuses to run unless --single-pruner says
that no other prune or forget runs on the bucket.

On a terminal a bar shows the phase, the narinfos scanned and kept, the
files deleted and the bytes freed; elsewhere, and with --log-format json,
it logs a line at each phase.

Arguments:
	CACHEDIR   the cache directory, the one holding nix-cache-info,
	           or the s3:// URL of a bucket (and prefix) holding one

Examples:
	kiss-onion prune --dry-run /srv/cache
	kiss-onion prune --max-root-age 720h --gcroots /etc/kiss-onion/roots /srv/cache
	kiss-onion prune 's3://nix-cache/main?endpoint=http://127.0.0.1:8333&region=us-east-1'
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
	var s3 s3Flags
	s3.register(fs)
	single := fs.Bool("single-pruner", false, "for an s3:// store without conditional writes: no other prune or forget runs on the bucket, so prune without them")
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
	if *single && !isStoreURL(cacheDir) {
		return usagef("--single-pruner is for an s3:// store; a directory's prunes exclude each other with flock")
	}

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
	var st prune.Stats
	if isStoreURL(cacheDir) {
		store, cfg, oerr := s3.open(cacheDir, log)
		if oerr != nil {
			if bar != nil {
				bar.finish()
			}
			return oerr
		}
		cacheDir = cfg.String() // without keys, whatever the URL held
		opt.CacheDir = ""
		st, err = prune.RunBucket(ctx, prune.BucketOptions{Options: opt, Store: store, Name: cacheDir, SinglePruner: *single, Settle: serve.ForgetSettle})
	} else {
		st, err = prune.Run(ctx, opt)
	}
	if bar != nil {
		bar.finish()
	}
	if err != nil {
		if errors.Is(err, cachelock.ErrPruneRunning) {
			return withHint(fmt.Errorf("prune %s: %w", cacheDir, err), "wait for it to finish, or stop it")
		}
		if errors.Is(err, bucketlock.ErrNoConditionalWrites) {
			return withHint(fmt.Errorf("prune %s: %w", cacheDir, err), "if no other prune or forget runs on this bucket, add --single-pruner")
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
