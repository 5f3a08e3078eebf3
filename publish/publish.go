package publish

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// Options configure Publish.
type Options struct {
	// Cache is the URL of the cache's write role: a Gateway's URL, or a
	// local write listener.
	Cache string
	// Name is the marker's name under gcroots/.
	Name string
	// Paths are the store paths to push and name in the marker.
	Paths []string
	// StoreDir is the Nix store directory; /nix/store when empty.
	StoreDir string
	// SigningKey, when set, signs the marker: a statement of its name,
	// paths and a generation larger than the marker's current one.
	SigningKey *nixcache.SecretKey
	// CacheKeyFile, when set, is a Nix secret key file that nix copy signs
	// the narinfos with (its secret-key= parameter).
	CacheKeyFile string
	// Compression is the NARs' compression; zstd when empty.
	Compression string
	// Nix runs nix copy.
	Nix Nix
	// NetrcFile, when set, is a netrc file whose entry for the cache's
	// host is sent with every request, publish's own and nix copy's (an
	// OIDC door's token, say).
	NetrcFile string
	// LockWait and Refresh are as in WithLockOptions.
	LockWait, Refresh time.Duration
	// Log receives every step; logrus's standard logger when nil.
	Log *logrus.Entry
}

// Result is what Publish wrote.
type Result struct {
	Marker     string // the marker's location
	Generation uint64 // 0 for an unsigned marker
	Content    []byte // what the marker now holds
}

// Publish pushes the closures of the paths to the cache and points the
// marker at them, under an upload lock (the with-lock protocol): it takes
// the lock next to the marker, runs `nix copy --to CACHE?compression=zstd`
// while refreshing the lock, and only when the copy succeeded and the lock
// held throughout writes the marker. The lock is always dropped.
func Publish(ctx context.Context, o Options) (Result, error) {
	log := o.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.StoreDir == "" {
		o.StoreDir = nixcache.DefaultStoreDir
	}
	if o.Compression == "" {
		o.Compression = "zstd"
	}
	if o.LockWait == 0 {
		o.LockWait = 30 * time.Minute
	}
	if o.Refresh == 0 {
		o.Refresh = 5 * time.Minute
	}
	if len(o.Paths) == 0 {
		return Result{}, errors.New("publish: no store path")
	}
	for _, p := range o.Paths {
		if _, err := nixcache.BaseName(o.StoreDir, p); err != nil {
			return Result{}, fmt.Errorf("publish: %w", err)
		}
	}
	cache := strings.TrimSuffix(o.Cache, "/")
	m, err := ParseMarkerURL(cache+"/gcroots/"+o.Name, "")
	if err != nil {
		return Result{}, fmt.Errorf("publish: %w", err)
	}
	if err := withNetrc(m, &o.Nix, o.NetrcFile); err != nil {
		return Result{}, fmt.Errorf("publish: %w", err)
	}
	to, err := copyURL(cache, o.Compression, o.CacheKeyFile)
	if err != nil {
		return Result{}, fmt.Errorf("publish: %w", err)
	}

	var gen uint64
	if o.SigningKey != nil {
		// The generation only grows: the time, unless the marker holds a
		// larger one already (a clock that went back).
		gen = uint64(time.Now().UnixNano())
		data, err := getMarker(ctx, m.client, cache, o.Name)
		switch {
		case errors.Is(err, ErrNoMarker):
		case err != nil:
			return Result{}, fmt.Errorf("publish: %w", err)
		default:
			if cur, err := ParseMarker(data, o.StoreDir); err == nil && cur.Generation() >= gen {
				gen = cur.Generation() + 1
			}
		}
	}
	content := FormatMarker(o.Name, gen, o.Paths, o.SigningKey)

	holder := fmt.Sprintf("publish for %s", o.Name)
	err = m.Hold(ctx, holder, o.LockWait, o.Refresh, log, func(ctx context.Context) error {
		args := append([]string{"--extra-experimental-features", "nix-command", "copy", "--to", to}, o.Paths...)
		if err := o.Nix.run(ctx, log, "nix", args...); err != nil {
			return fmt.Errorf("push to the cache: %w", err)
		}
		return nil
	}, func(ctx context.Context) error {
		return putMarker(ctx, m, content)
	})
	if err != nil {
		return Result{}, fmt.Errorf("publish %s: %w; the marker was not written", o.Name, err)
	}
	l := log.WithFields(logrus.Fields{"marker": o.Name, "paths": strings.Join(o.Paths, " ")})
	if gen != 0 {
		l = l.WithField("generation", gen)
	}
	l.Info("marker written")
	return Result{Marker: m.String(), Generation: gen, Content: content}, nil
}

// copyURL returns the store URL nix copy uploads to.
func copyURL(cache, compression, keyFile string) (string, error) {
	params := []string{"compression=" + compression}
	if keyFile != "" {
		if strings.ContainsAny(keyFile, "&=#%? \t\n") {
			return "", fmt.Errorf("cache key file %q: the name must not hold &=#%%? or spaces (it goes in a URL)", keyFile)
		}
		params = append(params, "secret-key="+keyFile)
	}
	return cache + "?" + strings.Join(params, "&"), nil
}

// ErrNoMarker is the error (wrapped) of reading a marker the cache does
// not have.
var ErrNoMarker = errors.New("no such marker")

// maxMarkerSize bounds a marker read from the cache.
const maxMarkerSize = 1 << 20

// getMarker reads the marker name from the cache at base.
func getMarker(ctx context.Context, client *http.Client, base, name string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/gcroots/"+name, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("read marker %s: %w", name, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxMarkerSize+1))
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("read marker %s: %w", name, ErrNoMarker)
	case resp.StatusCode != http.StatusOK:
		return nil, newStatusError("read marker "+name, resp, data[:min(len(data), 512)])
	case err != nil:
		return nil, fmt.Errorf("read marker %s: %w", name, err)
	case len(data) > maxMarkerSize:
		return nil, fmt.Errorf("read marker %s: larger than %d bytes", name, maxMarkerSize)
	}
	return data, nil
}

// putMarker writes the marker m.
func putMarker(ctx context.Context, m *MarkerURL, content []byte) error {
	return m.request(ctx, "write marker "+m.Name, http.MethodPut, "gcroots/"+m.Name, content)
}
