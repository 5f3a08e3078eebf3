package gateway

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// HealthPath is where a Forwarder answers with its Health as JSON: 200
// while the onion is reachable, 503 while it is not (or not yet).
const HealthPath = "/-/health"

// State is what a Forwarder makes of its onion.
type State string

// The States of a Forwarder.
const (
	// StateProbing: no verdict yet (since the start), or the onion was
	// reachable and a request then waited DialTimeout for tor in vain; the
	// prober is trying it with its own, longer timeout.
	StateProbing State = "probing"
	// StateReachable: the onion answered last.
	StateReachable State = "reachable"
	// StateUnreachable: tor refused the onion, or a connection to it
	// broke, or the prober gave up, and nothing answered since.
	StateUnreachable State = "unreachable"
)

// Defaults of ForwarderConfig.
const (
	DefaultCircuits = 6 // measured against 4 and 8: docs/benchmarks.md
	DefaultKeepWarm = time.Minute
)

// Timings of a Forwarder. Variables, so that a test can shorten them.
var (
	// probeEvery is how often an unreachable onion is tried again.
	probeEvery = 5 * time.Second
	// probeTimeout bounds one probe: tor may spend a minute or two looking
	// for a descriptor, and a slow onion is not a dead one.
	probeTimeout = 150 * time.Second
	// DialTimeout bounds how long a request may wait for tor to connect it
	// to the onion (circuits are kept warm: a dial to a reachable onion
	// takes well under a second). A request that waits longer is answered
	// by the gateway, and the next ones too until the prober succeeds.
	DialTimeout = 20 * time.Second
	// staleAfter bounds the wait for the response headers of a read once
	// it is sent: the cache answers reads at once, and a connection that
	// stays silent is taken for dead (its circuit gone, the cache
	// restarted), and the read is tried once more on a new connection.
	staleAfter = 5 * time.Second
	// responseTimeout bounds the wait for the onion's response headers once
	// any request is sent: a PUT is answered once its body is stored.
	responseTimeout = time.Minute
)

// maxCacheInfo bounds the nix-cache-info a Forwarder remembers.
const maxCacheInfo = 16 << 10

// ForwarderConfig configures a Forwarder.
type ForwarderConfig struct {
	// Target is the URL requests are forwarded to: "http://<address>.onion",
	// or any http:// URL (then SocksAddr may be nil, for a direct connection).
	Target string
	// SocksAddr returns the address of tor's SOCKS5 port at the time of a
	// dial ("" while tor does not run); it may change when tor restarts.
	// nil dials Target directly.
	SocksAddr func() string
	// Circuits is how many isolated circuits requests are spread over
	// (DefaultCircuits when 0). Each has its own HTTP connections and SOCKS
	// credentials, so tor (IsolateSOCKSAuth) builds each its own circuit.
	Circuits int
	// KeepWarm is how long a circuit may stay idle before the Forwarder
	// sends it a small request to keep its connection and circuit open
	// (DefaultKeepWarm when 0; negative never).
	KeepWarm time.Duration
	// TLS, when set, lets Target be an https:// URL, reached directly
	// (SocksAddr nil) with this client configuration: the TLS door.
	TLS *tls.Config
	// CacheInfoFile is where the cache's nix-cache-info is remembered,
	// so that it is answered while the onion is unreachable, across
	// restarts too; "" remembers it in memory only.
	CacheInfoFile string
	// Frontends are the URLs of the cache's further front ends, besides
	// Target: other serves over the same store, each with its own onions.
	// Requests are spread over them all (see frontends.go).
	Frontends []string
	// Log receives state changes and errors; logrus's standard logger when nil.
	Log *logrus.Entry

	// For a front end's Forwarder: the metrics it shares with the others,
	// and its index among them.
	metrics *forwarderMetrics
	front   int
}

// Health is what a Forwarder knows of its onion.
type Health struct {
	Target    string    `json:"target"`
	State     State     `json:"state"`
	Reachable bool      `json:"reachable"` // State == StateReachable
	Since     time.Time `json:"since"`     // when State last changed, or the start
	// Forwarding is false while the gateway answers requests itself,
	// without sending them into tor: from the first failure until the
	// onion answers again.
	Forwarding bool      `json:"forwarding"`
	LastOK     time.Time `json:"last_ok,omitzero"`
	LastError  string    `json:"last_error,omitempty"`
	ErrorAt    time.Time `json:"last_error_at,omitzero"`
	// CacheInfo is whether the gateway remembers the cache's
	// nix-cache-info, to answer it while the onion is away.
	CacheInfo bool `json:"remembers_cache_info"`
	Circuits  int  `json:"circuits"`
	InFlight  int  `json:"in_flight"`
	// Frontends is each front end's own Health, when there are several;
	// the fields above then sum them up.
	Frontends []Health `json:"frontends,omitempty"`
}

// Forwarder is an http.Handler that forwards every request to one onion
// (or any URL) through tor's SOCKS port: bodies stream both ways, headers
// pass through (Range, ETag, Content-Encoding) and nothing is added but
// the Host. Requests are spread over a few isolated circuits that are kept
// warm. When a request cannot reach the onion, and from then on until the
// prober reaches it again, the Forwarder answers from what it knows (see
// the package documentation). Its health is served at HealthPath.
type Forwarder struct {
	cfg      ForwarderConfig
	target   *url.URL
	log      *logrus.Entry
	circuits []*circuit
	next     atomic.Uint32 // round-robin start among equally loaded circuits
	// picked counts the requests given to this front end (frontends.go):
	// of equally busy front ends, the one given the fewest goes first.
	picked atomic.Uint64
	// claimMu makes picking a circuit and counting the request on it one
	// step: requests started together would otherwise all see the same
	// least busy circuit.
	claimMu sync.Mutex
	proxy   *httputil.ReverseProxy

	mu        sync.Mutex
	health    Health
	upc       chan struct{} // closed while reachable
	awaySince time.Time     // when the onion last stopped being reachable, or the start
	cacheInfo []byte        // the cache's nix-cache-info, once seen

	metrics *forwarderMetrics
	fronts  []*Forwarder // one per front end, when there are several

	downAt  atomic.Int64 // unix nanoseconds of when forwarding last stopped
	probes  sync.WaitGroup
	probing atomic.Int32  // probes in flight
	kick    chan struct{} // wakes the prober
	rewarm  atomic.Bool   // the prober warms every circuit up on its next turn
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}
}

// errNoTor is the dial error while the gateway's tor does not run.
var errNoTor = errors.New("tor is not running (starting or restarting)")

// circuit is one isolated path to the onion: its own transport (pool of
// keep-alive connections) and SOCKS credentials.
type circuit struct {
	f        *Forwarder
	n        int
	tr       *http.Transport
	inflight atomic.Int32
	used     atomic.Int64 // unix nanoseconds of the last request's start
	lastOK   atomic.Int64 // unix nanoseconds of the onion's last answer on it
	probing  atomic.Int32 // probes in flight on it
}

// NewForwarder returns a Forwarder and starts its prober, which warms the
// circuits up at once. Close stops it.
func NewForwarder(cfg ForwarderConfig) (*Forwarder, error) {
	if len(cfg.Frontends) > 0 {
		return newFrontends(cfg)
	}
	target, err := url.Parse(cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("forward to %q: %w", cfg.Target, err)
	}
	scheme := "http"
	if cfg.TLS != nil {
		scheme = "https"
	}
	if target.Scheme != scheme || target.Host == "" || target.RawQuery != "" || target.Fragment != "" {
		return nil, fmt.Errorf("forward to %q: want %s://HOST[/PREFIX]", cfg.Target, scheme)
	}
	target.Path = strings.TrimSuffix(target.Path, "/")
	if cfg.Circuits <= 0 {
		cfg.Circuits = DefaultCircuits
	}
	if cfg.KeepWarm == 0 {
		cfg.KeepWarm = DefaultKeepWarm
	}
	f := &Forwarder{
		cfg:    cfg,
		target: target,
		log:    cfg.Log,
		upc:    make(chan struct{}),
		kick:   make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	f.metrics = cfg.metrics
	if f.metrics == nil {
		f.metrics = newForwarderMetrics()
	}
	if f.log == nil {
		f.log = logrus.NewEntry(logrus.StandardLogger())
	}
	f.log = f.log.WithField("onion", target.Host)
	now := time.Now()
	f.health = Health{Target: target.String(), State: StateProbing, Since: now, Forwarding: true, Circuits: cfg.Circuits, LastError: "not tried yet"}
	f.awaySince = now
	if cfg.CacheInfoFile != "" {
		if b, err := os.ReadFile(cfg.CacheInfoFile); err == nil && validCacheInfo(b) {
			f.cacheInfo, f.health.CacheInfo = b, true
		} else if err != nil && !errors.Is(err, os.ErrNotExist) {
			f.log.WithError(err).Warn("read the remembered nix-cache-info")
		}
	}
	for i := range cfg.Circuits {
		f.circuits = append(f.circuits, f.newCircuit(i))
	}
	f.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			// Go's server already answered any "100-continue"; asking the
			// onion too would cost a round trip.
			pr.Out.Header.Del("Expect")
		},
		Transport:      roundTripper{f},
		ErrorHandler:   f.fail,
		ModifyResponse: f.received,
		ErrorLog:       log.New(f.log.WriterLevel(logrus.DebugLevel), "", 0),
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	go f.run()
	return f, nil
}

func (f *Forwarder) newCircuit(n int) *circuit {
	c := &circuit{f: f, n: n}
	// Credentials only tell tor which streams may share a circuit.
	user := fmt.Sprintf("kiss-onion-circuit-%d", n)
	c.tr = &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return f.dial(ctx, network, addr, user)
		},
		// Never ask for a transport encoding, never undo one: NARs and
		// narinfos pass as the onion sends them.
		DisableCompression:  true,
		MaxIdleConns:        32,
		MaxIdleConnsPerHost: 32,
		// Under serve's 2 minutes: a connection is dropped here before the
		// onion drops it, so an upload never starts on a closing one.
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: responseTimeout,
		TLSClientConfig:       f.cfg.TLS,
	}
	return c
}

// arrivalKey is the context key of a request's arrival time: it must be
// connected to the onion within DialTimeout of it. Probes have none.
type arrivalKey struct{}

// arrival returns when the request with ctx arrived.
func arrival(ctx context.Context) (time.Time, bool) {
	t, ok := ctx.Value(arrivalKey{}).(time.Time)
	return t, ok
}

// errSlow is the dial error of a request that reached its dial deadline;
// errStale that of a read whose connection stayed silent.
var (
	errSlow  = errors.New("no connection to the onion in time")
	errStale = errors.New("no answer on the connection to the onion in time")
)

// dial connects to addr through tor, as user, waiting for tor while it
// starts; a request's dial ends at its dial deadline with errSlow.
func (f *Forwarder) dial(ctx context.Context, network, addr, user string) (net.Conn, error) {
	arrived, bounded := arrival(ctx)
	dctx := ctx
	if bounded {
		var cancel context.CancelFunc
		dctx, cancel = context.WithDeadline(ctx, arrived.Add(DialTimeout))
		defer cancel()
	}
	conn, err := f.dialTor(dctx, network, addr, user)
	// The SOCKS handshake may time out on its own deadline a moment
	// before dctx says so: the clock decides.
	if err != nil && bounded && ctx.Err() == nil && !time.Now().Before(arrived.Add(DialTimeout)) {
		err = fmt.Errorf("%w (%v: the onion or the Tor network is out of reach, or slow): %v", errSlow, DialTimeout, err)
	}
	if err != nil && !errors.Is(ctx.Err(), context.Canceled) { // not a client gone
		f.metrics.dialFailed(err)
	}
	return conn, err
}

func (f *Forwarder) dialTor(ctx context.Context, network, addr, user string) (net.Conn, error) {
	if f.cfg.SocksAddr == nil {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	for {
		if socks := f.cfg.SocksAddr(); socks != "" {
			return dialSocks(ctx, socks, addr, user, "x")
		}
		select {
		case <-ctx.Done():
			return nil, errNoTor
		case <-f.ctx.Done():
			return nil, errNoTor
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close stops the prober and closes the idle connections.
func (f *Forwarder) Close() {
	for _, c := range f.fronts {
		c.Close()
	}
	f.cancel()
	<-f.done
	for _, c := range f.circuits {
		c.tr.CloseIdleConnections()
	}
}

// Health returns what the Forwarder knows of its onion now.
func (f *Forwarder) Health() Health {
	if f.fronts != nil {
		return f.frontsHealth()
	}
	f.mu.Lock()
	h := f.health
	f.mu.Unlock()
	for _, c := range f.circuits {
		h.InFlight += int(c.inflight.Load())
	}
	return h
}

// WaitReachable returns once the onion has answered, or ctx's error
// wrapped with the last reason it could not be reached.
func (f *Forwarder) WaitReachable(ctx context.Context) error {
	if f.fronts != nil {
		return f.waitAny(ctx)
	}
	for {
		f.mu.Lock()
		upc, h := f.upc, f.health
		f.mu.Unlock()
		select {
		case <-upc:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("%s not reachable: %s (%w)", f.target, h.LastError, ctx.Err())
		case <-f.ctx.Done():
			return errors.New("gateway closed")
		case <-time.After(time.Second):
		}
	}
}

// ServeHTTP forwards r to the onion, or answers HealthPath.
func (f *Forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == HealthPath {
		f.serveHealth(w, r)
		return
	}
	w, r, counted := f.metrics.begin(w, r)
	defer counted()
	if forwarding, reason := f.forwarding(); !forwarding {
		f.answer(w, r, errors.New(reason))
		return
	}
	ctx := context.WithValue(r.Context(), arrivalKey{}, time.Now())
	f.proxy.ServeHTTP(w, r.WithContext(ctx))
}

// errAway is RoundTrip's error while the gateway answers requests itself.
var errAway = errors.New("the onion is unreachable")

// RoundTrip sends req, whose URL is a path on the onion (its scheme and
// host are set here), over the circuits, for a client inside the gateway
// (the Prefetcher). It fails at once, with an error wrapping errAway,
// while the Forwarder answers requests itself; and a failure to reach the
// onion counts as a forwarded request's would.
func (f *Forwarder) RoundTrip(req *http.Request) (*http.Response, error) {
	forwarding, reason := f.forwarding()
	if !forwarding {
		return nil, fmt.Errorf("%w: %s", errAway, reason)
	}
	if f.fronts != nil {
		return f.sendAny(req)
	}
	return f.send(req)
}

func (f *Forwarder) serveHealth(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	h := f.Health()
	body, _ := json.MarshalIndent(h, "", "  ")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	status := http.StatusOK
	if !h.Reachable {
		status = http.StatusServiceUnavailable
	}
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// received notes that the onion answered.
func (f *Forwarder) received(resp *http.Response) error {
	f.up()
	return nil
}

// ErrorHeader is set on every answer the gateway makes itself because the
// onion could not take a request (a remembered nix-cache-info too), to
// "unreachable", or because a NAR's download failed (prefetch.go), to
// "download": so that a client can tell the gateway's answer from the
// cache's.
const ErrorHeader = "Kiss-Onion-Gateway-Error"

// errorPrefix starts the body of those answers, for people.
const errorPrefix = "kiss-onion gateway: "

// fail answers a request the onion could not take, and notes why.
func (f *Forwarder) fail(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		// The client went away; that says nothing about the onion.
		return
	}
	began, _ := arrival(r.Context())
	f.down(err, began)
	f.answer(w, r, err)
}

// answer answers r from what the gateway knows, because the onion cannot
// take it (err says why). Nix carries on with what it gets:
//
//   - a write: 421 (Misdirected Request), because Nix 2.8 retries a PUT
//     that got a 5xx with an empty body and then stalls for minutes, while
//     a 4xx fails the upload at once, showing the reason;
//   - nix-cache-info: the copy remembered from the cache, or 502 when
//     there is none (Nix then retries a few seconds and skips the cache);
//   - any other file of the binary-cache protocol (narinfo, NAR, listing,
//     log, realisation): 404, "not there", so that Nix builds the path or
//     takes it from another substituter, with or without --fallback;
//   - anything else (markers, locks): 502, which no kiss-onion command
//     mistakes for a missing marker.
//
// Every such answer has ErrorHeader and Cache-Control: no-store.
func (f *Forwarder) answer(w http.ResponseWriter, r *http.Request, err error) {
	h, info := f.Health(), f.knownCacheInfo()
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(ErrorHeader, "unreachable")
	read := r.Method == http.MethodGet || r.Method == http.MethodHead
	if read && r.URL.Path == "/nix-cache-info" && info != nil {
		w.Header().Set("Content-Type", "text/x-nix-cache-info")
		w.Header().Set("Content-Length", fmt.Sprint(len(info)))
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodGet {
			w.Write(info)
		}
		return
	}
	status := http.StatusBadGateway
	switch {
	case !read:
		status = http.StatusMisdirectedRequest
	case nixFile(r.URL.Path):
		status = http.StatusNotFound
	}
	msg := fmt.Sprintf("%s%s is unreachable: %v", errorPrefix, f.describe(), err)
	if h.State != StateReachable {
		msg += fmt.Sprintf(" (%s since %s)", h.State, h.Since.UTC().Format(time.RFC3339))
	}
	f.log.WithFields(logrus.Fields{"method": r.Method, "path": r.URL.Path, "status": status}).WithError(err).Debug("onion unreachable: answered by the gateway")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	io.WriteString(w, msg+"\n")
}

// nixFile reports whether path is one of the files a Nix client reads
// from a binary cache, other than nix-cache-info.
func nixFile(path string) bool {
	p := strings.TrimPrefix(path, "/")
	if strings.Contains(p, "/") {
		dir, _, _ := strings.Cut(p, "/")
		switch dir {
		case "nar", "log", "realisations", "build-trace-v2", "debuginfo":
			return true
		}
		return false
	}
	return strings.HasSuffix(p, ".narinfo") || strings.HasSuffix(p, ".ls")
}

// validCacheInfo reports whether b looks like a nix-cache-info worth
// remembering.
func validCacheInfo(b []byte) bool {
	if len(b) == 0 || len(b) > maxCacheInfo {
		return false
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "StoreDir: /") {
			return true
		}
	}
	return false
}

// rememberCacheInfo keeps b, the cache's nix-cache-info, when it changed.
func (f *Forwarder) rememberCacheInfo(b []byte) {
	if !validCacheInfo(b) {
		return
	}
	f.mu.Lock()
	same := string(f.cacheInfo) == string(b)
	f.mu.Unlock()
	if same {
		return
	}
	if f.cfg.CacheInfoFile != "" {
		if err := atomicfile.WriteFile(f.cfg.CacheInfoFile, b, 0o600); err != nil {
			f.log.WithError(err).Warn("remember nix-cache-info")
		}
	}
	f.mu.Lock()
	f.cacheInfo, f.health.CacheInfo = b, true
	f.mu.Unlock()
}

// up records that the onion answered.
func (f *Forwarder) up() {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.health.LastOK = now
	f.health.Forwarding = true
	if f.health.Reachable {
		return
	}
	f.health.State, f.health.Reachable, f.health.Since = StateReachable, true, now
	close(f.upc)
	f.rewarm.Store(true)
	f.log.WithFields(logrus.Fields{"target": f.target.String(), "after": now.Sub(f.awaySince).Round(time.Millisecond)}).Info("onion reachable")
	select {
	case f.kick <- struct{}{}: // warm the other circuits up
	default:
	}
}

// down records that an attempt begun at began could not reach the onion:
// requests are answered by the gateway from now until it answers again.
// When the onion answered another request since began, the failure was
// the circuit's, not the onion's, and changes nothing. A request that
// merely waited too long (errSlow, errStale) leaves the verdict to the
// prober.
func (f *Forwarder) down(err error, began time.Time) {
	now := time.Now()
	f.mu.Lock()
	f.health.LastError, f.health.ErrorAt = err.Error(), now
	if f.health.LastOK.After(began) {
		f.mu.Unlock()
		f.log.WithError(err).Debug("a circuit failed while the onion answers on others")
		return
	}
	was, wasForwarding := f.health.State, f.health.Forwarding
	f.health.Forwarding = false
	next := StateUnreachable
	if (errors.Is(err, errSlow) || errors.Is(err, errStale)) && was != StateUnreachable {
		next = StateProbing
	}
	if next != was {
		if was == StateReachable {
			f.upc = make(chan struct{})
			f.awaySince = now
		}
		f.health.State, f.health.Reachable, f.health.Since = next, false, now
		log := f.log.WithField("target", f.target.String()).WithError(err)
		switch {
		case f.cfg.metrics != nil: // one front end of several
			log.WithField("state", string(next)).Warn("front end unreachable or slow: requests go to the other front ends while it probes")
		case next == StateProbing:
			log.Warn("onion slow to answer: the gateway answers requests itself while it probes")
		default:
			log.Warn("onion unreachable: the gateway answers requests itself while it probes")
		}
	}
	f.mu.Unlock()
	if wasForwarding {
		f.downAt.Store(now.UnixNano())
		// Their circuits are likely gone; a connection that survived is
		// dialled again in a moment.
		f.closeIdle()
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
}

// closeIdle closes every circuit's idle connections.
func (f *Forwarder) closeIdle() {
	for _, c := range f.circuits {
		c.tr.CloseIdleConnections()
	}
}

// roundTripper spreads requests over the circuits: each goes to a ready
// one (see pick) with the fewest requests in flight; the requests of a
// spread, to circuits the others of it did not take.
type roundTripper struct{ f *Forwarder }

func (rt roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	f := rt.f
	sp, _ := req.Context().Value(spreadKey{}).(*spread)
	c := sp.pick(f, nil)
	resp, err := f.attempt(c, req)
	if err != nil && retryable(req, err) && req.Context().Err() == nil {
		// A circuit that failed to build says little of the others.
		f.log.WithField("circuit", c.n).WithError(err).Debug("retry on another circuit")
		if errors.Is(err, errStale) {
			// The onion restarted or its circuits broke: the other kept
			// connections are likely dead too.
			f.closeIdle()
		}
		resp, err = f.attempt(sp.pick(f, c), req)
	}
	return resp, err
}

// spreadKey is the context key of a *spread.
type spreadKey struct{}

// spread sends the requests whose contexts carry it (the parts of one
// NAR, fetched at once) over different circuits, while there are
// circuits none of them took: requests started together would otherwise
// all see the same least busy circuit.
type spread struct {
	mu   sync.Mutex
	took map[*circuit]int
}

// withSpread returns ctx with a new spread.
func withSpread(ctx context.Context) context.Context {
	return context.WithValue(ctx, spreadKey{}, &spread{took: map[*circuit]int{}})
}

// pick picks a circuit of f for a request of sp, as f.pick does when sp
// is nil.
func (sp *spread) pick(f *Forwarder, not *circuit) *circuit {
	if sp == nil {
		return f.claim(not, nil)
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	c := f.claim(not, sp.took)
	sp.took[c]++
	return c
}

// claim picks a circuit as pickOf does and counts a request in flight on
// it, which its roundTrip ends.
func (f *Forwarder) claim(not *circuit, took map[*circuit]int) *circuit {
	f.claimMu.Lock()
	defer f.claimMu.Unlock()
	c := f.pickOf(not, took)
	c.inflight.Add(1)
	return c
}

// attempt sends req over c. A read's response headers must come within
// staleAfter of the connection's start, or the attempt ends with errStale.
func (f *Forwarder) attempt(c *circuit, req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		return c.roundTrip(req)
	}
	ctx, cancel := context.WithCancelCause(req.Context())
	var mu sync.Mutex
	var timer *time.Timer
	got := false
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) {
			mu.Lock()
			defer mu.Unlock()
			if !got {
				timer = time.AfterFunc(staleAfter, func() { cancel(errStale) })
			}
		},
	})
	resp, err := c.roundTrip(req.WithContext(ctx))
	mu.Lock()
	got = true
	if timer != nil {
		timer.Stop()
	}
	mu.Unlock()
	if err != nil {
		stale := context.Cause(ctx) == errStale && req.Context().Err() == nil
		cancel(nil)
		if stale {
			return nil, fmt.Errorf("%w (%v)", errStale, staleAfter)
		}
		return nil, err
	}
	// The attempt's context must outlive the body: cancelled once the body
	// is read, it could cost the connection its return to the pool. It
	// ends with the request's.
	context.AfterFunc(req.Context(), func() { cancel(nil) })
	return resp, nil
}

// pick returns the least busy circuit other than not, among the ready
// ones when there are: those that the onion answered on since the
// gateway last stopped forwarding. A circuit that tor is still building
// (the onion just came back, a rendezvous that hangs) is then left alone.
func (f *Forwarder) pick(not *circuit) *circuit { return f.pickOf(not, nil) }

// pickOf picks as pick does, among the ready circuits those took counts
// least of first.
func (f *Forwarder) pickOf(not *circuit, took map[*circuit]int) *circuit {
	start := int(f.next.Add(1))
	downAt := f.downAt.Load()
	var best *circuit
	bestReady := false
	for i := range f.circuits {
		c := f.circuits[(start+i)%len(f.circuits)]
		if c == not && len(f.circuits) > 1 {
			continue
		}
		ready := c.lastOK.Load() > downAt
		switch {
		case best == nil, ready && !bestReady:
		case ready == bestReady && took[c] < took[best]:
		case ready == bestReady && took[c] == took[best] && c.inflight.Load() < best.inflight.Load():
		default:
			continue
		}
		best, bestReady = c, ready
	}
	return best
}

// roundTrip sends req over c, on which claim counted it in flight: until
// the response's body is closed, or now when there is none.
func (c *circuit) roundTrip(req *http.Request) (*http.Response, error) {
	c.used.Store(time.Now().UnixNano())
	resp, err := c.tr.RoundTrip(req)
	if err != nil {
		c.inflight.Add(-1)
		return nil, err
	}
	c.lastOK.Store(time.Now().UnixNano())
	resp.Body = &doneBody{ReadCloser: resp.Body, received: &c.f.metrics.received, done: func() { c.inflight.Add(-1) }, broke: func(err error) {
		if req.Context().Err() == nil {
			// A connection that breaks in the middle of a body is news.
			c.f.down(err, time.Now())
		}
	}}
	return resp, nil
}

// doneBody calls done once, when the body is closed, and broke when
// reading it fails (the connection to the onion broke).
type doneBody struct {
	io.ReadCloser
	once  sync.Once
	done  func()
	broke func(error)

	received *atomic.Uint64 // counts the bytes read
}

func (b *doneBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.received.Add(uint64(n))
	if err != nil && err != io.EOF {
		b.broke(err)
	}
	return n, err
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

// retryable reports whether a request that failed with err may be sent
// again on another circuit: it has no body, and tor's refusal, if any, is
// not one that another circuit would get too.
func retryable(req *http.Request, err error) bool {
	if req.Body != nil && req.Body != http.NoBody {
		return false
	}
	var se *SocksError
	if errors.As(err, &se) {
		switch se.Code {
		case 0xF0, 0xF1, 0xF4, 0xF5, 0xF6:
			return false
		}
	}
	return !errors.Is(err, errNoTor) && !errors.Is(err, errSlow)
}

// run keeps the circuits warm while the onion is reachable, and probes it
// every few seconds while it is not, on each circuit in turn.
func (f *Forwarder) run() {
	defer close(f.done)
	defer f.probes.Wait()
	f.warm(true)
	var turn int
	for {
		wait := probeEvery
		reachable := f.Health().Reachable
		if reachable && f.cfg.KeepWarm > 0 {
			wait = f.cfg.KeepWarm / 4
		} else if reachable {
			wait = time.Hour
		}
		select {
		case <-f.ctx.Done():
			return
		case <-f.kick:
		case <-time.After(wait):
		}
		if f.Health().Reachable {
			// Just reachable: build every circuit now, not on demand.
			if all := f.rewarm.Swap(false); all || f.cfg.KeepWarm > 0 {
				f.warm(all)
			}
			continue
		}
		turn++
		f.goProbe(f.circuits[turn%len(f.circuits)])
	}
}

// warm probes every circuit (all) or those idle for longer than KeepWarm,
// but none that a probe is still trying.
func (f *Forwarder) warm(all bool) {
	idle := time.Now().Add(-f.cfg.KeepWarm).UnixNano()
	for _, c := range f.circuits {
		if (!all && c.used.Load() > idle) || c.probing.Load() > 0 {
			continue
		}
		f.goProbe(c)
	}
}

// maxProbes bounds the probes in flight.
const maxProbes = 32

// goProbe probes c in the background. While the onion is unreachable a
// new probe starts every probeEvery even though earlier ones still wait:
// tor may hold a stream for two minutes on the state it had when the
// stream arrived (a dead service's introduction points), and only a fresh
// one finds the cache that just came back.
func (f *Forwarder) goProbe(c *circuit) {
	if f.probing.Add(1) > maxProbes {
		f.probing.Add(-1)
		return
	}
	c.probing.Add(1)
	f.probes.Go(func() {
		defer f.probing.Add(-1)
		defer c.probing.Add(-1)
		f.probe(c)
	})
}

// probe sends GET /nix-cache-info over c, records the outcome and
// remembers the answer.
func (f *Forwarder) probe(c *circuit) {
	ctx, cancel := context.WithTimeout(f.ctx, probeTimeout)
	defer cancel()
	u := *f.target
	u.Path += "/nix-cache-info"
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	began := time.Now()
	c.inflight.Add(1) // as claim counts it: the probe's circuit is c
	resp, err := f.attempt(c, req)
	if err != nil {
		if f.ctx.Err() == nil {
			f.down(err, began)
		}
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxCacheInfo+1))
	resp.Body.Close()
	if err != nil {
		return // the body's reader noted it
	}
	f.up()
	if resp.StatusCode == http.StatusOK {
		f.rememberCacheInfo(body)
	}
	f.log.WithFields(logrus.Fields{"circuit": c.n, "status": resp.StatusCode, "elapsed": time.Since(began).Round(time.Millisecond)}).Debug("probe")
}
