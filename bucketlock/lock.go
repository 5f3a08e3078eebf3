package bucketlock

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// GuardWindow is how long a Guard's function may run after the check
// that no prune is deleting: its context's deadline. serve checks a
// narinfo and PUTs it (at most a MiB) inside it.
const GuardWindow = 10 * time.Second

// GuardMargin is what a prune waits beyond GuardWindow after marking the
// cache as deleting, for a request that was sent in time to be answered.
const GuardMargin = 2500 * time.Millisecond

// guardWait bounds how long a Guard waits for a prune's deletion to end
// before it gives up with ErrBusy.
var guardWait = 2 * time.Minute

// deletingLine is the line a prune's marker ends with once it deletes.
const deletingLine = "deleting\n"

// Object names in the store.
const (
	lockDir    = "gcroots/.lock/"
	markerName = lockDir + ".prune"
)

// markerRefresh is how often a hold rewrites its marker; staleAfter is
// cachelock.StaleAfter, a variable for the tests of a takeover.
var (
	markerRefresh = 30 * time.Second
	staleAfter    = cachelock.StaleAfter
)

// ErrNoConditionalWrites is the error (wrapped) of a Hold on a store that
// does not honour If-None-Match, unless SetSinglePruner was called.
var ErrNoConditionalWrites = errors.New("the store does not honour conditional writes (If-None-Match), so two prunes could both hold the cache")

// Locks is the lock protocol over one cache in a bucket. It is safe for
// concurrent use.
type Locks struct {
	st     *s3store.Store
	log    *logrus.Entry
	window time.Duration
	margin time.Duration
	single bool

	probeOnce sync.Once
	cond      bool
	probeErr  error
}

// New returns the locks of the cache in st. It sends no request.
func New(st *s3store.Store, log *logrus.Entry) *Locks {
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	return &Locks{st: st, log: log, window: GuardWindow, margin: GuardMargin}
}

// SetSinglePruner says that this process is the only one that prunes or
// forgets on the bucket: Hold then runs also on a store without
// conditional writes. Call it before Hold.
func (l *Locks) SetSinglePruner(single bool) { l.single = single }

// SetGuardWindow replaces GuardWindow (and scales the margin with it),
// for tests that cannot wait half a minute per prune. Every process using
// the bucket must use the same window; call it before anything else.
func (l *Locks) SetGuardWindow(w time.Duration) {
	l.window, l.margin = w, w/4
}

// isFresh reports whether an object last modified at mtime still counts.
func isFresh(mtime time.Time) bool { return time.Since(mtime) < staleAfter }

// marker returns the prune marker when one is there and fresh.
func (l *Locks) marker(ctx context.Context) (s3store.Info, bool, error) {
	info, err := l.st.Stat(ctx, markerName)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return info, false, nil
	case err != nil:
		return info, false, fmt.Errorf("check for a prune: %w", err)
	}
	return info, isFresh(info.ModTime), nil
}

// Guard runs fn unless a prune is deleting, with a context whose
// deadline is GuardWindow after the check was sent. While a prune deletes
// (its marker says so) Guard waits for it, up to guardWait or ctx, then
// fails with an error wrapping cachelock.ErrBusy. A prune marks the cache
// as deleting, then waits GuardWindow and GuardMargin before it rereads
// the markers and narinfos and deletes, so what fn writes before its
// deadline is seen by the prune: a prune's scan does not hold uploads up,
// only its deletion does, as on a directory. serve checks a narinfo's
// references and PUTs it inside fn, and gives up at the deadline.
func (l *Locks) Guard(ctx context.Context, fn func(ctx context.Context) error) error {
	giveUp := time.Now().Add(guardWait)
	delay := 100 * time.Millisecond
	for {
		checked := time.Now()
		deleting, err := l.deleting(ctx)
		if err != nil {
			return fmt.Errorf("guard against a prune: %w", err)
		}
		if !deleting {
			gctx, cancel := context.WithDeadline(ctx, checked.Add(l.window))
			defer cancel()
			return fn(gctx)
		}
		if time.Now().Add(delay).After(giveUp) {
			return fmt.Errorf("guard against a prune: %w (it is deleting)", cachelock.ErrBusy)
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("guard against a prune: %w", ctx.Err())
		case <-t.C:
		}
		delay = min(delay*2, time.Second)
	}
}

// deleting reports whether a fresh prune marker says the prune deletes.
func (l *Locks) deleting(ctx context.Context) (bool, error) {
	rc, info, err := l.st.Get(ctx, markerName, 0, -1)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("check for a prune: %w", err)
	}
	defer rc.Close()
	body, err := io.ReadAll(io.LimitReader(rc, cachelock.MaxLockBody))
	if err != nil {
		return false, fmt.Errorf("check for a prune: %w", err)
	}
	return isFresh(info.ModTime) && bytes.HasSuffix(body, []byte(deletingLine)), nil
}

// Acquire takes or refreshes the shared upload lock name, storing body (at
// most cachelock.MaxLockBody bytes) as its content. While a prune holds
// the cache it fails with an error wrapping cachelock.ErrBusy, except that
// a lock that is still fresh may be refreshed while the prune waits for it
// to go.
func (l *Locks) Acquire(name string, body []byte) error {
	if err := cachelock.CheckName(name); err != nil {
		return err
	}
	if len(body) > cachelock.MaxLockBody {
		return fmt.Errorf("lock %s: body of %d bytes is over %d", name, len(body), cachelock.MaxLockBody)
	}
	put := func(ctx context.Context) error {
		_, err := l.st.Put(ctx, lockDir+name, bytes.NewReader(body), int64(len(body)))
		return err
	}
	ctx := context.Background()
	_, held, err := l.marker(ctx)
	if err != nil {
		return fmt.Errorf("lock %s: %w", name, err)
	}
	if !held {
		prev, statErr := l.st.Stat(ctx, lockDir+name)
		wasFresh := statErr == nil && isFresh(prev.ModTime)
		if err := put(ctx); err != nil {
			return fmt.Errorf("lock %s: %w", name, err)
		}
		// A prune that marked the cache meanwhile lists the locks until
		// none is fresh, after its mark: it sees this one, unless it had
		// already finished waiting, and then its mark is seen here. A
		// lock that was fresh already was waited for: it stays.
		if _, held, err = l.marker(ctx); (err == nil && !held) || wasFresh {
			return nil
		}
		l.st.Delete(ctx, []string{lockDir + name})
		if err != nil {
			return fmt.Errorf("lock %s: %w", name, err)
		}
		return fmt.Errorf("lock %s: %w", name, cachelock.ErrBusy)
	}
	// A prune that has finished waiting saw no fresh lock, and a stale
	// lock stays stale: refreshing a fresh one lets nothing in behind it.
	info, err := l.st.Stat(ctx, lockDir+name)
	if err != nil || !isFresh(info.ModTime) {
		return fmt.Errorf("lock %s: %w", name, cachelock.ErrBusy)
	}
	if err := put(ctx); err != nil {
		return fmt.Errorf("lock %s: %w", name, err)
	}
	return nil
}

// Release drops the shared lock name. A lock that is not there is no error.
func (l *Locks) Release(name string) error {
	if err := cachelock.CheckName(name); err != nil {
		return err
	}
	if err := l.st.Delete(context.Background(), []string{lockDir + name}); err != nil {
		return fmt.Errorf("release lock %s: %w", name, err)
	}
	return nil
}

// List returns the shared locks, fresh and stale, sorted by name.
func (l *Locks) List() ([]cachelock.LockInfo, error) {
	return l.list(context.Background())
}

func (l *Locks) list(ctx context.Context) ([]cachelock.LockInfo, error) {
	var out []cachelock.LockInfo
	err := l.st.ListDir(ctx, lockDir, func(page []s3store.Info) error {
		for _, o := range page {
			name := strings.TrimPrefix(o.Name, lockDir)
			if cachelock.CheckName(name) != nil {
				continue // the protocol's own objects
			}
			out = append(out, cachelock.LockInfo{Name: name, ModTime: o.ModTime, Fresh: isFresh(o.ModTime)})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list locks: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Holder reports whether a prune (or a forget) holds the cache now, by a
// fresh marker, and what the marker says of it ("pid N on HOST since
// TIME"). It takes nothing.
func (l *Locks) Holder() (who string, held bool, err error) {
	ctx := context.Background()
	_, held, err = l.marker(ctx)
	if err != nil || !held {
		return "", held, err
	}
	return l.who(ctx), true, nil
}

// who reads what the marker says, or "" when it cannot.
func (l *Locks) who(ctx context.Context) string {
	rc, _, err := l.st.Get(ctx, markerName, 0, 4096)
	if err != nil {
		return ""
	}
	defer rc.Close()
	data, _ := io.ReadAll(rc)
	return strings.Join(strings.Fields(strings.ReplaceAll(string(data), "\n", "; ")), " ")
}

// conditional reports, once per Locks, whether the store honours
// conditional writes.
func (l *Locks) conditional(ctx context.Context) (bool, error) {
	l.probeOnce.Do(func() { l.cond, l.probeErr = l.st.Probe(ctx) })
	return l.cond, l.probeErr
}
