package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

// The TLS door on 127.0.0.1 (no tor): serve --listen-tls, bundles from
// keys add --tls, the real nix 2.8 through kiss-onion proxy, and curl
// presenting certificates of every kind.

// tlsDoor is a running serve with a TLS door and no onions.
type tlsDoor struct {
	*proc
	cacheDir, stateDir string
	url                string
}

func startTLSDoor(t *testing.T, extra ...string) *tlsDoor {
	t.Helper()
	d := &tlsDoor{cacheDir: filepath.Join(t.TempDir(), "cache"), stateDir: filepath.Join(t.TempDir(), "state")}
	args := append([]string{"serve", "--tor", "off", "--cache-dir", d.cacheDir, "--state-dir", d.stateDir, "--listen-tls", "127.0.0.1:0", "--log-level", "debug"}, extra...)
	d.proc = start(t, args...)
	waitReady(t, d.proc, "recording the TLS door", 30*time.Second, func() bool {
		info, err := tlsca.LoadDoor(tlsca.Dir(d.stateDir))
		d.url = info.URL
		return err == nil
	})
	return d
}

// addTLSClient runs keys add NAME --tls and returns the bundle directory.
func (d *tlsDoor) addTLSClient(t *testing.T, name, role string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), name+".bundle")
	if o, code := runKissOnion(t, "keys", "add", name, "--role", role, "--tls", "--out", out, "--state-dir", d.stateDir); code != 0 {
		t.Fatalf("keys add %s --tls: exit %d\n%s", name, code, o)
	}
	return out
}

// startTLSGateway starts kiss-onion proxy on a TLS bundle and waits until
// the door answers it.
func startTLSGateway(t *testing.T, bundle string, extra ...string) *gateway {
	t.Helper()
	g := startGateway(t, bundle, extra...)
	g.waitReachable(t)
	return g
}

// curlResult is what curl got: the HTTP status ("000" when there was no
// HTTP answer, as when the handshake fails), the body and curl's exit code.
type curlResult struct {
	status, body string
	exit         int
}

// curlDoor runs curl against url trusting the cache's CA, with more
// arguments (a certificate, a method).
func curlDoor(t *testing.T, caFile, url string, args ...string) curlResult {
	t.Helper()
	bodyFile := filepath.Join(t.TempDir(), "body")
	cmd := exec.Command("curl", append([]string{"-sS", "--max-time", "30", "--cacert", caFile, "-o", bodyFile, "-w", "%{http_code}"}, append(args, url)...)...)
	var r curlResult
	out, err := cmd.Output()
	if ee, ok := err.(*exec.ExitError); ok {
		r.exit = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(bodyFile)
	r.status, r.body = strings.TrimSpace(string(out)), string(b)
	return r
}

// pemFiles writes a certificate and its key for curl and returns the
// --cert and --key arguments.
func pemFiles(t *testing.T, iss tlsca.Issued) []string {
	t.Helper()
	dir := t.TempDir()
	c, k := filepath.Join(dir, "c.pem"), filepath.Join(dir, "k.pem")
	if err := os.WriteFile(c, iss.CertPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(k, iss.KeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--cert", c, "--key", k}
}

func bundleCert(bundle string) []string {
	return []string{"--cert", filepath.Join(bundle, clientauth.BundleTLSCertFile), "--key", filepath.Join(bundle, clientauth.BundleTLSKeyFile)}
}

// TestTLSDoor: a writer pushes a signed closure with nix copy through its
// proxy on the TLS door, a reader substitutes it through its own; a
// reader's PUT, and every certificate the door must not take, are
// refused with nothing served or stored; keys revoke shuts a reader out
// of the running serve while another reader carries on.
func TestTLSDoor(t *testing.T) {
	key := newSigningKey(t, "tls-e2e-1")
	d := startTLSDoor(t, "--trusted-writer-key", key.public)
	writer := d.addTLSClient(t, "builder", "writer")
	reader := d.addTLSClient(t, "laptop", "reader")
	other := d.addTLSClient(t, "desktop", "reader")
	caFile := filepath.Join(reader, clientauth.BundleTLSCAFile)

	src := newNix(t)
	top, closure := src.buildClosure(128)
	topInfo := "/" + hashOf(top) + ".narinfo"

	t.Run("a writer pushes through its proxy", func(t *testing.T) {
		gw := startTLSGateway(t, writer, "--write")
		src.must("nix", "copy", "--to", gw.url+"?compression=zstd&secret-key="+key.secretFile, top)
		for _, p := range closure {
			if _, err := visibleFile(t, d.cacheDir, hashOf(p)+".narinfo"); err != nil {
				t.Fatalf("no narinfo for %s after nix copy: %v", p, err)
			}
		}
	})

	t.Run("a reader substitutes through its proxy, signatures required", func(t *testing.T) {
		gw := startTLSGateway(t, reader)
		dst := newNix(t, "substituters = "+gw.url, "trusted-public-keys = "+key.public, "require-sigs = true")
		dst.must("nix-store", "--realise", top)
		for _, p := range closure {
			sameTree(t, src, dst, p)
		}
		// The reader's proxy cannot write either: the door decides by certificate.
		if code, _ := httpDo(t, "PUT", gw.url+"/nix-cache-info", strings.NewReader("StoreDir: /nix/store\n")); code != 405 {
			t.Errorf("PUT through a reader's proxy: %d, want 405", code)
		}
	})

	t.Run("a reader cannot PUT", func(t *testing.T) {
		const fake = "/00000000000000000000000000000000.narinfo"
		r := curlDoor(t, caFile, d.url+fake, append(bundleCert(reader), "-X", "PUT", "--data-binary", "StorePath: /nix/store/00000000000000000000000000000000-x\n")...)
		if r.status != "405" {
			t.Errorf("reader's PUT: %+v, want 405", r)
		}
		if _, err := os.Stat(filepath.Join(d.cacheDir, fake)); err == nil {
			t.Error("the reader's PUT was stored")
		}
	})

	ca, err := tlsca.Load(tlsca.Dir(d.stateDir))
	if err != nil {
		t.Fatal(err)
	}
	otherCA, err := tlsca.LoadOrCreate(filepath.Join(t.TempDir(), "other-ca"))
	if err != nil {
		t.Fatal(err)
	}
	issue := func(ca *tlsca.CA, tmpl tlsca.Template) tlsca.Issued {
		iss, err := ca.Issue(tmpl)
		if err != nil {
			t.Fatal(err)
		}
		return iss
	}
	now := time.Now()
	expired := issue(ca, tlsca.Template{Client: true, Name: "old", NotBefore: now.Add(-72 * time.Hour), NotAfter: now.Add(-24 * time.Hour)})
	// Registered, so that only its dates keep it out.
	registerCert(t, d.stateDir, "old", expired.Fingerprint())

	t.Run("refusals", func(t *testing.T) {
		for _, tt := range []struct {
			name      string
			cert      []string
			status    string // the HTTP answer, or "000": refused in the handshake
			handshake bool
		}{
			{"a registered reader is served", bundleCert(reader), "200", false},
			{"no certificate", nil, "401", false},
			{"a certificate of another CA", pemFiles(t, issue(otherCA, tlsca.Template{Client: true, Name: "laptop"})), "000", true},
			{"an expired certificate", pemFiles(t, expired), "000", true},
			{"an unregistered certificate of the cache's CA", pemFiles(t, issue(ca, tlsca.Template{Client: true, Name: "laptop"})), "401", false},
		} {
			t.Run(tt.name, func(t *testing.T) {
				r := curlDoor(t, caFile, d.url+topInfo, tt.cert...)
				if r.status != tt.status || tt.handshake != (r.exit != 0) {
					t.Errorf("curl: %+v, want status %s (refused in the handshake: %v)", r, tt.status, tt.handshake)
				}
				if served := strings.Contains(r.body, "StorePath:"); served != (tt.status == "200") {
					t.Errorf("narinfo served: %v; body %q", served, r.body)
				}
			})
		}
	})

	t.Run("status lists the door and its clients", func(t *testing.T) {
		out, code := runKissOnion(t, "status", "--state-dir", d.stateDir)
		if code != 0 {
			t.Fatalf("status: exit %d\n%s", code, out)
		}
		// The cache's own certificate, valid 2 years (730 days).
		if ends := regexp.MustCompile(`certificate ends \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in 7(29|30) days\)`); !ends.MatchString(out) {
			t.Errorf("status does not say when the door's certificate ends:\n%s", out)
		}
		for _, want := range []string{"tls    https://" + strings.TrimPrefix(d.url, "https://"), "laptop", "builder"} {
			if !strings.Contains(out, want) {
				t.Errorf("status does not say %q:\n%s", want, out)
			}
		}
	})

	t.Run("keys revoke shuts a reader out of the running serve", func(t *testing.T) {
		gw := startTLSGateway(t, reader)
		if r := curlDoor(t, caFile, d.url+topInfo, bundleCert(reader)...); r.status != "200" {
			t.Fatalf("before revoke: %+v", r)
		}
		if out, code := runKissOnion(t, "keys", "revoke", "laptop", "--state-dir", d.stateDir); code != 0 {
			t.Fatalf("keys revoke: exit %d\n%s", code, out)
		}
		r := curlDoor(t, caFile, d.url+topInfo, bundleCert(reader)...)
		if r.status != "401" || strings.Contains(r.body, "StorePath:") || !strings.Contains(r.body, "revoked") {
			t.Errorf("revoked reader: %+v, want 401 saying revoked", r)
		}
		// Through its proxy, on a connection opened before the revoke.
		if code, body := httpDo(t, "GET", gw.url+topInfo, nil); code != 401 || strings.Contains(body, "StorePath:") {
			t.Errorf("revoked reader's proxy: %d %q, want 401", code, body)
		}
		if r := curlDoor(t, caFile, d.url+topInfo, bundleCert(other)...); r.status != "200" || !strings.Contains(r.body, "StorePath:") {
			t.Errorf("another reader after the revoke: %+v, want 200", r)
		}
	})
}

// registerCert registers a client with a new onion key and the TLS
// certificate fp, as keys add --tls does.
func registerCert(t *testing.T, stateDir, name, fp string) {
	t.Helper()
	k, err := clientauth.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	err = clientauth.UpdateRegistry(filepath.Join(stateDir, clientauth.RegistryFileName), func(r *clientauth.Registry) error {
		if _, err := r.Add(name, clientauth.RoleReader, k.PublicKey()); err != nil {
			return err
		}
		return r.SetTLSCert(name, fp)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestTLSDoorWithTheUsersCertificate: serve --tls-cert serves a
// certificate the user supplies, bundles then pin no server certificate,
// and a client trusting the user's CA is served; Nix substitutes through
// a gateway that trusts it as a system root. The certificate renewed in
// place (under another CA) is served by the running serve, and Nix
// substitutes again through a gateway trusting only the new CA.
func TestTLSDoorWithTheUsersCertificate(t *testing.T) {
	userCA, err := tlsca.LoadOrCreate(filepath.Join(t.TempDir(), "user-ca"))
	if err != nil {
		t.Fatal(err)
	}
	server, err := userCA.Issue(tlsca.Template{Name: "localhost", Hosts: []string{"localhost", "127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	files := pemFiles(t, server)
	metricsAddr := freeAddr(t)
	d := startTLSDoor(t, "--tls-cert", files[1], "--tls-key", files[3], "--metrics-listen", metricsAddr)
	// The certificate's end, as the metrics say; a renewal moves it.
	certEnd := func() float64 {
		return scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get("kiss_onion_tls_certificate_expiry_timestamp_seconds")
	}
	if got, want := certEnd(), float64(server.Cert.NotAfter.Unix()); got != want {
		t.Errorf("kiss_onion_tls_certificate_expiry_timestamp_seconds = %.0f, want %.0f", got, want)
	}
	if info, err := tlsca.LoadDoor(tlsca.Dir(d.stateDir)); err != nil || info.ServerFingerprint != "" {
		t.Errorf("door.toml with the user's certificate: %+v, %v; want no server fingerprint", info, err)
	}
	reader := d.addTLSClient(t, "laptop", "reader")
	b, err := clientauth.LoadBundle(reader)
	if err != nil || b.TLS == nil || b.TLS.ServerFingerprint != "" {
		t.Fatalf("bundle: %+v, %v", b.TLS, err)
	}
	userCAFile := filepath.Join(t.TempDir(), "user-ca.crt")
	if err := os.WriteFile(userCAFile, userCA.CertPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := curlDoor(t, userCAFile, d.url+"/nix-cache-info", bundleCert(reader)...); r.status != "200" || !strings.Contains(r.body, "StoreDir:") {
		t.Errorf("reader trusting the user's CA: %+v, want 200", r)
	}
	// The cache's own CA does not vouch for the user's certificate.
	if r := curlDoor(t, filepath.Join(reader, clientauth.BundleTLSCAFile), d.url+"/nix-cache-info", bundleCert(reader)...); r.exit == 0 {
		t.Errorf("curl trusted the user's certificate through the cache's CA: %+v", r)
	}

	key := newSigningKey(t, "tls-user-cert-1")
	src := newNix(t)
	top, closure := src.buildClosure(64)
	src.must("nix", "copy", "--to", "file://"+d.cacheDir+"?compression=zstd&secret-key="+key.secretFile, top)
	substitute := func(t *testing.T, caFile string) {
		t.Helper()
		// The gateway trusts the system's roots for a certificate the
		// user supplies; SSL_CERT_FILE makes caFile the only one.
		t.Setenv("SSL_CERT_FILE", caFile)
		gw := startTLSGateway(t, reader)
		dst := newNix(t, "substituters = "+gw.url, "trusted-public-keys = "+key.public, "require-sigs = true")
		dst.must("nix-store", "--realise", top)
		for _, p := range closure {
			sameTree(t, src, dst, p)
		}
	}
	t.Run("nix substitutes through a gateway trusting the user's CA", func(t *testing.T) {
		substitute(t, userCAFile)
	})

	t.Run("a renewed certificate is served with no restart", func(t *testing.T) {
		newCA, err := tlsca.LoadOrCreate(filepath.Join(t.TempDir(), "new-ca"))
		if err != nil {
			t.Fatal(err)
		}
		renewed, err := newCA.Issue(tlsca.Template{Name: "localhost", Hosts: []string{"localhost", "127.0.0.1"}, NotAfter: time.Now().Add(90 * 24 * time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		// As certbot renews: new files moved over the ones serve was given.
		for _, f := range []struct {
			path string
			data []byte
		}{{files[1], renewed.CertPEM}, {files[3], renewed.KeyPEM}} {
			if err := os.WriteFile(f.path+".new", f.data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(f.path+".new", f.path); err != nil {
				t.Fatal(err)
			}
		}
		newCAFile := filepath.Join(t.TempDir(), "new-ca.crt")
		if err := os.WriteFile(newCAFile, newCA.CertPEM(), 0o600); err != nil {
			t.Fatal(err)
		}
		waitReady(t, d.proc, "the renewed certificate served", 10*time.Second, func() bool {
			return curlDoor(t, newCAFile, d.url+"/nix-cache-info", bundleCert(reader)...).status == "200"
		})
		if r := curlDoor(t, userCAFile, d.url+"/nix-cache-info", bundleCert(reader)...); r.exit == 0 {
			t.Errorf("the old certificate still served after the renewal: %+v", r)
		}
		if !strings.Contains(d.out.String(), "tls server certificate renewed") {
			t.Error("serve's log does not say the certificate was renewed")
		}
		if got, want := certEnd(), float64(renewed.Cert.NotAfter.Unix()); got != want {
			t.Errorf("kiss_onion_tls_certificate_expiry_timestamp_seconds after the renewal = %.0f, want %.0f", got, want)
		}
		substitute(t, newCAFile)
	})
}
