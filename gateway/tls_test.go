package gateway

import (
	"context"
	"crypto/tls"
	"io"
	"log"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

// tlsCache serves a tiny cache over TLS, to clients with a certificate of
// ca only, with serverCA's server certificate; each answer names the
// client's certificate.
func tlsCache(t *testing.T, ca, serverCA *tlsca.CA) string {
	t.Helper()
	cert, err := serverCA.ServerCert([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: ca.Pool(), ClientAuth: tls.RequireAndVerifyClientCert})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/nix-cache-info" {
			io.WriteString(w, "StoreDir: /nix/store\n")
			return
		}
		io.WriteString(w, r.TLS.PeerCertificates[0].Subject.CommonName)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "https://" + ln.Addr().String()
}

func TestTLSGateway(t *testing.T) {
	ca, err := tlsca.LoadOrCreate(filepath.Join(t.TempDir(), "ca"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := tlsca.LoadOrCreate(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	iss, err := ca.Issue(tlsca.Template{Client: true, Name: "laptop"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name      string
		serverCA  *tlsca.CA
		pin       string
		reachable bool
	}{
		{"the cache's own server certificate", ca, "sha256:" + strings.Repeat("0", 64), true},
		{"a server certificate of another CA", other, "sha256:" + strings.Repeat("0", 64), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k, _ := clientauth.GeneratePrivateKey()
			b := clientauth.Bundle{Name: "laptop", Role: clientauth.RoleReader, Key: k, ReadOnion: "x", TLS: &clientauth.BundleTLS{
				URL: tlsCache(t, ca, tt.serverCA), CA: ca.CertPEM(), ServerFingerprint: tt.pin, CertFingerprint: iss.Fingerprint(), Cert: iss.CertPEM, Key: iss.KeyPEM,
			}}
			g, err := Start(context.Background(), Config{Bundle: b, Door: DoorTLS, Circuits: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if !tt.reachable {
				for g.Health().State != StateUnreachable {
					if ctx.Err() != nil {
						t.Fatalf("never unreachable: %+v", g.Health())
					}
					time.Sleep(20 * time.Millisecond)
				}
				resp, err := http.Get(g.URL() + "/0123456789abcdfghijklmnpqrsvwxyz.narinfo")
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusNotFound || resp.Header.Get(ErrorHeader) == "" {
					t.Errorf("narinfo while unreachable: %d %q", resp.StatusCode, resp.Header.Get(ErrorHeader))
				}
				return
			}
			if err := g.WaitReachable(ctx); err != nil {
				t.Fatal(err)
			}
			resp, err := http.Get(g.URL() + "/whoami")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "laptop" {
				t.Errorf("through the gateway: %d %q, want 200 laptop", resp.StatusCode, body)
			}
		})
	}
}
