package serve

import (
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// minSendRate is the slowest a download may go (bytes a second) before its
// write deadline cuts it off; Tor runs at a few MB/s, a stalled client at 0.
const minSendRate = 16 << 10

// sendGrace is the write deadline every response gets on top of its size.
const sendGrace = 60 * time.Second

// sendDeadline is how long sending n bytes may take.
func sendDeadline(n int64) time.Duration {
	return sendGrace + time.Duration(n/minSendRate)*time.Second
}

// query is what a GET or HEAD asks beyond its path, whichever HTTP server
// carried it: the read role's and the write role's share one answer.
type query struct {
	head                         bool
	rng, ifRange                 string
	ifMatch, ifUnmodifiedSince   string
	ifNoneMatch, ifModifiedSince string
}

// answer is the reply to a query. Its body comes from memory (data) or from
// a file (file, positioned at the first byte to send, length bytes long),
// which whoever writes the answer must close.
type answer struct {
	status       int
	ctype        string
	etag         string
	modified     string // Last-Modified, in http.TimeFormat
	contentRange string
	length       int64 // Content-Length
	data         []byte
	file         *os.File
	msg          string // the error's text, for a status of 400 and over
	err          error  // the cause of a 500, for the log
	// stream is a body of length bytes (-1: unknown) from upstream, as
	// it downloads, or from a bucket, which whoever writes the answer
	// must close.
	stream io.ReadCloser
	// ranges says that the stream is a file that takes ranges (from a
	// bucket), not a download in progress.
	ranges bool
}

var notFound = answer{status: http.StatusNotFound, msg: "not found"}

// pendingWait is how long a read of an upload that was acknowledged but is
// not yet visible waits for it, before answering 404.
const pendingWait = 5 * time.Second

// read answers a GET or HEAD of t. A file acknowledged to a writer is
// there for readers, even while it waits to become visible.
func (c *Cache) read(t target, q *query) answer {
	a := c.readNow(t, q)
	if a.status == http.StatusNotFound && c.durable.visible(t.rel, pendingWait) {
		a = c.readNow(t, q)
	}
	if c.cfg.Upstream != nil {
		switch {
		case a.status == http.StatusNotFound && t.kind == kindNarInfo:
			a = c.readUpstream(t, q)
		case a.status == http.StatusNotFound && t.kind == kindNar:
			a = c.readUpstreamNar(t, q)
		case a.status < 300 && t.kind == kindNar && !q.head:
			c.cfg.Upstream.Used(t.rel)
		}
	}
	return a
}

func (c *Cache) readNow(t target, q *query) answer {
	switch t.kind {
	case kindClosure:
		return c.readClosure(t, q)
	case kindCacheInfo:
		return respond(q, contentType[kindCacheInfo], c.infoETag, c.infoModified, c.infoTime, c.info, nil)
	}
	if c.bucket != nil {
		return c.readBucket(t, q)
	}
	switch t.kind {
	case kindNarInfo:
		if c.narinfos != nil {
			e, err := c.narinfos.get(c.root, t.rel)
			switch {
			case err == nil:
				return respond(q, narInfoType, e.etag, e.modified, e.mod, e.data, nil)
			case errors.Is(err, fs.ErrNotExist):
				return notFound
			case isSymlinkRefusal(err):
				return c.symlinkRefused(t, err)
			default:
				return answer{status: http.StatusInternalServerError, msg: "internal error", err: err}
			}
		}
	}
	f, err := c.root.open(t.rel)
	if err != nil {
		switch {
		case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
			return notFound
		case isSymlinkRefusal(err):
			return c.symlinkRefused(t, err)
		}
		return answer{status: http.StatusInternalServerError, msg: "internal error", err: err}
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return answer{status: http.StatusInternalServerError, msg: "internal error", err: err}
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return notFound
	}
	mod := fi.ModTime()
	if t.kind == kindRoot {
		// Only what can be a marker: a state directory misplaced under
		// gcroots/ must not hand out its keys.
		defer f.Close()
		data, ok := c.readMarker(f, fi.Size())
		if !ok {
			return notFound
		}
		return respond(q, contentType[t.kind], etagOf(fi.Size(), mod), mod.UTC().Format(http.TimeFormat), mod, data, nil)
	}
	a := respond(q, contentType[t.kind], etagOf(fi.Size(), mod), mod.UTC().Format(http.TimeFormat), mod, nil, &sized{f: f, size: fi.Size()})
	if a.file == nil {
		f.Close()
	}
	return a
}

// maxMarkerRead bounds a marker that reads serve: larger than an upload
// may be, for markers written locally (with-lock on the cache directory,
// or by hand) naming many roots.
const maxMarkerRead = 1 << 20

// readMarker reads a file under gcroots/ and returns it when it can be a
// marker: one store path a line, comments and blank lines aside.
func (c *Cache) readMarker(f *os.File, size int64) ([]byte, bool) {
	if size > maxMarkerRead {
		return nil, false
	}
	data, err := io.ReadAll(io.LimitReader(f, maxMarkerRead+1))
	if err != nil || len(data) > maxMarkerRead {
		return nil, false
	}
	if _, err := nixcache.ParseMarker(data, c.cfg.StoreDir); err != nil {
		return nil, false
	}
	return data, true
}

// symlinkRefused answers 404 for a symlink in the cache, which reads never
// follow, and warns: nothing the server writes is one.
func (c *Cache) symlinkRefused(t target, err error) answer {
	c.log.WithField("path", t.rel).WithError(err).Warn("not served: a symlink in the cache")
	return notFound
}

// sized is a file and its size, the body of an answer not held in memory:
// an open file, or (on a bucket) open, which opens n bytes from off.
type sized struct {
	f    *os.File
	size int64
	open func(off, n int64) (io.ReadCloser, error)
}

// respond answers q for a representation held in data or in file: the
// conditional headers of RFC 9110 section 13 (If-Match, If-Unmodified-Since,
// If-None-Match, If-Modified-Since, in that order), then a single byte range
// (section 14; If-Range honoured; several ranges get the whole file, which
// the RFC allows).
func respond(q *query, ctype, etag, modified string, mod time.Time, data []byte, file *sized) answer {
	size := int64(len(data))
	if file != nil {
		size = file.size
	}
	a := answer{status: http.StatusOK, ctype: ctype, etag: etag, modified: modified, length: size}
	mod = mod.Truncate(time.Second) // HTTP dates have seconds only
	switch {
	case q.ifMatch != "":
		if !etagListed(q.ifMatch, etag, false) {
			return answer{status: http.StatusPreconditionFailed, msg: "If-Match does not match"}
		}
	case q.ifUnmodifiedSince != "":
		if t, err := http.ParseTime(q.ifUnmodifiedSince); err == nil && mod.After(t) {
			return answer{status: http.StatusPreconditionFailed, msg: "modified since If-Unmodified-Since"}
		}
	}
	switch {
	case q.ifNoneMatch != "":
		if etagListed(q.ifNoneMatch, etag, true) {
			return answer{status: http.StatusNotModified, etag: etag, modified: modified}
		}
	case q.ifModifiedSince != "":
		if t, err := http.ParseTime(q.ifModifiedSince); err == nil && !mod.After(t) {
			return answer{status: http.StatusNotModified, etag: etag, modified: modified}
		}
	}
	start, n := int64(0), size
	if q.rng != "" && rangeApplies(q.ifRange, etag, mod) {
		s, l, ok := parseRange(q.rng, size)
		switch {
		case !ok:
			// A malformed or multiple range is ignored: the whole body.
		case l < 0:
			return answer{status: http.StatusRequestedRangeNotSatisfiable, contentRange: "bytes */" + strconv.FormatInt(size, 10),
				msg: "range not satisfiable: the file has " + strconv.FormatInt(size, 10) + " bytes"}
		default:
			start, n = s, l
			a.status = http.StatusPartialContent
			a.contentRange = "bytes " + strconv.FormatInt(s, 10) + "-" + strconv.FormatInt(s+l-1, 10) + "/" + strconv.FormatInt(size, 10)
			a.length = l
		}
	}
	if q.head {
		return a
	}
	if file == nil {
		a.data = data[start : start+n]
		return a
	}
	if file.open != nil {
		if n == 0 {
			a.data = []byte{}
			return a
		}
		rc, err := file.open(start, n)
		if err != nil {
			return bucketErr(err)
		}
		a.stream, a.ranges = rc, true
		return a
	}
	if start > 0 {
		if _, err := file.f.Seek(start, io.SeekStart); err != nil {
			return answer{status: http.StatusInternalServerError, msg: "internal error", err: err}
		}
	}
	a.file = file.f
	return a
}

// rangeApplies reports whether an If-Range (when there is one) lets a Range
// stand: it must name the current strong ETag or the exact modification time.
func rangeApplies(ifRange, etag string, mod time.Time) bool {
	if ifRange == "" {
		return true
	}
	if strings.HasPrefix(ifRange, `"`) {
		return ifRange == etag
	}
	t, err := http.ParseTime(ifRange)
	return err == nil && t.Equal(mod)
}

// parseRange reads a Range header of one byte range against a body of size
// bytes. ok is false for anything else (ignored, per the RFC); a length
// below zero means the range is valid but not satisfiable (416).
func parseRange(h string, size int64) (start, length int64, ok bool) {
	spec, found := strings.CutPrefix(h, "bytes=")
	if !found || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	first, last, found := strings.Cut(strings.TrimSpace(spec), "-")
	if !found {
		return 0, 0, false
	}
	if first == "" {
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n < 0 || last[0] == '+' {
			return 0, 0, false
		}
		if n == 0 || size == 0 {
			return 0, -1, true
		}
		n = min(n, size)
		return size - n, n, true
	}
	s, err := strconv.ParseInt(first, 10, 64)
	if err != nil || s < 0 || first[0] == '+' {
		return 0, 0, false
	}
	e := size - 1
	if last != "" {
		e, err = strconv.ParseInt(last, 10, 64)
		if err != nil || e < s || last[0] == '+' {
			return 0, 0, false
		}
		e = min(e, size-1)
	}
	if s >= size {
		return 0, -1, true
	}
	return s, e - s + 1, true
}

// etagListed reports whether a header's list of entity tags names etag (or
// is "*"). If-None-Match compares weakly (a W/ prefix does not matter),
// If-Match strongly.
func etagListed(list, etag string, weak bool) bool {
	for list != "" {
		var t string
		t, list, _ = strings.Cut(list, ",")
		t = strings.TrimSpace(t)
		if t == "*" {
			return true
		}
		if strings.HasPrefix(t, "W/") {
			if !weak {
				continue
			}
			t = t[2:]
		}
		if t == etag {
			return true
		}
	}
	return false
}

// etagOf is a strong validator from a file's size and modification time:
// files are replaced by rename, never edited in place.
func etagOf(size int64, mod time.Time) string {
	return `"` + strconv.FormatInt(size, 36) + "-" + strconv.FormatInt(mod.UnixNano(), 36) + `"`
}

// serveFile answers a GET or HEAD through net/http (the write role).
func (c *Cache) serveFile(w http.ResponseWriter, r *http.Request, t target) {
	h := r.Header
	q := query{
		head: r.Method == http.MethodHead, rng: h.Get("Range"), ifRange: h.Get("If-Range"),
		ifMatch: h.Get("If-Match"), ifUnmodifiedSince: h.Get("If-Unmodified-Since"),
		ifNoneMatch: h.Get("If-None-Match"), ifModifiedSince: h.Get("If-Modified-Since"),
	}
	a := c.read(t, &q)
	if a.file != nil {
		defer a.file.Close()
	}
	if a.stream != nil {
		defer a.stream.Close()
	}
	if a.status >= 400 {
		c.refuseRead(w, r, a)
		return
	}
	wh := w.Header()
	if a.ctype != "" {
		wh.Set("Content-Type", a.ctype)
	}
	if a.etag != "" {
		wh.Set("Etag", a.etag)
	}
	if a.modified != "" {
		wh.Set("Last-Modified", a.modified)
	}
	if a.status != http.StatusNotModified && a.length >= 0 {
		if a.stream == nil || a.ranges {
			wh.Set("Accept-Ranges", "bytes")
		}
		wh.Set("Content-Length", strconv.FormatInt(a.length, 10))
	}
	if a.contentRange != "" {
		wh.Set("Content-Range", a.contentRange)
	}
	if a.length > 1<<20 {
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(sendDeadline(a.length)))
	}
	w.WriteHeader(a.status)
	switch {
	case a.file != nil:
		// net/http's ResponseWriter copies an *os.File with sendfile.
		io.Copy(w, io.LimitReader(a.file, a.length))
	case a.stream != nil:
		io.Copy(w, a.stream)
	case a.data != nil:
		w.Write(a.data)
	}
}

// refuseRead answers a read that failed: 404 quietly, 500 with a log
// line, the rest as refusals.
func (c *Cache) refuseRead(w http.ResponseWriter, r *http.Request, a answer) {
	if a.contentRange != "" {
		w.Header().Set("Content-Range", a.contentRange)
	}
	switch {
	case a.err != nil:
		c.log.WithFields(map[string]any{"method": r.Method, "path": r.URL.Path}).WithError(a.err).Error("request failed")
		writePlain(w, a.status, a.msg)
	case a.status == http.StatusNotFound:
		writePlain(w, a.status, a.msg)
	default:
		c.refuse(w, r, a.status, "%s", a.msg)
	}
}
