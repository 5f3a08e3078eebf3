package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// A Forwarder's metrics, for Prometheus (see RegisterMetrics). They are
// counted always, whether anyone scrapes them or not. Labels come from
// fixed sets (role, method, status, source, state, reason): no metric
// carries a key, an onion address or a path.

// Sources of an answer: the onion's (forwarded), the gateway's own for an
// onion away (ErrorHeader), or the gateway's from what it holds.
const (
	sourceOnion   = "onion"
	sourceGateway = "gateway"
	sourceCache   = "cache"
)

// Reasons a dial to the onion fails, as the dial failure counters know
// them.
const (
	dialTimeout = iota // no connection within DialTimeout, or a probe's timeout
	dialRefused        // tor refused the stream (a SOCKS error)
	dialNoTor          // tor is not running
	dialOther
	numDialReasons
)

var dialReasons = [numDialReasons]string{"timeout", "refused", "no_tor", "other"}

// requestKey is one cell of the request counters.
type requestKey struct {
	method, status, source string
}

// forwarderMetrics are the counters of one Forwarder.
type forwarderMetrics struct {
	mu       sync.Mutex
	requests map[requestKey]uint64

	inflight atomic.Int64
	sent     atomic.Uint64 // request body bytes read from clients and sent on to the onion
	received atomic.Uint64 // response body bytes read from the onion, probes' included
	dials    [numDialReasons]atomic.Uint64

	narHits, narMisses atomic.Uint64 // NARs the Prefetcher served, by whether stored already
	resumes            atomic.Uint64 // NAR downloads taken up on another front end
}

func newForwarderMetrics() *forwarderMetrics {
	return &forwarderMetrics{requests: map[requestKey]uint64{}}
}

// countedKey is the context key of a request counted by handler: a
// *counted.
type countedKey struct{}

// counted is what handler learns of a request it counts.
type counted struct {
	forwarded atomic.Bool // the Forwarder took it (rather than the Prefetcher)
}

// handler counts the requests next answers (all but HealthPath), telling
// apart those the Forwarder forwards, those the gateway answers itself
// for an onion away (ErrorHeader), and those it answers from what it holds
// (a Prefetcher's closure answers and NAR store).
func (m *forwarderMetrics) handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == HealthPath {
			next.ServeHTTP(w, r)
			return
		}
		c := &counted{}
		r = r.WithContext(context.WithValue(r.Context(), countedKey{}, c))
		w, r, done := m.count(w, r, c)
		defer done()
		next.ServeHTTP(w, r)
	})
}

// begin is the Forwarder's side of handler: it notes that the Forwarder
// took r, or counts r when no handler does (a bare Forwarder). done is to
// be called once r is answered.
func (m *forwarderMetrics) begin(w http.ResponseWriter, r *http.Request) (_ http.ResponseWriter, _ *http.Request, done func()) {
	if c, ok := r.Context().Value(countedKey{}).(*counted); ok {
		c.forwarded.Store(true)
		return w, r, func() {}
	}
	c := &counted{}
	c.forwarded.Store(true)
	return m.count(w, r, c)
}

// count starts counting a request: it returns the writer and request to
// serve it with, and done, to call once it is answered.
func (m *forwarderMetrics) count(w http.ResponseWriter, r *http.Request, c *counted) (http.ResponseWriter, *http.Request, func()) {
	m.inflight.Add(1)
	sw := &statusWriter{ResponseWriter: w}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &countingBody{ReadCloser: r.Body, n: &m.sent}
	}
	return sw, r, func() {
		m.inflight.Add(-1)
		status := sw.status
		if status == 0 {
			// Nothing written: the client went away (see fail), or a
			// handler that answered 200 with no body.
			status = http.StatusOK
			if r.Context().Err() != nil {
				status = 499 // nginx's "client closed request"
			}
		}
		source := sourceCache
		switch {
		case w.Header().Get(ErrorHeader) != "":
			source = sourceGateway
		case c.forwarded.Load():
			source = sourceOnion
		}
		k := requestKey{methodName(r.Method), statusName(status), source}
		m.mu.Lock()
		m.requests[k]++
		m.mu.Unlock()
	}
}

// narLookup counts a NAR a Prefetcher served from its store: complete
// there already (fetched ahead, or for an earlier request), or not.
func (m *forwarderMetrics) narLookup(stored bool) {
	if stored {
		m.narHits.Add(1)
	} else {
		m.narMisses.Add(1)
	}
}

// dialFailed counts a dial to the onion that failed with err.
func (m *forwarderMetrics) dialFailed(err error) {
	why := dialOther
	var se *SocksError
	switch {
	case errors.Is(err, errSlow), errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded):
		why = dialTimeout
	case errors.As(err, &se):
		why = dialRefused
	case errors.Is(err, errNoTor):
		why = dialNoTor
	}
	m.dials[why].Add(1)
}

// methodName returns the method label of an HTTP method.
func methodName(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodDelete:
		return m
	}
	return "other"
}

// statusName returns the status label of a code: the code, or "other"
// outside 100-599.
func statusName(code int) string {
	if code < 100 || code > 599 {
		return "other"
	}
	return strconv.Itoa(code)
}

// statusWriter records the status of a response. It unwraps for
// http.ResponseController (the reverse proxy flushes through it).
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countingBody counts the bytes read from a body.
type countingBody struct {
	io.ReadCloser
	n *atomic.Uint64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(uint64(n))
	return n, err
}

var (
	gwReachableDesc = prometheus.NewDesc("kiss_onion_gateway_onion_reachable",
		"1 while the onion answers the gateway, 0 while it is probing or unreachable.", []string{"role"}, nil)
	gwStateDesc = prometheus.NewDesc("kiss_onion_gateway_onion_state",
		"1 for the state the gateway is in (probing, reachable, unreachable), 0 for the others.", []string{"role", "state"}, nil)
	gwSinceDesc = prometheus.NewDesc("kiss_onion_gateway_onion_state_since_timestamp_seconds",
		"Since when (Unix time) the gateway has been in its state: its last change, or its start.", []string{"role"}, nil)
	gwForwardingDesc = prometheus.NewDesc("kiss_onion_gateway_forwarding",
		"1 while requests are sent on to the onion, 0 while the gateway answers them itself (from a failure until the onion answers again).", []string{"role"}, nil)
	gwCircuitsDesc = prometheus.NewDesc("kiss_onion_gateway_circuits",
		"Isolated Tor circuits the gateway spreads requests over (--circuits).", []string{"role"}, nil)
	gwCircuitsInUseDesc = prometheus.NewDesc("kiss_onion_gateway_circuits_in_use",
		"Circuits with a request (or a probe) in flight now.", []string{"role"}, nil)
	gwRequestsDesc = prometheus.NewDesc("kiss_onion_gateway_requests_total",
		"Requests answered, by role, method (GET, HEAD, PUT, DELETE, other), status and source: onion (forwarded: the cache's answer), gateway (its own, with the Kiss-Onion-Gateway-Error header, while the onion is unreachable or a download failed) or cache (from what the gateway holds: closure answers, its NAR store).",
		[]string{"role", "method", "status", "source"}, nil)
	gwInFlightDesc = prometheus.NewDesc("kiss_onion_gateway_requests_in_flight",
		"Requests being answered now.", []string{"role"}, nil)
	gwSentDesc = prometheus.NewDesc("kiss_onion_gateway_onion_sent_bytes_total",
		"Bytes of request bodies (uploads) sent on to the onion.", []string{"role"}, nil)
	gwReceivedDesc = prometheus.NewDesc("kiss_onion_gateway_onion_received_bytes_total",
		"Bytes of response bodies received from the onion, the gateway's probes included.", []string{"role"}, nil)
	gwCacheBytesDesc = prometheus.NewDesc("kiss_onion_gateway_cache_bytes",
		"Bytes of the NARs (and, with --cache-dir, narinfos) the gateway holds, downloads under way included.", []string{"role"}, nil)
	gwCacheFilesDesc = prometheus.NewDesc("kiss_onion_gateway_cache_files",
		"Files the gateway holds complete.", []string{"role"}, nil)
	gwCacheNarsDesc = prometheus.NewDesc("kiss_onion_gateway_cache_nar_requests_total",
		"NAR requests the gateway answered from its store, by result: hit (complete there already: fetched ahead, or for an earlier request) or miss (fetched, or still arriving, when asked).",
		[]string{"role", "result"}, nil)
	gwFrontendReachableDesc = prometheus.NewDesc("kiss_onion_gateway_frontend_reachable",
		"1 while the front end answers the gateway, 0 while it is probing or unreachable; front ends by their index in the bundle (0 for its read_url and write_url, then each [[frontend]] in order).", []string{"role", "frontend"}, nil)
	gwResumesDesc = prometheus.NewDesc("kiss_onion_gateway_frontend_resumes_total",
		"NAR downloads that broke on one front end and were taken up on another with a Range request.", []string{"role"}, nil)
	gwDialFailuresDesc = prometheus.NewDesc("kiss_onion_gateway_dial_failures_total",
		"Connections to the onion through Tor that failed, by reason: timeout (none within the dial timeout), refused (Tor refused the stream), no_tor (Tor not running), other.",
		[]string{"role", "reason"}, nil)
)

// forwarderCollector is the prometheus.Collector of a Forwarder's metrics.
type forwarderCollector struct {
	f    *Forwarder
	role string
	p    *Prefetcher // nil: none
}

// RegisterMetrics registers the Forwarder's metrics with reg, labelled
// with role ("read" or "write"): the onion's reachability, the circuits,
// the requests and their bytes, the failed dials.
func (f *Forwarder) RegisterMetrics(reg prometheus.Registerer, role string) error {
	return reg.Register(&forwarderCollector{f: f, role: role})
}

// registerMetrics registers the Forwarder's metrics with cfg.Metrics, if
// any, labelled with the role cfg asks for (the TLS door decides the
// role by the certificate: the label says whether the gateway was started
// to write).
func (g *Gateway) registerMetrics(cfg Config) error {
	if cfg.Metrics == nil {
		return nil
	}
	role := "read"
	if cfg.Write {
		role = "write"
	}
	if err := cfg.Metrics.Register(&forwarderCollector{f: g.Forwarder, role: role, p: g.prefetch}); err != nil {
		return fmt.Errorf("start gateway: %w", err)
	}
	return nil
}

func (fc *forwarderCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{gwReachableDesc, gwStateDesc, gwSinceDesc, gwForwardingDesc, gwCircuitsDesc, gwCircuitsInUseDesc,
		gwRequestsDesc, gwInFlightDesc, gwSentDesc, gwReceivedDesc, gwDialFailuresDesc, gwCacheBytesDesc, gwCacheFilesDesc, gwCacheNarsDesc,
		gwFrontendReachableDesc, gwResumesDesc} {
		ch <- d
	}
}

func (fc *forwarderCollector) Collect(ch chan<- prometheus.Metric) {
	f, m, role := fc.f, fc.f.metrics, fc.role
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{role}, labels...)...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{role}, labels...)...)
	}
	h := f.Health()
	gauge(gwReachableDesc, b2f(h.Reachable))
	for _, s := range []State{StateProbing, StateReachable, StateUnreachable} {
		gauge(gwStateDesc, b2f(h.State == s), string(s))
	}
	gauge(gwSinceDesc, float64(h.Since.UnixNano())/float64(time.Second))
	gauge(gwForwardingDesc, b2f(h.Forwarding))
	if len(h.Frontends) == 0 {
		gauge(gwFrontendReachableDesc, b2f(h.Reachable), "0")
	}
	for i, fh := range h.Frontends {
		gauge(gwFrontendReachableDesc, b2f(fh.Reachable), strconv.Itoa(i))
	}
	counter(gwResumesDesc, m.resumes.Load())
	inUse := 0
	for _, c := range f.circuits {
		if c.inflight.Load() > 0 {
			inUse++
		}
	}
	gauge(gwCircuitsDesc, float64(len(f.circuits)))
	gauge(gwCircuitsInUseDesc, float64(inUse))
	gauge(gwInFlightDesc, float64(m.inflight.Load()))
	m.mu.Lock()
	for k, n := range m.requests {
		counter(gwRequestsDesc, n, k.method, k.status, k.source)
	}
	m.mu.Unlock()
	counter(gwSentDesc, m.sent.Load())
	counter(gwReceivedDesc, m.received.Load())
	for i, why := range dialReasons {
		counter(gwDialFailuresDesc, m.dials[i].Load(), why)
	}
	if fc.p != nil {
		bytes, files := fc.p.store.stats()
		gauge(gwCacheBytesDesc, float64(bytes))
		gauge(gwCacheFilesDesc, float64(files))
		counter(gwCacheNarsDesc, m.narHits.Load(), "hit")
		counter(gwCacheNarsDesc, m.narMisses.Load(), "miss")
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
