package bucketlock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// Hold is a prune's hold on the cache: while it lasts, the Acquire of a
// new lock fails with ErrBusy, and once it is Deleting, Guards wait.
type Hold struct {
	l      *Locks
	mu     sync.Mutex // body and etag, which refresh rewrites
	body   []byte
	etag   string       // of the marker as last written
	wrote  [2]time.Time // when the write that took the marker was sent and answered
	skew   time.Duration
	ctx    context.Context
	lost   context.CancelFunc
	stop   chan struct{}
	done   chan struct{}
	closed bool
}

// Hold marks the cache as held by a prune and waits up to wait for the
// fresh upload locks to go; call Deleting before deleting anything. Giving up, it
// removes the mark and fails with an error wrapping
// cachelock.ErrLocksHeld and naming the locks; when another prune holds
// the cache it fails with cachelock.ErrPruneRunning, and on a store
// without conditional writes with ErrNoConditionalWrites unless
// SetSinglePruner was called. The hold refreshes its marker until
// released. waiting, if not nil, is called with the fresh locks while it
// waits.
func (l *Locks) Hold(ctx context.Context, wait time.Duration, waiting func([]string)) (*Hold, error) {
	cond, err := l.conditional(ctx)
	if err != nil {
		return nil, fmt.Errorf("mark the cache as held by a prune: %w", err)
	}
	if !cond && !l.single {
		return nil, fmt.Errorf("mark the cache as held by a prune: %w; run it with --single-pruner if it is the only prune of the bucket", ErrNoConditionalWrites)
	}
	host, _ := os.Hostname()
	h := &Hold{l: l, body: []byte(fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().UTC().Format(time.RFC3339)))}
	if cond {
		err = h.take(ctx)
	} else {
		err = h.takeUnconditionally(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("mark the cache as held by a prune: %w", err)
	}
	if info, err := l.st.Stat(ctx, markerName); err == nil && info.ETag == h.etag {
		h.skew = info.ModTime.Sub(h.wrote[0].Add(h.wrote[1].Sub(h.wrote[0]) / 2))
	}
	h.ctx, h.lost = context.WithCancel(context.Background())
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	go h.refresh(cond)

	deadline := time.Now().Add(wait)
	delay := 50 * time.Millisecond
	for {
		listed := time.Now()
		ls, err := l.list(ctx)
		var fresh []string
		for _, li := range ls {
			if li.Fresh {
				fresh = append(fresh, li.Name)
			}
		}
		switch {
		case err != nil:
		case len(fresh) == 0:
			return h, nil
		case !listed.Before(deadline):
			err = fmt.Errorf("%w after waiting %s: %s (uploads hold them; a lock counts until released or %s old)",
				cachelock.ErrLocksHeld, wait, strings.Join(fresh, ", "), cachelock.StaleAfter)
		case len(fresh) > 0 && waiting != nil:
			waiting(fresh)
		}
		if err == nil {
			next := min(delay, time.Until(deadline))
			delay = min(delay*2, time.Second)
			t := time.NewTimer(max(next, time.Millisecond))
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-h.ctx.Done():
				err = errors.New("the marker was lost while waiting")
			case <-t.C:
			}
			t.Stop()
		}
		if err != nil {
			h.Release()
			return nil, err
		}
	}
}

// take creates the marker, or replaces a stale one conditionally on the
// ETag read, so that of racing prunes exactly one holds the cache.
func (h *Hold) take(ctx context.Context) error {
	l := h.l
	for try := 0; ; try++ {
		h.wrote[0] = time.Now()
		info, err := l.st.Create(ctx, markerName, h.body)
		h.wrote[1] = time.Now()
		if err == nil {
			h.etag = info.ETag
			return nil
		}
		if errors.Is(err, s3store.ErrConflict) && try < 5 {
			time.Sleep(time.Duration(try+1) * 100 * time.Millisecond)
			continue
		}
		if !errors.Is(err, fs.ErrExist) {
			return err
		}
		old, err := l.st.Stat(ctx, markerName)
		if errors.Is(err, fs.ErrNotExist) && try < 5 {
			continue // released meanwhile
		}
		if err != nil {
			return err
		}
		if isFresh(old.ModTime) {
			return h.running(ctx)
		}
		h.wrote[0] = time.Now()
		info, err = l.st.Replace(ctx, markerName, h.body, old.ETag)
		h.wrote[1] = time.Now()
		if errors.Is(err, fs.ErrExist) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, s3store.ErrConflict) {
			return h.running(ctx) // another prune took it over first
		}
		if err != nil {
			return err
		}
		l.log.WithFields(logrus.Fields{"last_refresh": old.ModTime, "stale_after": cachelock.StaleAfter}).
			Warn("took over the marker of a prune that stopped refreshing it")
		h.etag = info.ETag
		return nil
	}
}

// takeUnconditionally writes the marker unless a fresh one is there: the
// best a store without conditional writes allows, enough for one pruner.
func (h *Hold) takeUnconditionally(ctx context.Context) error {
	if _, held, err := h.l.marker(ctx); err != nil {
		return err
	} else if held {
		return h.running(ctx)
	}
	h.wrote[0] = time.Now()
	info, err := h.l.st.Put(ctx, markerName, strings.NewReader(string(h.body)), int64(len(h.body)))
	h.wrote[1] = time.Now()
	h.etag = info.ETag
	return err
}

// Deleting marks the cache as being deleted from, then waits GuardWindow
// and GuardMargin, so that every Guard begun before the mark has ended:
// after it returns, no narinfo or marker is published until the hold is
// released, and the prune rereads what was published during its scan.
func (h *Hold) Deleting(ctx context.Context) error {
	h.mu.Lock()
	body := append(append([]byte{}, h.body...), deletingLine...)
	sent := time.Now()
	var info s3store.Info
	var err error
	if h.etag != "" && h.l.cond {
		info, err = h.l.st.Replace(ctx, markerName, body, h.etag)
	} else {
		info, err = h.l.st.Put(ctx, markerName, strings.NewReader(string(body)), int64(len(body)))
	}
	if err == nil {
		h.body, h.etag = body, info.ETag
	}
	h.mu.Unlock()
	if err != nil {
		return fmt.Errorf("mark the cache as being deleted from: %w", err)
	}
	t := time.NewTimer(time.Until(sent.Add(h.l.window + h.l.margin)))
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-h.ctx.Done():
		return errors.New("the prune's marker was lost")
	case <-t.C:
		return nil
	}
}

// running is ErrPruneRunning with what the other prune's marker says.
func (h *Hold) running(ctx context.Context) error {
	if w := h.l.who(ctx); w != "" {
		return fmt.Errorf("%w (%s)", cachelock.ErrPruneRunning, w)
	}
	return cachelock.ErrPruneRunning
}

// refresh rewrites the marker while the hold lasts, conditionally on the
// ETag it last wrote where the store allows: if another prune took it
// over (this one stalled for StaleAfter), the hold is lost and its
// context is cancelled rather than the other's marker overwritten.
func (h *Hold) refresh(cond bool) {
	defer close(h.done)
	t := time.NewTicker(markerRefresh)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(h.ctx, markerRefresh)
		var info s3store.Info
		var err error
		h.mu.Lock()
		if cond {
			info, err = h.l.st.Replace(ctx, markerName, h.body, h.etag)
		} else {
			info, err = h.l.st.Put(ctx, markerName, strings.NewReader(string(h.body)), int64(len(h.body)))
		}
		if err == nil {
			h.etag = info.ETag
		}
		h.mu.Unlock()
		cancel()
		switch {
		case errors.Is(err, fs.ErrExist) || errors.Is(err, fs.ErrNotExist):
			h.l.log.WithError(err).Error("the prune's marker was taken over or removed: stopping")
			h.lost()
			return
		case err != nil:
			// A missed refresh is harmless until StaleAfter.
			h.l.log.WithError(err).Warn("could not refresh the prune's marker")
		}
	}
}

// Skew is the store's clock minus this machine's, as the marker's
// LastModified tells (to a second or so: stores round it): a prune judges
// the age of objects by it rather than by comparing the two clocks.
func (h *Hold) Skew() time.Duration { return h.skew }

// Context is done when the hold is released or lost (another prune took
// over its marker): a prune deletes with it.
func (h *Hold) Context() context.Context { return h.ctx }

// Release stops refreshing the marker and removes it, unless the hold
// was lost to another prune.
func (h *Hold) Release() {
	if h.closed {
		return
	}
	h.closed = true
	close(h.stop)
	<-h.done
	lost := h.ctx.Err() != nil
	h.lost()
	if lost {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := h.l.st.Delete(ctx, []string{markerName}); err != nil {
		h.l.log.WithError(err).Warn("could not remove the prune's marker: uploads are refused until it is stale")
	}
}
