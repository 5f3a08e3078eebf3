package main

import (
	"flag"
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
	maxSize byteSize
}

func (u *upstreamFlags) register(fs *flag.FlagSet) {
	u.maxSize = 8 << 30
	fs.Var(&u.urls, "upstream", "fetch narinfos the cache lacks from this upstream cache `URL` (repeatable, tried in order)")
	fs.Var(&u.keys, "upstream-key", "accept from upstream only paths signed by this `name:base64` key (repeatable)")
	fs.DurationVar(&u.timeout, "upstream-timeout", 5*time.Second, "connect and answer `timeout` of upstream requests")
	fs.Var(&u.maxSize, "upstream-max-size", "largest NAR `size` fetched from upstream (like 512M or 8G)")
}

// fetcher returns the Fetcher the flags ask for, nil without --upstream.
func (u *upstreamFlags) fetcher(storeDir string, log *logrus.Entry) (serve.Upstream, error) {
	if len(u.urls) == 0 {
		if len(u.keys) > 0 {
			return nil, usagef("--upstream-key needs --upstream")
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
	f, err := upstream.New(upstream.Config{
		URLs:     u.urls,
		Keys:     keys,
		StoreDir: storeDir,
		Timeout:  u.timeout,
		MaxSize:  int64(u.maxSize),
		Log:      log.WithField("component", "upstream"),
	})
	if err != nil {
		return nil, usagef("--upstream: %v", err)
	}
	return f, nil
}
