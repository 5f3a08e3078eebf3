package upstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/serve"
)

// A listing (<hash>.ls) is the JSON tree of a store path's files, which
// Nix reads for `nix store ls` and `nix store cat` on a binary cache
// store, when the cache has one. It is fetched along with the NAR, best
// effort: an upstream without one, or with one that is not a listing,
// costs the path nothing. It carries no signature; it is checked to be a
// listing (version 1, a root of a known type), not against the NAR.

// maxListingSize bounds a listing from upstream, decoded.
const maxListingSize = 64 << 20

// maxListings is how many listings are fetched at once.
const maxListings = 4

// listing fetches n's listing from its upstream into c, if there is one.
func (f *Fetcher) listing(ctx context.Context, n *node, c *serve.Cache) {
	log := f.log.WithFields(logrus.Fields{"path": n.ni.StorePath, "upstream": n.base.Redacted()})
	select {
	case f.listings <- struct{}{}:
		defer func() { <-f.listings }()
	case <-ctx.Done():
		return
	}
	data, err := f.fetchListing(ctx, n)
	if err == nil {
		err = c.StoreListing(n.hash, bytes.NewReader(data))
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		log.Debug("no listing upstream")
	case err != nil:
		log.WithError(err).Info("listing not fetched from upstream")
	}
}

func (f *Fetcher) fetchListing(ctx context.Context, n *node) ([]byte, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	u := n.base.JoinPath(n.hash + ".ls")
	resp, err := f.get(ctx, u)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body := &stallReader{r: resp.Body, cancel: cancel, stall: f.cfg.StallTimeout}
	body.arm()
	defer body.stop()
	// Caches on S3, cache.nixos.org's among them, store listings
	// compressed and say so in Content-Encoding, whatever was asked.
	method := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding")))
	if method == "identity" {
		method = ""
	}
	if !checkable(method) {
		return nil, fmt.Errorf("%s: Content-Encoding %q", u.Redacted(), method)
	}
	dec, err := decompressor(method, body)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", u.Redacted(), err)
	}
	if cl, ok := dec.(io.Closer); ok {
		defer cl.Close()
	}
	data, err := io.ReadAll(io.LimitReader(dec, maxListingSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", u.Redacted(), err)
	}
	if len(data) > maxListingSize {
		return nil, fmt.Errorf("%s: over %d bytes", u.Redacted(), maxListingSize)
	}
	if err := checkListing(data); err != nil {
		return nil, fmt.Errorf("%s: %w", u.Redacted(), err)
	}
	return data, nil
}

// checkListing reports whether data is a listing Nix reads.
func checkListing(data []byte) error {
	var l struct {
		Version int `json:"version"`
		Root    struct {
			Type string `json:"type"`
		} `json:"root"`
	}
	if err := json.Unmarshal(data, &l); err != nil {
		return fmt.Errorf("not a listing: %w", err)
	}
	if l.Version != 1 {
		return fmt.Errorf("listing version %d, not 1", l.Version)
	}
	switch l.Root.Type {
	case "regular", "directory", "symlink":
		return nil
	}
	return fmt.Errorf("listing root of type %q", l.Root.Type)
}
