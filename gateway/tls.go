package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
)

// The doors a Gateway can go through (Config.Door).
const (
	DoorOnion = "onion"
	DoorTLS   = "tls"
)

// startTLS starts a Gateway into the bundle's TLS door: the Forwarder
// reaches the door's URL directly over TLS, presenting the bundle's
// client certificate, and answers like it does for an onion while the
// door is away. The door decides the role by the certificate, so one
// URL serves reads and writes; Write only checks the bundle is a writer's.
func startTLS(cfg Config) (*Gateway, error) {
	b := cfg.Bundle
	if b.TLS == nil {
		return nil, fmt.Errorf("start gateway: %q's bundle has no TLS door (kiss-onion keys add --tls)", b.Name)
	}
	if cfg.Write && b.Role != clientauth.RoleWriter {
		return nil, fmt.Errorf("start gateway: %q is a %s's bundle: it cannot write", b.Name, b.Role)
	}
	conf, err := ClientTLSConfig(b.TLS)
	if err != nil {
		return nil, fmt.Errorf("start gateway: %w", err)
	}
	log := cfg.Log
	g := &Gateway{errc: make(chan error, 1)}
	g.Forwarder, err = NewForwarder(ForwarderConfig{
		Target:        b.TLS.URL,
		TLS:           conf,
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
	log.WithFields(logrus.Fields{"client": b.Name, "listen": g.URL(), "target": b.TLS.URL, "door": DoorTLS}).Info("gateway forwarding")
	return g, nil
}

// ClientTLSConfig returns the client side of a bundle's TLS door: its
// client certificate, and trust in the server's certificate. A bundle
// that pins the cache's own server certificate (ServerFingerprint) trusts
// the cache's CA alone, which signed it; a server certificate the user
// supplied is trusted through the system's roots (and the cache's CA).
func ClientTLSConfig(t *clientauth.BundleTLS) (*tls.Config, error) {
	if t.Cert == nil || t.Key == nil {
		return nil, errors.New("the bundle has no TLS client certificate (tls-client.crt and tls-client.key)")
	}
	cert, err := tls.X509KeyPair(t.Cert, t.Key)
	if err != nil {
		return nil, fmt.Errorf("the bundle's TLS client certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if t.ServerFingerprint == "" {
		if sys, err := x509.SystemCertPool(); err == nil {
			pool = sys
		}
	}
	if !pool.AppendCertsFromPEM(t.CA) {
		return nil, errors.New("the bundle's tls_ca holds no certificate")
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		MinVersion:   tls.VersionTLS12,
	}, nil
}
