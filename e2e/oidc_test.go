package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/kiss-onion/kiss-onion/internal/oidctest"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

const oidcAudience = "https://cache.e2e.example"

// oidcServer is a `kiss-onion serve --tor off` whose only door is
// --listen-oidc, taking tokens of iss.
type oidcServer struct {
	*proc
	cacheDir, stateDir, url string
}

func startOIDCServer(t *testing.T, iss *oidctest.Issuer, extra ...string) *oidcServer {
	t.Helper()
	dir := t.TempDir()
	s := &oidcServer{cacheDir: filepath.Join(dir, "cache"), stateDir: filepath.Join(dir, "state")}
	addr := freeAddr(t)
	s.url = "http://" + addr
	args := append([]string{"serve", "--tor", "off", "--cache-dir", s.cacheDir, "--state-dir", s.stateDir,
		"--listen-oidc", addr, "--oidc-issuer", iss.URL, "--oidc-audience", oidcAudience,
		"--oidc-writer", "repository=org/infra,ref=refs/heads/main", "--oidc-reader", "repository_owner=org",
		"--log-level", "debug"}, extra...)
	s.proc = start(t, args...)
	// Up once it answers at all: without a token, with a 401.
	waitReady(t, s.proc, "serving "+s.url, 30*time.Second, func() bool { return answers(s.url+"/nix-cache-info", false) })
	return s
}

// writeNetrc writes a netrc-file giving token as the password for host.
func writeNetrc(t *testing.T, url, token string) string {
	t.Helper()
	host := strings.Split(strings.TrimPrefix(url, "http://"), ":")[0]
	p := filepath.Join(t.TempDir(), "netrc")
	if err := os.WriteFile(p, []byte("machine "+host+" login ci password "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// curlStatus runs curl with args and returns the HTTP status and body.
func curlStatus(t *testing.T, args ...string) (string, string) {
	t.Helper()
	body := filepath.Join(t.TempDir(), "body")
	out, err := exec.Command("curl", append([]string{"-sS", "-o", body, "-w", "%{http_code}"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %v: %v\n%s", args, err, out)
	}
	b, _ := os.ReadFile(body)
	return string(out), string(b)
}

// TestOIDCDoor: through --listen-oidc, a writer token pushes a signed
// closure with the real nix copy --to and a netrc-file; a reader token
// substitutes it into a fresh store that requires signatures and cannot
// upload; every bad token is refused with a 401 naming why, and serve's
// log holds no token.
func TestOIDCDoor(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	other := oidctest.Start()
	defer other.Close()
	key := newSigningKey(t, "oidc-e2e-1")
	srv := startOIDCServer(t, iss, "--trusted-writer-key", key.public)
	var tokens []string
	mint := func(tok string) string { tokens = append(tokens, tok); return tok }
	writer := mint(iss.Token(jose.RS256, oidcAudience, nil))
	reader := mint(iss.Token(jose.ES256, oidcAudience, map[string]any{"ref": "refs/heads/dev"}))
	if len(writer) < 1000 {
		t.Fatalf("the writer token has %d bytes: want one the size of GitHub's", len(writer))
	}

	src := newNix(t, "netrc-file = "+writeNetrc(t, srv.url, writer))
	top, closure := src.buildClosure(64)
	src.must("nix", "copy", "--to", srv.url+"?compression=zstd&secret-key="+key.secretFile, top)
	for _, p := range closure {
		if _, err := visibleFile(t, srv.cacheDir, hashOf(p)+".narinfo"); err != nil {
			t.Fatalf("no narinfo for %s after nix copy with a writer token: %v", p, err)
		}
	}

	sub := newNix(t, "substituters = "+srv.url, "trusted-public-keys = "+key.public, "require-sigs = true",
		"netrc-file = "+writeNetrc(t, srv.url, reader))
	sub.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, src, sub, p)
	}
	// Without a token, Nix 2.8 reads the 401 as "not there".
	bare := newNix(t, "substituters = "+srv.url, "trusted-public-keys = "+key.public)
	if out, err := bare.run(nil, "nix-store", "--realise", top); err == nil || bare.hasPath(top) {
		t.Fatalf("substituted without a token:\n%s", out)
	}

	t.Run("a reader cannot upload", func(t *testing.T) {
		nar := filepath.Join(t.TempDir(), "x.nar")
		os.WriteFile(nar, []byte("not a nar"), 0o644)
		const path = "/nar/1111111111111111111111111111111111111111111111111111.nar"
		for _, auth := range [][]string{{"-u", "ci:" + reader}, {"-H", "Authorization: Bearer " + reader}} {
			code, body := curlStatus(t, append(auth, "-T", nar, srv.url+path)...)
			if code != "405" || !strings.Contains(body, "reader") {
				t.Errorf("PUT with a reader token: %s %q, want 405", code, body)
			}
		}
		if _, err := os.Stat(filepath.Join(srv.cacheDir, path)); err == nil {
			t.Error("a reader's PUT was stored")
		}
		other := newNix(t, "netrc-file = "+writeNetrc(t, srv.url, reader))
		top2, _ := other.buildClosure(8)
		if out, err := other.run(nil, "nix", "copy", "--to", srv.url+"?compression=zstd&secret-key="+key.secretFile, top2); err == nil {
			t.Errorf("nix copy --to with a reader token succeeded:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(srv.cacheDir, hashOf(top2)+".narinfo")); err == nil {
			t.Error("a reader's nix copy stored a narinfo")
		}
	})

	now := time.Now()
	unlisted := iss.NewKey(jose.RS256)
	for _, tt := range []struct {
		name, token, reason string
	}{
		{"expired", iss.Token(jose.RS256, oidcAudience, map[string]any{"exp": now.Add(-time.Minute).Unix(), "iat": now.Add(-11 * time.Minute).Unix()}), "expired"},
		{"wrong audience", iss.Token(jose.ES256, "https://another.example", nil), "wrong audience"},
		{"wrong issuer", other.Token(jose.RS256, oidcAudience, nil), "wrong issuer"},
		{"alg none", oidctest.Unsigned(iss.Claims(oidcAudience)), "unsigned"},
		{"a key the issuer does not list", iss.Sign(unlisted, iss.Claims(oidcAudience)), "unknown key"},
		{"claims matching no rule", iss.Token(jose.RS256, oidcAudience, map[string]any{"repository": "else/where", "repository_owner": "else"}), "no matching rule"},
		{"no token", "", "no token"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			mint(tt.token)
			ways := map[string][]string{"no credentials": nil}
			if tt.token != "" {
				ways = map[string][]string{
					"netrc-file": {"--netrc-file", writeNetrc(t, srv.url, tt.token)},
					"bearer":     {"-H", "Authorization: Bearer " + tt.token},
				}
			}
			for way, args := range ways {
				code, body := curlStatus(t, append(args, srv.url+"/nix-cache-info")...)
				if code != "401" || !strings.Contains(body, tt.reason) {
					t.Errorf("%s: %s %q, want 401 naming %q", way, code, body, tt.reason)
				}
				if tt.token != "" && strings.Contains(body, tt.token) {
					t.Errorf("%s: the 401 holds the token", way)
				}
			}
		})
	}

	log := srv.out.String()
	t.Logf("token of %d bytes; serve log of %d bytes", len(writer), len(log))
	if testing.Verbose() {
		t.Log(log)
	}
	if !strings.Contains(log, "no matching rule") || !strings.Contains(log, `"client":`) && !strings.Contains(log, "client=") {
		t.Errorf("serve's log does not show the refusals and the clients let in:\n%s", log)
	}
	for _, tok := range tokens {
		for _, part := range strings.Split(tok, ".") {
			if len(part) > 16 && strings.Contains(log, part) {
				t.Fatalf("serve's log holds part of a token:\n%s", log)
			}
		}
	}
}

// TestOIDCIssuerUnreachableAtStart: serve refuses to start when it cannot
// reach the issuer, and says which.
func TestOIDCIssuerUnreachableAtStart(t *testing.T) {
	iss := oidctest.Start()
	url := iss.URL
	iss.Close()
	dir := t.TempDir()
	out, code := runKissOnion(t, "serve", "--tor", "off", "--cache-dir", filepath.Join(dir, "cache"), "--state-dir", filepath.Join(dir, "state"),
		"--listen-oidc", freeAddr(t), "--oidc-issuer", url, "--oidc-audience", oidcAudience, "--oidc-writer", "repository=org/infra")
	if code != 1 || !strings.Contains(out, "--oidc-issuer: discover issuer "+url) {
		t.Fatalf("exit %d, want 1 and the issuer named:\n%s", code, out)
	}
}

// TestOIDCDoorNix218: Nix 2.18's parallel uploads and its substitution
// send the netrc-file's token as well.
func TestOIDCDoorNix218(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	key := newSigningKey(t, "oidc-e2e-1")
	srv := startOIDCServer(t, iss, "--trusted-writer-key", key.public)
	writer := iss.Token(jose.ES256, oidcAudience, nil)
	reader := iss.Token(jose.RS256, oidcAudience, map[string]any{"ref": "refs/heads/dev"})

	src := newModernNix(t, "netrc-file = "+writeNetrc(t, srv.url, writer))
	top, closure := src.buildWideClosure(8)
	src.must("nix", "copy", "--to", srv.url+"?compression=zstd&secret-key="+key.secretFile, top)
	dst := newModernNix(t, "substituters = "+srv.url, "trusted-public-keys = "+key.public, "require-sigs = true",
		"netrc-file = "+writeNetrc(t, srv.url, reader))
	dst.must("nix-store", "--realise", top)
	dst.must("nix", "store", "verify", "--recursive", top)
	for _, p := range closure {
		sameTree(t, src, dst, p)
	}
	log := srv.out.String()
	for _, tok := range []string{writer, reader} {
		if strings.Contains(log, strings.Split(tok, ".")[2]) {
			t.Fatalf("serve's log holds a token:\n%s", log)
		}
	}
}

// TestOIDCOnTheTLSDoor: the TLS door takes tokens from clients that show
// no certificate. Nix 2.8 pushes over https with a writer token from its
// netrc-file and substitutes with a reader token, trusting the cache's CA
// (NIX_SSL_CERT_FILE); a certificate still decides when there is one, and a
// request with neither is refused.
func TestOIDCOnTheTLSDoor(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	key := newSigningKey(t, "oidc-tls-e2e-1")
	door := startTLSDoor(t, "--oidc-issuer", iss.URL, "--oidc-audience", oidcAudience,
		"--oidc-writer", "repository=org/infra,ref=refs/heads/main", "--oidc-reader", "repository_owner=org",
		"--trusted-writer-key", key.public)
	ca := filepath.Join(tlsca.Dir(door.stateDir), tlsca.CACertFile)
	writer := iss.Token(jose.ES256, oidcAudience, nil)
	reader := iss.Token(jose.RS256, oidcAudience, map[string]any{"ref": "refs/heads/dev"})
	netrc := func(token string) string {
		return writeNetrc(t, strings.Replace(door.url, "https://", "http://", 1), token)
	}

	// Nix 2.8 takes the CA from the environment (no ssl-cert-file setting).
	src := newNix(t, "netrc-file = "+netrc(writer))
	src.env0 = []string{"NIX_SSL_CERT_FILE=" + ca}
	top, closure := src.buildClosure(16)
	src.must("nix", "copy", "--to", door.url+"?compression=zstd&secret-key="+key.secretFile, top)
	sub := newNix(t, "substituters = "+door.url, "trusted-public-keys = "+key.public, "require-sigs = true",
		"netrc-file = "+netrc(reader))
	sub.env0 = src.env0
	sub.must("nix-store", "--realise", top)
	for _, p := range closure {
		sameTree(t, src, sub, p)
	}

	for _, tt := range []struct {
		name   string
		args   []string
		status string
	}{
		{"neither a certificate nor a token", nil, "401"},
		{"a reader token", []string{"-H", "Authorization: Bearer " + reader}, "200"},
		{"a reader token may not upload", []string{"-H", "Authorization: Bearer " + reader, "-X", "PUT", "--data-binary", "x"}, "405"},
		{"a token for another audience", []string{"-H", "Authorization: Bearer " + iss.Token(jose.RS256, "https://else.example", nil)}, "401"},
		{"a reader certificate over a writer token", append(bundleCert(door.addTLSClient(t, "laptop", "reader")),
			"-H", "Authorization: Bearer "+writer, "-X", "PUT", "--data-binary", "x"), "405"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := "/nix-cache-info"
			if slices.Contains(tt.args, "PUT") {
				path = "/gcroots/oidc-tls"
			}
			if r := curlDoor(t, ca, door.url+path, tt.args...); r.status != tt.status {
				t.Errorf("%s: %s %q (curl exit %d), want %s", tt.name, r.status, r.body, r.exit, tt.status)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(door.cacheDir, "gcroots", "oidc-tls")); err == nil {
		t.Error("a refused PUT wrote a marker")
	}
}

// TestOIDCDeploy: with a writer token in a netrc file, publish --cache
// pushes a system through the OIDC door and writes its signed marker,
// and with-lock writes a marker; with a reader token, update --cache
// switches a host to it. Without a token, or with a reader's, publish
// fails saying why and writes no marker.
func TestOIDCDeploy(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	key := newSigningKey(t, "oidc-deploy-1")
	publisher := newSigningKey(t, "fleet-1")
	srv := startOIDCServer(t, iss, "--trusted-writer-key", key.public)
	writerToken := iss.Token(jose.RS256, oidcAudience, nil)
	writer := writeNetrc(t, srv.url, writerToken)
	reader := writeNetrc(t, srv.url, iss.Token(jose.ES256, oidcAudience, map[string]any{"ref": "refs/heads/dev"}))
	src, host := newNix(t), newNix(t)
	work := t.TempDir()
	activations, profile := filepath.Join(work, "activations"), filepath.Join(work, "profiles", "system")
	sys := buildSystem(t, src, activations, profile)
	marker := filepath.Join(srv.cacheDir, "gcroots", "web1")
	publish := func(extra ...string) (string, int) {
		args := append([]string{"publish", "--cache", srv.url, "--store", src.root, "--cache-key", key.secretFile, "--signing-key", publisher.secretFile}, extra...)
		return kissOnion(t, src, append(args, "web1", sys)...)
	}

	for _, tt := range []struct {
		name  string
		extra []string
		says  []string
	}{
		{"no token", nil, []string{"Unauthorized", "no token", "hint: the cache asks for credentials: give --netrc-file"}},
		{"a reader's token", []string{"--netrc-file", reader}, []string{"is a reader", "the marker was not written"}},
	} {
		t.Run("publish with "+tt.name+" is refused", func(t *testing.T) {
			out, code := publish(tt.extra...)
			for _, want := range tt.says {
				if code != 1 || !strings.Contains(out, want) {
					t.Errorf("publish: exit %d, want 1 saying %q:\n%s", code, want, out)
				}
			}
			if _, err := os.Stat(marker); err == nil {
				t.Error("a marker was written")
			}
		})
	}

	t.Run("publish with a writer's token", func(t *testing.T) {
		out, code := publish("--netrc-file", writer)
		if code != 0 {
			t.Fatalf("publish: exit %d\n%s", code, out)
		}
		if strings.Contains(out, writerToken) {
			t.Error("publish's output holds the token")
		}
		data, err := os.ReadFile(marker)
		if err != nil || !strings.Contains(string(data), sys) {
			t.Fatalf("marker after publish: %q, %v; want it to name %s", data, err, sys)
		}
		if _, err := visibleFile(t, srv.cacheDir, hashOf(sys)+".narinfo"); err != nil {
			t.Errorf("the system was not pushed: %v", err)
		}
	})

	t.Run("update with a reader's token", func(t *testing.T) {
		mustKissOnion(t, host, "update", "switch", "--cache", srv.url, "--netrc-file", reader, "--marker", "web1",
			"--profile", profile, "--state-dir", filepath.Join(work, "update-state"), "--store", host.root,
			"--nix-option", "trusted-public-keys="+key.public, "--publisher-key", publisher.public)
		if link, _ := os.Readlink(profile); !strings.HasPrefix(link, "system-") {
			t.Fatalf("profile %s -> %q after update, want a generation link", profile, link)
		}
		if got := profileTarget(profile); got != sys {
			t.Errorf("profile at %q, want %s", got, sys)
		}
		sameTree(t, src, host, sys)
	})

	t.Run("status lists the door", func(t *testing.T) {
		out, code := runKissOnion(t, "status", "--state-dir", srv.stateDir, "--cache-dir", srv.cacheDir)
		if code != 0 || !strings.Contains(out, "oidc   "+srv.url) {
			t.Errorf("status: exit %d, want the oidc door at %s:\n%s", code, srv.url, out)
		}
	})

	t.Run("with-lock with a writer's token", func(t *testing.T) {
		mustKissOnion(t, src, "with-lock", "--netrc-file", writer, srv.url+"/gcroots/tools", sys, "--", "true")
		if data, err := os.ReadFile(filepath.Join(srv.cacheDir, "gcroots", "tools")); err != nil || !strings.Contains(string(data), sys) {
			t.Errorf("marker tools: %q, %v; want it to name %s", data, err, sys)
		}
		out, code := kissOnion(t, src, "with-lock", "--netrc-file", reader, srv.url+"/gcroots/other", sys, "--", "true")
		if code == 0 || !strings.Contains(out, "reader") {
			t.Errorf("with-lock with a reader's token: exit %d, want a refusal naming the reader:\n%s", code, out)
		}
	})
}
