package upstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/url"
	"os"
	"path/filepath"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/serve"
)

// A path comes from upstream in two steps. resolve fetches and checks the
// narinfos of its closure (small files, quickly): once it returns, every
// path of the closure is known to be signed, and serve may answer the
// narinfo. store then downloads the NARs, the path's own at once and its
// references' alongside, and stores each narinfo once its NAR and its
// references are stored, so that the cache on disk stays closed under
// references. A client that asks for a NAR being downloaded reads it as it
// comes (OpenNar).

// node is a path whose narinfo was resolved and that is not stored yet.
type node struct {
	hash string
	ni   *nixcache.NarInfo
	data []byte
	base *url.URL
	refs []*node // the references not in the cache when it was resolved
	// spool holds the NAR as it downloads, for the clients reading it;
	// made when the first of them or the download comes.
	mu    sync.Mutex
	spool *spool
}

// spooled returns n's spool, made in dir when it has none yet.
func (n *node) spooled(dir string) (*spool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.spool == nil {
		sp, err := newSpool(dir, int64(n.ni.FileSize))
		if err != nil {
			return nil, err
		}
		n.spool = sp
	}
	return n.spool, nil
}

// refParallel is how many references of one path are resolved or stored
// at once.
const refParallel = 4

// nestedFetch marks the context of a reference's resolve or store.
type nestedFetch struct{}

// Fetch brings the store path whose hash part is hash into c with its
// closure and returns once all of it is stored. It returns an error
// wrapping fs.ErrNotExist when no upstream has the path, or one of its
// closure, signed by an upstream key.
func (f *Fetcher) Fetch(ctx context.Context, hash string, c *serve.Cache) error {
	n, err := f.resolve(ctx, hash, c)
	if err != nil || n == nil {
		return err
	}
	err = f.store(ctx, n, c)
	f.flushKeep(c)
	return err
}

// Lookup resolves the closure of the path whose hash part is hash, within
// Config.ClosureTimeout, and returns its narinfo, while its NARs are
// fetched and stored in the background, within Config.DownloadTimeout; it
// implements serve.Upstream. It returns nil and no error when the path
// is in the cache.
func (f *Fetcher) Lookup(ctx context.Context, hash string, c *serve.Cache) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.ClosureTimeout)
	defer cancel()
	n, err := f.resolve(ctx, hash, c)
	if err != nil || n == nil {
		return nil, err
	}
	f.storeInBackground(n, c)
	return n.data, nil
}

// OpenNar returns a reader of the NAR file at url, of a path being
// fetched, from its first byte as it downloads; it implements
// serve.Upstream. The reader fails when the download does: what it gave
// may not be trusted before its io.EOF.
func (f *Fetcher) OpenNar(url string, c *serve.Cache) (serve.NarDownload, bool) {
	f.mu.Lock()
	n := f.byURL[url]
	f.mu.Unlock()
	if n == nil || c.HasNar(url) {
		return nil, false
	}
	sp, err := n.spooled(f.spoolDir())
	if err != nil {
		f.log.WithError(err).Warn("NAR not streamed")
		return nil, false
	}
	r := sp.open()
	if r == nil {
		return nil, false
	}
	f.storeInBackground(n, c)
	return r, true
}

func (f *Fetcher) storeInBackground(n *node, c *serve.Cache) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), f.cfg.DownloadTimeout)
		defer cancel()
		if err := f.store(ctx, n, c); err != nil {
			f.log.WithField("path", n.ni.StorePath).WithError(err).Warn("not stored from upstream")
		}
		f.flushKeep(c)
	}()
}

// flushKeep rewrites the keep marker of c, if there is one.
func (f *Fetcher) flushKeep(c *serve.Cache) {
	if f.keeper != nil {
		if err := f.keeper.flush(f.keeper.store(c)); err != nil {
			f.log.WithError(err).Error("keep marker not written")
		}
	}
}

// resolve returns the node of hash, with its closure resolved: nil when c
// has the path.
func (f *Fetcher) resolve(ctx context.Context, hash string, c *serve.Cache) (*node, error) {
	if !nixcache.IsHashPart(hash) {
		return nil, fmt.Errorf("%q is not a store hash: %w", hash, fs.ErrNotExist)
	}
	if c.HasNarInfo(hash) {
		return nil, nil
	}
	if n := f.pending(hash); n != nil {
		return n, nil
	}
	if err := f.remembered(hash); err != nil {
		return nil, err
	}
	err := f.resolving.do(hash, func() error {
		if f.pending(hash) != nil || c.HasNarInfo(hash) {
			return nil
		}
		err := f.resolveOne(ctx, hash, c)
		if err != nil && ctx.Err() == nil {
			f.remember(hash)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if n := f.pending(hash); n != nil {
		return n, nil
	}
	if c.HasNarInfo(hash) {
		return nil, nil
	}
	return nil, fmt.Errorf("%s: fetched and lost: %w", hash, fs.ErrNotExist)
}

func (f *Fetcher) resolveOne(ctx context.Context, hash string, c *serve.Cache) error {
	ni, data, base, err := f.narInfo(ctx, hash)
	if err != nil {
		return err
	}
	if int64(ni.FileSize) > f.cfg.MaxNarSize || int64(ni.NarSize) > f.cfg.MaxNarSize {
		return fmt.Errorf("%s: %d bytes (%d as a file) is over the upstream NAR size limit of %d", ni.StorePath, ni.NarSize, ni.FileSize, f.cfg.MaxNarSize)
	}
	n := &node{hash: hash, ni: ni, data: data, base: base}
	var refs []string
	for _, ref := range ni.References {
		if h := ref[:nixcache.HashLen]; h != hash && !c.HasNarInfo(h) {
			refs = append(refs, ref)
		}
	}
	n.refs = make([]*node, len(refs))
	err = f.each(ctx, refs, func(ctx context.Context, i int, ref string) error {
		r, err := f.resolve(ctx, ref[:nixcache.HashLen], c)
		n.refs[i] = r
		if err != nil {
			return fmt.Errorf("%s: reference %s: %w", ni.StorePath, ref, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.nodes[hash] = n
	f.byURL[ni.URL] = n
	f.mu.Unlock()
	return nil
}

// pending returns the resolved node of hash not yet stored, or nil.
func (f *Fetcher) pending(hash string) *node {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.nodes[hash]
}

// done forgets a node once stored, or once storing it failed.
func (f *Fetcher) done(n *node) {
	f.mu.Lock()
	if f.nodes[n.hash] == n {
		delete(f.nodes, n.hash)
	}
	if f.byURL[n.ni.URL] == n {
		delete(f.byURL, n.ni.URL)
	}
	f.mu.Unlock()
}

// store downloads and stores n: its NAR and its references at the same
// time, then its narinfo.
func (f *Fetcher) store(ctx context.Context, n *node, c *serve.Cache) error {
	return f.flights.do(n.hash, func() error {
		if f.pending(n.hash) != n {
			// Stored, or failed, since it was resolved.
			if c.HasNarInfo(n.hash) {
				return nil
			}
			return fmt.Errorf("%s: not stored: %w", n.ni.StorePath, fs.ErrNotExist)
		}
		err := f.storeOne(ctx, n, c)
		if err != nil && ctx.Err() == nil {
			f.remember(n.hash)
		}
		f.done(n)
		return err
	})
}

func (f *Fetcher) storeOne(ctx context.Context, n *node, c *serve.Cache) error {
	ctx = context.WithValue(ctx, nestedFetch{}, true)
	sp, err := n.spooled(f.spoolDir())
	if err != nil {
		return err
	}
	narDone := make(chan error, 1)
	go func() {
		if c.HasNar(n.ni.URL) {
			sp.finish(errOnDisk)
			narDone <- nil
			return
		}
		f.downloads <- struct{}{}
		err := f.nar(ctx, n.base, n.ni, c, sp)
		<-f.downloads
		sp.finish(err)
		narDone <- err
	}()
	lsDone := make(chan struct{})
	go func() {
		defer close(lsDone)
		f.listing(ctx, n, c)
	}()
	refs := make([]string, len(n.refs))
	err = f.each(ctx, refs, func(ctx context.Context, i int, _ string) error {
		if r := n.refs[i]; r != nil {
			if err := f.store(ctx, r, c); err != nil {
				return fmt.Errorf("%s: reference %s: %w", n.ni.StorePath, r.ni.StorePath, err)
			}
		}
		return nil
	})
	if narErr := <-narDone; err == nil {
		err = narErr
	}
	<-lsDone
	if err != nil {
		return err
	}
	if err := c.StoreNarInfo(n.hash, n.data); err != nil {
		return err
	}
	f.log.WithFields(logrus.Fields{"path": n.ni.StorePath, "upstream": n.base.Redacted(), "size": n.ni.FileSize}).Info("fetched from upstream")
	if f.keeper != nil {
		f.keeper.fetched(n.ni)
	}
	if f.cfg.Fetched != nil {
		f.cfg.Fetched(n.ni.StorePath, n.ni.FileSize)
	}
	return nil
}

// each runs fn for every item, refParallel at a time, and returns the
// first error, after which the others' context is cancelled.
func (f *Fetcher) each(ctx context.Context, items []string, fn func(ctx context.Context, i int, item string) error) error {
	ctx, cancel := context.WithCancel(context.WithValue(ctx, nestedFetch{}, true))
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
		slots = make(chan struct{}, refParallel)
	)
	for i, item := range items {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-slots; wg.Done() }()
			if err := fn(ctx, i, item); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}()
	}
	wg.Wait()
	return first
}

// spoolDir is where NARs being downloaded are spooled for the clients
// reading them.
func (f *Fetcher) spoolDir() string {
	if f.cfg.SpoolDir != "" {
		return f.cfg.SpoolDir
	}
	if f.cfg.CacheDir != "" {
		return filepath.Join(f.cfg.CacheDir, ".tmp")
	}
	return os.TempDir()
}

// errOnDisk ends the spool of a NAR that was already in the cache: its
// readers read it from there.
var errOnDisk = errors.New("the NAR is in the cache: read it again")

// spool is a NAR file as it downloads: an unlinked temporary file that
// readers follow, each from its first byte, until the download ends.
type spool struct {
	f    *os.File
	mu   sync.Mutex
	cond *sync.Cond
	n    int64 // bytes written
	// size is the file's size when known: its last byte is held back
	// until the download is checked, so that a reader of a file that
	// fails its check is cut off rather than handed all it expected.
	size int64
	done bool
	err  error
	refs int // the writer and the open readers
}

func newSpool(dir string, size int64) (*spool, error) {
	f, err := os.CreateTemp(dir, "upstream-*.nar")
	if err != nil {
		return nil, fmt.Errorf("spool a NAR: %w", err)
	}
	os.Remove(f.Name())
	s := &spool{f: f, size: size, refs: 1}
	s.cond = sync.NewCond(&s.mu)
	return s, nil
}

func (s *spool) Write(p []byte) (int, error) {
	n, err := s.f.WriteAt(p, s.n)
	s.mu.Lock()
	s.n += int64(n)
	s.cond.Broadcast()
	s.mu.Unlock()
	if err != nil {
		// The readers fail; the download goes on into the cache.
		s.finish(fmt.Errorf("spool: %w", err))
	}
	return len(p), nil
}

// finish ends the download: a nil err means it was stored whole.
func (s *spool) finish(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return
	}
	s.done, s.err = true, err
	s.cond.Broadcast()
	s.release()
}

// release drops a reference; the caller holds s.mu.
func (s *spool) release() {
	s.refs--
	if s.refs == 0 {
		s.f.Close()
	}
}

// open returns a new reader, or nil once the download failed.
func (s *spool) open() *spoolReader {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refs == 0 || (s.done && s.err != nil) {
		return nil
	}
	s.refs++
	end := int64(math.MaxInt64)
	if s.size > 0 {
		end = s.size
	}
	return &spoolReader{s: s, end: end}
}

// readable is how far a reader that stops at end may read; the caller
// holds s.mu. The last byte it asks for is held back until the download
// is checked, so that a reader of a file that fails its check is cut off
// rather than handed all it expected.
func (s *spool) readable(end int64) int64 {
	if s.done {
		return min(s.n, end)
	}
	return min(s.n, end-1)
}

// spoolReader reads a spool from off to end (the file's size, or
// math.MaxInt64 when unknown).
type spoolReader struct {
	s      *spool
	off    int64
	end    int64
	closed bool
}

// Size is the file's size, -1 when unknown.
func (r *spoolReader) Size() int64 {
	if r.s.size <= 0 {
		return -1
	}
	return r.s.size
}

// Narrow makes r read the n bytes from start only.
func (r *spoolReader) Narrow(start, n int64) {
	r.off, r.end = start, start+n
}

func (r *spoolReader) Read(p []byte) (int, error) {
	s := r.s
	s.mu.Lock()
	for r.off >= s.readable(r.end) && !s.done {
		s.cond.Wait()
	}
	avail, done, err := s.readable(r.end)-r.off, s.done, s.err
	s.mu.Unlock()
	if done && err != nil {
		return 0, err
	}
	if avail <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > avail {
		p = p[:avail]
	}
	n, rerr := s.f.ReadAt(p, r.off)
	r.off += int64(n)
	if rerr == io.EOF && n > 0 {
		rerr = nil
	}
	return n, rerr
}

func (r *spoolReader) Close() error {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if !r.closed {
		r.closed = true
		r.s.release()
	}
	return nil
}
