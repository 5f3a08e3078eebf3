package clientauth

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fpA is a well-formed certificate fingerprint.
var fpA = "sha256:" + strings.Repeat("ab", 32)

func TestSetTLSCert(t *testing.T) {
	path := filepath.Join(t.TempDir(), RegistryFileName)
	fpB := "sha256:" + strings.Repeat("cd", 32)
	r, _ := LoadRegistry(path)
	for _, n := range []string{"laptop", "ci", "gone"} {
		if _, err := r.Add(n, RoleReader, newPub(t)); err != nil {
			t.Fatal(err)
		}
	}
	r.Revoke("gone")
	for _, tt := range []struct {
		name, client, fp, wantErr string
	}{
		{"first certificate", "laptop", strings.ToUpper(fpA[:7]) + fpA[7:], ""},
		{"second certificate of a client", "laptop", fpB, "has a TLS certificate already"},
		{"certificate of another client", "ci", fpA, `already registered to client "laptop"`},
		{"revoked client", "gone", fpB, "already revoked"},
		{"unknown client", "nobody", fpB, "no client"},
		{"malformed fingerprint", "ci", "sha256:xyz", "not a certificate fingerprint"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := r.SetTLSCert(tt.client, tt.fp)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("SetTLSCert: %v, want %q", err, tt.wantErr)
			}
		})
	}
	if err := r.Save(); err != nil {
		t.Fatal(err)
	}
	again, err := LoadRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := again.Client("laptop"); c.TLSCert != fpA {
		t.Errorf("saved and loaded: tls_cert %q, want %q", c.TLSCert, fpA)
	}
	if c, _ := again.Client("ci"); c.TLSCert != "" {
		t.Errorf("ci has tls_cert %q", c.TLSCert)
	}
}

func TestRegistryWithoutTLSStillLoads(t *testing.T) {
	path := filepath.Join(t.TempDir(), RegistryFileName)
	old := "version = 1\n[[client]]\nname = 'laptop'\nrole = 'reader'\npublic_key = '" + rfc7748[0].pubBase32 + "'\ncreated = 2025-01-01T00:00:00Z\n"
	if err := os.WriteFile(path, []byte(old), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	if c, ok := r.Client("laptop"); !ok || c.TLSCert != "" || len(MergeTLS(r)) != 0 {
		t.Errorf("old registry: %+v", c)
	}
	if err := r.Save(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(path); strings.Contains(string(b), "tls_cert") {
		t.Errorf("a registry without certificates saved with tls_cert:\n%s", b)
	}
}

func TestMergeTLS(t *testing.T) {
	fp := func(c byte) string { return "sha256:" + strings.Repeat(string([]byte{c}), 64) }
	mk := func(t *testing.T, clients ...Client) *Registry {
		r := &Registry{}
		for _, c := range clients {
			c.PublicKey = newPub(t)
			r.clients = append(r.clients, c)
		}
		return r
	}
	revoked := Client{Name: "x"}.Revoked.AddDate(2025, 0, 0)
	for _, tt := range []struct {
		name string
		regs [][]Client
		want string // name:role of each fingerprint a..d that is let in
	}{
		{"one registry", [][]Client{{{Name: "a", Role: RoleReader, TLSCert: fp('a')}, {Name: "b", Role: RoleWriter, TLSCert: fp('b')}, {Name: "c", Role: RoleReader}}}, "a:reader b:writer"},
		{"revoked in its registry", [][]Client{{{Name: "a", Role: RoleReader, TLSCert: fp('a'), Revoked: revoked}}}, ""},
		{"revoked in another registry", [][]Client{{{Name: "a", Role: RoleWriter, TLSCert: fp('a')}}, {{Name: "a2", Role: RoleWriter, TLSCert: fp('a'), Revoked: revoked}}}, ""},
		{"the first registry decides the role", [][]Client{{{Name: "a", Role: RoleReader, TLSCert: fp('a')}}, {{Name: "a", Role: RoleWriter, TLSCert: fp('a')}, {Name: "d", Role: RoleWriter, TLSCert: fp('d')}}}, "a:reader d:writer"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var regs []*Registry
			for _, cs := range tt.regs {
				regs = append(regs, mk(t, cs...))
			}
			m := MergeTLS(regs...)
			var got []string
			for _, c := range "abcd" {
				if cl, ok := m[fp(byte(c))]; ok {
					got = append(got, cl.Name+":"+string(cl.Role))
				}
			}
			if strings.Join(got, " ") != tt.want {
				t.Errorf("MergeTLS: %q, want %q", strings.Join(got, " "), tt.want)
			}
		})
	}
}

// testCertPEM is a PEM "certificate": the bundle checks only its form and
// fingerprint, package tlsca makes real ones.
func testCertPEM(body string) ([]byte, string) {
	der := []byte(body)
	sum := sha256.Sum256(der)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), "sha256:" + hex.EncodeToString(sum[:])
}

func TestBundleWithTLS(t *testing.T) {
	caPEM, _ := testCertPEM("ca")
	certPEM, certFP := testCertPEM("client")
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("secret")})
	k, _ := GeneratePrivateKey()
	b := Bundle{Name: "laptop", Role: RoleReader, Key: k, ReadOnion: onionA, TLS: &BundleTLS{
		URL: "https://cache.lan:8443", CA: caPEM, CertFingerprint: certFP, ServerFingerprint: fpA, Cert: certPEM, Key: keyPEM,
	}}
	dir := filepath.Join(t.TempDir(), "laptop.bundle")
	if err := WriteBundle(dir, b); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{BundleTLSCertFile, BundleTLSKeyFile, BundleTLSCAFile} {
		if m := mode(t, filepath.Join(dir, f)); m != 0o600 {
			t.Errorf("%s: mode %o, want 600", f, m)
		}
	}
	got, err := LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.TLS == nil || got.TLS.URL != b.TLS.URL || string(got.TLS.CA) != string(caPEM) || got.TLS.ServerFingerprint != fpA ||
		string(got.TLS.Cert) != string(certPEM) || string(got.TLS.Key) != string(keyPEM) {
		t.Fatalf("loaded TLS %+v, want %+v", got.TLS, b.TLS)
	}

	t.Run("a bundle without TLS still loads", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "old.bundle")
		if err := WriteBundle(dir, Bundle{Name: "old", Role: RoleReader, Key: k, ReadOnion: onionA}); err != nil {
			t.Fatal(err)
		}
		b, err := LoadBundle(dir)
		if err != nil || b.TLS != nil {
			t.Fatalf("LoadBundle: %+v, %v", b.TLS, err)
		}
	})

	for _, tt := range []struct {
		name    string
		change  func(dir string)
		wantErr string
	}{
		{"another certificate", func(dir string) {
			other, _ := testCertPEM("other")
			os.WriteFile(filepath.Join(dir, BundleTLSCertFile), other, 0o600)
		}, "but kiss-onion.toml names"},
		{"certificate without key", func(dir string) { os.Remove(filepath.Join(dir, BundleTLSKeyFile)) }, BundleTLSKeyFile},
		{"http tls_url", func(dir string) { edit(t, dir, "https://cache.lan:8443", "http://cache.lan:8443") }, "not https://"},
		{"tls_ca without tls_url", func(dir string) { edit(t, dir, "tls_url = 'https://cache.lan:8443'", "") }, "tls_ca without tls_url"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := filepath.Join(t.TempDir(), "b")
			if err := WriteBundle(d, b); err != nil {
				t.Fatal(err)
			}
			tt.change(d)
			_, err := LoadBundle(d)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("LoadBundle: %v, want %q", err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("error quotes the key: %v", err)
			}
		})
	}
	if err := WriteBundle(filepath.Join(t.TempDir(), "x"), Bundle{Name: "x", Role: RoleReader, Key: k, ReadOnion: onionA, TLS: &BundleTLS{
		URL: "https://cache.lan", CA: caPEM, CertFingerprint: fpA, Cert: certPEM, Key: keyPEM,
	}}); err == nil || !strings.Contains(err.Error(), "not the one tls_cert_fingerprint names") {
		t.Errorf("WriteBundle of a certificate with another fingerprint: %v", err)
	}
}

func edit(t *testing.T, dir, old, new string) {
	t.Helper()
	p := filepath.Join(dir, BundleConfigFile)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s has no %q:\n%s", p, old, b)
	}
	if err := os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
}
