package oidcauth

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"github.com/sirupsen/logrus"
)

// Door is the name of this kind of credentials in an identity.
const Door = "oidc"

// Algorithms are the signature algorithms a token may be signed with:
// the asymmetric ones OpenID Connect issuers use. HMAC (the issuer's
// secret would be the verifier's too) and "none" are refused.
var Algorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

// maxToken bounds the token read from a request; real ones are a few KiB.
const maxToken = 16 << 10

// Config says which tokens a Verifier takes.
type Config struct {
	// Issuer is the issuer's URL, as in its tokens' iss claim; its
	// discovery document is at Issuer/.well-known/openid-configuration.
	Issuer string
	// Audience must be one of a token's aud values.
	Audience string
	// Writers and Readers map claims to roles; writer rules are tried
	// first, and a token no rule matches is refused.
	Writers, Readers []Rule
	// NameClaim is the string claim that names a client in logs ("sub"
	// when empty; sub too when the token lacks it).
	NameClaim string
	// Timeout bounds each request to the issuer (10s when zero).
	Timeout time.Duration
	// KeyRefresh is the least time between two fetches of the issuer's
	// key set, which tokens naming an unknown key id cause (10s when
	// zero, none when negative).
	KeyRefresh time.Duration
	// Transport carries the requests to the issuer
	// (http.DefaultTransport when nil).
	Transport http.RoundTripper
	// Log tells when the issuer's key set changes or cannot be fetched
	// (logrus's standard logger when nil).
	Log *logrus.Entry
}

// Grant is what a token proved: who, and whether it may write.
type Grant struct {
	// Name is the NameClaim of the token.
	Name string
	// Writer is set when a writer rule matched, else a reader rule did.
	Writer bool
	// Rule is the rule that matched, as written.
	Rule string
}

// Verifier checks tokens of one issuer. It is safe for concurrent use.
type Verifier struct {
	cfg      Config
	verifier *oidc.IDTokenVerifier
	keys     *keyWatch
}

// New reaches the issuer's discovery document and key set, within
// cfg.Timeout each, and returns a Verifier. Later, the issuer is reached
// only to fetch its keys again when a token names a key id it has not
// seen: an issuer away then fails only tokens signed by a new key.
func New(ctx context.Context, cfg Config) (*Verifier, error) {
	if cfg.Issuer == "" || cfg.Audience == "" {
		return nil, errors.New("an issuer and an audience are needed")
	}
	if len(cfg.Writers)+len(cfg.Readers) == 0 {
		return nil, errors.New("no rule: give at least one writer or reader rule, or no token would be let in")
	}
	if cfg.NameClaim == "" {
		cfg.NameClaim = "sub"
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	base := cfg.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	if cfg.KeyRefresh == 0 {
		cfg.KeyRefresh = 10 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	keys := &keyWatch{base: base, minInterval: cfg.KeyRefresh, log: cfg.Log}
	client := &http.Client{Transport: keys, Timeout: cfg.Timeout}
	dctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	provider, err := oidc.NewProvider(oidc.ClientContext(dctx, client), cfg.Issuer)
	if err != nil {
		return nil, fmt.Errorf("discover issuer %s: %w", cfg.Issuer, err)
	}
	var meta struct {
		JWKS string `json:"jwks_uri"`
	}
	if err := provider.Claims(&meta); err != nil || meta.JWKS == "" {
		return nil, fmt.Errorf("discover issuer %s: its discovery document names no jwks_uri", cfg.Issuer)
	}
	u, err := url.Parse(meta.JWKS)
	if err != nil {
		return nil, fmt.Errorf("discover issuer %s: jwks_uri %q: %w", cfg.Issuer, meta.JWKS, err)
	}
	// As the requests go-oidc makes for it will print it.
	keys.jwksURL = u.String()
	// One look at the key set now, so that a wrong jwks_uri shows at
	// start rather than at the first token.
	if err := fetchOnce(dctx, client, meta.JWKS); err != nil {
		return nil, fmt.Errorf("fetch the keys of issuer %s: %w", cfg.Issuer, err)
	}
	// The key set's context carries the client (with its timeout) and is
	// kept for later fetches, which go-oidc does not cancel.
	remote := oidc.NewRemoteKeySet(oidc.ClientContext(context.Background(), client), meta.JWKS)
	v := oidc.NewVerifier(cfg.Issuer, watchedKeySet{remote}, &oidc.Config{
		ClientID:             cfg.Audience,
		SupportedSigningAlgs: Algorithms,
	})
	return &Verifier{cfg: cfg, verifier: v, keys: keys}, nil
}

// watchedKeySet is go-oidc's remote key set, telling Verify whether the
// signature held.
type watchedKeySet struct{ remote *oidc.RemoteKeySet }

func (w watchedKeySet) VerifySignature(ctx context.Context, jwt string) ([]byte, error) {
	payload, err := w.remote.VerifySignature(ctx, jwt)
	if o, ok := ctx.Value(sigOutcomeKey{}).(*sigOutcome); ok {
		o.checked, o.err = true, err
	}
	return payload, err
}

func fetchOnce(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %s", url, resp.Status)
	}
	return nil
}

// TokenFrom returns the token a request carries: an "Authorization:
// Bearer" token, or the password of basic auth with any user name.
func TokenFrom(r *http.Request) (string, bool) {
	h := r.Header.Get("Authorization")
	scheme, rest, _ := strings.Cut(h, " ")
	if strings.EqualFold(scheme, "Bearer") {
		tok := strings.TrimSpace(rest)
		return tok, tok != ""
	}
	if _, pass, ok := r.BasicAuth(); ok && pass != "" {
		return pass, true
	}
	return "", false
}

// Authenticate verifies the token r carries.
func (v *Verifier) Authenticate(r *http.Request) (Grant, error) {
	tok, ok := TokenFrom(r)
	if !ok {
		return Grant{}, refuse(NoToken, "send it as Authorization: Bearer TOKEN, or as the password of basic auth (a netrc-file line)")
	}
	return v.Verify(r.Context(), tok)
}

// header and claims are the parts of a token read before it is verified,
// to refuse what is plainly wrong without reaching the issuer, and to
// name the reason when go-oidc refuses it.
type header struct {
	Alg string `json:"alg"`
	Kid string `json:"kid"`
}

type unverified struct {
	Iss string          `json:"iss"`
	Aud json.RawMessage `json:"aud"`
	Exp *float64        `json:"exp"`
	Nbf *float64        `json:"nbf"`
}

// Verify checks a token and maps its claims to a grant.
func (v *Verifier) Verify(ctx context.Context, token string) (Grant, error) {
	h, c, err := peek(token)
	if err != nil {
		return Grant{}, err
	}
	if c.Iss != v.cfg.Issuer {
		return Grant{}, refuse(WrongIssuer, "issued by %s, this cache takes tokens of %q", short(c.Iss), v.cfg.Issuer)
	}
	sig := &sigOutcome{}
	idt, err := v.verifier.Verify(context.WithValue(ctx, sigOutcomeKey{}, sig), token)
	if err != nil {
		return Grant{}, v.why(err, h, c, sig)
	}
	var claims map[string]any
	if err := idt.Claims(&claims); err != nil {
		return Grant{}, refuse(Malformed, "its claims are not a JSON object")
	}
	name, _ := claims[v.cfg.NameClaim].(string)
	if name == "" {
		name = idt.Subject
	}
	for _, set := range []struct {
		rules  []Rule
		writer bool
	}{{v.cfg.Writers, true}, {v.cfg.Readers, false}} {
		for _, r := range set.rules {
			if r.Match(claims) {
				return Grant{Name: name, Writer: set.writer, Rule: r.String()}, nil
			}
		}
	}
	return Grant{}, refuse(NoMatchingRule, "no writer or reader rule matches the claims of %s", short(name))
}

// peek reads a token's header and claims without verifying them.
func peek(token string) (header, unverified, error) {
	var h header
	var c unverified
	if len(token) > maxToken {
		return h, c, refuse(Malformed, "longer than %d bytes", maxToken)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return h, c, refuse(Malformed, "not a signed JWT (three base64url parts joined by dots)")
	}
	hb, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(hb, &h) != nil {
		return h, c, refuse(Malformed, "its header is not base64url JSON")
	}
	if strings.EqualFold(h.Alg, "none") || parts[2] == "" {
		return h, c, refuse(Unsigned, "alg %s: a token must be signed by the issuer", short(h.Alg))
	}
	if !slices.Contains(Algorithms, h.Alg) {
		return h, c, refuse(UnsupportedAlgorithm, "alg %s; this cache takes %s", short(h.Alg), strings.Join(Algorithms, ", "))
	}
	cb, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || json.Unmarshal(cb, &c) != nil {
		return h, c, refuse(Malformed, "its claims are not base64url JSON")
	}
	return h, c, nil
}

// sigOutcome records whether go-oidc's key set verified the signature:
// go-oidc checks it before the claims, so a refusal after a good
// signature is about the claims.
type sigOutcome struct {
	checked bool
	err     error
}

type sigOutcomeKey struct{}

// why turns go-oidc's refusal into one naming its reason.
func (v *Verifier) why(err error, h header, c unverified, sig *sigOutcome) error {
	if !sig.checked {
		return refuse(Malformed, "not a compact JWS with one signature")
	}
	if sig.err != nil {
		known, lastErr := v.keys.state(h.Kid)
		switch {
		case lastErr != nil:
			return refuse(KeysUnavailable, "key id %s is not among the keys known, and the issuer's key set could not be fetched", short(h.Kid))
		case !known:
			return refuse(UnknownKey, "the issuer does not list key id %s", short(h.Kid))
		default:
			return refuse(BadSignature, "the signature does not verify with key %s", short(h.Kid))
		}
	}
	var expired *oidc.TokenExpiredError
	if errors.As(err, &expired) {
		if c.Exp == nil {
			return refuse(Expired, "it has no exp claim")
		}
		return refuse(Expired, "it expired at %s", time.Unix(int64(*c.Exp), 0).UTC().Format(time.RFC3339))
	}
	if aud := audiences(c.Aud); !slices.Contains(aud, v.cfg.Audience) {
		return refuse(WrongAudience, "its audience is %s, this cache is %q", short(strings.Join(aud, ",")), v.cfg.Audience)
	}
	if c.Nbf != nil && time.Unix(int64(*c.Nbf), 0).After(time.Now()) {
		return refuse(NotYetValid, "it is valid from %s", time.Unix(int64(*c.Nbf), 0).UTC().Format(time.RFC3339))
	}
	return refuse(Malformed, "its claims do not have the types a token's claims have")
}

// audiences reads aud, a string or a list of strings.
func audiences(raw json.RawMessage) []string {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}
	}
	var many []string
	json.Unmarshal(raw, &many)
	return many
}
