package serve

import (
	"bytes"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// minSendRate is the slowest a download may go (bytes a second) before its
// write deadline cuts it off; Tor runs at a few MB/s, a stalled client at 0.
const minSendRate = 16 << 10

// sendGrace is the write deadline every response gets on top of its size.
const sendGrace = 60 * time.Second

func (c *Cache) serveFile(w http.ResponseWriter, r *http.Request, t target) {
	switch t.kind {
	case kindCacheInfo:
		c.serveBytes(w, r, t.kind, c.info, c.infoTime, etagOf(int64(len(c.info)), c.infoTime))
		return
	case kindNarInfo:
		if c.narinfos != nil {
			e, err := c.narinfos.get(c.cfg.Dir, t.rel)
			switch {
			case err == nil:
				c.serveNarInfo(w, r, e)
			case errors.Is(err, fs.ErrNotExist):
				http.NotFound(w, r)
			default:
				c.serverError(w, r, err)
			}
			return
		}
	}
	f, err := os.Open(c.path(t))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			http.NotFound(w, r)
			return
		}
		c.serverError(w, r, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		c.serverError(w, r, err)
		return
	}
	if !fi.Mode().IsRegular() {
		http.NotFound(w, r)
		return
	}
	h := w.Header()
	h.Set("Content-Type", contentType[t.kind])
	h.Set("ETag", etagOf(fi.Size(), fi.ModTime()))
	h.Set("Accept-Ranges", "bytes")
	if fi.Size() > 1<<20 {
		deadline := sendGrace + time.Duration(fi.Size()/minSendRate)*time.Second
		http.NewResponseController(w).SetWriteDeadline(time.Now().Add(deadline))
	}
	// ServeContent copies an *os.File with sendfile and answers Range,
	// If-Range, If-None-Match and HEAD.
	http.ServeContent(w, r, "", fi.ModTime(), f)
}

// Header values for narinfos served from memory, shared by all responses
// (net/http only reads them).
var (
	narInfoType = []string{"text/x-nix-narinfo"}
	acceptBytes = []string{"bytes"}
)

// serveNarInfo answers a narinfo from memory. Plain GETs and HEADs, all but
// every request Nix makes, take a path with nothing computed per request;
// anything conditional or ranged goes through http.ServeContent.
func (c *Cache) serveNarInfo(w http.ResponseWriter, r *http.Request, e *memEntry) {
	rh := r.Header
	if len(rh["Range"]) > 0 || len(rh["If-Range"]) > 0 || len(rh["If-Match"]) > 0 ||
		len(rh["If-Modified-Since"]) > 0 || len(rh["If-Unmodified-Since"]) > 0 {
		c.serveBytes(w, r, kindNarInfo, e.data, e.mod, e.etag)
		return
	}
	h := w.Header()
	h["Content-Type"] = narInfoType
	h["Accept-Ranges"] = acceptBytes
	h["Etag"] = e.hdrETag
	h["Last-Modified"] = e.hdrModified
	if inm := rh["If-None-Match"]; len(inm) > 0 && etagMatches(inm, e.etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	h["Content-Length"] = e.hdrLength
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		w.Write(e.data)
	}
}

// etagMatches reports whether an If-None-Match header lists etag (or *).
func etagMatches(values []string, etag string) bool {
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			t = strings.TrimSpace(t)
			if t == "*" || strings.TrimPrefix(t, "W/") == etag {
				return true
			}
		}
	}
	return false
}

func (c *Cache) serveBytes(w http.ResponseWriter, r *http.Request, k kind, data []byte, mod time.Time, etag string) {
	h := w.Header()
	h.Set("Content-Type", contentType[k])
	h.Set("ETag", etag)
	h.Set("Accept-Ranges", "bytes")
	http.ServeContent(w, r, "", mod, bytes.NewReader(data))
}

func (c *Cache) serverError(w http.ResponseWriter, r *http.Request, err error) {
	c.log.WithFields(map[string]any{"method": r.Method, "path": r.URL.Path}).WithError(err).Error("request failed")
	http.Error(w, "internal error", http.StatusInternalServerError)
}

// etagOf is a strong validator from a file's size and modification time:
// files are replaced by rename, never edited in place.
func etagOf(size int64, mod time.Time) string {
	return `"` + strconv.FormatInt(size, 36) + "-" + strconv.FormatInt(mod.UnixNano(), 36) + `"`
}

// memCache keeps narinfos in memory: they are small, immutable once written
// and read far more often than anything else. An entry is trusted for
// revalidateAfter and then checked against the file (identity, size, time),
// so a narinfo deleted or replaced behind our back (by a prune in another
// process) stops being served within that time.
type memCache struct {
	m     sync.Map // rel path -> *memEntry; lock-free reads, which is all a hit does
	mu    sync.Mutex
	bytes int64 // under mu, like every change to m
	limit int64
}

type memEntry struct {
	data    []byte
	mod     time.Time
	etag    string
	ino     uint64
	checked atomic.Int64 // unix nanoseconds of the last check against the file

	// Response header values, computed once.
	hdrETag, hdrModified, hdrLength []string
}

func newMemEntry(data []byte, fi os.FileInfo, now int64) *memEntry {
	e := &memEntry{data: data, mod: fi.ModTime(), etag: etagOf(int64(len(data)), fi.ModTime()), ino: inode(fi)}
	e.hdrETag = []string{e.etag}
	e.hdrModified = []string{e.mod.UTC().Format(http.TimeFormat)}
	e.hdrLength = []string{strconv.Itoa(len(data))}
	e.checked.Store(now)
	return e
}

const revalidateAfter = time.Second

func newMemCache(limit int64) *memCache {
	return &memCache{limit: limit}
}

// get returns the narinfo at rel in dir, from memory when it was checked
// recently. It is keyed by rel, a slice of the request's path, so a hit
// allocates nothing.
func (mc *memCache) get(dir, rel string) (*memEntry, error) {
	now := time.Now().UnixNano()
	var e *memEntry
	if v, ok := mc.m.Load(rel); ok {
		e = v.(*memEntry)
	}
	if e != nil && now-e.checked.Load() < int64(revalidateAfter) {
		return e, nil
	}
	path := filepath.Join(dir, rel)
	fi, err := os.Stat(path)
	if err != nil {
		mc.drop(rel)
		return nil, err
	}
	if e != nil && e.ino == inode(fi) && int64(len(e.data)) == fi.Size() && e.mod.Equal(fi.ModTime()) {
		e.checked.Store(now)
		return e, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		mc.drop(rel)
		return nil, err
	}
	e = newMemEntry(data, fi, now)
	mc.put(rel, e)
	return e, nil
}

// put stores e, evicting arbitrary entries beyond the limit.
func (mc *memCache) put(rel string, e *memEntry) {
	size := entrySize(rel, e)
	if size > mc.limit {
		return
	}
	mc.mu.Lock()
	defer mc.mu.Unlock()
	if old, ok := mc.m.LoadAndDelete(rel); ok {
		mc.bytes -= entrySize(rel, old.(*memEntry))
	}
	if mc.bytes+size > mc.limit {
		mc.m.Range(func(k, v any) bool {
			mc.m.Delete(k)
			mc.bytes -= entrySize(k.(string), v.(*memEntry))
			return mc.bytes+size > mc.limit
		})
	}
	mc.m.Store(rel, e)
	mc.bytes += size
}

func (mc *memCache) drop(rel string) {
	mc.mu.Lock()
	if old, ok := mc.m.LoadAndDelete(rel); ok {
		mc.bytes -= entrySize(rel, old.(*memEntry))
	}
	mc.mu.Unlock()
}

// entrySize is what an entry counts against the limit: its data, its key
// and a rough overhead.
func entrySize(rel string, e *memEntry) int64 { return int64(len(e.data)+len(rel)) + 256 }

// stored records a narinfo this process just wrote at rel in dir, so the
// next read needs no disk access.
func (mc *memCache) stored(dir, rel string, data []byte) {
	fi, err := os.Stat(filepath.Join(dir, rel))
	if err != nil {
		return
	}
	mc.put(rel, newMemEntry(data, fi, time.Now().UnixNano()))
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
