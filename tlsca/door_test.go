package tlsca

import (
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/serve"
)

// doorServer serves, over real TLS with the Door's configuration, the
// identity the Door grants each request, or its refusal.
func doorServer(t *testing.T, d *Door, ca *CA) string {
	t.Helper()
	cert, err := NewOwnCert(ca, []string{"127.0.0.1"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", d.TLSConfig(cert))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := d.Authenticate(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusUnauthorized)
			return
		}
		fmt.Fprintf(w, "%s %s %s", id.Door, id.Name, id.Role)
	}), ErrorLog: log.New(io.Discard, "", 0)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "https://" + ln.Addr().String()
}

// get fetches url presenting cert (none when nil), trusting ca.
func get(url string, ca *CA, cert *Issued) (string, error) {
	cfg := &tls.Config{RootCAs: ca.Pool()}
	if cert != nil {
		c, err := tls.X509KeyPair(cert.CertPEM, cert.KeyPEM)
		if err != nil {
			return "", err
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(b))), nil
}

func addClient(t *testing.T, path, name string, role clientauth.Role, iss *Issued) {
	t.Helper()
	k, err := clientauth.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	err = clientauth.UpdateRegistry(path, func(r *clientauth.Registry) error {
		if _, err := r.Add(name, role, k.PublicKey()); err != nil {
			return err
		}
		return r.SetTLSCert(name, iss.Fingerprint())
	})
	if err != nil {
		t.Fatal(err)
	}
}

func issue(t *testing.T, ca *CA, tmpl Template) *Issued {
	t.Helper()
	iss, err := ca.Issue(tmpl)
	if err != nil {
		t.Fatal(err)
	}
	return &iss
}

func TestDoorLetsInRegisteredCertificatesOnly(t *testing.T) {
	state := t.TempDir()
	ca, err := LoadOrCreate(Dir(state))
	if err != nil {
		t.Fatal(err)
	}
	other, err := LoadOrCreate(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	reg := filepath.Join(state, clientauth.RegistryFileName)
	declared := filepath.Join(t.TempDir(), "clients.toml")
	reader, writer := issue(t, ca, Template{Client: true, Name: "laptop"}), issue(t, ca, Template{Client: true, Name: "ci"})
	revoked, declaredOnly := issue(t, ca, Template{Client: true, Name: "gone"}), issue(t, ca, Template{Client: true, Name: "decl"})
	addClient(t, reg, "laptop", clientauth.RoleReader, reader)
	addClient(t, reg, "ci", clientauth.RoleWriter, writer)
	addClient(t, reg, "gone", clientauth.RoleReader, revoked)
	addClient(t, declared, "decl", clientauth.RoleWriter, declaredOnly)
	now := time.Now()
	expired := issue(t, ca, Template{Client: true, Name: "laptop", NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour)})
	addClient(t, reg, "expired", clientauth.RoleReader, expired)

	d, err := NewDoor(DoorConfig{CA: ca, Registries: []string{reg, declared}})
	if err != nil {
		t.Fatal(err)
	}
	url := doorServer(t, d, ca)
	if err := clientauth.UpdateRegistry(reg, func(r *clientauth.Registry) error { return r.Revoke("gone") }); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name      string
		cert      *Issued
		want      string // the answer, or
		handshake bool   // refused in the handshake
	}{
		{"reader", reader, "200 tls laptop read", false},
		{"writer", writer, "200 tls ci write", false},
		{"writer of a declarative clients file", declaredOnly, "200 tls decl write", false},
		{"no certificate", nil, "401 " + serve.ErrNoCredentials.Error(), false},
		{"revoked while the door runs", revoked, "401 client certificate " + revoked.Fingerprint() + ` of "gone" was revoked`, false},
		{"unregistered", issue(t, ca, Template{Client: true, Name: "stranger"}), "401", false},
		// Go's client sends no certificate the server's CA list rules
		// out; curl sends it, and fails the handshake (e2e).
		{"another CA's", issue(t, other, Template{Client: true, Name: "laptop"}), "401 " + serve.ErrNoCredentials.Error(), false},
		{"expired", expired, "", true},
		{"a server certificate", issue(t, ca, Template{Name: "laptop", Hosts: []string{"laptop"}}), "", true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := get(url, ca, tt.cert)
			if tt.handshake {
				if err == nil {
					t.Fatalf("served %q, want a refused handshake", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDoorFallsThroughToNext(t *testing.T) {
	state := t.TempDir()
	ca, err := LoadOrCreate(Dir(state))
	if err != nil {
		t.Fatal(err)
	}
	next := serve.AuthenticatorFunc(func(r *http.Request) (serve.Identity, error) {
		if r.Header.Get("Authorization") == "Bearer good" {
			return serve.Identity{Name: "token", Door: "oidc", Role: serve.Read}, nil
		}
		return serve.Identity{}, fmt.Errorf("bad token")
	})
	d, err := NewDoor(DoorConfig{CA: ca, Registries: []string{filepath.Join(state, clientauth.RegistryFileName)}, Next: next})
	if err != nil {
		t.Fatal(err)
	}
	url := doorServer(t, d, ca)
	unregistered := issue(t, ca, Template{Client: true, Name: "x"})
	for _, tt := range []struct {
		name, auth string
		cert       *Issued
		want       string
	}{
		{"token without certificate", "Bearer good", nil, "200 oidc token read"},
		{"bad token", "Bearer bad", nil, "401 bad token"},
		{"a certificate decides, not the token", "Bearer good", unregistered, "401 client certificate"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := &tls.Config{RootCAs: ca.Pool()}
			if tt.cert != nil {
				c, _ := tls.X509KeyPair(tt.cert.CertPEM, tt.cert.KeyPEM)
				cfg.Certificates = []tls.Certificate{c}
			}
			req, _ := http.NewRequest("GET", url, nil)
			req.Header.Set("Authorization", tt.auth)
			resp, err := (&http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if got := fmt.Sprintf("%d %s", resp.StatusCode, b); !strings.HasPrefix(got, tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}
