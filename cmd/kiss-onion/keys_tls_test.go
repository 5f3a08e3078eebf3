package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

func TestKeysAddTLS(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	keysMust(t, dir, "add", "laptop", "--role", "reader", "--tls", "--tls-url", "https://cache.lan:8443/", "--state-dir", state)
	b, err := clientauth.LoadBundle(filepath.Join(dir, "laptop.bundle"))
	if err != nil {
		t.Fatal(err)
	}
	if b.TLS == nil || b.TLS.URL != "https://cache.lan:8443" || b.TLS.Cert == nil || b.TLS.Key == nil || b.TLS.ServerFingerprint != "" {
		t.Fatalf("bundle TLS: %+v", b.TLS)
	}
	for _, f := range []string{clientauth.BundleTLSCertFile, clientauth.BundleTLSKeyFile, clientauth.BundleTLSCAFile} {
		if m := keysMode(t, filepath.Join(dir, "laptop.bundle", f)); m != 0o600 {
			t.Errorf("%s: mode %o, want 600", f, m)
		}
	}
	if m := keysMode(t, filepath.Join(state, "tls", tlsca.CAKeyFile)); m != 0o600 {
		t.Errorf("CA key: mode %o, want 600", m)
	}
	reg, err := clientauth.LoadRegistry(filepath.Join(state, clientauth.RegistryFileName))
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := reg.Client("laptop"); c.TLSCert != b.TLS.CertFingerprint {
		t.Errorf("registry tls_cert %q, bundle's certificate %q", c.TLSCert, b.TLS.CertFingerprint)
	}
	keysMust(t, dir, "add", "desktop", "--role", "reader", "--state-dir", state)
	list := strings.Split(keysMust(t, dir, "list", "--state-dir", state).stdout, "\n")
	if !strings.HasPrefix(list[1], "laptop ") || !strings.HasSuffix(list[1], " "+b.TLS.CertFingerprint) {
		t.Errorf("keys list row %q does not end with laptop's certificate %s", list[1], b.TLS.CertFingerprint)
	}
	if !strings.HasPrefix(list[2], "desktop ") || !strings.HasSuffix(list[2], " -") {
		t.Errorf("keys list row %q: desktop has no certificate", list[2])
	}
	ca, err := tlsca.Load(tlsca.Dir(state))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tlsca.ParseCertPEM(b.TLS.Cert)
	if err != nil || cert.CheckSignatureFrom(ca.Cert()) != nil || cert.Subject.CommonName != "laptop" {
		t.Errorf("bundle certificate not the CA's for laptop: %v", err)
	}

	// Once serve recorded the door, its URL and server fingerprint are the default.
	if err := tlsca.SaveDoor(tlsca.Dir(state), tlsca.DoorInfo{URL: "https://10.0.0.2:8443", ServerFingerprint: "sha256:" + strings.Repeat("0", 64)}); err != nil {
		t.Fatal(err)
	}
	keysMust(t, dir, "add", "ci", "--role", "writer", "--tls", "--state-dir", state)
	ci, err := clientauth.LoadBundle(filepath.Join(dir, "ci.bundle"))
	if err != nil {
		t.Fatal(err)
	}
	if ci.TLS == nil || ci.TLS.URL != "https://10.0.0.2:8443" || ci.TLS.ServerFingerprint == "" {
		t.Errorf("bundle TLS from the recorded door: %+v", ci.TLS)
	}

	// export keeps the door, without the certificate it cannot make again.
	out := filepath.Join(dir, "export")
	keysMust(t, dir, "export", "ci", "--out", out, "--state-dir", state)
	ex, err := clientauth.LoadBundle(out)
	if err != nil {
		t.Fatal(err)
	}
	if ex.TLS == nil || ex.TLS.CertFingerprint != ci.TLS.CertFingerprint || ex.TLS.Key != nil {
		t.Errorf("exported TLS: %+v", ex.TLS)
	}

	r := keysMust(t, dir, "revoke", "ci", "--state-dir", state)
	if !strings.Contains(r.stdout, "TLS certificate") {
		t.Errorf("revoke says %q", r.stdout)
	}
}

func TestKeysAddTLSRefusals(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	for _, tt := range []struct {
		name string
		args []string
		code int
		says string
	}{
		{"no URL known", []string{"add", "a", "--role", "reader", "--tls"}, 1, "no URL for the TLS door"},
		{"http URL", []string{"add", "a", "--role", "reader", "--tls", "--tls-url", "http://cache.lan"}, 2, "not https://"},
		{"--tls-url without --tls", []string{"add", "a", "--role", "reader", "--tls-url", "https://cache.lan"}, 2, "--tls-url needs --tls"},
		{"--tls with --public-key", []string{"add", "a", "--role", "reader", "--tls", "--tls-url", "https://cache.lan", "--public-key", k2pub(t)}, 2, "does not go with --public-key"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := keysRun(t, dir, append(tt.args, "--state-dir", state)...)
			if r.code != tt.code || !strings.Contains(r.stderr, tt.says) {
				t.Errorf("exit %d, stderr %q; want exit %d saying %q", r.code, r.stderr, tt.code, tt.says)
			}
			if _, err := os.Stat(filepath.Join(dir, "a.bundle")); err == nil {
				t.Error("a bundle was written")
			}
		})
	}
}
