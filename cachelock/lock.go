package cachelock

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// ErrBusy is the error (wrapped) of Acquire while a prune holds the cache.
var ErrBusy = errors.New("a prune holds the cache")

// ErrPruneRunning is the error (wrapped) of a prune that finds another
// prune holding the cache.
var ErrPruneRunning = errors.New("another prune is running on this cache")

// ErrLocksHeld is the error (wrapped) of a Hold that gave up waiting for
// the fresh upload locks to go.
var ErrLocksHeld = errors.New("upload locks still held")

// StaleAfter is the age (by modification time) after which a shared lock
// no longer counts: its holder died or stopped refreshing it.
const StaleAfter = 30 * time.Minute

// MaxLockBody is the largest content a shared lock file may hold.
const MaxLockBody = 1024

// Names of the implementation's files in gcroots/.lock/. Every name there
// that starts with '.' is reserved; the others are shared upload locks.
const (
	lockDirName = ".lock"
	guardFile   = ".guard" // flock: LOCK_SH by Guard, LOCK_EX by a prune's deletion phase
	admitFile   = ".admit" // flock: serializes Acquire against a prune taking the cache
	pruneFile   = ".prune" // exists and is flock'ed LOCK_EX while a prune holds the cache
)

// markerRefresh is how often a prune touches its marker while it runs.
var markerRefresh = 30 * time.Second

// Locks is the lock protocol over a cache directory's gcroots/.lock/.
//
// Shared locks are plain files gcroots/.lock/<name> whose content is the
// writer's body and whose modification time is their last refresh. A
// prune marks the cache as held with gcroots/.lock/.prune, which it keeps
// flock'ed (so a killed prune holds nothing). Guard and a prune's deletion
// phase exclude each other through a shared/exclusive flock on
// gcroots/.lock/.guard, which works across processes and between
// goroutines of one process alike.
type Locks struct {
	dir string // <cache>/gcroots/.lock
}

// New returns the locks of the cache directory cacheDir. It touches
// nothing on disk.
func New(cacheDir string) *Locks {
	return &Locks{dir: filepath.Join(cacheDir, "gcroots", lockDirName)}
}

// Dir returns the lock directory, gcroots/.lock under the cache.
func (l *Locks) Dir() string { return l.dir }

// CheckName is the floor every backend of the lock protocol applies to a
// shared lock's name: one plain file name, not starting with '.'.
func CheckName(name string) error { return checkLockName(name) }

// checkLockName refuses names that are not a single plain file name in the
// lock directory. serve validates names more strictly; this is the floor.
func checkLockName(name string) error {
	switch {
	case name == "":
		return errors.New("empty lock name")
	case name[0] == '.':
		return fmt.Errorf("lock name %q starts with '.' (reserved)", name)
	case len(name) > 255:
		return errors.New("lock name longer than 255 bytes")
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("lock name %q contains '/' or NUL", name)
	}
	return nil
}

func (l *Locks) mkdir() error {
	if err := os.MkdirAll(l.dir, 0o755); err != nil {
		return fmt.Errorf("create lock directory: %w", err)
	}
	return nil
}

// flockFile opens (creating) the reserved file name in the lock directory
// and flocks it with how (syscall.LOCK_SH, LOCK_EX, maybe |LOCK_NB).
func (l *Locks) flockFile(name string, how int) (*os.File, error) {
	if err := l.mkdir(); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(l.dir, name), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// admit runs fn while holding the admission mutex.
func (l *Locks) admit(fn func() error) error {
	f, err := l.flockFile(admitFile, syscall.LOCK_EX)
	if err != nil {
		return fmt.Errorf("lock %s: %w", admitFile, err)
	}
	defer f.Close() // closing drops the flock
	return fn()
}

// pruneHeld reports whether a live prune holds the cache: its marker exists
// and is flock'ed. A marker left by a killed prune is not flock'ed.
func (l *Locks) pruneHeld() (bool, error) {
	f, err := os.Open(filepath.Join(l.dir, pruneFile))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer f.Close()
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		if err != syscall.EINTR {
			break
		}
	}
	switch {
	case err == syscall.EWOULDBLOCK:
		return true, nil
	case err != nil:
		return false, err
	}
	return false, nil // closing f drops our probe
}

// isFresh reports whether a lock file modified at mtime still counts at now.
func isFresh(mtime, now time.Time) bool {
	return now.Sub(mtime) < StaleAfter
}

// Acquire takes or refreshes the shared upload lock name, storing body (at
// most MaxLockBody bytes) as the lock file's content. While a prune holds
// the cache it fails with an error wrapping ErrBusy, except that a lock
// that is still fresh may be refreshed while the prune waits for it to go.
func (l *Locks) Acquire(name string, body []byte) error {
	if err := checkLockName(name); err != nil {
		return err
	}
	if len(body) > MaxLockBody {
		return fmt.Errorf("lock %s: body of %d bytes is over %d", name, len(body), MaxLockBody)
	}
	p := filepath.Join(l.dir, name)
	return l.admit(func() error {
		held, err := l.pruneHeld()
		if err != nil {
			return fmt.Errorf("lock %s: check for a prune: %w", name, err)
		}
		if held {
			// A prune that has finished waiting saw no fresh lock, and a
			// lock that is stale stays stale: refreshing a fresh lock
			// never lets one in behind the prune's back.
			fi, err := os.Stat(p)
			if err != nil || !isFresh(fi.ModTime(), time.Now()) {
				return fmt.Errorf("lock %s: %w", name, ErrBusy)
			}
		}
		if err := atomicfile.WriteFile(p, body, 0o644); err != nil {
			return fmt.Errorf("lock %s: %w", name, err)
		}
		return nil
	})
}

// Release drops the shared lock name. A lock that is not there is no error.
func (l *Locks) Release(name string) error {
	if err := checkLockName(name); err != nil {
		return err
	}
	err := os.Remove(filepath.Join(l.dir, name))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("release lock %s: %w", name, err)
	}
	return nil
}

// Guard runs fn so that no prune's deletion phase runs at the same time,
// in this process or another: it holds a shared flock on
// gcroots/.lock/.guard around fn, which a prune takes exclusively while it
// deletes. Guards do not exclude each other. serve checks an uploaded
// narinfo's NAR and references and renames the narinfo into place under it.
func (l *Locks) Guard(fn func() error) error {
	f, err := l.flockFile(guardFile, syscall.LOCK_SH)
	if err != nil {
		return fmt.Errorf("guard against a prune: %w", err)
	}
	defer f.Close()
	return fn()
}

// Exclusive runs fn with no Guard running: a prune's deletion phase.
func (l *Locks) Exclusive(fn func() error) error {
	f, err := l.flockFile(guardFile, syscall.LOCK_EX)
	if err != nil {
		return fmt.Errorf("lock %s exclusively: %w", guardFile, err)
	}
	defer f.Close()
	return fn()
}

// LockInfo describes a shared lock file.
type LockInfo struct {
	Name    string
	ModTime time.Time
	Fresh   bool
}

// List returns the shared locks, fresh and stale, sorted by name.
func (l *Locks) List() ([]LockInfo, error) {
	ents, err := os.ReadDir(l.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list locks: %w", err)
	}
	now := time.Now()
	var out []LockInfo
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") || !e.Type().IsRegular() {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // released meanwhile
		}
		out = append(out, LockInfo{Name: e.Name(), ModTime: fi.ModTime(), Fresh: isFresh(fi.ModTime(), now)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Hold is a prune's hold on the cache: while it lasts, Acquire of a new
// lock fails with ErrBusy.
type Hold struct {
	l    *Locks
	f    *os.File
	path string
	stop chan struct{}
	done chan struct{}
}

// Hold marks the cache as held by a prune, then waits up to wait for the
// fresh shared locks to go. Giving up, it un-marks the cache and fails
// with an error wrapping ErrLocksHeld and naming the locks (or
// ErrPruneRunning when another prune holds the cache). The hold refreshes
// its marker until released. waiting, if not nil, is called with the fresh
// locks while it waits.
func (l *Locks) Hold(ctx context.Context, wait time.Duration, waiting func([]string)) (*Hold, error) {
	if err := l.mkdir(); err != nil {
		return nil, err
	}
	h := &Hold{l: l, path: filepath.Join(l.dir, pruneFile)}
	err := l.admit(func() error {
		f, err := os.OpenFile(h.path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return err
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if err == syscall.EWOULDBLOCK {
				who, _ := os.ReadFile(h.path)
				if w := strings.TrimSpace(string(who)); w != "" {
					return fmt.Errorf("%w (%s)", ErrPruneRunning, w)
				}
				return ErrPruneRunning
			}
			return err
		}
		host, _ := os.Hostname()
		f.Truncate(0)
		f.WriteAt([]byte(fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().UTC().Format(time.RFC3339))), 0)
		h.f = f
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("mark the cache as held by a prune: %w", err)
	}
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	go h.refresh()

	deadline := time.Now().Add(wait)
	delay := 50 * time.Millisecond
	for {
		var fresh []string
		err := l.admit(func() error {
			ls, err := l.List()
			for _, li := range ls {
				if li.Fresh {
					fresh = append(fresh, li.Name)
				}
			}
			return err
		})
		if err == nil && len(fresh) == 0 {
			return h, nil
		}
		if err == nil && !time.Now().Before(deadline) {
			err = fmt.Errorf("%w after waiting %s: %s (uploads hold them; a lock counts until released or %s old)",
				ErrLocksHeld, wait, strings.Join(fresh, ", "), StaleAfter)
		}
		if err == nil {
			if waiting != nil {
				waiting(fresh)
			}
			t := time.NewTimer(min(delay, time.Until(deadline)))
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-t.C:
			}
			t.Stop()
			delay = min(delay*2, time.Second)
		}
		if err != nil {
			h.Release()
			return nil, err
		}
	}
}

// refresh touches the marker while the hold lasts, so that it shows as
// live to whoever reads its modification time.
func (h *Hold) refresh() {
	defer close(h.done)
	t := time.NewTicker(markerRefresh)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case now := <-t.C:
			os.Chtimes(h.path, now, now)
		}
	}
}

// Release removes the marker and drops the hold. It does both under the
// admission mutex, so that another prune never flocks a marker that is
// being removed.
func (h *Hold) Release() {
	close(h.stop)
	<-h.done
	err := h.l.admit(func() error {
		os.Remove(h.path)
		return h.f.Close()
	})
	if err != nil {
		// Without the mutex, still drop the flock: a marker nobody
		// flocks holds nothing.
		h.f.Close()
	}
}

// RemoveTemp removes the temporary files that writes of lock files left in
// the lock directory (names starting with '.', other than the protocol's
// own files) last modified before old: a writer killed mid-write.
func (l *Locks) RemoveTemp(old time.Time) {
	ents, _ := os.ReadDir(l.dir)
	for _, e := range ents {
		switch n := e.Name(); {
		case n == guardFile || n == admitFile || n == pruneFile || n[0] != '.' || !e.Type().IsRegular():
			continue
		}
		if fi, err := e.Info(); err == nil && fi.ModTime().Before(old) {
			os.Remove(filepath.Join(l.dir, e.Name()))
		}
	}
}
