package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
)

// Config is where a Fetcher fetches from and what it accepts.
type Config struct {
	// URLs are the upstream caches, tried in order (http:// or https://).
	URLs []string
	// Keys are the upstream keys: a narinfo must carry a valid signature
	// by one of them.
	Keys []nixcache.PublicKey
	// StoreDir is the Nix store the cache is for; default /nix/store.
	StoreDir string
	// Timeout bounds connecting to an upstream and waiting for its
	// answer's headers; default 5 s. A narinfo must arrive whole within
	// twice that, and a NAR download may stall for at most StallTimeout.
	Timeout time.Duration
	// ClosureTimeout bounds what Lookup waits for the narinfos of a
	// path's closure; default 24 times Timeout, at most 5 minutes (Nix
	// gives up on a request stalled that long).
	ClosureTimeout time.Duration
	// DownloadTimeout bounds the download of the NARs of a closure that
	// Lookup or OpenNar started; default an hour.
	DownloadTimeout time.Duration
	// StallTimeout cuts off a NAR download that receives nothing for this
	// long; default 30 s.
	StallTimeout time.Duration
	// MaxNarSize is the largest NAR (as stored, and uncompressed) that
	// is fetched; default 8 GiB.
	MaxNarSize int64
	// NegativeTTL is how long a path that no upstream has, or that could
	// not be fetched, is not asked for again; default 30 s.
	NegativeTTL time.Duration
	// Proxy, when set, chooses the proxy of each request: a SOCKS5 proxy
	// (socks5://127.0.0.1:PORT) sends them through Tor, for an appliance
	// with no clearnet. Default: http.ProxyFromEnvironment.
	Proxy func(*http.Request) (*url.URL, error)
	// Keep, when set, keeps each fetched path for this long after it was
	// fetched or its NAR last read, with the marker KeepMarker in the
	// cache (keep.go); KeepLoop must run. Zero: fetched paths are
	// rooted by nothing, and a prune deletes them, unless MaxKept is set.
	Keep time.Duration
	// MaxKept, when set, bounds the bytes of NAR files that KeepMarker
	// keeps: past it, the least recently read fetched paths leave the
	// marker (not one that a path kept references), and the next prune
	// deletes them unless another root reaches them. With Keep zero, it
	// alone decides what the marker keeps.
	MaxKept int64
	// CacheDir is the cache directory, for Keep and MaxKept; empty when
	// the cache is a bucket, where the marker is kept through serve.
	CacheDir string
	// SpoolDir is where NARs are spooled while they download, for the
	// clients reading them (files unlinked at once); default CacheDir's
	// .tmp/, else the system's temporary directory.
	SpoolDir string
	// Fetched, when set, is called after each path is stored, with its
	// store path and the size of its NAR file (for progress), from
	// several goroutines at once.
	Fetched func(storePath string, fileSize uint64)
	// Log receives what was fetched and what was refused; default the
	// standard logger.
	Log *logrus.Entry
}

// Fetcher fetches store paths from upstream caches into a serve.Cache. It
// is a serve.Upstream.
type Fetcher struct {
	cfg    Config
	bases  []*url.URL
	client *http.Client
	log    *logrus.Entry

	keeper *keeper // nil without Config.Keep and Config.MaxKept
	// downloads and listings bound the NARs and listings (listing.go)
	// downloaded at once.
	downloads chan struct{}
	listings  chan struct{}
	// resolving and flights run one resolve and one store of a path at a
	// time; nodes and byURL are the paths resolved and not yet stored, by
	// hash part and by NAR URL (closure.go).
	resolving flightGroup
	flights   flightGroup
	nodes     map[string]*node
	byURL     map[string]*node
	mu        sync.Mutex
	misses    map[string]time.Time   // hash part -> until when it is not asked again
	down      map[*url.URL]time.Time // upstream -> until when it is not asked
	now       func() time.Time
}

// maxMisses bounds the misses remembered at once (about 100 bytes each).
const maxMisses = 1 << 16

// maxDownloads is how many NARs are downloaded at once.
const maxDownloads = 4

// maxNarInfoSize bounds a narinfo from upstream.
const maxNarInfoSize = 1 << 20

// New returns a Fetcher for cfg.
func New(cfg Config) (*Fetcher, error) {
	if len(cfg.URLs) == 0 {
		return nil, errors.New("no upstream URL")
	}
	if len(cfg.Keys) == 0 {
		return nil, errors.New("no upstream key: what comes from upstream must be signed")
	}
	if cfg.StoreDir == "" {
		cfg.StoreDir = nixcache.DefaultStoreDir
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.ClosureTimeout <= 0 {
		cfg.ClosureTimeout = min(24*cfg.Timeout, 5*time.Minute)
	}
	if cfg.DownloadTimeout <= 0 {
		cfg.DownloadTimeout = time.Hour
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 30 * time.Second
	}
	if cfg.MaxNarSize <= 0 {
		cfg.MaxNarSize = 8 << 30
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = 30 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	f := &Fetcher{cfg: cfg, log: cfg.Log, misses: map[string]time.Time{}, down: map[*url.URL]time.Time{}, now: time.Now,
		downloads: make(chan struct{}, maxDownloads), listings: make(chan struct{}, maxListings), nodes: map[string]*node{}, byURL: map[string]*node{}}
	if cfg.Keep > 0 || cfg.MaxKept > 0 {
		f.keeper = newKeeper(cfg.CacheDir, cfg.StoreDir, max(cfg.Keep, 0), max(cfg.MaxKept, 0), func() time.Time { return f.now() })
	}
	for _, s := range cfg.URLs {
		u, err := url.Parse(strings.TrimSuffix(s, "/") + "/")
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("upstream %q: not an http:// or https:// URL", s)
		}
		f.bases = append(f.bases, u)
	}
	if cfg.Proxy == nil {
		cfg.Proxy = http.ProxyFromEnvironment
	}
	f.client = &http.Client{Transport: &http.Transport{
		Proxy:                 cfg.Proxy,
		DialContext:           (&net.Dialer{Timeout: cfg.Timeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   cfg.Timeout,
		ResponseHeaderTimeout: cfg.Timeout,
		MaxIdleConnsPerHost:   8,
		IdleConnTimeout:       90 * time.Second,
		// NARs are stored as they come: no transparent decoding.
		DisableCompression: true,
	}}
	return f, nil
}

// errNotFound is a path that no upstream has (with a valid signature).
var errNotFound = fmt.Errorf("not in any upstream: %w", fs.ErrNotExist)

// remembered returns the error of a recent miss of hash, if any.
func (f *Fetcher) remembered(hash string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	until, ok := f.misses[hash]
	if !ok {
		return nil
	}
	if f.now().Before(until) {
		return fmt.Errorf("%s (remembered): %w", hash, errNotFound)
	}
	delete(f.misses, hash)
	return nil
}

// remember keeps hash as a miss for NegativeTTL, dropping expired misses
// now and then so that the map does not grow without bound.
func (f *Fetcher) remember(hash string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.now()
	if len(f.misses) >= 4096 {
		for h, until := range f.misses {
			if !now.Before(until) {
				delete(f.misses, h)
			}
		}
		if len(f.misses) >= maxMisses {
			return // a storm of distinct misses: the upstream takes it
		}
	}
	f.misses[hash] = now.Add(f.cfg.NegativeTTL)
}

// narInfo asks each upstream in turn for hash's narinfo and returns the
// first that is well formed and signed by an upstream key, with the
// upstream it came from.
func (f *Fetcher) narInfo(ctx context.Context, hash string) (*nixcache.NarInfo, []byte, *url.URL, error) {
	var errs []error
	for _, base := range f.bases {
		if until, down := f.isDown(base); down {
			errs = append(errs, fmt.Errorf("%s: unreachable a moment ago, not asked again until %s", base.Redacted(), until.Format(time.TimeOnly)))
			continue
		}
		ni, data, err := f.narInfoFrom(ctx, base, hash)
		if err == nil {
			return ni, data, base, nil
		}
		var ue *unreachable
		if errors.As(err, &ue) && ctx.Err() == nil {
			f.setDown(base)
		}
		if !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, nil, nil, errors.Join(errs...)
	}
	return nil, nil, nil, fmt.Errorf("%s: %w", hash, errNotFound)
}

func (f *Fetcher) narInfoFrom(ctx context.Context, base *url.URL, hash string) (*nixcache.NarInfo, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*f.cfg.Timeout)
	defer cancel()
	u := base.JoinPath(hash + ".narinfo")
	resp, err := f.get(ctx, u)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxNarInfoSize+1))
	if err != nil {
		return nil, nil, fmt.Errorf("read %s: %w", u.Redacted(), err)
	}
	if len(data) > maxNarInfoSize {
		return nil, nil, fmt.Errorf("%s: over %d bytes", u.Redacted(), maxNarInfoSize)
	}
	ni, err := nixcache.ParseNarInfo(data)
	if err == nil {
		err = ni.Validate(f.cfg.StoreDir, hash)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", u.Redacted(), err)
	}
	if !ni.VerifiedBy(f.cfg.StoreDir, f.cfg.Keys) {
		f.log.WithFields(logrus.Fields{"path": ni.StorePath, "upstream": base.Redacted()}).Warn("refused from upstream: no valid signature by an upstream key")
		return nil, nil, fmt.Errorf("%s: no valid signature by an upstream key: %w", u.Redacted(), fs.ErrNotExist)
	}
	return ni, data, nil
}

// unreachable is an upstream request that got no answer: refused, timed
// out, or cut off.
type unreachable struct{ err error }

func (e *unreachable) Error() string { return "upstream: " + e.err.Error() }
func (e *unreachable) Unwrap() error { return e.err }

// isDown reports whether base was unreachable within NegativeTTL, and
// until when it is not asked: a dead upstream costs one timeout, not one
// a narinfo, which Nix asks for one after another.
func (f *Fetcher) isDown(base *url.URL) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	until, ok := f.down[base]
	return until, ok && f.now().Before(until)
}

func (f *Fetcher) setDown(base *url.URL) {
	f.mu.Lock()
	f.down[base] = f.now().Add(f.cfg.NegativeTTL)
	f.mu.Unlock()
	f.log.WithFields(logrus.Fields{"upstream": base.Redacted(), "for": f.cfg.NegativeTTL}).Warn("upstream unreachable: not asked for a while")
}

// get sends a GET of u and returns a 200 answer; a 404 or 403 (which Nix
// reads as not found) wraps fs.ErrNotExist.
func (f *Fetcher) get(ctx context.Context, u *url.URL) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, &unreachable{err}
	}
	switch resp.StatusCode {
	case http.StatusOK:
		return resp, nil
	case http.StatusNotFound, http.StatusForbidden, http.StatusGone:
		resp.Body.Close()
		return nil, fmt.Errorf("%s: %s: %w", u.Redacted(), resp.Status, fs.ErrNotExist)
	}
	resp.Body.Close()
	return nil, fmt.Errorf("%s: %s", u.Redacted(), resp.Status)
}

// nar downloads ni's NAR from base into c, checked as it comes (check.go).
func (f *Fetcher) nar(ctx context.Context, base *url.URL, ni *nixcache.NarInfo, c *serve.Cache, sp *spool) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	u := base.JoinPath(ni.URL)
	resp, err := f.get(ctx, u)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// A narinfo whose NAR is gone: the path is not there.
			return fmt.Errorf("%s: NAR missing upstream: %w", ni.StorePath, err)
		}
		return err
	}
	defer resp.Body.Close()
	if ni.FileSize > 0 && resp.ContentLength >= 0 && resp.ContentLength != int64(ni.FileSize) {
		return fmt.Errorf("%s: %d bytes, not the narinfo's FileSize %d", u.Redacted(), resp.ContentLength, ni.FileSize)
	}
	body := &stallReader{r: resp.Body, cancel: cancel, stall: f.cfg.StallTimeout}
	body.arm()
	defer body.stop()
	v, err := newVerifier(body, ni, f.cfg.MaxNarSize)
	if err != nil {
		return fmt.Errorf("%s: %w", ni.StorePath, err)
	}
	defer v.Close()
	if err := c.StoreNar(ni.URL, io.TeeReader(v, sp)); err != nil {
		return fmt.Errorf("%s: %w", ni.StorePath, err)
	}
	return nil
}

// stallReader cancels a download that receives nothing for stall.
type stallReader struct {
	r      io.Reader
	cancel context.CancelFunc
	stall  time.Duration
	t      *time.Timer
}

func (s *stallReader) arm() { s.t = time.AfterFunc(s.stall, s.cancel) }

func (s *stallReader) stop() { s.t.Stop() }

func (s *stallReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if n > 0 {
		s.t.Reset(s.stall)
	}
	return n, err
}
