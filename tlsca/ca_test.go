package tlsca

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func newCA(t *testing.T) *CA {
	t.Helper()
	ca, err := LoadOrCreate(filepath.Join(t.TempDir(), "state", "tls"))
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestLoadOrCreateKeepsTheCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state", "tls")
	ca, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []struct {
		path string
		mode os.FileMode
	}{{dir, 0o700}, {filepath.Join(dir, CAKeyFile), 0o600}, {filepath.Join(dir, CACertFile), 0o600}} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != f.mode {
			t.Errorf("%s: mode %o, want %o", f.path, fi.Mode().Perm(), f.mode)
		}
	}
	again, err := LoadOrCreate(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !again.Cert().Equal(ca.Cert()) {
		t.Error("a second LoadOrCreate made another CA")
	}
	if !ca.Cert().IsCA || ca.Cert().PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("CA certificate: IsCA %v, key %v", ca.Cert().IsCA, ca.Cert().PublicKeyAlgorithm)
	}
}

func TestLoadRefusesABrokenCA(t *testing.T) {
	for _, tt := range []struct {
		name   string
		breaks func(dir string)
		says   string
	}{
		{"key without certificate", func(dir string) { os.Remove(filepath.Join(dir, CACertFile)) }, "without"},
		{"another CA's key", func(dir string) {
			other := filepath.Join(filepath.Dir(dir), "other")
			if _, err := LoadOrCreate(other); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(filepath.Join(other, CAKeyFile))
			os.WriteFile(filepath.Join(dir, CAKeyFile), b, 0o600)
		}, "does not hold the key"},
		{"garbled key", func(dir string) { os.WriteFile(filepath.Join(dir, CAKeyFile), []byte("secret junk"), 0o600) }, "no PEM private key"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "tls")
			if _, err := LoadOrCreate(dir); err != nil {
				t.Fatal(err)
			}
			tt.breaks(dir)
			_, err := LoadOrCreate(dir)
			if err == nil || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("LoadOrCreate: %v, want an error saying %q", err, tt.says)
			}
			if strings.Contains(err.Error(), "secret junk") {
				t.Error("the error quotes the key file")
			}
		})
	}
}

func TestIssue(t *testing.T) {
	ca := newCA(t)
	now := time.Now()
	for _, tt := range []struct {
		name    string
		tmpl    Template
		usage   x509.ExtKeyUsage
		host    string // a server certificate must name it
		wantErr string
		expired bool
	}{
		{name: "client", tmpl: Template{Client: true, Name: "laptop"}, usage: x509.ExtKeyUsageClientAuth},
		{name: "server for names and addresses", tmpl: Template{Name: "cache.lan", Hosts: []string{"cache.lan", "192.168.1.5", "[::1]"}}, usage: x509.ExtKeyUsageServerAuth, host: "192.168.1.5"},
		{name: "expired client", tmpl: Template{Client: true, Name: "old", NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-24 * time.Hour)}, usage: x509.ExtKeyUsageClientAuth, expired: true},
		{name: "no name", tmpl: Template{Client: true}, wantErr: "no name"},
		{name: "server without host", tmpl: Template{Name: "x"}, wantErr: "no host"},
		{name: "ends before it begins", tmpl: Template{Client: true, Name: "x", NotBefore: now, NotAfter: now.Add(-time.Second)}, wantErr: "end before it begins"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			iss, err := ca.Issue(tt.tmpl)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Issue: %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			_, err = iss.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool(), KeyUsages: []x509.ExtKeyUsage{tt.usage}, DNSName: tt.host})
			if tt.expired != (err != nil) {
				t.Fatalf("verify against the CA: %v (expired: %v)", err, tt.expired)
			}
			if iss.Cert.Subject.CommonName != tt.tmpl.Name {
				t.Errorf("common name %q, want %q", iss.Cert.Subject.CommonName, tt.tmpl.Name)
			}
			if c, err := ParseCertPEM(iss.CertPEM); err != nil || !c.Equal(iss.Cert) {
				t.Errorf("CertPEM does not hold the certificate: %v", err)
			}
			if fp := iss.Fingerprint(); !strings.HasPrefix(fp, "sha256:") || len(fp) != 7+64 {
				t.Errorf("fingerprint %q", fp)
			}
		})
	}
}

func TestServerCertIsKeptUntilItNoLongerFits(t *testing.T) {
	ca := newCA(t)
	first, err := ca.ServerCert([]string{"cache.lan", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		hosts []string
		same  bool
	}{
		{"same hosts", []string{"cache.lan", "127.0.0.1"}, true},
		{"fewer hosts", []string{"127.0.0.1"}, true},
		{"a new host", []string{"cache.lan", "10.0.0.2"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ca.ServerCert(tt.hosts)
			if err != nil {
				t.Fatal(err)
			}
			if same := c.Leaf.Equal(first.Leaf); same != tt.same {
				t.Errorf("kept the certificate: %v, want %v", same, tt.same)
			}
			for _, h := range tt.hosts {
				if err := c.Leaf.VerifyHostname(h); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

func TestDoorInfoAndURL(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadDoor(dir); err == nil {
		t.Fatal("LoadDoor of a door never recorded succeeded")
	}
	want := DoorInfo{URL: "https://cache.lan:8443", ServerFingerprint: "sha256:00"}
	if err := SaveDoor(dir, want); err != nil {
		t.Fatal(err)
	}
	if got, err := LoadDoor(dir); err != nil || got != want {
		t.Errorf("LoadDoor: %+v, %v; want %+v", got, err, want)
	}
	for _, tt := range []struct {
		url string
		ok  bool
	}{
		{"https://cache.lan:8443", true},
		{"https://127.0.0.1:8443/", true},
		{"https://[::1]:8443", true},
		{"http://cache.lan", false},
		{"https://", false},
		{"https://cache.lan/prefix", false},
		{"https://user@cache.lan", false},
	} {
		if err := CheckURL(tt.url); (err == nil) != tt.ok {
			t.Errorf("CheckURL(%q): %v, want ok %v", tt.url, err, tt.ok)
		}
	}
}

func TestDefaultHosts(t *testing.T) {
	for _, tt := range []struct{ listen, want string }{
		{"127.0.0.1:8443", "127.0.0.1 localhost ::1"},
		{"0.0.0.0:8443", "localhost 127.0.0.1 ::1"},
		{"192.168.1.5:8443", "192.168.1.5 localhost 127.0.0.1 ::1"},
		{"cache.lan:8443", "cache.lan localhost 127.0.0.1 ::1"},
	} {
		if got := strings.Join(DefaultHosts(tt.listen), " "); got != tt.want {
			t.Errorf("DefaultHosts(%q) = %q, want %q", tt.listen, got, tt.want)
		}
	}
}

func TestConcurrentFirstUsesMakeOneCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	cas := make(chan *CA, 8)
	for range cap(cas) {
		go func() {
			ca, err := LoadOrCreate(dir)
			if err != nil {
				t.Error(err)
			}
			cas <- ca
		}()
	}
	first := <-cas
	for range cap(cas) - 1 {
		if ca := <-cas; first == nil || ca == nil || !ca.Cert().Equal(first.Cert()) {
			t.Fatal("concurrent LoadOrCreate made more than one CA")
		}
	}
}
