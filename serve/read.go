package serve

import (
	"bytes"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"strconv"
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
			if e, err := c.narinfos.get(c.path(t)); err == nil {
				c.serveBytes(w, r, t.kind, e.data, e.mod, e.etag)
				return
			} else if !errors.Is(err, fs.ErrNotExist) {
				c.serverError(w, r, err)
				return
			}
			http.NotFound(w, r)
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
	mu    sync.RWMutex
	m     map[string]*memEntry
	bytes int64
	limit int64
}

type memEntry struct {
	data    []byte
	mod     time.Time
	etag    string
	ino     uint64
	checked atomic.Int64 // unix nanoseconds of the last check against the file
}

const revalidateAfter = time.Second

func newMemCache(limit int64) *memCache {
	return &memCache{m: map[string]*memEntry{}, limit: limit}
}

// get returns the narinfo at path, from memory when it was checked recently.
func (mc *memCache) get(path string) (*memEntry, error) {
	now := time.Now().UnixNano()
	mc.mu.RLock()
	e := mc.m[path]
	mc.mu.RUnlock()
	if e != nil && now-e.checked.Load() < int64(revalidateAfter) {
		return e, nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		mc.drop(path)
		return nil, err
	}
	if e != nil && e.ino == inode(fi) && int64(len(e.data)) == fi.Size() && e.mod.Equal(fi.ModTime()) {
		e.checked.Store(now)
		return e, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		mc.drop(path)
		return nil, err
	}
	e = &memEntry{data: data, mod: fi.ModTime(), etag: etagOf(int64(len(data)), fi.ModTime()), ino: inode(fi)}
	e.checked.Store(now)
	mc.put(path, e)
	return e, nil
}

// put stores e, evicting arbitrary entries (map order) beyond the limit.
func (mc *memCache) put(path string, e *memEntry) {
	size := int64(len(e.data)) + int64(len(path)) + 128
	if size > mc.limit {
		return
	}
	mc.mu.Lock()
	defer mc.mu.Unlock()
	if old := mc.m[path]; old != nil {
		delete(mc.m, path)
		mc.bytes -= int64(len(old.data)) + int64(len(path)) + 128
	}
	for k, old := range mc.m {
		if mc.bytes+size <= mc.limit {
			break
		}
		delete(mc.m, k)
		mc.bytes -= int64(len(old.data)) + int64(len(k)) + 128
	}
	mc.m[path] = e
	mc.bytes += size
}

func (mc *memCache) drop(path string) {
	mc.mu.Lock()
	if old := mc.m[path]; old != nil {
		delete(mc.m, path)
		mc.bytes -= int64(len(old.data)) + int64(len(path)) + 128
	}
	mc.mu.Unlock()
}

// stored records a narinfo this process just wrote, so the next read needs
// no disk access.
func (mc *memCache) stored(path string, data []byte) {
	fi, err := os.Stat(path)
	if err != nil {
		return
	}
	e := &memEntry{data: data, mod: fi.ModTime(), etag: etagOf(int64(len(data)), fi.ModTime()), ino: inode(fi)}
	e.checked.Store(time.Now().UnixNano())
	mc.put(path, e)
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}
