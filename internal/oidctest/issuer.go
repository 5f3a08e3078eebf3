// Package oidctest is an OpenID Connect issuer for tests: a real HTTP
// server on 127.0.0.1 serving a discovery document and a key set, and
// minting tokens signed with RS256 or ES256 keys it lists, or does not.
// It is not an identity provider: it has no login, no token endpoint.
package oidctest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// Key is a signing key of the issuer, listed in its key set or not.
type Key struct {
	ID  string
	Alg jose.SignatureAlgorithm
	key crypto.Signer
}

// Issuer is a running test issuer.
type Issuer struct {
	// URL is the issuer's URL, as in its tokens' iss claim.
	URL string
	srv *httptest.Server

	mu          sync.Mutex
	listed      []*Key
	down        bool
	jwksFetches int
	n           int
}

// Start starts an issuer listing one RS256 and one ES256 key.
func Start() *Issuer {
	i := &Issuer{}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", i.discovery)
	mux.HandleFunc("/jwks", i.jwks)
	i.srv = httptest.NewServer(mux)
	i.URL = i.srv.URL
	i.List(i.NewKey(jose.RS256))
	i.List(i.NewKey(jose.ES256))
	return i
}

// Close stops the issuer's server.
func (i *Issuer) Close() { i.srv.Close() }

// NewKey makes a key, RS256 or ES256, that the issuer does not list yet.
func (i *Issuer) NewKey(alg jose.SignatureAlgorithm) *Key {
	i.mu.Lock()
	i.n++
	id := fmt.Sprintf("key-%d", i.n)
	i.mu.Unlock()
	var signer crypto.Signer
	var err error
	switch alg {
	case jose.RS256:
		signer, err = rsa.GenerateKey(rand.Reader, 2048)
	case jose.ES256:
		signer, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		panic("oidctest: no key for " + string(alg))
	}
	if err != nil {
		panic(err)
	}
	return &Key{ID: id, Alg: alg, key: signer}
}

// List adds k to the key set the issuer serves.
func (i *Issuer) List(k *Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.listed = append(i.listed, k)
}

// Unlist takes k out of the key set.
func (i *Issuer) Unlist(k *Key) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.listed = slices.DeleteFunc(i.listed, func(l *Key) bool { return l == k })
}

// Rotate lists a new key of alg in place of all listed keys of alg, and
// returns it.
func (i *Issuer) Rotate(alg jose.SignatureAlgorithm) *Key {
	k := i.NewKey(alg)
	i.mu.Lock()
	defer i.mu.Unlock()
	i.listed = append(slices.DeleteFunc(i.listed, func(l *Key) bool { return l.Alg == alg }), k)
	return k
}

// Key returns the listed key of alg last listed.
func (i *Issuer) Key(alg jose.SignatureAlgorithm) *Key {
	i.mu.Lock()
	defer i.mu.Unlock()
	for j := len(i.listed) - 1; j >= 0; j-- {
		if i.listed[j].Alg == alg {
			return i.listed[j]
		}
	}
	panic("oidctest: no listed key for " + string(alg))
}

// SetDown makes the issuer answer 503 to everything (or not).
func (i *Issuer) SetDown(down bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.down = down
}

// KeySetFetches is how many times the key set was served.
func (i *Issuer) KeySetFetches() int {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.jwksFetches
}

func (i *Issuer) isDown(w http.ResponseWriter) bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.down {
		http.Error(w, "issuer down for the test", http.StatusServiceUnavailable)
	}
	return i.down
}

func (i *Issuer) discovery(w http.ResponseWriter, r *http.Request) {
	if i.isDown(w) {
		return
	}
	writeJSON(w, map[string]any{
		"issuer":                                i.URL,
		"jwks_uri":                              i.URL + "/jwks",
		"response_types_supported":              []string{"id_token"},
		"subject_types_supported":               []string{"public"},
		"id_token_signing_alg_values_supported": []string{"RS256", "ES256"},
		"claims_supported":                      []string{"sub", "aud", "exp", "iat", "iss", "nbf", "repository", "ref"},
	})
}

func (i *Issuer) jwks(w http.ResponseWriter, r *http.Request) {
	if i.isDown(w) {
		return
	}
	i.mu.Lock()
	i.jwksFetches++
	var set jose.JSONWebKeySet
	for _, k := range i.listed {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.key.Public(), KeyID: k.ID, Algorithm: string(k.Alg), Use: "sig"})
	}
	i.mu.Unlock()
	writeJSON(w, set)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

// Claims returns the claims of a token that is valid now for aud, from
// this issuer, much like those GitHub Actions mints for a push to main of
// org/infra. Tests change them to make a token wrong.
func (i *Issuer) Claims(aud string) map[string]any {
	now := time.Now()
	return map[string]any{
		"iss":                   i.URL,
		"aud":                   aud,
		"sub":                   "repo:org/infra:ref:refs/heads/main",
		"iat":                   now.Unix(),
		"nbf":                   now.Add(-5 * time.Second).Unix(),
		"exp":                   now.Add(10 * time.Minute).Unix(),
		"jti":                   fmt.Sprintf("%x", now.UnixNano()),
		"repository":            "org/infra",
		"repository_owner":      "org",
		"repository_id":         "123456789",
		"repository_visibility": "private",
		"ref":                   "refs/heads/main",
		"ref_type":              "branch",
		"sha":                   "0123456789abcdef0123456789abcdef01234567",
		"workflow":              "push",
		"job_workflow_ref":      "org/infra/.github/workflows/push.yml@refs/heads/main",
		"event_name":            "push",
		"actor":                 "someone",
		"run_id":                "9876543210",
		"run_attempt":           "1",
		"runner_environment":    "github-hosted",
	}
}

// Sign returns claims as a compact JWT signed by k, with k's key id.
func (i *Issuer) Sign(k *Key, claims map[string]any) string {
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.Alg, Key: jose.JSONWebKey{Key: k.key, KeyID: k.ID}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		panic(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		panic(err)
	}
	sig, err := signer.Sign(payload)
	if err != nil {
		panic(err)
	}
	s, err := sig.CompactSerialize()
	if err != nil {
		panic(err)
	}
	return s
}

// Token returns a valid token for aud signed by the listed key of alg,
// with extra claims set over the defaults (a nil value deletes one).
func (i *Issuer) Token(alg jose.SignatureAlgorithm, aud string, extra map[string]any) string {
	c := i.Claims(aud)
	for k, v := range extra {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	return i.Sign(i.Key(alg), c)
}

// Unsigned returns claims as a JWT with alg "none" and no signature.
func Unsigned(claims map[string]any) string {
	enc := base64.RawURLEncoding
	payload, err := json.Marshal(claims)
	if err != nil {
		panic(err)
	}
	return enc.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + enc.EncodeToString(payload) + "."
}
