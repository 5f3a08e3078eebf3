package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/serve"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

// serveMetrics are what `serve --metrics-listen` exports besides the
// cache's own (serve.Cache.RegisterMetrics): the scheduled prunes, the
// onions, tor's restarts and the clients. A registry of its own, not
// Prometheus' global one. Labels come from fixed sets (result, onion,
// role, door, state): no metric carries a key, a secret or a store path.
type serveMetrics struct {
	reg *prometheus.Registry

	pruneRuns            *prometheus.CounterVec
	pruneDuration        prometheus.Histogram
	pruneWaited          prometheus.Counter
	pruneKept            prometheus.Gauge
	pruneDeletedFiles    prometheus.Counter
	pruneDeletedNarInfos prometheus.Counter
	pruneFreed           prometheus.Counter
	pruneRunning         prometheus.Gauge
	pruneLastSuccess     prometheus.Gauge

	mu      sync.Mutex
	onions  map[string]onionState // by onion: read, write
	tor     *onion.Tor
	tlsCert *tlsca.ServedCert // the TLS door's, nil without one
}

// onionState is what access last did with an onion.
type onionState struct {
	up    bool
	since time.Time
}

func newServeMetrics(registries []string) *serveMetrics {
	m := &serveMetrics{
		reg: newProcessRegistry(),
		pruneRuns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "kiss_onion_prune_runs_total",
			Help: "Scheduled prunes (serve --prune-interval) run, by result: ok or failed.",
		}, []string{"result"}),
		pruneDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "kiss_onion_prune_duration_seconds",
			Help: "How long scheduled prunes took, waiting for upload locks included.",
			// 10 ms to about 11 minutes.
			Buckets: prometheus.ExponentialBuckets(0.01, 4, 9),
		}),
		pruneWaited: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiss_onion_prune_lock_wait_seconds_total",
			Help: "Time scheduled prunes spent waiting for upload locks to be released.",
		}),
		pruneKept: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kiss_onion_prune_kept_narinfos",
			Help: "Narinfos the last successful scheduled prune kept.",
		}),
		pruneDeletedFiles: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiss_onion_prune_deleted_files_total",
			Help: "Files scheduled prunes deleted, narinfos included.",
		}),
		pruneDeletedNarInfos: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiss_onion_prune_deleted_narinfos_total",
			Help: "Narinfos (store paths) scheduled prunes deleted.",
		}),
		pruneFreed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kiss_onion_prune_freed_bytes_total",
			Help: "Bytes of the files scheduled prunes deleted.",
		}),
		pruneRunning: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kiss_onion_prune_running",
			Help: "1 while a scheduled prune runs.",
		}),
		pruneLastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kiss_onion_prune_last_success_timestamp_seconds",
			Help: "When the last successful scheduled prune ended (Unix time).",
		}),
		onions: map[string]onionState{},
	}
	m.reg.MustRegister(m.pruneRuns, m.pruneDuration, m.pruneWaited, m.pruneKept, m.pruneDeletedFiles,
		m.pruneDeletedNarInfos, m.pruneFreed, m.pruneRunning, m.pruneLastSuccess,
		&onionCollector{m}, &clientsCollector{registries}, &tlsCertCollector{m})
	// Both results from the start, so that a rate of failures is 0, not absent.
	m.pruneRuns.WithLabelValues("ok")
	m.pruneRuns.WithLabelValues("failed")
	return m
}

// prune records a scheduled prune that ran (or failed) with st.
func (m *serveMetrics) prune(st prune.Stats, err error) {
	result := "ok"
	if err != nil {
		result = "failed"
	}
	m.pruneRuns.WithLabelValues(result).Inc()
	m.pruneDuration.Observe(st.Elapsed.Seconds())
	m.pruneWaited.Add(st.Waited.Seconds())
	m.pruneDeletedFiles.Add(float64(st.Deleted))
	m.pruneDeletedNarInfos.Add(float64(st.DeletedNarInfos))
	m.pruneFreed.Add(float64(st.BytesFreed))
	if err == nil {
		m.pruneKept.Set(float64(st.Kept))
		m.pruneLastSuccess.SetToCurrentTime()
	}
}

// published is access.Config.Published: what was done with an onion.
func (m *serveMetrics) published(name string, up bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := m.onions[name]
	if up && !st.up {
		st.since = time.Now()
	}
	st.up = up
	m.onions[name] = st
}

// watchTor counts t's restarts, and dates the onions from the last one.
func (m *serveMetrics) watchTor(t *onion.Tor) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tor = t
}

// servesTLS dates the TLS door's server certificate from cert.
func (m *serveMetrics) servesTLS(cert *tlsca.ServedCert) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tlsCert = cert
}

// tlsCertCollector exports the end of the TLS door's server certificate.
type tlsCertCollector struct{ m *serveMetrics }

var tlsCertEndDesc = prometheus.NewDesc("kiss_onion_tls_certificate_expiry_timestamp_seconds",
	"When (Unix time) the server certificate the TLS door serves ends; a renewal moves it. Absent without --listen-tls.", nil, nil)

func (c *tlsCertCollector) Describe(ch chan<- *prometheus.Desc) { ch <- tlsCertEndDesc }

func (c *tlsCertCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	cert := c.m.tlsCert
	c.m.mu.Unlock()
	if cert != nil {
		end := cert.Current().Leaf.NotAfter
		ch <- prometheus.MustNewConstMetric(tlsCertEndDesc, prometheus.GaugeValue, float64(end.Unix()))
	}
}

// onionCollector exports the onions' state and tor's restarts.
type onionCollector struct{ m *serveMetrics }

var (
	onionUpDesc = prometheus.NewDesc("kiss_onion_onion_published",
		"1 while the onion (read or write) is published, 0 while it is not (no client keys).", []string{"onion"}, nil)
	onionSinceDesc = prometheus.NewDesc("kiss_onion_onion_published_since_timestamp_seconds",
		"Since when (Unix time) the onion has been published: its last publication after being down, or tor's last restart, which republishes it.", []string{"onion"}, nil)
	torRestartsDesc = prometheus.NewDesc("kiss_onion_tor_restarts_total",
		"Times tor was restarted after it exited or stopped answering.", nil, nil)
)

func (c *onionCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- onionUpDesc
	ch <- onionSinceDesc
	ch <- torRestartsDesc
}

func (c *onionCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	defer c.m.mu.Unlock()
	var restored time.Time
	if c.m.tor != nil {
		n, at := c.m.tor.Restarts()
		restored = at
		ch <- prometheus.MustNewConstMetric(torRestartsDesc, prometheus.CounterValue, float64(n))
	}
	for name, st := range c.m.onions {
		up := 0.0
		if st.up {
			up = 1
			since := st.since
			if restored.After(since) {
				since = restored
			}
			ch <- prometheus.MustNewConstMetric(onionSinceDesc, prometheus.GaugeValue, float64(since.UnixNano())/1e9, name)
		}
		ch <- prometheus.MustNewConstMetric(onionUpDesc, prometheus.GaugeValue, up, name)
	}
}

// clientsCollector counts the clients of the registries, read on every
// scrape (a small file, or two).
type clientsCollector struct{ registries []string }

var clientsDesc = prometheus.NewDesc("kiss_onion_clients",
	"Clients in the registries, by role (reader, writer), door (how they come in: onion) and state (active, revoked); a key revoked in any registry counts as revoked.",
	[]string{"role", "door", "state"}, nil)

func (c *clientsCollector) Describe(ch chan<- *prometheus.Desc) { ch <- clientsDesc }

func (c *clientsCollector) Collect(ch chan<- prometheus.Metric) {
	type key struct {
		role clientauth.Role
		pub  [32]byte
	}
	active, revoked := map[key]bool{}, map[[32]byte]bool{}
	for _, path := range c.registries {
		reg, err := clientauth.LoadRegistry(path)
		if err != nil {
			ch <- prometheus.NewInvalidMetric(clientsDesc, err)
			return
		}
		for _, cl := range reg.Clients() {
			if cl.IsRevoked() {
				revoked[cl.PublicKey.Bytes()] = true
			}
			active[key{cl.Role, cl.PublicKey.Bytes()}] = true
		}
	}
	counts := map[[2]string]int{}
	for _, role := range []clientauth.Role{clientauth.RoleReader, clientauth.RoleWriter} {
		counts[[2]string{string(role), "active"}] = 0
		counts[[2]string{string(role), "revoked"}] = 0
	}
	for k := range active {
		state := "active"
		if revoked[k.pub] {
			state = "revoked"
		}
		counts[[2]string{string(k.role), state}]++
	}
	for rs, n := range counts {
		ch <- prometheus.MustNewConstMetric(clientsDesc, prometheus.GaugeValue, float64(n), rs[0], "onion", rs[1])
	}
}

// serveMetricsOn serves m and cache's metrics at http://addr/metrics
// until ctx ends; errors go to errc.
func serveMetricsOn(ctx context.Context, addr string, m *serveMetrics, cache *serve.Cache, log *logrus.Entry, errc chan<- error) error {
	if err := cache.RegisterMetrics(m.reg); err != nil {
		return err
	}
	return serveRegistry(ctx, addr, m.reg, log, errc)
}

// newProcessRegistry returns a registry with the Go runtime's and the
// process's metrics.
func newProcessRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// serveRegistry serves reg at http://addr/metrics until ctx ends; errors
// go to errc.
func serveRegistry(ctx context.Context, addr string, reg *prometheus.Registry, log *logrus.Entry, errc chan<- error) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}
	log.WithField("url", "http://"+ln.Addr().String()+"/metrics").Info("serving metrics")
	go func() {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	return nil
}
