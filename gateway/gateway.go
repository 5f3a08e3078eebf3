package gateway

import (
	"context"
	"encoding/base32"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
)

// Config configures Start.
type Config struct {
	// Bundle holds the client key and the onion addresses; its Key is
	// required.
	Bundle clientauth.Bundle
	// Write forwards to the write onion (a writer's bundle only) instead
	// of the read onion.
	Write bool
	// Door is the way to the cache: DoorOnion (when empty) through tor,
	// or DoorTLS, the bundle's TLS door, directly (see StartTLS).
	Door string
	// Listen is the loopback address to serve on; "127.0.0.1:0" (a free
	// port) when empty.
	Listen string
	// TorBinary is the tor program ("tor" from PATH when empty); TorDataDir
	// its data directory (required); TorrcLines extra torrc lines (a
	// private network's, for one).
	TorBinary  string
	TorDataDir string
	TorrcLines []string
	// StateDir keeps what the gateway remembers of the cache (its
	// nix-cache-info, answered while the onion is unreachable); nothing is
	// kept across restarts when empty.
	StateDir string
	// Circuits and KeepWarm are the Forwarder's.
	Circuits int
	KeepWarm time.Duration
	// Prefetch, when set, puts a Prefetcher in front of the read onion's
	// Forwarder (not the write onion's).
	Prefetch *PrefetchConfig
	// Metrics, when not nil, gets the gateway's metrics registered (see
	// Forwarder.RegisterMetrics) before it listens and tor starts,
	// labelled with the role of the onion.
	Metrics prometheus.Registerer
	// Log receives the gateway's messages, TorLog tor's output (Log when
	// nil); logrus's standard logger when nil.
	Log    *logrus.Entry
	TorLog *logrus.Entry
}

// Gateway is a local entrance into one of the cache's onions: a client tor
// holding the bundle's key, and a Forwarder serving plain HTTP on a
// loopback address. Nix, publish and update then need no proxy settings.
type Gateway struct {
	*Forwarder
	prefetch *Prefetcher // nil when off
	tor      atomic.Pointer[onion.Tor]
	srv      *http.Server
	ln       net.Listener
	errc     chan error
}

// Start listens, starts serving (the gateway answers for the onion until
// it is reachable), starts a client tor with the bundle's key and returns once tor has
// bootstrapped. The onion may not be reachable yet: see WaitReachable.
// ctx bounds only the start.
func Start(ctx context.Context, cfg Config) (*Gateway, error) {
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.Door == DoorTLS {
		return startTLS(cfg)
	}
	b := cfg.Bundle
	if b.Key == nil {
		return nil, errors.New("start gateway: the bundle has no private key (client.key)")
	}
	targets := b.ReadURLs()
	if cfg.Write {
		if b.WriteOnion == "" {
			return nil, fmt.Errorf("start gateway: %q is a %s's bundle: it cannot reach the write onion", b.Name, b.Role)
		}
		targets = b.WriteURLs()
	}
	target := targets[0]
	if cfg.TorDataDir == "" {
		return nil, errors.New("start gateway: no tor data directory")
	}
	log := cfg.Log
	torLog := cfg.TorLog
	if torLog == nil {
		torLog = log
	}
	key, err := keyBytes(b.Key)
	if err != nil {
		return nil, fmt.Errorf("start gateway: %w", err)
	}

	g := &Gateway{errc: make(chan error, 1)}
	g.Forwarder, err = NewForwarder(ForwarderConfig{
		Target:    target,
		Frontends: targets[1:],
		SocksAddr: func() string {
			if t := g.tor.Load(); t != nil {
				return t.SocksAddr()
			}
			return ""
		},
		Circuits:      cfg.Circuits,
		KeepWarm:      cfg.KeepWarm,
		CacheInfoFile: cfg.cacheInfoFile(),
		Log:           log,
	})
	if err != nil {
		return nil, fmt.Errorf("start gateway: %w", err)
	}
	if err := g.listen(cfg, log); err != nil {
		return nil, err
	}
	log.WithFields(logrus.Fields{"client": b.Name, "listen": g.URL(), "target": target, "frontends": len(targets)}).Info("gateway starting tor")

	t, err := onion.Start(ctx, onion.Config{
		Binary:     cfg.TorBinary,
		DataDir:    cfg.TorDataDir,
		TorrcLines: cfg.TorrcLines,
		Socks:      true,
		Log:        torLog,
	})
	if err != nil {
		g.closeServer()
		return nil, fmt.Errorf("start gateway: %w", err)
	}
	for _, addr := range b.Onions() {
		if err := t.AddClientAuth(ctx, addr, key); err != nil {
			t.Close()
			g.closeServer()
			return nil, fmt.Errorf("start gateway: %w", err)
		}
	}
	g.tor.Store(t)
	g.wake()
	return g, nil
}

// listen starts serving on cfg.Listen: the Forwarder, behind a Prefetcher
// for reads when cfg asks for one. It closes them when it cannot.
func (g *Gateway) listen(cfg Config, log *logrus.Entry) error {
	var handler http.Handler = g.Forwarder
	if cfg.Prefetch != nil && !cfg.Write {
		pc := *cfg.Prefetch
		if pc.Log == nil {
			pc.Log = log
		}
		var err error
		if g.prefetch, err = NewPrefetcher(g.Forwarder, pc); err != nil {
			g.Forwarder.Close()
			return fmt.Errorf("start gateway: %w", err)
		}
		handler = g.prefetch
	}
	if err := g.registerMetrics(cfg); err != nil {
		g.closeForwarding()
		return err
	}
	var err error
	if g.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		g.closeForwarding()
		return fmt.Errorf("start gateway: %w", err)
	}
	g.srv = &http.Server{
		Handler:           g.Forwarder.metrics.handler(handler),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
	}
	go func() {
		if err := g.srv.Serve(g.ln); !errors.Is(err, http.ErrServerClosed) {
			g.errc <- err
		}
	}()
	return nil
}

// cacheInfoFile is where the gateway remembers the cache's nix-cache-info:
// named after the read onion, as both onions and the TLS door serve the
// same cache; "" without a state directory.
func (cfg Config) cacheInfoFile() string {
	if cfg.StateDir == "" {
		return ""
	}
	return filepath.Join(cfg.StateDir, strings.TrimSuffix(cfg.Bundle.ReadOnion, ".onion")+".nix-cache-info")
}

// URL returns the gateway's address: "http://127.0.0.1:PORT".
func (g *Gateway) URL() string { return "http://" + g.ln.Addr().String() }

// Err returns a channel that receives an error if serving stops.
func (g *Gateway) Err() <-chan error { return g.errc }

// Close stops serving (requests in flight get a few seconds) and stops tor.
func (g *Gateway) Close() error {
	g.closeServer()
	if t := g.tor.Load(); t != nil {
		return t.Close()
	}
	return nil
}

func (g *Gateway) closeServer() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	g.srv.Shutdown(ctx)
	g.closeForwarding()
}

func (g *Gateway) closeForwarding() {
	if g.prefetch != nil {
		g.prefetch.Close()
	}
	g.Forwarder.Close()
}

// keyBytes returns the raw 32 bytes of a client key, as tor's control
// port takes them.
func keyBytes(k *clientauth.PrivateKey) ([32]byte, error) {
	var out [32]byte
	b, err := base32.StdEncoding.WithPadding(base32.NoPadding).DecodeString(k.String())
	if err != nil || len(b) != 32 {
		return out, errors.New("malformed client key")
	}
	copy(out[:], b)
	return out, nil
}
