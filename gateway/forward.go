package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// HealthPath is where a Forwarder answers with its Health as JSON: 200
// while the onion is reachable, 503 while it is not.
const HealthPath = "/-/health"

// Defaults of ForwarderConfig.
const (
	DefaultCircuits = 4
	DefaultKeepWarm = time.Minute
)

// Timings of a Forwarder. Variables, so that a test can shorten them.
var (
	// probeEvery is how often an unreachable onion is tried again.
	probeEvery = 5 * time.Second
	// probeTimeout bounds one probe: tor may spend a minute or two looking
	// for a descriptor.
	probeTimeout = 150 * time.Second
)

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
	// Log receives state changes and errors; logrus's standard logger when nil.
	Log *logrus.Entry
}

// Health is what a Forwarder knows of its onion.
type Health struct {
	Target    string    `json:"target"`
	Reachable bool      `json:"reachable"`
	Since     time.Time `json:"since"` // when Reachable last changed, or the start
	LastOK    time.Time `json:"last_ok,omitzero"`
	LastError string    `json:"last_error,omitempty"`
	ErrorAt   time.Time `json:"last_error_at,omitzero"`
	Circuits  int       `json:"circuits"`
	InFlight  int       `json:"in_flight"`
}

// Forwarder is an http.Handler that forwards every request to one onion
// (or any URL) through tor's SOCKS port: bodies stream both ways, headers
// pass through (Range, ETag, Content-Encoding) and nothing is added but
// the Host. Requests are spread over a few isolated circuits that are kept
// warm. While the onion cannot be reached it answers 502 (421 to a write)
// with a plain-text reason. Its health is served at HealthPath.
type Forwarder struct {
	cfg      ForwarderConfig
	target   *url.URL
	log      *logrus.Entry
	circuits []*circuit
	next     atomic.Uint32 // round-robin start among equally loaded circuits
	proxy    *httputil.ReverseProxy

	mu     sync.Mutex
	health Health
	upc    chan struct{} // closed while reachable

	kick   chan struct{} // wakes the prober
	rewarm atomic.Bool   // the prober warms every circuit up on its next turn
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

// errNoTor is the dial error while the gateway's tor does not run.
var errNoTor = errors.New("tor is not running (starting or restarting)")

// circuit is one isolated path to the onion: its own transport (pool of
// keep-alive connections) and SOCKS credentials.
type circuit struct {
	n        int
	tr       *http.Transport
	inflight atomic.Int32
	used     atomic.Int64 // unix nanoseconds of the last request's start
}

// NewForwarder returns a Forwarder and starts its prober, which warms the
// circuits up at once. Close stops it.
func NewForwarder(cfg ForwarderConfig) (*Forwarder, error) {
	target, err := url.Parse(cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("forward to %q: %w", cfg.Target, err)
	}
	if target.Scheme != "http" || target.Host == "" || target.RawQuery != "" || target.Fragment != "" {
		return nil, fmt.Errorf("forward to %q: want http://HOST[/PREFIX]", cfg.Target)
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
	if f.log == nil {
		f.log = logrus.NewEntry(logrus.StandardLogger())
	}
	f.log = f.log.WithField("onion", target.Host)
	f.health = Health{Target: target.String(), Since: time.Now(), Circuits: cfg.Circuits, LastError: "not tried yet"}
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
	c := &circuit{n: n}
	// Credentials only tell tor which streams may share a circuit.
	user := fmt.Sprintf("kiss-onion-circuit-%d", n)
	c.tr = &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if f.cfg.SocksAddr == nil {
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			}
			socks := f.cfg.SocksAddr()
			if socks == "" {
				return nil, errNoTor
			}
			return dialSocks(ctx, socks, addr, user, "x")
		},
		// Never ask for a transport encoding, never undo one: NARs and
		// narinfos pass as the onion sends them.
		DisableCompression:  true,
		MaxIdleConns:        32,
		MaxIdleConnsPerHost: 32,
		// Under serve's 2 minutes: a connection is dropped here before the
		// onion drops it, so an upload never starts on a closing one.
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: 5 * time.Minute,
	}
	return c
}

// Close stops the prober and closes the idle connections.
func (f *Forwarder) Close() {
	f.cancel()
	<-f.done
	for _, c := range f.circuits {
		c.tr.CloseIdleConnections()
	}
}

// Health returns what the Forwarder knows of its onion now.
func (f *Forwarder) Health() Health {
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
	f.proxy.ServeHTTP(w, r)
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

// ErrorHeader is set, to "unreachable", on every answer the gateway makes
// itself because the onion could not take a request, so that a client can
// tell the gateway's refusal from the cache's.
const ErrorHeader = "Kiss-Onion-Gateway-Error"

// errorPrefix starts the body of those answers, for people.
const errorPrefix = "kiss-onion gateway: "

// fail answers a request the onion could not take, with the reason: 502
// for a read; 421 (Misdirected Request) for a write, because Nix 2.8
// retries a PUT that got a 5xx with an empty body and then stalls for
// minutes, while a 4xx fails the upload at once, showing the reason.
func (f *Forwarder) fail(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		// The client went away; that says nothing about the onion.
		return
	}
	f.down(err)
	h := f.Health()
	msg := fmt.Sprintf("%s%s is unreachable: %v", errorPrefix, f.target, err)
	if !h.Reachable && !h.Since.IsZero() {
		msg += fmt.Sprintf(" (unreachable since %s)", h.Since.UTC().Format(time.RFC3339))
	}
	status := http.StatusBadGateway
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		status = http.StatusMisdirectedRequest
	}
	f.log.WithFields(logrus.Fields{"method": r.Method, "path": r.URL.Path, "status": status}).WithError(err).Debug("onion unreachable: answered by the gateway")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set(ErrorHeader, "unreachable")
	w.WriteHeader(status)
	io.WriteString(w, msg+"\n")
}

// up records that the onion answered.
func (f *Forwarder) up() {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.health.LastOK = now
	if f.health.Reachable {
		return
	}
	was := f.health.Since
	f.health.Reachable, f.health.Since = true, now
	close(f.upc)
	f.rewarm.Store(true)
	f.log.WithFields(logrus.Fields{"target": f.target.String(), "after": now.Sub(was).Round(time.Millisecond)}).Info("onion reachable")
	select {
	case f.kick <- struct{}{}: // warm the other circuits up
	default:
	}
}

// down records that the onion could not be reached.
func (f *Forwarder) down(err error) {
	now := time.Now()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.health.LastError, f.health.ErrorAt = err.Error(), now
	if !f.health.Reachable {
		return
	}
	f.health.Reachable, f.health.Since = false, now
	f.upc = make(chan struct{})
	f.log.WithField("target", f.target.String()).WithError(err).Warn("onion unreachable")
	select {
	case f.kick <- struct{}{}:
	default:
	}
}

// roundTripper spreads requests over the circuits: each goes to the one
// with the fewest requests in flight.
type roundTripper struct{ f *Forwarder }

func (rt roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	f := rt.f
	c := f.pick(nil)
	resp, err := c.roundTrip(req)
	if err != nil && retryable(req, err) && req.Context().Err() == nil {
		// A circuit that failed to build says little of the others.
		f.log.WithField("circuit", c.n).WithError(err).Debug("retry on another circuit")
		resp, err = f.pick(c).roundTrip(req)
	}
	return resp, err
}

// pick returns the least busy circuit other than not.
func (f *Forwarder) pick(not *circuit) *circuit {
	start := int(f.next.Add(1))
	var best *circuit
	for i := range f.circuits {
		c := f.circuits[(start+i)%len(f.circuits)]
		if c == not && len(f.circuits) > 1 {
			continue
		}
		if best == nil || c.inflight.Load() < best.inflight.Load() {
			best = c
		}
	}
	return best
}

func (c *circuit) roundTrip(req *http.Request) (*http.Response, error) {
	c.inflight.Add(1)
	c.used.Store(time.Now().UnixNano())
	resp, err := c.tr.RoundTrip(req)
	if err != nil {
		c.inflight.Add(-1)
		return nil, err
	}
	resp.Body = &doneBody{ReadCloser: resp.Body, done: func() { c.inflight.Add(-1) }}
	return resp, nil
}

// doneBody calls done once, when the body is closed.
type doneBody struct {
	io.ReadCloser
	once sync.Once
	done func()
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
	return !errors.Is(err, errNoTor)
}

// run keeps the circuits warm while the onion is reachable, and probes it
// every few seconds while it is not.
func (f *Forwarder) run() {
	defer close(f.done)
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
		f.probe(f.circuits[turn%len(f.circuits)])
	}
}

// warm probes, in parallel, every circuit (all) or those idle for longer
// than KeepWarm.
func (f *Forwarder) warm(all bool) {
	var wg sync.WaitGroup
	idle := time.Now().Add(-f.cfg.KeepWarm).UnixNano()
	for _, c := range f.circuits {
		if !all && c.used.Load() > idle {
			continue
		}
		wg.Go(func() { f.probe(c) })
	}
	wg.Wait()
}

// probe sends HEAD /nix-cache-info over c and records the outcome.
func (f *Forwarder) probe(c *circuit) {
	ctx, cancel := context.WithTimeout(f.ctx, probeTimeout)
	defer cancel()
	u := *f.target
	u.Path += "/nix-cache-info"
	req, _ := http.NewRequestWithContext(ctx, http.MethodHead, u.String(), nil)
	began := time.Now()
	resp, err := c.roundTrip(req)
	if err != nil {
		if f.ctx.Err() == nil {
			f.down(err)
		}
		return
	}
	resp.Body.Close()
	f.up()
	f.log.WithFields(logrus.Fields{"circuit": c.n, "status": resp.StatusCode, "elapsed": time.Since(began).Round(time.Millisecond)}).Debug("probe")
}
