package oidcauth

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
)

// keyWatch sits in the HTTP client go-oidc fetches the issuer's key set
// with, and remembers which key ids the last fetch listed and whether it
// failed. go-oidc's refusal of a signature does not say whether the key
// was unknown, the signature wrong or the issuer away; this tells them
// apart. It decides nothing: go-oidc's key set does the fetching,
// caching and verifying.
type keyWatch struct {
	base    http.RoundTripper
	jwksURL string

	mu      sync.Mutex
	kids    map[string]bool
	lastErr error
	fetches int
}

func (k *keyWatch) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := k.base.RoundTrip(req)
	if req.URL.String() != k.jwksURL {
		return resp, err
	}
	if err != nil {
		k.record(nil, err)
		return resp, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	resp.Body.Close()
	if err != nil {
		k.record(nil, err)
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if resp.StatusCode != http.StatusOK {
		k.record(nil, fmt.Errorf("key set answered %s", resp.Status))
		return resp, nil
	}
	var set struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		k.record(nil, fmt.Errorf("key set is not JSON: %w", err))
		return resp, nil
	}
	kids := map[string]bool{}
	for _, key := range set.Keys {
		kids[key.Kid] = true
	}
	k.record(kids, nil)
	return resp, nil
}

func (k *keyWatch) record(kids map[string]bool, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.fetches++
	k.lastErr = err
	if err == nil {
		k.kids = kids
	}
}

// state returns whether kid was in the last key set fetched, and the
// error of the last fetch.
func (k *keyWatch) state(kid string) (known bool, lastErr error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.kids[kid], k.lastErr
}
