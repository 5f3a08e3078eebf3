package gateway

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// A Forwarder given several front ends (ForwarderConfig.Frontends: serves
// over one store, each with its own onions) runs one Forwarder per front
// end, each with its share of the circuits, its own state and its own
// prober, and sends each request to one of those that forward: a
// reachable one first, the least busy. A request that fails before any
// answer came (a dial refused or timed out, a connection reset) goes to
// another front end, when its body, if any, was not read yet; the front
// end that failed gets nothing more until its prober reaches it again. A
// NAR whose download breaks (the front end killed, its circuit gone) is
// taken up on another front end with a Range request from the byte it
// broke at, so the reader gets the whole file. The gateway answers
// requests itself only while no front end forwards.

// newFrontends returns a Forwarder over cfg.Target and cfg.Frontends.
func newFrontends(cfg ForwarderConfig) (*Forwarder, error) {
	targets := append([]string{cfg.Target}, cfg.Frontends...)
	seen := map[string]bool{}
	for _, t := range targets {
		if seen[t] {
			return nil, fmt.Errorf("forward to %q: a front end listed twice", t)
		}
		seen[t] = true
	}
	target, err := url.Parse(cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("forward to %q: %w", cfg.Target, err)
	}
	if cfg.Circuits <= 0 {
		cfg.Circuits = DefaultCircuits
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	f := &Forwarder{cfg: cfg, target: target, log: cfg.Log, upc: make(chan struct{}), kick: make(chan struct{}, 1), done: make(chan struct{}), metrics: newForwarderMetrics()}
	for i, t := range targets {
		sub := cfg
		sub.Target, sub.Frontends, sub.metrics, sub.front = t, nil, f.metrics, i
		// The circuits are shared out, at least one each.
		sub.Circuits = max(1, cfg.Circuits/len(targets))
		if i < cfg.Circuits%len(targets) {
			sub.Circuits++
		}
		sub.Log = cfg.Log.WithField("frontend", i)
		c, err := NewForwarder(sub)
		if err != nil {
			for _, c := range f.fronts {
				c.Close()
			}
			return nil, err
		}
		f.fronts = append(f.fronts, c)
		f.circuits = append(f.circuits, c.circuits...)
	}
	f.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			// sendAny sets the front end's URL.
			pr.Out.URL.Scheme, pr.Out.URL.Host = target.Scheme, target.Host
			pr.Out.Header.Del("Expect")
		},
		Transport: frontendsTransport{f},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() == nil {
				f.answer(w, r, err) // the front ends noted their failures
			}
		},
		ErrorLog: log.New(f.log.WriterLevel(logrus.DebugLevel), "", 0),
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	close(f.done) // no prober of its own: each front end has one
	return f, nil
}

// each returns the Forwarders of the front ends: f's own, or f itself
// when it forwards to one.
func (f *Forwarder) each() []*Forwarder {
	if f.fronts != nil {
		return f.fronts
	}
	return []*Forwarder{f}
}

// wake has the probers try at once (tor just started).
func (f *Forwarder) wake() {
	for _, c := range f.each() {
		select {
		case c.kick <- struct{}{}:
		default:
		}
	}
}

// forwarding reports whether requests are sent on (to some front end),
// and else why not.
func (f *Forwarder) forwarding() (bool, string) {
	var reason string
	var at time.Time
	for _, c := range f.each() {
		c.mu.Lock()
		ok, why, when := c.health.Forwarding, c.health.LastError, c.health.ErrorAt
		c.mu.Unlock()
		if ok {
			return true, ""
		}
		if reason == "" || when.After(at) {
			reason, at = why, when
		}
	}
	return false, reason
}

// knownCacheInfo returns the cache's nix-cache-info as any front end
// last served it, or nil.
func (f *Forwarder) knownCacheInfo() []byte {
	for _, c := range f.each() {
		c.mu.Lock()
		info := c.cacheInfo
		c.mu.Unlock()
		if info != nil {
			return info
		}
	}
	return nil
}

// describe names what the Forwarder forwards to, for messages.
func (f *Forwarder) describe() string {
	if len(f.fronts) > 1 {
		return fmt.Sprintf("every front end (%s and %d more)", f.target, len(f.fronts)-1)
	}
	return f.target.String()
}

// frontsHealth sums up the front ends' Health: the best state any is in
// (reachable, then probing), since the earliest of those in it; the
// latest error; each front end's own in Frontends.
func (f *Forwarder) frontsHealth() Health {
	rank := map[State]int{StateUnreachable: 0, StateProbing: 1, StateReachable: 2}
	h := Health{Target: f.target.String(), Circuits: len(f.circuits)}
	for i, c := range f.fronts {
		ch := c.Health()
		h.Frontends = append(h.Frontends, ch)
		switch {
		case i == 0 || rank[ch.State] > rank[h.State]:
			h.State, h.Since = ch.State, ch.Since
		case ch.State == h.State && ch.Since.Before(h.Since):
			h.Since = ch.Since
		}
		h.Forwarding = h.Forwarding || ch.Forwarding
		h.CacheInfo = h.CacheInfo || ch.CacheInfo
		h.InFlight += ch.InFlight
		if ch.LastOK.After(h.LastOK) {
			h.LastOK = ch.LastOK
		}
		if ch.ErrorAt.After(h.ErrorAt) {
			h.LastError, h.ErrorAt = ch.LastError, ch.ErrorAt
		}
	}
	h.Reachable = h.State == StateReachable
	return h
}

// waitAny returns once any front end is reachable, or the first front
// end's error when ctx ends first.
func (f *Forwarder) waitAny(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make(chan error, len(f.fronts))
	for _, c := range f.fronts {
		go func() { errs <- c.WaitReachable(ctx) }()
	}
	var first error
	for range f.fronts {
		err := <-errs
		if err == nil {
			return nil
		}
		if first == nil {
			first = err
		}
	}
	return first
}

// frontendsTransport is the round tripper of a Forwarder over several
// front ends.
type frontendsTransport struct{ f *Forwarder }

func (t frontendsTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	return t.f.sendAny(req)
}

// sendAny sends req (a path on the cache) to a front end that forwards,
// and to the next one when it fails before answering, while req's body,
// if any, was not read.
func (f *Forwarder) sendAny(req *http.Request) (*http.Response, error) {
	var body *untouchedBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &untouchedBody{r: req.Body}
		req = req.Clone(req.Context())
		req.Body = body
	}
	tried := make([]bool, len(f.fronts))
	var lastErr error
	for {
		c := f.pickFront(tried)
		if c == nil {
			break
		}
		tried[c.cfg.front] = true
		resp, err := f.sendWatched(c, req)
		if err == nil {
			if r := f.resumable(req, resp, c, tried); r != nil {
				resp.Body = r
			}
			return resp, nil
		}
		lastErr = err
		if req.Context().Err() != nil || (body != nil && body.read.Load()) {
			return nil, err
		}
		c.log.WithError(err).Debug("front end failed: the request goes to another")
	}
	if lastErr == nil {
		_, reason := f.forwarding()
		lastErr = fmt.Errorf("%w: %s", errAway, reason)
	}
	return nil, lastErr
}

// pickFront returns a front end not tried yet that forwards, a reachable
// one before one still probing, the least busy for its circuits; nil
// when none is left.
func (f *Forwarder) pickFront(tried []bool) *Forwarder {
	start := int(f.next.Add(1))
	var best *Forwarder
	var bestReach bool
	var bestLoad float64
	for i := range f.fronts {
		j := (start + i) % len(f.fronts)
		c := f.fronts[j]
		if tried[j] {
			continue
		}
		c.mu.Lock()
		fw, reach := c.health.Forwarding, c.health.Reachable
		c.mu.Unlock()
		if !fw {
			continue
		}
		var inflight int32
		for _, cc := range c.circuits {
			inflight += cc.inflight.Load()
		}
		load := float64(inflight) / float64(len(c.circuits))
		if best == nil || (reach && !bestReach) || (reach == bestReach && load < bestLoad) ||
			(reach == bestReach && load == bestLoad && c.picked.Load() < best.picked.Load()) {
			best, bestReach, bestLoad = c, reach, load
		}
	}
	if best != nil {
		best.picked.Add(1)
	}
	return best
}

// send sends req, a path (and query) on the cache, to f's own target
// over its circuits, and notes the outcome in f's state.
func (f *Forwarder) send(req *http.Request) (*http.Response, error) {
	began := time.Now()
	out := req.Clone(context.WithValue(req.Context(), arrivalKey{}, began))
	u := *f.target
	u.Path, u.RawPath, u.RawQuery = f.target.Path+req.URL.Path, "", req.URL.RawQuery
	out.URL, out.Host = &u, ""
	resp, err := roundTripper{f}.RoundTrip(out)
	if err != nil {
		if req.Context().Err() == nil {
			f.down(err, began)
		}
		return nil, err
	}
	f.up()
	return resp, nil
}

// untouchedBody is a request body that tells whether it was read: until
// then, the request may go to another front end. Closing it is left to
// its owner, the server.
type untouchedBody struct {
	r    io.ReadCloser
	read atomic.Bool
}

func (b *untouchedBody) Read(p []byte) (int, error) {
	b.read.Store(true)
	return b.r.Read(p)
}

func (b *untouchedBody) Close() error { return nil }

// resumable returns a body for resp that takes a broken download up on
// another front end, when resp is a whole NAR of known size; else nil.
// NARs are named by their hash: every front end holds the same bytes
// under a name.
func (f *Forwarder) resumable(req *http.Request, resp *http.Response, from *Forwarder, tried []bool) io.ReadCloser {
	if req.Method != http.MethodGet || resp.StatusCode != http.StatusOK || req.Header.Get("Range") != "" ||
		resp.ContentLength <= 0 || nixcache.NarURLHash(strings.TrimPrefix(req.URL.Path, "/")) == "" {
		return nil
	}
	return &resumingBody{f: f, req: req, body: resp.Body, size: resp.ContentLength, tried: tried, encoding: resp.Header.Get("Content-Encoding")}
}

// resumingBody reads a NAR from one front end and, when that breaks,
// from the next with a Range request, until the whole file came or no
// front end is left.
type resumingBody struct {
	f        *Forwarder
	req      *http.Request
	body     io.ReadCloser
	size     int64
	off      int64
	tried    []bool // front ends that broke (or failed) on this file
	broken   error  // the read that broke, once its bytes were given out
	encoding string
}

func (b *resumingBody) Read(p []byte) (int, error) {
	for {
		if b.broken != nil {
			if err := b.resume(); err != nil {
				return 0, err
			}
		}
		n, err := b.body.Read(p)
		b.off += int64(n)
		switch {
		case err == nil:
			return n, nil
		case err == io.EOF && b.off == b.size:
			return n, io.EOF
		case err == io.EOF:
			err = io.ErrUnexpectedEOF
		}
		b.broken = err
		if n > 0 {
			return n, nil
		}
	}
}

// resume asks the next front end for the rest of the file; it returns the
// error that broke the download when none gives it.
func (b *resumingBody) resume() error {
	cause := b.broken
	if b.req.Context().Err() != nil {
		return cause
	}
	b.body.Close()
	for {
		c := b.f.pickFront(b.tried)
		if c == nil {
			return cause
		}
		b.tried[c.cfg.front] = true
		r := b.req.Clone(b.req.Context())
		r.Header.Set("Range", "bytes="+strconv.FormatInt(b.off, 10)+"-")
		resp, err := b.f.sendWatched(c, r)
		if err != nil {
			continue
		}
		want := fmt.Sprintf("bytes %d-%d/%d", b.off, b.size-1, b.size)
		if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != want || resp.Header.Get("Content-Encoding") != b.encoding {
			resp.Body.Close()
			c.log.WithFields(logrus.Fields{"status": resp.StatusCode, "content_range": resp.Header.Get("Content-Range")}).Debug("front end cannot resume the download")
			continue
		}
		c.log.WithFields(logrus.Fields{"path": b.req.URL.Path, "offset": b.off}).WithError(cause).Info("download resumed on another front end")
		b.f.metrics.resumes.Add(1)
		b.body, b.broken = resp.Body, nil
		return nil
	}
}

func (b *resumingBody) Close() error { return b.body.Close() }

// stallAfter is how long a read of a response body from one front end
// may wait for a byte while another front end forwards: past it, the
// front end is taken for gone (its machine or its network cut off
// without a word: tor sends nothing, and keeps the circuit), it probes
// again, and the read fails, so that the download resumes on another
// front end (a NAR fetched whole, resumingBody) or is asked again (a
// part, narstore). A variable, so that a test can shorten it.
var stallAfter = 10 * time.Second

// errStalled is the read error of a response body that stalled.
var errStalled = fmt.Errorf("%w: the front end stopped sending", errStale)

// sendWatched sends req to the front end c, as send does, and watches the
// body of a read's answer for a stall (stallAfter).
func (f *Forwarder) sendWatched(c *Forwarder, req *http.Request) (*http.Response, error) {
	resp, err := c.send(req)
	if err != nil || req.Method != http.MethodGet {
		return resp, err
	}
	b := &stallingBody{body: resp.Body}
	b.timer = time.AfterFunc(stallAfter, func() {
		if !b.reading.Load() {
			return
		}
		if !f.othersForward(c) {
			// No better place to read it from: wait on.
			b.timer.Reset(stallAfter)
			return
		}
		b.stalled.Store(true)
		c.down(errStalled, time.Now().Add(-stallAfter))
		b.body.Close()
	})
	b.timer.Stop() // it runs only while a Read waits
	resp.Body = b
	return resp, nil
}

// othersForward reports whether a front end other than c forwards.
func (f *Forwarder) othersForward(c *Forwarder) bool {
	for _, o := range f.fronts {
		if o == c {
			continue
		}
		o.mu.Lock()
		fw := o.health.Forwarding
		o.mu.Unlock()
		if fw {
			return true
		}
	}
	return false
}

// stallingBody is a response body whose Read fails with errStalled when
// it waits stallAfter for a byte. The time a reader takes between reads
// (Nix busy, its pipe full) is not counted.
type stallingBody struct {
	body    io.ReadCloser
	timer   *time.Timer
	reading atomic.Bool
	stalled atomic.Bool
}

func (b *stallingBody) Read(p []byte) (int, error) {
	b.reading.Store(true)
	b.timer.Reset(stallAfter)
	n, err := b.body.Read(p)
	b.reading.Store(false)
	b.timer.Stop()
	if err != nil && b.stalled.Load() {
		err = errStalled
	}
	return n, err
}

func (b *stallingBody) Close() error {
	b.timer.Stop()
	return b.body.Close()
}
