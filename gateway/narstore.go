package gateway

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// narStore keeps NARs, and the narinfos that name them, in a directory,
// within a size: the least recently used files go first. A NAR is
// downloaded once however many clients ask for it at once; a client that
// asks while it downloads reads what has arrived and waits for the rest.
// A NAR is kept, and its last byte given out, only once the whole file
// matches the hash its name carries: no client ever gets a complete but
// corrupt file from the store.
type narStore struct {
	dir   string
	limit int64
	// fetch GETs a path of the cache (the Forwarder's RoundTrip).
	fetch func(*http.Request) (*http.Response, error)
	// kept is called, without the store's lock, once a NAR is kept.
	kept func(rel string)
	// durable: files are flushed before they are kept, because the store
	// outlives the process and load trusts what it finds.
	durable bool
	// parts bounds the parts a NAR of known size is fetched in at once
	// (the circuits' count); 1 fetches every NAR whole.
	parts int
	log   *logrus.Entry

	mu        sync.Mutex
	files     map[string]*storedFile // complete files, by path relative to dir
	used      int64                  // bytes of files, and reserved by downloads
	downloads map[string]*download
	queue     []prefetch // NARs to fetch ahead, in order
	fetching  int        // prefetches running
	maxFetch  int
	closed    bool
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

// storedFile is a complete file of the store.
type storedFile struct {
	size    int64
	used    time.Time // last read, or arrival
	readers int
	// ahead: prefetched and not read yet; a prefetch does not push it out.
	ahead bool
}

// prefetch is a NAR to fetch ahead.
type prefetch struct {
	rel  string
	size int64
}

// downloadIdle fails a download that receives nothing for this long.
var downloadIdle = time.Minute

const tmpDir = ".tmp"

// openNarStore opens dir (creating it 0700), forgetting partial downloads.
// Unless keep, it empties it first, and flushes nothing: the store is
// only for this process.
func openNarStore(dir string, limit int64, maxFetch, parts int, keep bool, fetch func(*http.Request) (*http.Response, error), log *logrus.Entry) (*narStore, error) {
	if !keep {
		if err := os.RemoveAll(dir); err != nil {
			return nil, fmt.Errorf("empty %s: %w", dir, err)
		}
	}
	for _, d := range []string{dir, filepath.Join(dir, "nar"), filepath.Join(dir, tmpDir)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("create %s: %w", d, err)
		}
	}
	s := &narStore{dir: dir, limit: limit, maxFetch: maxFetch, parts: parts, fetch: fetch, durable: keep, log: log,
		files: map[string]*storedFile{}, downloads: map[string]*download{}}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.load(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.evict(0, false)
	s.mu.Unlock()
	return s, nil
}

// load takes in what an earlier run kept, and drops its partial files.
func (s *narStore) load() error {
	tmp := filepath.Join(s.dir, tmpDir)
	entries, err := os.ReadDir(tmp)
	if err != nil {
		return err
	}
	for _, e := range entries {
		os.Remove(filepath.Join(tmp, e.Name()))
	}
	for _, sub := range []string{"", "nar"} {
		entries, err := os.ReadDir(filepath.Join(s.dir, sub))
		if err != nil {
			return err
		}
		for _, e := range entries {
			rel := e.Name()
			if sub != "" {
				rel = sub + "/" + rel
			}
			ok := (sub == "nar" && nixcache.NarURLHash(rel) != "") || (sub == "" && strings.HasSuffix(rel, ".narinfo"))
			fi, err := e.Info()
			if !ok || err != nil || !fi.Mode().IsRegular() {
				continue
			}
			s.files[rel] = &storedFile{size: fi.Size(), used: fi.ModTime()}
			s.used += fi.Size()
		}
	}
	return nil
}

// evict drops the least recently used files nobody reads until need more
// bytes fit; with prefetching, files fetched ahead and not read yet stay.
// It reports whether need fits. The caller holds s.mu.
func (s *narStore) evict(need int64, prefetching bool) bool {
	if s.used+need <= s.limit {
		return true
	}
	type cand struct {
		rel string
		f   *storedFile
	}
	var cands []cand
	for rel, f := range s.files {
		if f.readers == 0 && !(prefetching && f.ahead) {
			cands = append(cands, cand{rel, f})
		}
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].f.used.Before(cands[j].f.used) })
	for _, c := range cands {
		if s.used+need <= s.limit {
			break
		}
		if err := os.Remove(filepath.Join(s.dir, filepath.FromSlash(c.rel))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.log.WithField("file", c.rel).WithError(err).Warn("gateway cache: remove")
			continue
		}
		delete(s.files, c.rel)
		s.used -= c.f.size
	}
	return s.used+need <= s.limit
}

// source is what open returns: a complete file, or a download.
type source struct {
	s    *narStore
	rel  string
	file *os.File // a complete file
	size int64
	d    *download
}

// open returns rel from the store, joining or starting its download (at
// once, ahead of the prefetches) when it is not there. size is the file's
// size when a narinfo said it, or -1.
func (s *narStore) open(rel string, size int64) (*source, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errors.New("gateway cache closed")
	}
	if f := s.files[rel]; f != nil {
		fh, err := os.Open(filepath.Join(s.dir, filepath.FromSlash(rel)))
		if err == nil {
			f.readers++
			wasAhead := f.ahead
			f.used, f.ahead = time.Now(), false
			if wasAhead {
				// It may now make room for the next ones.
				s.pump()
			}
			return &source{s: s, rel: rel, file: fh, size: f.size}, nil
		}
		delete(s.files, rel)
		s.used -= f.size
	}
	d := s.downloads[rel]
	if d == nil {
		d = s.start(rel, size, false)
	}
	d.readers++
	return &source{s: s, rel: rel, d: d}, nil
}

// Close releases the source.
func (src *source) Close() error {
	s := src.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if src.file != nil {
		if f := s.files[src.rel]; f != nil {
			f.readers--
			if f.readers == 0 && len(s.queue) > 0 {
				s.pump() // it may go now, for the next prefetch
			}
		}
		return src.file.Close()
	}
	src.d.readers--
	if src.d.kept {
		if f := s.files[src.rel]; f != nil && f.readers > 0 {
			f.readers--
			if f.readers == 0 {
				// It was kept past the bound while read: the bound holds
				// again now.
				s.evict(0, false)
				if len(s.queue) > 0 {
					s.pump()
				}
			}
		}
	}
	return nil
}

// wait waits for the head of the source's download: the onion's status
// (200 when the body follows) and the body's size; or an error when the
// onion could not be asked.
func (src *source) wait(ctx context.Context) (status int, size int64, err error) {
	if src.file != nil {
		return http.StatusOK, src.size, nil
	}
	select {
	case <-src.d.ready:
	case <-ctx.Done():
		return 0, 0, ctx.Err()
	}
	return src.d.status, src.d.size, src.d.err
}

// reader returns the body: call it after wait said 200.
func (src *source) reader() (io.ReadCloser, error) {
	if src.file != nil {
		return io.NopCloser(src.file), nil // Close closes it
	}
	d := src.d
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.failed != nil:
		return nil, d.failed
	case d.refs > 0:
		d.refs++
		return &downloadReader{d: d}, nil
	}
	// Done and kept since wait: read the kept file.
	return os.Open(filepath.Join(src.s.dir, filepath.FromSlash(d.rel)))
}

// download is a NAR on its way into the store.
type download struct {
	rel     string
	ready   chan struct{} // closed once status, size and tmp are set
	status  int
	size    int64
	err     error
	tmp     string
	readers int // under the store's lock
	// kept says, under the store's lock, that the file was kept with
	// readers set to the sources still attached: each takes one off as
	// it closes, so the file is not evicted before they open it.
	kept bool

	mu   sync.Mutex
	cond *sync.Cond
	// written is how much of the file, from its start, is there: the
	// contiguous prefix when it comes in parts.
	written int64
	parts   []part // when it comes in parts
	end     bool   // no more bytes will come
	failed  error  // why, when it ended before it was kept
	// rf reads the file as it is written, for every reader, whatever
	// becomes of its name; refs counts the download and its readers, and
	// the last to go closes it.
	rf   *os.File
	refs int
}

// release drops a reference to d's file; the caller holds d.mu.
func (d *download) release() {
	d.refs--
	if d.refs == 0 {
		d.rf.Close()
	}
}

// start starts downloading rel; the caller holds s.mu.
func (s *narStore) start(rel string, size int64, ahead bool) *download {
	d := &download{rel: rel, ready: make(chan struct{}), size: size}
	d.cond = sync.NewCond(&d.mu)
	s.downloads[rel] = d
	if size > 0 {
		s.evict(size, ahead)
		s.used += size
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.run(d, ahead)
	}()
	return d
}

// run downloads d and keeps it when it is whole and true to its name.
func (s *narStore) run(d *download, ahead bool) {
	reserved := max(d.size, 0)
	keep, err := s.get(d)
	s.mu.Lock()
	delete(s.downloads, d.rel)
	s.used -= reserved
	if err == nil && keep {
		if f := s.files[d.rel]; f != nil {
			s.used -= f.size
		}
		s.files[d.rel] = &storedFile{size: d.written, used: time.Now(), ahead: ahead && d.readers == 0, readers: d.readers}
		d.kept = true
		s.used += d.written
		s.evict(0, false)
	}
	s.mu.Unlock()
	if err != nil {
		if d.status == http.StatusOK {
			s.log.WithFields(logrus.Fields{"file": d.rel, "bytes": d.written}).WithError(err).Warn("gateway cache: download failed")
		}
		return
	}
	if keep && s.kept != nil {
		s.kept(d.rel)
	}
}

// get fetches d's body into its temporary file and, when the body is
// whole and true to its name, renames it into place (keep). A NAR of
// known size is fetched in parts at once (getParts), when the onion
// answers the first part's Range with the part.
func (s *narStore) get(d *download) (keep bool, err error) {
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	var resp *http.Response
	if parts := split(d.size, s.parts, minPart); len(parts) > 1 {
		ctx = withSpread(ctx)
		var done bool
		if resp, done, keep, err = s.getParts(ctx, d, parts); done {
			return keep, err
		}
	}
	if resp == nil {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "/"+d.rel, nil)
		if resp, err = s.fetch(req); err != nil {
			d.err = err
			close(d.ready)
			return false, err
		}
	}
	defer resp.Body.Close()
	d.status = resp.StatusCode
	if resp.StatusCode != http.StatusOK {
		close(d.ready)
		return false, fmt.Errorf("%s", resp.Status)
	}
	if d.size >= 0 && resp.ContentLength >= 0 && resp.ContentLength != d.size {
		s.log.WithFields(logrus.Fields{"file": d.rel, "narinfo": d.size, "onion": resp.ContentLength}).Debug("gateway cache: size differs from the narinfo's")
	}
	d.size = resp.ContentLength
	f, err := s.createTemp(d)
	if err != nil {
		return false, err
	}
	close(d.ready)
	err = s.copyBody(ctx, cancel, d, f, resp.Body)
	return s.finish(d, f, err)
}

// createTemp creates d's temporary file, and the handle its readers
// share; on an error it tells d's waiters.
func (s *narStore) createTemp(d *download) (*os.File, error) {
	f, err := os.CreateTemp(filepath.Join(s.dir, tmpDir), "nar-")
	if err == nil {
		d.tmp = f.Name()
		if d.rf, err = os.Open(d.tmp); err != nil {
			f.Close()
			os.Remove(d.tmp)
		}
	}
	if err != nil {
		d.status, d.err = 0, err
		close(d.ready)
		return nil, err
	}
	d.refs = 1
	return f, nil
}

// finish keeps d's file when err is nil (the body came whole and true to
// its name), and tells d's readers either way.
func (s *narStore) finish(d *download, f *os.File, err error) (bool, error) {
	if err == nil && s.durable {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(d.tmp, filepath.Join(s.dir, filepath.FromSlash(d.rel)))
	}
	if err != nil {
		os.Remove(d.tmp)
	}
	d.mu.Lock()
	d.end, d.failed = true, err
	d.cond.Broadcast()
	d.release()
	d.mu.Unlock()
	return err == nil, err
}

// Fetching a NAR in parts. Tor gives each stream a window of its own,
// and each circuit one: a large NAR on one stream of one circuit comes no
// faster than that window over the round trip, however idle the others
// are. A NAR of known size (its narinfo's FileSize) of two parts or more
// is therefore asked for in Range requests at once, one per part, over
// different circuits (a spread, forward.go), each written at its offset
// into the temporary file. Readers read the contiguous prefix as it
// grows; the whole is hashed in order as the prefix grows, and the last
// byte is given out once it matched, as for a NAR fetched whole.

// minPart is the smallest part; maxParts bounds the parts of one NAR.
const (
	minPart  = 1 << 20
	maxParts = 8
)

// Retrying a part: a part that breaks is asked for again from the byte it
// broke at, up to partTries times in a row without a byte coming, waiting
// partRetryWait times the tries so far in between (the Forwarder may
// need its probe to take requests again).
var (
	partTries     = 5
	partRetryWait = 250 * time.Millisecond
)

// part is a byte range [start, end) of a file, and how much of it came.
type part struct {
	start, end int64
	got        int64
}

// split cuts a file of size bytes into at most n parts (and maxParts) of
// at least least bytes each, of even sizes; one part when it cannot be
// cut, none when the size is not known.
func split(size int64, n int, least int64) []part {
	if size <= 0 {
		return nil
	}
	n = int(max(1, min(int64(n), int64(maxParts), size/max(least, 1))))
	parts := make([]part, n)
	for i := range parts {
		parts[i] = part{start: size * int64(i) / int64(n), end: size * int64(i+1) / int64(n)}
	}
	return parts
}

// contentRange is the Content-Range of a 206 for [start, end) of size.
func contentRange(start, end, size int64) string {
	return fmt.Sprintf("bytes %d-%d/%d", start, end-1, size)
}

// rangeAttempt is one request for a range of a file, with a context of
// its own: cancelled (with errIdle) when nothing arrives for
// downloadIdle, it fails the attempt alone.
type rangeAttempt struct {
	resp   *http.Response
	err    error
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// askRange asks for [start, end) of rel.
func (s *narStore) askRange(ctx context.Context, rel string, start, end int64) rangeAttempt {
	a := rangeAttempt{}
	a.ctx, a.cancel = context.WithCancelCause(ctx)
	req, _ := http.NewRequestWithContext(a.ctx, http.MethodGet, "/"+rel, nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", start, end-1))
	a.resp, a.err = s.fetch(req)
	return a
}

// getParts fetches d in parts, all asked for at once, and keeps it when
// it is whole and true to its name (done). When the onion answers the
// first part with anything but that part (a 200 with the whole file, a
// 404, a file of another size), the other parts are stopped and forgotten,
// and getParts returns not done, with the answer to take as the whole
// file's, or none to ask for it whole.
func (s *narStore) getParts(ctx context.Context, d *download, parts []part) (resp *http.Response, done, keep bool, err error) {
	f, err := s.createTemp(d)
	if err != nil {
		return nil, true, false, err
	}
	d.parts = parts
	// The parts' own context: a part that fails ends them all.
	pctx, pcancel := context.WithCancelCause(ctx)
	defer pcancel(nil)
	var wg sync.WaitGroup
	for i := 1; i < len(parts); i++ {
		wg.Go(func() {
			if err := s.getPart(pctx, d, f, i, rangeAttempt{}); err != nil {
				pcancel(err)
			}
		})
	}
	first := s.askRange(ctx, d.rel, parts[0].start, parts[0].end)
	if first.err != nil || first.resp.StatusCode != http.StatusPartialContent ||
		first.resp.Header.Get("Content-Range") != contentRange(parts[0].start, parts[0].end, d.size) || first.resp.Header.Get("Content-Encoding") != "" {
		pcancel(errNotParts)
		wg.Wait()
		f.Close()
		os.Remove(d.tmp)
		d.mu.Lock()
		d.parts, d.written, d.tmp = nil, 0, ""
		d.release()
		d.mu.Unlock()
		switch {
		case first.err != nil:
			first.cancel(nil)
			d.err = first.err
			close(d.ready)
			return nil, true, false, first.err
		case first.resp.StatusCode == http.StatusPartialContent:
			// Not the size the narinfo said: ask for the file whole.
			first.resp.Body.Close()
			first.cancel(nil)
			return nil, false, false, nil
		}
		// A 200 is the whole file (the onion ignores ranges); any other
		// status, the onion's answer for the file.
		context.AfterFunc(ctx, func() { first.cancel(nil) })
		return first.resp, false, false, nil
	}
	d.status = http.StatusOK
	close(d.ready)
	context.AfterFunc(pctx, func() { first.cancel(context.Cause(pctx)) })
	wg.Go(func() {
		if err := s.getPart(pctx, d, f, 0, first); err != nil {
			pcancel(err)
		}
	})
	// Wake the hashing below when a part fails.
	stop := context.AfterFunc(pctx, func() {
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	})
	err = s.hashPrefix(pctx, d, f)
	stop()
	pcancel(err)
	wg.Wait()
	keep, err = s.finish(d, f, err)
	return nil, true, keep, err
}

// errNotParts stops the parts of a file the onion does not give in parts.
var errNotParts = errors.New("the onion does not answer the file in parts")

// getPart fetches part i of d into f, from a (the answer to its first
// request) or by asking, and again from where it broke while bytes keep
// coming.
func (s *narStore) getPart(ctx context.Context, d *download, f *os.File, i int, a rangeAttempt) error {
	p := d.parts[i]
	off, tries := p.start, 0
	for {
		if a.ctx == nil {
			a = s.askRange(ctx, d.rel, off, p.end)
		}
		err := a.err
		if err == nil {
			if got := a.resp.Header.Get("Content-Range"); a.resp.StatusCode != http.StatusPartialContent || got != contentRange(off, p.end, d.size) || a.resp.Header.Get("Content-Encoding") != "" {
				err = fmt.Errorf("range %d-%d: %s, Content-Range %q", off, p.end-1, a.resp.Status, got)
			} else {
				var n int64
				n, err = s.copyPart(a, d, f, i, off, p.end)
				off += n
				if n > 0 {
					tries = 0
				}
			}
			a.resp.Body.Close()
		}
		a.cancel(nil)
		a = rangeAttempt{}
		if off == p.end {
			return nil
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if tries++; tries >= partTries {
			return fmt.Errorf("bytes %d-%d: %w", off, p.end-1, err)
		}
		s.log.WithFields(logrus.Fields{"file": d.rel, "offset": off, "end": p.end}).WithError(err).Debug("gateway cache: a part broke: asking again")
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(partRetryWait * time.Duration(tries)):
		}
	}
}

// errIdle cancels an attempt that received nothing for downloadIdle.
var errIdle = errors.New("nothing received in time")

// copyPart copies a's body into f from off, at most up to end, telling
// d's readers as the contiguous prefix grows; it returns the bytes
// written.
func (s *narStore) copyPart(a rangeAttempt, d *download, f *os.File, i int, off, end int64) (int64, error) {
	idle := time.AfterFunc(downloadIdle, func() { a.cancel(fmt.Errorf("%w (%v)", errIdle, downloadIdle)) })
	defer idle.Stop()
	body := io.LimitReader(a.resp.Body, end-off)
	buf := make([]byte, 64<<10)
	var written int64
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			idle.Reset(downloadIdle)
			if _, err := f.WriteAt(buf[:n], off+written); err != nil {
				return written, err
			}
			written += int64(n)
			d.mu.Lock()
			d.parts[i].got += int64(n)
			if prefix := d.prefix(); prefix > d.written {
				d.written = prefix
				d.cond.Broadcast()
			}
			d.mu.Unlock()
		}
		if rerr == io.EOF && off+written == end {
			return written, nil
		}
		if rerr == io.EOF {
			rerr = io.ErrUnexpectedEOF
		}
		if rerr != nil {
			if c := context.Cause(a.ctx); c != nil {
				return written, c
			}
			return written, rerr
		}
	}
}

// prefix returns how much of the file, from its start, came; the caller
// holds d.mu.
func (d *download) prefix() int64 {
	for _, p := range d.parts {
		if p.start+p.got < p.end {
			return p.start + p.got
		}
	}
	return d.size
}

// hashPrefix hashes d's file as its prefix grows, until it is whole, and
// checks it against d's name.
func (s *narStore) hashPrefix(ctx context.Context, d *download, f *os.File) error {
	h := sha256.New()
	buf := make([]byte, 256<<10)
	var hashed int64
	for hashed < d.size {
		d.mu.Lock()
		for d.written == hashed && ctx.Err() == nil {
			d.cond.Wait()
		}
		written := d.written
		d.mu.Unlock()
		if written == hashed {
			return context.Cause(ctx)
		}
		for hashed < written {
			n, err := f.ReadAt(buf[:min(int64(len(buf)), written-hashed)], hashed)
			if n == 0 && err != nil {
				return err
			}
			h.Write(buf[:n])
			hashed += int64(n)
		}
	}
	if got := nixcache.Base32(h.Sum(nil)); got != nixcache.NarURLHash(d.rel) {
		return fmt.Errorf("content hash %s does not match the file's name", got)
	}
	return nil
}

// copyBody copies body into f, telling d's readers of every byte, and
// checks the whole against d's name.
func (s *narStore) copyBody(ctx context.Context, cancel context.CancelCauseFunc, d *download, f *os.File, body io.Reader) error {
	want := nixcache.NarURLHash(d.rel)
	h := sha256.New()
	idle := time.AfterFunc(downloadIdle, func() { cancel(fmt.Errorf("nothing received for %v", downloadIdle)) })
	defer idle.Stop()
	buf := make([]byte, 64<<10)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			idle.Reset(downloadIdle)
			if _, err := f.Write(buf[:n]); err != nil {
				return err
			}
			h.Write(buf[:n])
			d.mu.Lock()
			d.written += int64(n)
			d.cond.Broadcast()
			d.mu.Unlock()
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if c := context.Cause(ctx); c != nil {
				return c
			}
			return rerr
		}
	}
	if d.size >= 0 && d.written != d.size {
		return fmt.Errorf("%d bytes, the onion said %d", d.written, d.size)
	}
	if got := nixcache.Base32(h.Sum(nil)); got != want {
		return fmt.Errorf("content hash %s does not match the file's name", got)
	}
	return nil
}

// downloadReader reads a download as it arrives. The last byte waits
// until the file was checked: a reader sees the whole file only when it
// is the right one, and an error otherwise.
type downloadReader struct {
	d    *download
	off  int64
	once sync.Once
}

func (r *downloadReader) Read(p []byte) (int, error) {
	d := r.d
	d.mu.Lock()
	var avail int64
	for {
		if d.failed != nil {
			d.mu.Unlock()
			return 0, d.failed
		}
		avail = d.written
		if !d.end {
			avail--
		}
		if r.off < avail {
			break
		}
		if d.end {
			d.mu.Unlock()
			return 0, io.EOF
		}
		d.cond.Wait()
	}
	d.mu.Unlock()
	if int64(len(p)) > avail-r.off {
		p = p[:avail-r.off]
	}
	n, err := d.rf.ReadAt(p, r.off)
	r.off += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// Close lets go of the download's file.
func (r *downloadReader) Close() error {
	r.once.Do(func() {
		r.d.mu.Lock()
		r.d.release()
		r.d.mu.Unlock()
	})
	return nil
}

// ahead queues NARs to fetch before anyone asks, as far as they fit
// beside what was fetched ahead and not read yet.
func (s *narStore) ahead(list []prefetch) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	for _, p := range list {
		if s.files[p.rel] == nil && s.downloads[p.rel] == nil {
			s.queue = append(s.queue, p)
		}
	}
	s.pump()
}

// pump starts queued prefetches while slots are free; the caller holds
// s.mu.
func (s *narStore) pump() {
	for s.fetching < s.maxFetch && len(s.queue) > 0 {
		p := s.queue[0]
		s.queue = s.queue[1:]
		if s.files[p.rel] != nil || s.downloads[p.rel] != nil {
			continue
		}
		if p.size > s.limit {
			continue // never kept: the client's own request streams it
		}
		if !s.evict(p.size, true) {
			// No room beside what was fetched ahead and waits to be
			// read: wait until a client reads some of it (open).
			s.queue = append([]prefetch{p}, s.queue...)
			return
		}
		s.fetching++
		d := s.start(p.rel, p.size, true)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			<-d.ready
			d.mu.Lock()
			for !d.end && d.err == nil && d.status == http.StatusOK {
				d.cond.Wait()
			}
			d.mu.Unlock()
			s.mu.Lock()
			s.fetching--
			s.pump()
			s.mu.Unlock()
		}()
	}
}

// keepFile writes a small file (a narinfo) into the store.
func (s *narStore) keepFile(rel string, data []byte) error {
	if err := atomicfile.WriteFile(filepath.Join(s.dir, rel), data, 0o600); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.files[rel]; f != nil {
		s.used -= f.size
	}
	s.files[rel] = &storedFile{size: int64(len(data)), used: time.Now()}
	s.used += int64(len(data))
	s.evict(0, false)
	return nil
}

// has reports whether rel is in the store, whole.
func (s *narStore) has(rel string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.files[rel] != nil
}

// close stops the downloads and waits for them.
func (s *narStore) close() {
	s.mu.Lock()
	s.closed = true
	s.queue = nil
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
}

// stats returns the store's size and file count.
func (s *narStore) stats() (bytes int64, files int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.used, len(s.files)
}
