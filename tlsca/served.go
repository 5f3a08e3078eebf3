package tlsca

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/filestamp"
	"github.com/sirupsen/logrus"
)

// Intervals of a ServedCert: how often the user's files are looked at
// again, and how soon a renewal of the cache's own that failed (a full
// disk, say) is tried again.
const (
	certFileCheck = time.Second
	certRetry     = time.Minute
)

// ServedCert is the server certificate a TLS door serves, kept current
// for as long as serve runs, with no restart:
//   - the user's certificate (NewFileCert) is read again when its files
//     change, as when certbot renews it; a pair that does not load, as
//     while one file is written and not the other, leaves the one served
//     in place until the files change again;
//   - the cache's own (NewOwnCert) is issued again ServerRenewBefore its
//     end; clients trust the CA, which stays.
//
// Its GetCertificate goes in a tls.Config.
type ServedCert struct {
	load     func(now time.Time) (*tls.Certificate, error)
	due      func(cur *tls.Certificate, now time.Time) bool
	retry    time.Duration // after a load that failed
	onChange func(leaf *x509.Certificate)
	log      *logrus.Entry
	now      func() time.Time

	mu        sync.Mutex
	cur       *tls.Certificate
	nextCheck time.Time
	failed    error // the last failure, logged once
}

// NewFileCert serves the PEM certificate and key at certFile and keyFile,
// read now and again whenever either file changes.
func NewFileCert(certFile, keyFile string, log *logrus.Entry) (*ServedCert, error) {
	var stamps [2]filestamp.Stamp
	// A pair that failed is read again only once the files change.
	s := &ServedCert{log: log, now: time.Now, retry: certFileCheck}
	s.load = func(time.Time) (*tls.Certificate, error) {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("server certificate %s with key %s: %w", certFile, keyFile, err)
		}
		return &c, nil
	}
	s.due = func(*tls.Certificate, time.Time) bool {
		var current [2]filestamp.Stamp
		for i, name := range []string{certFile, keyFile} {
			st, err := filestamp.Stat(name)
			if err != nil || !st.Exists() {
				// Gone for a moment while it is replaced: wait for it.
				return false
			}
			current[i] = st
		}
		changed := current != stamps
		stamps = current
		return changed
	}
	s.due(nil, time.Time{})
	return s, s.start()
}

// NewOwnCert serves the cache's own server certificate for hosts (see
// CA.ServerCert), issued again ServerRenewBefore its end.
func NewOwnCert(ca *CA, hosts []string, log *logrus.Entry) (*ServedCert, error) {
	s := &ServedCert{log: log, now: time.Now, retry: certRetry}
	s.load = func(now time.Time) (*tls.Certificate, error) {
		c, err := ca.serverCertAt(hosts, now)
		return &c, err
	}
	s.due = func(cur *tls.Certificate, now time.Time) bool {
		return cur.Leaf.NotAfter.Sub(now) < ServerRenewBefore
	}
	return s, s.start()
}

func (s *ServedCert) start() error {
	if s.log == nil {
		s.log = logrus.NewEntry(logrus.StandardLogger())
	}
	now := s.now()
	c, err := s.load(now)
	if err != nil {
		return err
	}
	s.cur, s.nextCheck = c, now.Add(certFileCheck)
	return nil
}

// OnChange calls fn with the new certificate after each renewal or reload.
func (s *ServedCert) OnChange(fn func(leaf *x509.Certificate)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onChange = fn
}

// Current returns the certificate served now.
func (s *ServedCert) Current() *tls.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// GetCertificate is tls.Config.GetCertificate: the certificate served,
// renewed or read again first when that is due.
func (s *ServedCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if now.Before(s.nextCheck) {
		return s.cur, nil
	}
	s.nextCheck = now.Add(certFileCheck)
	if !s.due(s.cur, now) {
		return s.cur, nil
	}
	c, err := s.load(now)
	if err != nil {
		if s.failed == nil || s.failed.Error() != err.Error() {
			s.log.WithError(err).WithField("not_after", s.cur.Leaf.NotAfter.UTC().Format(time.RFC3339)).Warn("tls server certificate not renewed: the one served stays")
		}
		s.failed, s.nextCheck = err, now.Add(s.retry)
		return s.cur, nil
	}
	s.failed = nil
	if c.Leaf.Equal(s.cur.Leaf) {
		return s.cur, nil
	}
	s.cur = c
	s.log.WithFields(logrus.Fields{"server_fingerprint": Fingerprint(c.Leaf), "not_after": c.Leaf.NotAfter.UTC().Format(time.RFC3339)}).Info("tls server certificate renewed")
	if s.onChange != nil {
		s.onChange(c.Leaf)
	}
	return s.cur, nil
}
