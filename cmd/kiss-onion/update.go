package main

import (
	"context"
	"errors"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/publish"
)

func init() {
	register("update", "switch this machine to the system its marker in the cache names", runUpdate)
}

const updateUsage = `
Usage:
	kiss-onion update switch|boot --bundle DIR (--publisher-key NAME:BASE64 | --allow-unsigned)
		[--marker NAME] [--profile PATH] [--state-dir DIR] [--tor-config FILE]
	kiss-onion update switch|boot --cache URL (--publisher-key NAME:BASE64 | --allow-unsigned) ...

Reads the marker gcroots/NAME through a gateway to the read onion started
for the run (or from the cache URL given by --cache, such as a running
'kiss-onion proxy'), checks it, and when the profile does not name that
system yet: realises it from the cache, points the profile at it
(nix-env --profile PATH --set) and runs its bin/switch-to-configuration
with the action. Every step is logged. A failed step exits 1 and leaves
the profile as it was (it is put back if the activation fails).

When the cache cannot be reached (the gateway's onion does not answer
within --wait, or the gateway given by --cache says it is unreachable),
update logs a warning, changes nothing and exits 75 (EX_TEMPFAIL): on a
timer, that is a skipped run, not a failure.

With --publisher-key the marker must carry a statement signed by that key
('kiss-onion publish --signing-key'), naming this marker and its path, and
its generation must not be older than the last one applied (kept in the
state directory): an older signed system is refused as a rollback, and an
unsigned marker is refused. --allow-unsigned takes plain markers instead.

Arguments:
	switch|boot   activate the system now (switch) or at the next boot (boot)

Examples:
	kiss-onion update switch --bundle /var/lib/kiss-onion-secrets/web1.bundle \
		--publisher-key fleet-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w=
	kiss-onion update boot --cache http://127.0.0.1:37510 --allow-unsigned --marker web1
`

func runUpdate(args []string) error {
	fs := newFlagSet("update", updateUsage)
	var lf logFlags
	lf.add(fs)
	var g gatewayFlags
	g.add(fs, "/var/lib/kiss-onion-update", "the generation applied last and tor's data")
	cacheURL := fs.String("cache", "", "the cache's read `URL` (a running 'kiss-onion proxy') instead of a gateway from --bundle")
	host, _ := os.Hostname()
	marker := fs.String("marker", host, "the marker's `name` under gcroots/")
	profile := fs.String("profile", "/nix/var/nix/profiles/system", "the system profile `path`")
	publisherKey := fs.String("publisher-key", "", "accept only markers signed by this `NAME:BASE64` key, never an older generation")
	allowUnsigned := fs.Bool("allow-unsigned", false, "accept plain markers (whoever can write the marker decides what runs here)")
	wait := fs.Duration("wait", 2*time.Minute, "how long to wait for tor and the onion to answer (exit 75 after)")
	storeDir := fs.String("store-dir", nixcache.DefaultStoreDir, "the Nix store `directory`")
	netrc := netrcFlag(fs, "update's requests and nix's fetches")
	nix := nixFlags(fs)
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if *netrc != "" && *cacheURL == "" {
		return usagef("--netrc-file is for --cache: a bundle's gateway needs no password")
	}
	switch {
	case len(rest) == 0:
		return usagef("update needs an action: switch or boot")
	case rest[0] != "switch" && rest[0] != "boot":
		return usagef("update: unknown action %q: want switch or boot", rest[0])
	case len(rest) > 1:
		return usagef("update takes one action; got %q", rest)
	}
	action := rest[0]
	if *marker == "" {
		return usagef("give --marker NAME (the host name is unknown)")
	}
	if err := nixcache.CheckMarkerName(*marker); err != nil {
		return usagef("--marker: %v", err)
	}
	var key *nixcache.PublicKey
	switch {
	case *publisherKey != "" && *allowUnsigned:
		return usagef("--publisher-key and --allow-unsigned contradict each other: give one")
	case *publisherKey != "":
		k, err := nixcache.ParsePublicKey(*publisherKey)
		if err != nil {
			return usagef("--publisher-key: %v", err)
		}
		key = &k
	case !*allowUnsigned:
		return usagef("give --publisher-key NAME:BASE64 (publish's --signing-key), or --allow-unsigned to accept plain markers")
	}
	n, err := nix()
	if err != nil {
		return err
	}

	log, err := lf.cli(stderr)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	cache, done, err := g.openCache(ctx, *cacheURL, false, *wait, log)
	if errors.Is(err, errCacheAway) {
		return skipUpdate(err)
	}
	if err != nil {
		return err
	}
	defer done()
	_, err = publish.Update(ctx, publish.UpdateOptions{
		Cache:         cache,
		Action:        action,
		Marker:        *marker,
		Profile:       *profile,
		PublisherKey:  key,
		AllowUnsigned: *allowUnsigned,
		StateDir:      g.stateDir,
		StoreDir:      *storeDir,
		Nix:           n,
		NetrcFile:     *netrc,
		Log:           log,
	})
	var se *publish.StatusError
	switch {
	case errors.As(err, &se) && se.FromGateway:
		return skipUpdate(err)
	case errors.Is(err, publish.ErrNoMarker):
		return withHint(err, "publish one with 'kiss-onion publish %s /nix/store/...', or give --marker", *marker)
	case errors.Is(err, publish.ErrUnsigned):
		return withHint(err, "publish it with 'kiss-onion publish --signing-key FILE', or run update with --allow-unsigned")
	case errors.Is(err, publish.ErrRollback):
		return withHint(err, "publish the system again (a new generation) to go back to it")
	}
	return credentialsHint(err, *netrc)
}

// exitTempFail is update's exit status when the cache is unreachable:
// EX_TEMPFAIL, which the NixOS module's unit counts as success.
const exitTempFail = 75

// skipUpdate reports that the cache was unreachable and nothing changed.
func skipUpdate(err error) error {
	warningf("%v", err)
	warningf("update skipped: nothing changed; the next run tries again (exit %d)", exitTempFail)
	return &exitError{code: exitTempFail}
}
