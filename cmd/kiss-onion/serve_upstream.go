package main

import (
	"context"
	"errors"
	"flag"
	"net/http"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
	"github.com/kiss-onion/kiss-onion/upstream"
)

// upstreamFlags are serve's flags for fetching what the cache lacks from
// upstream caches (package upstream).
type upstreamFlags struct {
	urls    stringList
	keys    stringList
	timeout time.Duration
	// closureTimeout and downloadTimeout bound the two steps of a fetch
	// (package upstream).
	closureTimeout  time.Duration
	downloadTimeout time.Duration
	maxNarSize      byteSize
	maxSize         byteSize
	viaTor          bool
	keep            time.Duration
	// tor is the SOCKS port of serve's own tor once it runs, for
	// --upstream-via-tor.
	tor *torProxy
	// f is the fetcher made from the flags, nil without --upstream.
	f *upstream.Fetcher
}

func (u *upstreamFlags) register(fs *flag.FlagSet) {
	u.maxNarSize = 8 << 30
	u.tor = &torProxy{}
	fs.DurationVar(&u.keep, "upstream-keep", 0, "keep paths fetched from upstream this `long` after their last read, with the marker gcroots/upstream/recent (0: no time limit with --upstream-max-size, else until a prune)")
	fs.Var(&u.urls, "upstream", "fetch narinfos the cache lacks from this upstream cache `URL` (repeatable, tried in order)")
	fs.Var(&u.keys, "upstream-key", "accept from upstream only paths signed by this `name:base64` key (repeatable)")
	fs.DurationVar(&u.timeout, "upstream-timeout", 0, "connect and answer `timeout` of upstream requests (0: 5s, 30s with --upstream-via-tor)")
	fs.DurationVar(&u.closureTimeout, "upstream-closure-timeout", 0, "how `long` a narinfo request waits for the narinfos of the path's closure from upstream (0: 24 times --upstream-timeout, at most 5m)")
	fs.DurationVar(&u.downloadTimeout, "upstream-download-timeout", time.Hour, "how `long` the download of a closure's NARs that a request started may take")
	fs.Var(&u.maxNarSize, "upstream-max-nar-size", "largest NAR `size` fetched from upstream (like 512M or 8G)")
	fs.Var(&u.maxSize, "upstream-max-size", "keep at most this `size` of paths fetched from upstream with the marker gcroots/upstream/recent, the least recently read going first (like 50G; default: no bound)")
	fs.BoolVar(&u.viaTor, "upstream-via-tor", false, "reach upstream through serve's tor (for an appliance with no clearnet; needs --tor public or local)")
}

// fetcher returns the Fetcher the flags ask for, nil without --upstream.
// On a bucket (store set), NARs from upstream are spooled in the state
// directory while they download, and nothing is kept on disk.
func (u *upstreamFlags) fetcher(cacheDir, store, stateDir, storeDir, torMode string, log *logrus.Entry) (serve.Upstream, error) {
	spoolDir := ""
	if store != "" {
		cacheDir, spoolDir = "", stateDir
	}
	if len(u.urls) == 0 {
		if len(u.keys) > 0 || u.viaTor || u.keep > 0 || u.maxSize > 0 {
			return nil, usagef("--upstream-key, --upstream-via-tor, --upstream-keep and --upstream-max-size need --upstream")
		}
		return nil, nil
	}
	if len(u.keys) == 0 {
		return nil, usagef("--upstream needs --upstream-key: what comes from upstream must be signed")
	}
	var keys []nixcache.PublicKey
	for _, s := range u.keys {
		k, err := nixcache.ParsePublicKey(s)
		if err != nil {
			return nil, usagef("--upstream-key: %v", err)
		}
		keys = append(keys, k)
	}
	cfg := upstream.Config{
		URLs:            u.urls,
		Keys:            keys,
		StoreDir:        storeDir,
		Timeout:         u.timeout,
		ClosureTimeout:  u.closureTimeout,
		DownloadTimeout: u.downloadTimeout,
		MaxNarSize:      int64(u.maxNarSize),
		MaxKept:         int64(u.maxSize),
		Keep:            u.keep,
		CacheDir:        cacheDir,
		SpoolDir:        spoolDir,
		Log:             log.WithField("component", "upstream"),
	}
	if u.viaTor {
		if torMode == "off" {
			return nil, usagef("--upstream-via-tor needs tor: --tor public or local")
		}
		cfg.Proxy = u.tor.proxy
		if cfg.Timeout == 0 {
			// A first circuit to an onion takes seconds, often ten or more.
			cfg.Timeout = 30 * time.Second
		}
	}
	f, err := upstream.New(cfg)
	if err != nil {
		return nil, usagef("--upstream: %v", err)
	}
	u.f = f
	return f, nil
}

// keepLoop keeps the marker of --upstream-keep in c up to date until ctx
// ends.
func (u *upstreamFlags) keepLoop(ctx context.Context, c *serve.Cache) {
	if u.f != nil {
		u.f.KeepLoop(ctx, c)
	}
}

// torProxy sends upstream requests to the SOCKS port of serve's tor,
// which may move when tor is restarted.
type torProxy struct {
	addr atomic.Pointer[func() string]
}

// use sets where the SOCKS port is found, once tor runs.
func (t *torProxy) use(addr func() string) { t.addr.Store(&addr) }

func (t *torProxy) proxy(*http.Request) (*url.URL, error) {
	fn := t.addr.Load()
	if fn == nil {
		return nil, errors.New("tor is not running yet")
	}
	a := (*fn)()
	if a == "" {
		return nil, errors.New("tor has no SOCKS port")
	}
	// tor resolves the name: an onion, or a clearnet name through an exit.
	return &url.URL{Scheme: "socks5", Host: a}, nil
}
