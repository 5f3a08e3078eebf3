package serve

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// durability orders the work that makes uploads durable, so that it can
// run off the requests' critical path without ever breaking the cache's
// rule: a narinfo becomes visible only after its NAR (content and name)
// and its references' narinfos are durable.
//
// A file whose upload was acknowledged but whose name is not yet durable
// is pending: whoever depends on it waits for it (see wait). A file found
// on disk and not pending counts as durable once its directory has been
// fsynced by this process: an earlier one may have stopped between a
// rename and the directory's fsync.
type durability struct {
	mu      sync.Mutex
	pending map[string]*commit // by path relative to the cache directory
	settled map[string]bool    // directories fsynced since the start
	dirs    map[string]*dirSync
	// queued counts the commits begun and not yet ended.
	queued atomic.Int64
	// syncDir fsyncs a directory; tests replace it.
	syncDir func(dir string) error
}

func newDurability() *durability {
	return &durability{pending: map[string]*commit{}, settled: map[string]bool{}, dirs: map[string]*dirSync{}, syncDir: atomicfile.SyncDir}
}

// commit is the pending durability of one file under its final name.
type commit struct {
	d    *durability
	rel  string
	done chan struct{}
	err  error
}

// begin registers rel as pending. It must be called before the file gets
// its final name, so that anyone who sees the name also sees the commit.
func (d *durability) begin(rel string) *commit {
	cm := &commit{d: d, rel: rel, done: make(chan struct{})}
	d.mu.Lock()
	d.pending[rel] = cm
	d.mu.Unlock()
	d.queued.Add(1)
	return cm
}

// end records the outcome: nil once the file and its name are durable.
// A failed commit stays pending, failed, until the next upload of its
// name, so that nothing counts on it; visible names the file when it
// already has its final name, which then goes, as if never uploaded, so
// that the client uploads it again. It reports whether it removed it.
func (cm *commit) end(err error, visible string) (removed bool) {
	cm.err = err
	cm.d.mu.Lock()
	if cm.d.pending[cm.rel] == cm {
		if err == nil {
			delete(cm.d.pending, cm.rel)
		} else if visible != "" {
			// Under the lock: no later upload of the name can be renamed
			// into place in between.
			removed = os.Remove(visible) == nil
		}
	}
	cm.d.mu.Unlock()
	cm.d.queued.Add(-1)
	close(cm.done)
	return removed
}

func (cm *commit) wait() error {
	<-cm.done
	return cm.err
}

// wait returns nil once rel (relative to dir) exists and is durable, or
// fs.ErrNotExist when it exists neither on disk nor as a pending commit.
func (d *durability) wait(dir, rel string) error {
	cm, err := d.find(dir, rel)
	if err != nil {
		return err
	}
	if cm != nil {
		if err := cm.wait(); err != nil {
			return fmt.Errorf("%s was not stored: %w", rel, err)
		}
		return nil
	}
	return d.settle(filepath.Dir(filepath.Join(dir, filepath.FromSlash(rel))))
}

// dependency is a file that a new upload needs durable before it may
// become visible: a commit pending when the upload came, or a file then
// on disk.
type dependency struct {
	rel string
	cm  *commit
}

// need returns rel (relative to dir) as a dependency, without waiting:
// fs.ErrNotExist when it exists neither on disk nor as a pending commit,
// an error when its commit failed. Because a dependency is taken before
// the dependent's own commit begins, waits only ever go to older commits,
// and never in a circle.
func (d *durability) need(dir, rel string) (dependency, error) {
	cm, err := d.find(dir, rel)
	if err != nil {
		return dependency{}, err
	}
	if cm != nil {
		select {
		case <-cm.done:
			if cm.err != nil {
				return dependency{}, fmt.Errorf("%s was not stored: %w", rel, cm.err)
			}
		default:
		}
	}
	return dependency{rel: rel, cm: cm}, nil
}

// ready waits until dep is durable and checks that it is still there (a
// prune may have run since). The caller holds the prune guard.
func (d *durability) ready(dir string, dep dependency) error {
	path := filepath.Join(dir, filepath.FromSlash(dep.rel))
	if dep.cm != nil {
		if err := dep.cm.wait(); err != nil {
			return fmt.Errorf("%s was not stored: %w", dep.rel, err)
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fs.ErrNotExist
	}
	if dep.cm != nil {
		return nil
	}
	return d.settle(filepath.Dir(path))
}

// find returns rel's pending commit or, when it has none, nil if rel is a
// file on disk and fs.ErrNotExist if not.
func (d *durability) find(dir, rel string) (*commit, error) {
	// Stat first: a pending file gets its name only after begin, so a file
	// found on disk and not pending afterwards has ended its commit.
	path := filepath.Join(dir, filepath.FromSlash(rel))
	fi, statErr := os.Stat(path)
	d.mu.Lock()
	cm := d.pending[rel]
	d.mu.Unlock()
	if cm != nil {
		return cm, nil
	}
	if statErr != nil {
		// Its commit may have ended between the stat and the look-up.
		fi, statErr = os.Stat(path)
		if statErr != nil {
			return nil, statErr
		}
	}
	if !fi.Mode().IsRegular() {
		return nil, fs.ErrNotExist
	}
	return nil, nil
}

// committing reports whether rel is being committed now.
func (d *durability) committing(rel string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pending[rel] != nil
}

// visible waits, for at most max, until a pending rel has ended its
// commit. It reports whether rel was pending and has since become
// visible: a reader that did not find it should look again.
func (d *durability) visible(rel string, max time.Duration) bool {
	d.mu.Lock()
	cm := d.pending[rel]
	d.mu.Unlock()
	if cm == nil {
		return false
	}
	t := time.NewTimer(max)
	defer t.Stop()
	select {
	case <-cm.done:
		return cm.err == nil
	case <-t.C:
		return false
	}
}

// settle fsyncs dir once in the life of the process.
func (d *durability) settle(dir string) error {
	d.mu.Lock()
	done := d.settled[dir]
	d.mu.Unlock()
	if done {
		return nil
	}
	if err := d.sync(dir); err != nil {
		return err
	}
	d.mu.Lock()
	d.settled[dir] = true
	d.mu.Unlock()
	return nil
}

// barrier waits for every commit pending when it is called. Failed ones
// do not matter here: nothing that waited for them was committed.
func (d *durability) barrier() {
	d.mu.Lock()
	all := make([]*commit, 0, len(d.pending))
	for _, cm := range d.pending {
		all = append(all, cm)
	}
	d.mu.Unlock()
	for _, cm := range all {
		cm.wait()
	}
}

// dirSync is a group commit of one directory's fsyncs: a caller needs a
// sync that starts after its own rename; concurrent callers share one.
type dirSync struct {
	mu       sync.Mutex
	cond     *sync.Cond
	asked    uint64 // tickets handed out
	synced   uint64 // tickets covered by a finished sync
	running  bool
	failures []syncFailure
}

type syncFailure struct {
	from, to uint64 // tickets (from, to] that a failed sync covered
	err      error
}

// sync makes durable every change made to dir before the call.
func (d *durability) sync(dir string) error {
	d.mu.Lock()
	ds := d.dirs[dir]
	if ds == nil {
		ds = &dirSync{}
		ds.cond = sync.NewCond(&ds.mu)
		d.dirs[dir] = ds
	}
	d.mu.Unlock()

	ds.mu.Lock()
	defer ds.mu.Unlock()
	ds.asked++
	ticket := ds.asked
	for ds.synced < ticket {
		if ds.running {
			ds.cond.Wait()
			continue
		}
		// No sync running: start one that covers every ticket so far,
		// since all of them were handed out after their renames.
		ds.running = true
		from, to := ds.synced, ds.asked
		ds.mu.Unlock()
		err := d.syncDir(dir)
		ds.mu.Lock()
		ds.running = false
		ds.synced = to
		if err != nil {
			ds.failures = append(ds.failures, syncFailure{from, to, err})
		}
		ds.cond.Broadcast()
	}
	for _, f := range ds.failures {
		if f.from < ticket && ticket <= f.to {
			return f.err
		}
	}
	return nil
}
