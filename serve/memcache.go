package serve

import (
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// memCache keeps narinfos in memory: they are small, immutable once written
// and read far more often than anything else. An entry is trusted for
// revalidateAfter and then checked against the file (identity, size, time),
// so a narinfo deleted or replaced behind our back (by a prune in another
// process) stops being served within that time.
type memCache struct {
	mu    sync.RWMutex
	m     map[string]*memEntry // by path relative to the cache directory
	bytes int64                // what m holds, as entrySize counts it
	limit int64
}

type memEntry struct {
	data     []byte
	mod      time.Time
	modified string // mod in http.TimeFormat
	etag     string
	ino      uint64
	checked  atomic.Int64 // unix nanoseconds of the last check against the file
}

func newMemEntry(data []byte, fi os.FileInfo, now int64) *memEntry {
	e := &memEntry{data: data, mod: fi.ModTime(), etag: etagOf(int64(len(data)), fi.ModTime()), ino: inode(fi)}
	e.modified = e.mod.UTC().Format(http.TimeFormat)
	e.checked.Store(now)
	return e
}

const revalidateAfter = time.Second

func newMemCache(limit int64) *memCache {
	return &memCache{m: map[string]*memEntry{}, limit: limit}
}

// fresh returns the entry for rel when it was checked against its file
// recently, and nil otherwise. It allocates nothing: it is the whole of
// most narinfo requests.
func (mc *memCache) fresh(rel []byte, now int64) *memEntry {
	mc.mu.RLock()
	e := mc.m[string(rel)]
	mc.mu.RUnlock()
	if e != nil && now-e.checked.Load() < int64(revalidateAfter) {
		return e
	}
	return nil
}

// get returns the narinfo at rel in the cache, from memory when it was
// checked recently, after checking it against the file otherwise.
func (mc *memCache) get(root *cacheRoot, rel string) (*memEntry, error) {
	now := time.Now().UnixNano()
	mc.mu.RLock()
	e := mc.m[rel]
	mc.mu.RUnlock()
	if e != nil && now-e.checked.Load() < int64(revalidateAfter) {
		return e, nil
	}
	fi, err := root.lstat(rel)
	if err == nil && !fi.Mode().IsRegular() {
		err = &fs.PathError{Op: "read", Path: rel, Err: errSymlink}
	}
	if err != nil {
		mc.drop(rel)
		return nil, err
	}
	if e != nil && e.ino == inode(fi) && int64(len(e.data)) == fi.Size() && e.mod.Equal(fi.ModTime()) {
		e.checked.Store(now)
		return e, nil
	}
	data, err := readBeneath(root, rel)
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
	if old, ok := mc.m[rel]; ok {
		mc.bytes -= entrySize(rel, old)
		delete(mc.m, rel)
	}
	for k, v := range mc.m {
		if mc.bytes+size <= mc.limit {
			break
		}
		mc.bytes -= entrySize(k, v)
		delete(mc.m, k)
	}
	mc.m[rel] = e
	mc.bytes += size
}

func (mc *memCache) drop(rel string) {
	mc.mu.Lock()
	if old, ok := mc.m[rel]; ok {
		mc.bytes -= entrySize(rel, old)
		delete(mc.m, rel)
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
