package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/closure"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// Defaults of PrefetchConfig.
const (
	DefaultPrefetchSize = 1 << 30
	DefaultNarInfoTTL   = 30 * time.Second
)

// PrefetchConfig configures a Prefetcher.
type PrefetchConfig struct {
	// Dir holds the NARs fetched (required). Unless Keep, it is emptied
	// at the start: it is the Prefetcher's own.
	Dir string
	// Size bounds what Dir holds (DefaultPrefetchSize when 0): the least
	// recently used files go first.
	Size int64
	// Keep makes Dir a cache that outlives the gateway (a LAN cache): it
	// keeps the narinfos of the NARs it holds too, to answer them while
	// the onion is unreachable.
	Keep bool
	// Ahead fetches a closure's NARs as soon as its narinfos arrive,
	// rather than when Nix asks for each.
	Ahead bool
	// Downloads bounds the NARs fetched ahead at once (the circuits'
	// count, twice, when 0). A NAR Nix asks for starts at once.
	Downloads int
	// NarInfoTTL is how long a narinfo (or its absence) learnt from a
	// closure answer is answered without asking the cache
	// (DefaultNarInfoTTL when 0).
	NarInfoTTL time.Duration
	Log        *logrus.Entry
}

// Prefetcher is an http.Handler in front of a Forwarder that spares Nix
// a round trip over Tor for each narinfo and each NAR. On a narinfo it
// does not know, it asks the cache for the narinfos of the path's whole
// closure at once (a closure query, package closure) and answers the
// rest of Nix's narinfo requests from that answer, for NarInfoTTL; with
// Ahead, it starts the closure's NARs over the circuits right away. NARs
// come from its store (narstore.go), downloaded once, checked against
// their names, then kept within Size. Everything else, and everything
// when the cache answers no closure queries (an older serve), goes to the
// Forwarder as it is. What it answers is byte for byte what the cache
// held when it asked; Nix's own signature check is the last word.
type Prefetcher struct {
	next  *Forwarder
	cfg   PrefetchConfig
	store *narStore
	log   *logrus.Entry

	mu      sync.Mutex
	infos   map[string]infoEntry // by hash part
	byURL   map[string][]string  // NAR path -> hash parts whose narinfo names it
	calls   map[chan struct{}]bool
	noQuery time.Time // closure queries refused until then
}

// infoEntry is what a closure answer said of a path.
type infoEntry struct {
	data []byte // the narinfo; nil when the cache lacks the path
	url  string
	size int64
	at   time.Time
}

// maxInfos bounds the narinfos remembered.
const maxInfos = 200_000

// maxClosureAnswer bounds a closure answer the Prefetcher reads.
const maxClosureAnswer = 80 << 20

// closureTimeout bounds a closure query.
const closureTimeout = time.Minute

// NewPrefetcher returns a Prefetcher in front of next.
func NewPrefetcher(next *Forwarder, cfg PrefetchConfig) (*Prefetcher, error) {
	if cfg.Dir == "" {
		return nil, errors.New("prefetch: no directory")
	}
	if cfg.Size <= 0 {
		cfg.Size = DefaultPrefetchSize
	}
	if cfg.Downloads <= 0 {
		cfg.Downloads = 2 * len(next.circuits)
	}
	if cfg.NarInfoTTL <= 0 {
		cfg.NarInfoTTL = DefaultNarInfoTTL
	}
	log := cfg.Log
	if log == nil {
		log = next.log
	}
	p := &Prefetcher{next: next, cfg: cfg, log: log,
		infos: map[string]infoEntry{}, byURL: map[string][]string{}, calls: map[chan struct{}]bool{}}
	var err error
	p.store, err = openNarStore(cfg.Dir, cfg.Size, cfg.Downloads, len(next.circuits), cfg.Keep, next.RoundTrip, log)
	if err != nil {
		return nil, fmt.Errorf("prefetch: %w", err)
	}
	if cfg.Keep {
		p.store.kept = p.keepNarInfos
	}
	return p, nil
}

// Close stops the downloads.
func (p *Prefetcher) Close() { p.store.close() }

// ServeHTTP answers narinfo and NAR reads, and hands the rest to the
// Forwarder.
func (p *Prefetcher) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		path := strings.TrimPrefix(r.URL.Path, "/")
		if h, ok := strings.CutSuffix(path, ".narinfo"); ok && nixcache.IsHashPart(h) && r.URL.RawQuery == "" {
			p.serveNarInfo(w, r, h)
			return
		}
		if nixcache.NarURLHash(path) != "" && r.Method == http.MethodGet && r.URL.RawQuery == "" {
			if r.Header.Get("Range") == "" {
				p.serveNar(w, r, path)
				return
			}
			// Nix resumes a broken download with a Range: from the
			// store when it has the file whole, else from the cache.
			if p.serveNarRange(w, r, path) {
				return
			}
		}
	}
	p.next.ServeHTTP(w, r)
}

// serveNarInfo answers a narinfo from a closure answer: one it has, or
// one it asks for now.
func (p *Prefetcher) serveNarInfo(w http.ResponseWriter, r *http.Request, hash string) {
	e, ok := p.info(hash)
	if !ok {
		// A closure answer on its way may hold it: Nix asks for a path's
		// references once it has the path's narinfo, or all at once.
		p.waitCalls(r.Context())
		e, ok = p.info(hash)
	}
	if !ok {
		err := p.query(r.Context(), []string{hash})
		if e, ok = p.info(hash); !ok && err != nil && p.cfg.Keep {
			ok = p.keptNarInfo(hash, &e)
		}
	}
	switch {
	case !ok:
		p.next.ServeHTTP(w, r)
	case e.data == nil:
		h := w.Header()
		h.Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		if r.Method == http.MethodGet {
			io.WriteString(w, "not in the cache\n")
		}
	default:
		h := w.Header()
		h.Set("Content-Type", "text/x-nix-narinfo")
		h.Set("Content-Length", strconv.Itoa(len(e.data)))
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			w.Write(e.data)
		}
	}
}

// info returns what a fresh closure answer said of hash.
func (p *Prefetcher) info(hash string) (infoEntry, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.infos[hash]
	if ok && time.Since(e.at) > p.cfg.NarInfoTTL {
		return infoEntry{}, false
	}
	return e, ok
}

// waitCalls waits for the closure queries in flight now.
func (p *Prefetcher) waitCalls(ctx context.Context) {
	p.mu.Lock()
	calls := make([]chan struct{}, 0, len(p.calls))
	for c := range p.calls {
		calls = append(calls, c)
	}
	p.mu.Unlock()
	for _, c := range calls {
		select {
		case <-c:
		case <-ctx.Done():
			return
		}
	}
}

// query asks the cache for the closure of hashes and remembers the
// answer; with Ahead, it starts the closure's NARs.
func (p *Prefetcher) query(ctx context.Context, hashes []string) error {
	p.mu.Lock()
	if time.Now().Before(p.noQuery) {
		p.mu.Unlock()
		return errors.New("the cache answers no closure queries")
	}
	done := make(chan struct{})
	p.calls[done] = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.calls, done)
		p.mu.Unlock()
		close(done)
	}()
	// Others wait for this answer too: the asking client's leaving must
	// not cut it short.
	qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), closureTimeout)
	defer cancel()
	req, _ := http.NewRequestWithContext(qctx, http.MethodGet, closure.Query(hashes), nil)
	resp, err := p.next.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != closure.ContentType {
		if resp.StatusCode < 500 && resp.Header.Get(ErrorHeader) == "" {
			// An older serve: ask again in a while, after an upgrade.
			p.mu.Lock()
			p.noQuery = time.Now().Add(10 * time.Minute)
			p.mu.Unlock()
			p.log.WithField("status", resp.StatusCode).Info("the cache answers no closure queries: forwarding each narinfo")
		}
		return fmt.Errorf("closure query: %s", resp.Status)
	}
	a, err := closure.Parse(resp.Body, maxClosureAnswer)
	if err != nil {
		p.log.WithError(err).Warn("closure answer")
		return err
	}
	p.remember(a)
	return nil
}

// remember keeps what a closure answer says, and queues its NARs.
func (p *Prefetcher) remember(a closure.Answer) {
	now := time.Now()
	var ahead []prefetch
	p.mu.Lock()
	if len(p.infos)+len(a.Records) > maxInfos {
		p.sweep(now)
	}
	for _, rec := range a.Records {
		switch rec.Status {
		case closure.Found:
			e := infoEntry{data: rec.NarInfo, at: now, size: -1}
			if ni, err := nixcache.ParseNarInfo(rec.NarInfo); err == nil && nixcache.NarURLHash(ni.URL) != "" {
				e.url = ni.URL
				if ni.FileSize > 0 {
					e.size = int64(ni.FileSize)
				}
				p.byURL[e.url] = appendOnce(p.byURL[e.url], rec.Hash)
				ahead = append(ahead, prefetch{rel: e.url, size: e.size})
			}
			p.infos[rec.Hash] = e
		case closure.Missing:
			p.infos[rec.Hash] = infoEntry{at: now}
		}
	}
	p.mu.Unlock()
	if p.cfg.Ahead {
		// The answer goes breadth first from the roots; Nix substitutes
		// references before what refers to them: the deepest first.
		slices.Reverse(ahead)
		p.store.ahead(ahead)
	}
}

// sweep forgets stale narinfos; the caller holds p.mu.
func (p *Prefetcher) sweep(now time.Time) {
	for h, e := range p.infos {
		if now.Sub(e.at) > p.cfg.NarInfoTTL {
			delete(p.infos, h)
			if e.url != "" {
				delete(p.byURL, e.url)
			}
		}
	}
	if len(p.infos) > maxInfos/2 {
		p.infos, p.byURL = map[string]infoEntry{}, map[string][]string{}
	}
}

func appendOnce(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// keepNarInfos writes, into a LAN cache, the narinfos that name the NAR
// rel just kept, so that the path can be served while the onion is away.
func (p *Prefetcher) keepNarInfos(rel string) {
	p.mu.Lock()
	var keep []infoEntry
	var hashes []string
	for _, h := range p.byURL[rel] {
		if e, ok := p.infos[h]; ok && e.data != nil {
			keep, hashes = append(keep, e), append(hashes, h)
		}
	}
	p.mu.Unlock()
	for i, e := range keep {
		if err := p.store.keepFile(hashes[i]+".narinfo", e.data); err != nil {
			p.log.WithError(err).Warn("gateway cache: keep a narinfo")
		}
	}
}

// keptNarInfo reads a narinfo a LAN cache kept, when its NAR is there
// too.
func (p *Prefetcher) keptNarInfo(hash string, e *infoEntry) bool {
	data, err := os.ReadFile(filepath.Join(p.cfg.Dir, hash+".narinfo"))
	if err != nil {
		return false
	}
	ni, err := nixcache.ParseNarInfo(data)
	if err != nil || !p.store.has(ni.URL) {
		return false
	}
	*e = infoEntry{data: data, url: ni.URL}
	return true
}

// serveNar answers a NAR from the store, which fetches it once.
func (p *Prefetcher) serveNar(w http.ResponseWriter, r *http.Request, rel string) {
	size := int64(-1)
	p.mu.Lock()
	for _, h := range p.byURL[rel] {
		if e := p.infos[h]; e.size > 0 {
			size = e.size
		}
	}
	p.mu.Unlock()
	src, err := p.store.open(rel, size)
	if err != nil {
		p.next.ServeHTTP(w, r)
		return
	}
	defer src.Close()
	p.next.metrics.narLookup(src.file != nil)
	status, n, err := src.wait(r.Context())
	switch {
	case r.Context().Err() != nil:
		return
	case err != nil:
		// The Forwarder answers for an onion away (errAway), or tries
		// once more.
		p.next.ServeHTTP(w, r)
		return
	case status == http.StatusNotFound:
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, "not in the cache\n")
		return
	case status != http.StatusOK:
		// Whatever the cache says, it says it to Nix itself.
		p.next.ServeHTTP(w, r)
		return
	}
	body, err := src.reader()
	if err != nil {
		// The download failed (cut, or not the file its name says)
		// before this client's first byte: Nix retries a 502.
		w.Header().Set(ErrorHeader, "download")
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusBadGateway)
		fmt.Fprintf(w, "%s%s: %v\n", errorPrefix, rel, err)
		return
	}
	defer body.Close()
	h := w.Header()
	h.Set("Content-Type", "application/x-nix-nar")
	// Without it, Nix 2.8 does not resume a download that broke (the
	// onion went away): it fails the path instead of carrying on.
	h.Set("Accept-Ranges", "bytes")
	if n >= 0 {
		h.Set("Content-Length", strconv.FormatInt(n, 10))
	}
	w.WriteHeader(http.StatusOK)
	var from io.Reader = body
	if src.file != nil {
		from = src.file // net/http sends an *os.File with sendfile
	}
	if _, err := io.Copy(w, from); err != nil {
		// Cut the connection: Nix must not take a short body for a whole.
		panic(http.ErrAbortHandler)
	}
}

// serveNarRange answers a range of a NAR the store holds whole, and
// reports whether it did.
func (p *Prefetcher) serveNarRange(w http.ResponseWriter, r *http.Request, rel string) bool {
	if !p.store.has(rel) {
		return false
	}
	src, err := p.store.open(rel, -1)
	if err != nil || src.file == nil {
		if src != nil {
			src.Close()
		}
		return false
	}
	defer src.Close()
	w.Header().Set("Content-Type", "application/x-nix-nar")
	http.ServeContent(w, r, "", time.Time{}, src.file)
	return true
}
