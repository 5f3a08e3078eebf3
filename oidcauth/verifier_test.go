package oidcauth

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/kiss-onion/kiss-onion/internal/oidctest"
)

const audience = "https://cache.example"

func mustRules(t *testing.T, rules ...string) []Rule {
	t.Helper()
	var out []Rule
	for _, s := range rules {
		r, err := ParseRule(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func newVerifier(t *testing.T, iss *oidctest.Issuer, nameClaim string, keyRefresh time.Duration) *Verifier {
	t.Helper()
	v, err := New(context.Background(), Config{
		Issuer:     iss.URL,
		Audience:   audience,
		Writers:    mustRules(t, "repository=org/infra,ref=refs/heads/main"),
		Readers:    mustRules(t, "repository_owner=org"),
		NameClaim:  nameClaim,
		KeyRefresh: keyRefresh,
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// hs256 is a token signed with a shared secret, which an issuer's key
// set cannot vouch for.
func hs256(t *testing.T, claims map[string]any) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("0123456789abcdef0123456789abcdef")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := sig.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestVerify(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	other := oidctest.Start()
	defer other.Close()
	v := newVerifier(t, iss, "", 0)
	now := time.Now()
	unlisted := iss.NewKey(jose.ES256)
	impostor := iss.NewKey(jose.RS256)
	impostor.ID = iss.Key(jose.RS256).ID
	for _, tt := range []struct {
		name   string
		token  func() string
		writer bool
		reason Reason // empty: accepted
	}{
		{"RS256 writer", func() string { return iss.Token(jose.RS256, audience, nil) }, true, ""},
		{"ES256 writer", func() string { return iss.Token(jose.ES256, audience, nil) }, true, ""},
		{"reader rule when no writer rule matches", func() string {
			return iss.Token(jose.ES256, audience, map[string]any{"ref": "refs/heads/dev"})
		}, false, ""},
		{"one of several audiences", func() string {
			return iss.Token(jose.RS256, "", map[string]any{"aud": []string{"other", audience}})
		}, true, ""},
		{"no rule matches", func() string {
			return iss.Token(jose.RS256, audience, map[string]any{"repository": "else/where", "repository_owner": "else"})
		}, false, NoMatchingRule},
		{"a non-string claim matches no rule", func() string {
			return iss.Token(jose.RS256, audience, map[string]any{"repository_owner": 42, "ref": []string{"refs/heads/main"}})
		}, false, NoMatchingRule},
		{"expired", func() string {
			return iss.Token(jose.RS256, audience, map[string]any{"exp": now.Add(-time.Minute).Unix(), "iat": now.Add(-11 * time.Minute).Unix()})
		}, false, Expired},
		{"no expiry", func() string { return iss.Token(jose.ES256, audience, map[string]any{"exp": nil}) }, false, Expired},
		{"not yet valid", func() string {
			return iss.Token(jose.RS256, audience, map[string]any{"nbf": now.Add(time.Hour).Unix(), "exp": now.Add(2 * time.Hour).Unix()})
		}, false, NotYetValid},
		{"wrong audience", func() string { return iss.Token(jose.RS256, "https://other.example", nil) }, false, WrongAudience},
		{"wrong issuer claim", func() string {
			return iss.Token(jose.RS256, audience, map[string]any{"iss": other.URL})
		}, false, WrongIssuer},
		{"another issuer's token", func() string { return other.Token(jose.RS256, audience, nil) }, false, WrongIssuer},
		{"alg none", func() string { return oidctest.Unsigned(iss.Claims(audience)) }, false, Unsigned},
		{"HS256", func() string { return hs256(t, iss.Claims(audience)) }, false, UnsupportedAlgorithm},
		{"a key the issuer does not list", func() string { return iss.Sign(unlisted, iss.Claims(audience)) }, false, UnknownKey},
		{"a listed key id, another key", func() string { return iss.Sign(impostor, iss.Claims(audience)) }, false, BadSignature},
		{"a tampered payload", func() string {
			good := strings.Split(iss.Token(jose.ES256, audience, map[string]any{"repository": "org/other", "repository_owner": "else"}), ".")
			fake := strings.Split(iss.Token(jose.ES256, audience, nil), ".")
			return good[0] + "." + fake[1] + "." + good[2]
		}, false, BadSignature},
		{"not a JWT", func() string { return "not-a-token" }, false, Malformed},
		{"an encrypted JWT", func() string { return "a.b.c.d.e" }, false, Malformed},
		{"header not base64", func() string { return "!!.e30.c2ln" }, false, Malformed},
		{"too long", func() string { return strings.Repeat("a", maxToken+1) }, false, Malformed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tok := tt.token()
			g, err := v.Verify(context.Background(), tok)
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if g.Writer != tt.writer || g.Name != "repo:org/infra:ref:refs/heads/main" || g.Rule == "" {
					t.Errorf("grant %+v, want writer=%v", g, tt.writer)
				}
				return
			}
			var e *Error
			if !errors.As(err, &e) || e.Reason != tt.reason {
				t.Fatalf("got %+v (%v), want a refusal for %q", g, err, tt.reason)
			}
			msg := err.Error()
			t.Log(msg)
			if !strings.Contains(msg, string(tt.reason)) {
				t.Errorf("message %q does not name %q", msg, tt.reason)
			}
			for _, part := range append(strings.Split(tok, "."), tok) {
				if len(part) > 8 && strings.Contains(msg, part) {
					t.Errorf("message %q holds part of the token", msg)
				}
			}
		})
	}
}

func TestNameClaim(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	v := newVerifier(t, iss, "job_workflow_ref", 0)
	g, err := v.Verify(context.Background(), iss.Token(jose.RS256, audience, nil))
	if err != nil || g.Name != "org/infra/.github/workflows/push.yml@refs/heads/main" {
		t.Fatalf("grant %+v, %v", g, err)
	}
	g, err = v.Verify(context.Background(), iss.Token(jose.RS256, audience, map[string]any{"job_workflow_ref": nil}))
	if err != nil || g.Name != "repo:org/infra:ref:refs/heads/main" {
		t.Fatalf("without the claim: grant %+v, %v, want the sub", g, err)
	}
}

// TestKeyRotation: the issuer's keys are cached, fetched again when a
// token names a key id not seen, and a key the issuer stops listing is
// refused once the key set was fetched again; all without a new Verifier.
func TestKeyRotation(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	v := newVerifier(t, iss, "", -1)
	verify := func(tok string) error {
		_, err := v.Verify(context.Background(), tok)
		return err
	}
	old := iss.Key(jose.RS256)
	if err := verify(iss.Token(jose.RS256, audience, nil)); err != nil {
		t.Fatal(err)
	}
	fetches := iss.KeySetFetches()
	for range 3 {
		if err := verify(iss.Token(jose.RS256, audience, nil)); err != nil {
			t.Fatal(err)
		}
		if err := verify(iss.Token(jose.ES256, audience, nil)); err != nil {
			t.Fatal(err)
		}
	}
	if got := iss.KeySetFetches(); got != fetches {
		t.Errorf("key set fetched %d times more for tokens of known keys, want none", got-fetches)
	}
	iss.Rotate(jose.RS256)
	if err := verify(iss.Token(jose.RS256, audience, nil)); err != nil {
		t.Fatalf("a token by the new key, after the issuer lists it: %v", err)
	}
	if got := iss.KeySetFetches(); got != fetches+1 {
		t.Errorf("key set fetched %d times for a new key, want once", got-fetches)
	}
	var e *Error
	if err := verify(iss.Sign(old, iss.Claims(audience))); !errors.As(err, &e) || e.Reason != UnknownKey {
		t.Errorf("a token by the key the issuer dropped: %v, want %q", err, UnknownKey)
	}
}

// TestIssuerAway: an issuer that goes away fails only tokens whose key
// would have to be fetched.
func TestIssuerAway(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	v := newVerifier(t, iss, "", -1)
	if _, err := v.Verify(context.Background(), iss.Token(jose.ES256, audience, nil)); err != nil {
		t.Fatal(err)
	}
	iss.SetDown(true)
	if _, err := v.Verify(context.Background(), iss.Token(jose.ES256, audience, nil)); err != nil {
		t.Fatalf("a token by a cached key while the issuer is away: %v", err)
	}
	iss.Rotate(jose.ES256)
	var e *Error
	if _, err := v.Verify(context.Background(), iss.Token(jose.ES256, audience, nil)); !errors.As(err, &e) || e.Reason != KeysUnavailable {
		t.Fatalf("a token by a new key while the issuer is away: %v, want %q", err, KeysUnavailable)
	}
	iss.SetDown(false)
	// go-oidc signals the end of a key set fetch before it lets the next
	// one start, so a token in between gets the failed fetch's answer
	// again; the next one after it must go through.
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := v.Verify(context.Background(), iss.Token(jose.ES256, audience, nil))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the new key once the issuer is back: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestKeyFetchesSpaced: tokens naming key ids nobody lists do not make
// the cache ask the issuer once each.
func TestKeyFetchesSpaced(t *testing.T) {
	iss := oidctest.Start()
	defer iss.Close()
	v := newVerifier(t, iss, "", time.Hour)
	if _, err := v.Verify(context.Background(), iss.Token(jose.RS256, audience, nil)); err != nil {
		t.Fatal(err)
	}
	fetches := iss.KeySetFetches()
	if fetches != 1 {
		t.Errorf("key set fetched %d times by New and a first token, want once", fetches)
	}
	for range 5 {
		var e *Error
		if _, err := v.Verify(context.Background(), iss.Sign(iss.NewKey(jose.ES256), iss.Claims(audience))); !errors.As(err, &e) || e.Reason != UnknownKey {
			t.Fatalf("a token by an unlisted key: %v", err)
		}
	}
	if got := iss.KeySetFetches(); got != fetches {
		t.Errorf("tokens by unknown keys made %d fetches within the refresh interval, want none", got-fetches)
	}
	if _, err := v.Verify(context.Background(), iss.Token(jose.ES256, audience, nil)); err != nil {
		t.Fatalf("a token by a listed key after them: %v", err)
	}
}

func TestNewRefusesAnIssuerItCannotReach(t *testing.T) {
	iss := oidctest.Start()
	down := oidctest.Start()
	down.SetDown(true)
	defer down.Close()
	closed := iss.URL
	iss.Close()
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	rules := mustRules(t, "repository=org/infra")
	for _, tt := range []struct {
		name, issuer string
	}{
		{"nothing listening", closed},
		{"answers 503", down.URL},
		{"never answers", "http://" + silent.Addr().String()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(context.Background(), Config{Issuer: tt.issuer, Audience: audience, Writers: rules, Timeout: 500 * time.Millisecond})
			if err == nil || !strings.Contains(err.Error(), "discover issuer "+tt.issuer) {
				t.Fatalf("New = %v, want an error naming the issuer", err)
			}
		})
	}
	if _, err := New(context.Background(), Config{Issuer: down.URL, Audience: audience}); err == nil || !strings.Contains(err.Error(), "no rule") {
		t.Errorf("New without rules = %v", err)
	}
}

func TestTokenFrom(t *testing.T) {
	for _, tt := range []struct {
		name, header, want string
	}{
		{"bearer", "Bearer abc.def.ghi", "abc.def.ghi"},
		{"bearer, any case", "bearer abc.def.ghi", "abc.def.ghi"},
		{"basic password, any user", "Basic dXNlcjphYmMuZGVmLmdoaQ==", "abc.def.ghi"},
		{"basic with no password", "Basic dXNlcjo=", ""},
		{"empty bearer", "Bearer ", ""},
		{"another scheme", "Digest abc", ""},
		{"none", "", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r, _ := http.NewRequest("GET", "http://x/nix-cache-info", nil)
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			got, ok := TokenFrom(r)
			if got != tt.want || ok != (tt.want != "") {
				t.Errorf("TokenFrom = %q, %v; want %q", got, ok, tt.want)
			}
		})
	}
}
