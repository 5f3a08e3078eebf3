package oidcauth

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// keyWatch sits in the HTTP client go-oidc fetches the issuer's key set
// with, and remembers which key ids the last fetch listed and whether it
// failed. go-oidc's refusal of a signature does not say whether the key
// was unknown, the signature wrong or the issuer away; this tells them
// apart. It decides nothing: go-oidc's key set does the fetching,
// caching and verifying.
//
// It also spaces the fetches: go-oidc fetches the key set again for
// every token naming a key id it has not seen, so anyone who can reach a
// door could make the cache ask the issuer once per request. Within
// minInterval of the last fetch, the last answer is given again.
type keyWatch struct {
	base        http.RoundTripper
	jwksURL     string
	minInterval time.Duration
	log         *logrus.Entry

	mu       sync.Mutex
	kids     map[string]bool
	lastErr  error
	last     time.Time
	lastBody []byte
}

func (k *keyWatch) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.String() != k.jwksURL {
		return k.base.RoundTrip(req)
	}
	if body, err, ok := k.recent(); ok {
		if err != nil {
			return nil, err
		}
		return &http.Response{
			Status: "200 OK", StatusCode: http.StatusOK, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header:  http.Header{"Content-Type": {"application/json"}},
			Body:    io.NopCloser(bytes.NewReader(body)),
			Request: req,
		}, nil
	}
	resp, err := k.base.RoundTrip(req)
	if err != nil {
		k.record(nil, nil, err)
		return resp, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	resp.Body.Close()
	if err != nil {
		k.record(nil, nil, err)
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if resp.StatusCode != http.StatusOK {
		err := fmt.Errorf("key set answered %s", resp.Status)
		k.record(nil, nil, err)
		return nil, err
	}
	var set struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(body, &set); err != nil {
		err := fmt.Errorf("key set is not JSON: %w", err)
		k.record(nil, nil, err)
		return nil, err
	}
	kids := map[string]bool{}
	for _, key := range set.Keys {
		kids[key.Kid] = true
	}
	k.record(kids, body, nil)
	return resp, nil
}

// recent returns the last answer when it is younger than minInterval.
func (k *keyWatch) recent() ([]byte, error, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.last.IsZero() || time.Since(k.last) >= k.minInterval {
		return nil, nil, false
	}
	return k.lastBody, k.lastErr, true
}

func (k *keyWatch) record(kids map[string]bool, body []byte, err error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.last, k.lastErr = time.Now(), err
	if err != nil {
		k.log.WithError(err).WithField("url", k.jwksURL).Warn("oidc key set not fetched: tokens by keys not seen before are refused until it is")
		return
	}
	if !maps.Equal(kids, k.kids) {
		k.log.WithFields(logrus.Fields{"url": k.jwksURL, "key_ids": slices.Sorted(maps.Keys(kids))}).Info("oidc key set fetched")
	}
	k.kids, k.lastBody = kids, body
}

// state returns whether kid was in the last key set fetched, and the
// error of the last fetch.
func (k *keyWatch) state(kid string) (known bool, lastErr error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.kids[kid], k.lastErr
}
