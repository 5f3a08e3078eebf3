package publish

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
)

// PublishOptions configure Publish.
type PublishOptions struct {
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
	// LockWait and Refresh are as in WithLockOptions.
	LockWait, Refresh time.Duration
	// Log receives every step; logrus's standard logger when nil.
	Log *logrus.Entry
}

// Published is what Publish wrote.
type Published struct {
	Marker     string // the marker's location
	Generation uint64 // 0 for an unsigned marker
	Content    []byte // what the marker now holds
}

// Publish pushes the closures of the paths to the cache and points the
// marker at them, under an upload lock (the with-lock protocol): it takes
// the lock next to the marker, runs `nix copy --to CACHE?compression=zstd`
// while refreshing the lock, and only when the copy succeeded and the lock
// held throughout writes the marker. The lock is always dropped.
func Publish(ctx context.Context, o PublishOptions) (Published, error) {
	log := o.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.StoreDir == "" {
		o.StoreDir = "/nix/store"
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
		return Published{}, errors.New("publish: no store path")
	}
	for _, p := range o.Paths {
		if _, err := nixcache.BaseName(o.StoreDir, p); err != nil {
			return Published{}, fmt.Errorf("publish: %w", err)
		}
	}
	cache := strings.TrimSuffix(o.Cache, "/")
	m, err := ParseMarkerURL(cache+"/gcroots/"+o.Name, "")
	if err != nil {
		return Published{}, fmt.Errorf("publish: %w", err)
	}
	to, err := copyURL(cache, o.Compression, o.CacheKeyFile)
	if err != nil {
		return Published{}, fmt.Errorf("publish: %w", err)
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
			return Published{}, fmt.Errorf("publish: %w", err)
		default:
			if cur, err := ParseMarker(data, o.StoreDir); err == nil && cur.Generation() >= gen {
				gen = cur.Generation() + 1
			}
		}
	}
	content := FormatMarker(o.Name, gen, o.Paths, o.SigningKey)

	err = holdLock(ctx, m, o, log, func(ctx context.Context) error {
		args := append([]string{"--extra-experimental-features", "nix-command", "copy", "--to", to}, o.Paths...)
		if err := o.Nix.run(ctx, log, "nix", args...); err != nil {
			return fmt.Errorf("push to the cache: %w", err)
		}
		return nil
	}, func(ctx context.Context) error {
		return putMarker(ctx, m, content)
	})
	if err != nil {
		return Published{}, fmt.Errorf("publish %s: %w; the marker was not written", o.Name, err)
	}
	if gen != 0 {
		log.Infof("marker %s now names %s (signed, generation %d)", o.Name, strings.Join(o.Paths, " "), gen)
	} else {
		log.Infof("marker %s now names %s", o.Name, strings.Join(o.Paths, " "))
	}
	return Published{Marker: m.String(), Generation: gen, Content: content}, nil
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

// holdLock runs work under an upload lock next to the marker m, refreshing
// the lock meanwhile, then, if work succeeded and the lock held throughout,
// runs commit (still under the lock). The lock is always dropped.
func holdLock(ctx context.Context, m *MarkerURL, o PublishOptions, log *logrus.Entry, work, commit func(context.Context) error) error {
	name := m.NewLockName()
	host, _ := os.Hostname()
	body := []byte(fmt.Sprintf("publish pid %d on %s for %s since %s\n",
		os.Getpid(), host, o.Name, time.Now().UTC().Format(time.RFC3339)))
	if len(body) > prune.MaxLockBody {
		body = body[:prune.MaxLockBody]
	}
	log.Infof("take the upload lock %s", name)
	if err := m.Lock(ctx, name, body, o.LockWait, log); err != nil {
		return err
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := m.Unlock(uctx, name); err != nil {
			log.Warnf("%v (it goes stale in %s)", err, prune.StaleAfter)
		}
	}()

	lost := make(chan error, 1)
	stop := make(chan struct{})
	refreshed := make(chan struct{})
	go func() {
		defer close(refreshed)
		tick := time.NewTicker(o.Refresh)
		defer tick.Stop()
		lastOK := time.Now()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			err := m.TryLock(ctx, name, body)
			switch {
			case err == nil:
				lastOK = time.Now()
				continue
			case errors.Is(err, prune.ErrBusy):
				lost <- fmt.Errorf("%w: refreshing it was refused while a prune holds the cache", ErrLockLost)
			case isDefinite(err) && !strings.Contains(err.Error(), GatewayErrorPrefix):
				// The cache's answer; a gateway's own answer only says the
				// onion was out of reach for a moment.
				lost <- fmt.Errorf("%w: %v", ErrLockLost, err)
			case time.Since(lastOK) > prune.StaleAfter-2*o.Refresh:
				lost <- fmt.Errorf("%w: not refreshed since %s: %v", ErrLockLost, lastOK.Format(time.RFC3339), err)
			default:
				log.Warnf("refresh the upload lock: %v (will retry)", err)
				continue
			}
			return
		}
	}()
	err := work(ctx)
	close(stop)
	<-refreshed
	if err != nil {
		return err
	}
	select {
	case err := <-lost:
		return err
	default:
	}
	// One last refresh proves the lock still holds as the marker goes in.
	if err := m.TryLock(ctx, name, body); err != nil {
		return fmt.Errorf("%w: %v", ErrLockLost, err)
	}
	return commit(ctx)
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
		return nil, statusError("read marker "+name, resp.StatusCode, strings.TrimSpace(string(data[:min(len(data), 512)])))
	case err != nil:
		return nil, fmt.Errorf("read marker %s: %w", name, err)
	case len(data) > maxMarkerSize:
		return nil, fmt.Errorf("read marker %s: larger than %d bytes", name, maxMarkerSize)
	}
	return data, nil
}

// putMarker writes the marker m.
func putMarker(ctx context.Context, m *MarkerURL, content []byte) error {
	status, msg, err := m.request(ctx, http.MethodPut, "gcroots/"+m.Name, content)
	switch {
	case err != nil:
		return fmt.Errorf("write marker %s: %w", m.Name, err)
	case status/100 != 2:
		return statusError("write marker "+m.Name, status, msg)
	}
	return nil
}
