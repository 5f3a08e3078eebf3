package tlsca

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// servedBy completes a real handshake with a listener serving s and
// returns the certificate the client was shown.
func servedBy(t *testing.T, s *ServedCert) *x509.Certificate {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: s.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0]
}

// at makes s see the time as now, as if it had been running until then.
func (s *ServedCert) at(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now = func() time.Time { return now }
}

func logTo(buf *bytes.Buffer) *logrus.Entry {
	l := logrus.New()
	l.SetOutput(buf)
	return logrus.NewEntry(l)
}

// TestFileCertFollowsTheFiles: the user's certificate files replaced
// while serving (a renewal) are served from the next handshake on; a
// pair that does not load, as while only one file is new, or files gone
// for a moment, leave the certificate served in place.
func TestFileCertFollowsTheFiles(t *testing.T) {
	ca := newCA(t)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	issue := func() Issued {
		iss, err := ca.Issue(Template{Name: "cache.lan", Hosts: []string{"cache.lan"}})
		if err != nil {
			t.Fatal(err)
		}
		return iss
	}
	write := func(name string, data []byte) {
		// As certbot does: a new file moved into place.
		tmp := name + ".new"
		if err := os.WriteFile(tmp, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, name); err != nil {
			t.Fatal(err)
		}
	}
	first, second := issue(), issue()
	write(certFile, first.CertPEM)
	write(keyFile, first.KeyPEM)
	var logged bytes.Buffer
	s, err := NewFileCert(certFile, keyFile, logTo(&logged))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for _, step := range []struct {
		name   string
		change func()
		want   Issued
		warns  string
	}{
		{"as started", func() {}, first, ""},
		{"the certificate renewed, not yet its key", func() { write(certFile, second.CertPEM) }, first, "private key does not match"},
		{"then its key", func() { write(keyFile, second.KeyPEM) }, second, ""},
		{"a file that is not PEM", func() { write(certFile, []byte("not a certificate")) }, second, certFile},
		{"the files gone", func() { os.Remove(certFile); os.Remove(keyFile) }, second, ""},
		{"the first pair back", func() { write(certFile, first.CertPEM); write(keyFile, first.KeyPEM) }, first, ""},
	} {
		logged.Reset()
		step.change()
		now = now.Add(certFileCheck)
		s.at(now)
		if got := servedBy(t, s); !got.Equal(step.want.Cert) {
			t.Errorf("%s: served %s, want %s", step.name, Fingerprint(got), step.want.Fingerprint())
		}
		if step.warns != "" && !strings.Contains(logged.String(), step.warns) {
			t.Errorf("%s: log does not say %q:\n%s", step.name, step.warns, logged.String())
		}
	}
}

// TestOwnCertRenewsBeforeItsEnd: the cache's own certificate is issued
// again ServerRenewBefore its end by the running door, kept for the next
// start, and recorded through OnChange; clients that trust the CA
// verify it.
func TestOwnCertRenewsBeforeItsEnd(t *testing.T) {
	ca := newCA(t)
	hosts := []string{"cache.lan", "127.0.0.1"}
	s, err := NewOwnCert(ca, hosts, nil)
	if err != nil {
		t.Fatal(err)
	}
	var changed []*x509.Certificate
	s.OnChange(func(leaf *x509.Certificate) { changed = append(changed, leaf) })
	first := servedBy(t, s)
	s.at(first.NotAfter.Add(-ServerRenewBefore - time.Hour))
	if got := servedBy(t, s); !got.Equal(first) {
		t.Fatalf("renewed %s before it was due", Fingerprint(first))
	}
	later := first.NotAfter.Add(-ServerRenewBefore + time.Hour)
	s.at(later)
	renewed := servedBy(t, s)
	if renewed.Equal(first) {
		t.Fatalf("still served %s within %s of its end", Fingerprint(first), ServerRenewBefore)
	}
	if _, err := renewed.Verify(x509.VerifyOptions{Roots: ca.Pool(), DNSName: "cache.lan", CurrentTime: later.Add(ServerRenewBefore)}); err != nil {
		t.Errorf("the renewed certificate, past the first's end: %v", err)
	}
	if len(changed) != 1 || !changed[0].Equal(renewed) {
		t.Errorf("OnChange got %d certificates, want the renewed one", len(changed))
	}
	s.at(later.Add(certRetry))
	if again := servedBy(t, s); !again.Equal(renewed) {
		t.Error("renewed again on the next handshake")
	}
	kept, err := ca.serverCertAt(hosts, later)
	if err != nil || !kept.Leaf.Equal(renewed) {
		t.Errorf("the next start would serve another certificate than the renewed one (%v)", err)
	}
}
