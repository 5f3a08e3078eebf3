package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"path"
	"strings"
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
	register("forget", "remove store paths from the cache", runForget)
}

const forgetUsage = `
Usage:
	kiss-onion forget [--cache-dir DIR] [--with-referrers] [--dry-run] [--lock-wait DUR] STORE_PATH...
	kiss-onion forget --store s3://BUCKET/PREFIX?endpoint=URL [--s3-endpoint ADDR] [--s3-region R]
	                  [--s3-credentials FILE] [--s3-profile P] [--single-pruner]
	                  [--with-referrers] [--dry-run] [--lock-wait DUR] STORE_PATH...
	kiss-onion forget --cache URL [--with-referrers] STORE_PATH...
	kiss-onion forget --bundle DIR [--tor-config FILE] [--with-referrers] STORE_PATH...

Removes store paths from the cache: each one's narinfo and listing, and
its NAR unless another narinfo names it, with the realisations and build
traces that name it, the debuginfo into its NAR and its deriver's log when
no path left has that deriver. Once the command returns, neither the read
nor the write role serves them, and nix cannot substitute them from it.

A path that another path left in the cache refers to (directly or not)
is not forgotten: the cache must stay closed under references. forget
then changes nothing and lists those referrers and the markers under
gcroots/ that root them. --with-referrers forgets the referrers too,
after listing them; a marker that names one is left naming a path the
cache no longer has.

On the cache machine it works on the cache directory, under the upload
lock protocol, beside a running serve: new upload locks are refused while
it runs, and it waits up to --lock-wait for those held. A cache kept in
a bucket ('serve --store') is forgotten from directly with --store and
its URL, as 'kiss-onion prune s3://' names it: under the bucket's lock
protocol (gcroots/.lock/ in the bucket), which after the wait for the
upload locks waits some twelve seconds more for uploads that checked
before it, then deletes; a store without conditional writes needs
--single-pruner (no prune or other forget runs on the bucket). Elsewhere a
writer goes through the write role, which does the same for a DELETE of
a narinfo: --cache URL (serve's --listen-write, or a 'proxy --write'), or
--bundle DIR (a gateway to the write onion, started for the run), and
--with-referrers asks it to forget the referrers too (DELETE
/HASH.narinfo?with-referrers=1). Through the write role there is no
--dry-run; paths given together are forgotten in an order that lets each
go when the others were all that referred to it.

Arguments:
	STORE_PATH...  store paths (/nix/store/HASH-NAME), their base names
	               (HASH-NAME) or their hashes

Examples:
	kiss-onion forget --dry-run /nix/store/0a1zq2ax9h7dsnd3kkbxh3d9mvlkfx2d-leaked-secret
	kiss-onion forget --cache-dir /srv/cache --with-referrers /nix/store/...-broken-glibc
	kiss-onion forget --store 's3://nix-cache/main?endpoint=http://127.0.0.1:8333' /nix/store/...-leaked-secret
	kiss-onion forget --bundle ci.bundle /nix/store/...-bad-build
`

func runForget(args []string) error {
	fs := newFlagSet("forget", forgetUsage)
	var lf logFlags
	lf.add(fs)
	var g gatewayFlags
	g.add(fs, "", "serve's prune metadata cache, which speeds up the scan (default /var/lib/kiss-onion); with --bundle, tor's data (default /var/lib/kiss-onion-forget)")
	cacheDir := fs.String("cache-dir", "/var/cache/kiss-onion", "the cache `directory` to forget from")
	cacheURL := fs.String("cache", "", "forget through the cache's write `URL` (serve's --listen-write, or a 'proxy --write') instead of the cache directory")
	withReferrers := fs.Bool("with-referrers", false, "also forget every path that refers to one of them, directly or not")
	dryRun := fs.Bool("dry-run", false, "delete nothing; print what would be deleted")
	lockWait := fs.Duration("lock-wait", 5*time.Minute, "how long to wait for upload locks to be released, or a prune to end")
	wait := fs.Duration("wait", 5*time.Minute, "with --bundle, how long to wait for the onion to answer")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory` the cache is for")
	store := fs.String("store", "", "forget from the cache kept in this bucket instead of --cache-dir: `s3://BUCKET/PREFIX`[?endpoint=HOST:PORT&region=R] (docs/s3.md)")
	var s3 s3Flags
	s3.register(fs)
	single := fs.Bool("single-pruner", false, "for an s3:// store without conditional writes: no prune or other forget runs on the bucket, so forget without them")
	paths, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(paths) == 0 {
		return usagef("forget needs at least one STORE_PATH")
	}
	var hashes []string
	for _, p := range paths {
		h, err := prune.PathHash(*storeDir, p)
		if err != nil {
			return usagef("STORE_PATH: %v", err)
		}
		hashes = append(hashes, h)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	remote := *cacheURL != "" || g.bundle != ""
	switch {
	case *store != "" && (set["cache-dir"] || remote):
		return usagef("give --store, or --cache-dir, --cache or --bundle, not two")
	case *store != "" && !isStoreURL(*store):
		return usagef("--store %q: want s3://BUCKET/PREFIX", *store)
	case *store == "" && (*single || s3 != s3Flags{}):
		return usagef("--single-pruner and the --s3-* flags are for --store")
	}
	if remote {
		switch {
		case set["cache-dir"]:
			return usagef("give --cache-dir, or --cache or --bundle, not both")
		case *dryRun:
			return usagef("--dry-run works on the cache directory or with --store only")
		}
	}
	log, err := lf.cli(stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if !remote {
		if !set["state-dir"] {
			g.stateDir = "/var/lib/kiss-onion"
		}
		o := prune.ForgetOptions{
			CacheDir:      *cacheDir,
			StateDir:      g.stateDir,
			StoreDir:      *storeDir,
			Paths:         paths,
			WithReferrers: *withReferrers,
			DryRun:        *dryRun,
			LockWait:      *lockWait,
			Log:           log,
		}
		if *store == "" {
			return forgetLocal(ctx, o, prune.Forget)
		}
		st, cfg, err := s3.open(*store, log)
		if err != nil {
			return err
		}
		o.CacheDir = ""
		return forgetLocal(ctx, o, func(ctx context.Context, o prune.ForgetOptions) (prune.ForgetResult, error) {
			// The bucket's URL without keys, whatever --store held: it
			// names serve's metadata cache of it.
			return prune.ForgetBucket(ctx, prune.ForgetBucketOptions{ForgetOptions: o, Store: st, Name: cfg.String(),
				SinglePruner: *single, Settle: serve.ForgetSettle})
		})
	}
	if !set["state-dir"] {
		g.stateDir = "/var/lib/kiss-onion-forget"
	}
	cache, done, err := g.openCache(ctx, *cacheURL, true, *wait, log)
	if err != nil {
		return err
	}
	defer done()
	return forgetRemote(ctx, strings.TrimSuffix(cache, "/"), paths, hashes, *withReferrers)
}

// forgetOut is where forget prints what it forgets and lists; a test
// replaces it.
var forgetOut io.Writer = os.Stdout

// forgetLocal forgets on the cache directory, or with forget on the
// bucket.
func forgetLocal(ctx context.Context, o prune.ForgetOptions, forget func(context.Context, prune.ForgetOptions) (prune.ForgetResult, error)) error {
	var mu sync.Mutex
	var lastNarInfo time.Time
	o.Planned = func(res prune.ForgetResult) {
		verb := "forgetting"
		if o.DryRun {
			verb = "would forget"
		}
		for _, p := range res.Paths {
			fmt.Fprintf(forgetOut, "%s %s\n", verb, p)
		}
	}
	o.Deleted = func(rel string, size int64) {
		mu.Lock()
		defer mu.Unlock()
		if o.DryRun {
			fmt.Fprintf(forgetOut, "would delete %s (%s)\n", rel, prune.FormatBytes(size))
		} else if strings.HasSuffix(rel, ".narinfo") && !strings.Contains(rel, "/") {
			lastNarInfo = time.Now()
		}
	}
	res, err := forget(ctx, o)
	for _, a := range res.Absent {
		warningf("%s is not in the cache", a)
	}
	switch {
	case errors.Is(err, prune.ErrReferenced):
		printForgetListing(res)
		return withHint(fmt.Errorf("forget: %w", err), "add --with-referrers to forget them too, or forget what roots them first")
	case errors.Is(err, cachelock.ErrPruneRunning):
		return withHint(fmt.Errorf("forget: %w", err), "wait for it to finish, or raise --lock-wait")
	case errors.Is(err, cachelock.ErrLocksHeld):
		return withHint(fmt.Errorf("forget: %w", err), "retry later, or raise --lock-wait")
	case errors.Is(err, bucketlock.ErrNoConditionalWrites):
		return withHint(fmt.Errorf("forget: %w", err), "if no prune or other forget runs on this bucket, add --single-pruner")
	case err != nil:
		if res.Files > 0 {
			fmt.Fprintf(stderr, "kiss-onion: forget stopped after deleting %s (%s)\n", count(int(res.Files), "file"), prune.FormatBytes(res.Bytes))
		}
		return fmt.Errorf("forget: %w", err)
	case len(res.Paths) == 0:
		return errors.New("forget: none of the paths is in the cache")
	}
	for _, m := range res.Markers {
		warningf("marker %s names %s, which is no longer in the cache", m.Marker, m.Root)
	}
	if o.DryRun {
		fmt.Fprintf(forgetOut, "kiss-onion: dry run: %s would be forgotten: %s (%s)\n", count(len(res.Paths), "path"), count(int(res.Files), "file"), prune.FormatBytes(res.Bytes))
		return nil
	}
	// A serve running on the cache may serve a narinfo from memory for a
	// moment after it went.
	if !lastNarInfo.IsZero() {
		time.Sleep(time.Until(lastNarInfo.Add(serve.ForgetSettle)))
	}
	fmt.Fprintf(forgetOut, "kiss-onion: forgot %s: %s (%s) deleted\n", count(len(res.Paths), "path"), count(int(res.Files), "file"), prune.FormatBytes(res.Bytes))
	return nil
}

// printForgetListing prints the referrers and markers of a refused
// forget, as the write role answers them.
func printForgetListing(res prune.ForgetResult) {
	for _, p := range res.Referrers {
		fmt.Fprintf(forgetOut, "referrer %s\n", p)
	}
	for _, m := range res.Markers {
		fmt.Fprintf(forgetOut, "marker %s names %s\n", m.Marker, m.Root)
	}
}

// forgetRemote forgets through the write role at cache: a DELETE of each
// narinfo, asking for its referrers to go too with withReferrers. A path
// refused for referrers is tried again once others went, so that paths
// given together go whatever their order.
func forgetRemote(ctx context.Context, cache string, paths, hashes []string, withReferrers bool) error {
	type pending struct{ path, hash string }
	var todo []pending
	for i := range paths {
		todo = append(todo, pending{paths[i], hashes[i]})
	}
	query := ""
	if withReferrers {
		query = "?" + serve.WithReferrersParam + "=1"
	}
	forgot := 0
	gone := map[string]bool{} // hashes forgotten as another's referrers
	for len(todo) > 0 {
		var again []pending
		var refusals []string
		for _, p := range todo {
			if gone[p.hash] {
				continue
			}
			code, body, err := forgetDelete(ctx, cache+"/"+p.hash+".narinfo"+query)
			if err != nil {
				return fmt.Errorf("forget %s: %w", p.path, err)
			}
			first, rest, _ := strings.Cut(body, "\n")
			switch code {
			case http.StatusOK:
				forgot++
				fmt.Fprintf(forgetOut, "kiss-onion: %s\n", first)
				for _, l := range strings.Split(rest, "\n") {
					if ref, ok := strings.CutPrefix(l, "referrer "); ok {
						fmt.Fprintf(forgetOut, "forgot referrer %s\n", ref)
						if h, err := prune.PathHash(nixcache.DefaultStoreDir, path.Base(ref)); err == nil {
							gone[h] = true
						}
					} else if l != "" {
						warningf("%s", l)
					}
				}
			case http.StatusNotFound:
				warningf("%s is not in the cache", p.path)
			case http.StatusConflict:
				again = append(again, p)
				refusals = append(refusals, body)
			case http.StatusServiceUnavailable:
				return withHint(fmt.Errorf("forget %s: the cache answered %d: %s", p.path, code, first), "retry later: uploads or a prune hold the cache")
			default:
				return fmt.Errorf("forget %s: the cache answered %d: %s", p.path, code, first)
			}
		}
		if len(again) == len(todo) {
			var firsts []string
			for _, body := range refusals {
				first, rest, _ := strings.Cut(body, "\n")
				firsts = append(firsts, first)
				if rest != "" {
					fmt.Fprintln(forgetOut, rest)
				}
			}
			return withHint(fmt.Errorf("forget: %s", strings.Join(firsts, "; ")), "add --with-referrers to forget them too, or forget the referrers first")
		}
		todo = again
	}
	if forgot == 0 {
		return errors.New("forget: none of the paths is in the cache")
	}
	return nil
}

// forgetDelete sends one DELETE and returns the answer's status and body.
func forgetDelete(ctx context.Context, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 1<<20))
	for sc.Scan() {
		b.WriteString(sc.Text() + "\n")
	}
	return resp.StatusCode, strings.TrimSuffix(b.String(), "\n"), nil
}

// count returns "1 thing" or "N things".
func count(n int, thing string) string {
	if n == 1 {
		return "1 " + thing
	}
	return fmt.Sprintf("%d %ss", n, thing)
}
