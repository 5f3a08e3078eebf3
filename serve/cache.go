package serve

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// Role is what a listener lets its clients do.
type Role int

const (
	// Read answers GET and HEAD only.
	Read Role = iota
	// Write also takes uploads, markers and locks.
	Write
)

func (r Role) String() string {
	if r == Write {
		return "write"
	}
	return "read"
}

// Config is what a Cache serves and how it checks uploads.
type Config struct {
	// Dir is the cache directory; created 0755 when missing.
	Dir string
	// StoreDir is the Nix store the cache is for; default /nix/store.
	StoreDir string
	// Priority and WantMassQuery go into nix-cache-info.
	Priority      int
	WantMassQuery bool
	// TrustedKeys, when not empty, is the upload policy: a narinfo must carry
	// a valid signature by one of them.
	TrustedKeys []nixcache.PublicKey
	// MaxUploadSize bounds an upload's (decoded) body; default 8 GiB.
	MaxUploadSize int64
	// NarInfoMemory bounds the bytes of narinfos kept in memory; default
	// 64 MiB, negative turns the memory cache off.
	NarInfoMemory int64
	// UploadIdleTimeout cuts off an upload that sends nothing for this
	// long; default 60 s.
	UploadIdleTimeout time.Duration
	// StateDir, when set, is where scheduled prunes keep their metadata
	// cache: a DELETE of a narinfo reads it to scan the cache faster.
	StateDir string
	// Upstream, when set, is asked for every narinfo the cache lacks, on
	// either role, and stores what it finds (fallback.go).
	Upstream Upstream
	// Bucket, when set, is where the cache lives instead of Dir: the same
	// layout under the store's prefix (bucket.go).
	Bucket *s3store.Store
	// BucketLocks is the lock protocol on Bucket; required with it.
	BucketLocks Locks
	// BucketName is Bucket's store URL (s3store.Config.String()), under
	// which prunes of it keep their metadata cache in StateDir: a forget
	// reads it rather than every narinfo. Empty: it reads them all.
	BucketName string
	// Log receives refusals and errors; default the standard logger.
	Log *logrus.Entry
}

// Cache serves one cache directory.
type Cache struct {
	cfg      Config
	tmpDir   string
	info     []byte // nix-cache-info
	infoTime time.Time
	locks    Locks
	root     *cacheRoot // reads open files through it; nil on a bucket
	bucket   *bucket    // the cache's storage when it is a bucket
	stop     context.CancelFunc
	narinfos *memCache
	durable  *durability
	metrics  *metrics
	// closureWalks bounds the closure queries answered at once.
	closureWalks chan struct{}
	// forgetting is held for writing while a DELETE of a narinfo holds the
	// cache, and for reading by a narinfo upload from its check until its
	// commit begins (forget.go).
	forgetting sync.RWMutex
	log        *logrus.Entry

	// nix-cache-info's validators, computed once.
	infoETag, infoModified string
}

// Limits on bodies that are small by nature.
const (
	maxNarInfoSize = 1 << 20
	maxMarkerSize  = 4 << 10
	maxLockSize    = 1 << 10
	maxMetaSize    = 1 << 20 // realisations, build traces, debuginfo links
)

// New opens (creating when missing) the cache directory and writes its
// nix-cache-info, so that the directory is a valid file:// cache.
func New(cfg Config) (*Cache, error) {
	if cfg.Dir == "" && cfg.Bucket == nil {
		return nil, fmt.Errorf("cache directory not set")
	}
	if cfg.StoreDir == "" {
		cfg.StoreDir = nixcache.DefaultStoreDir
	}
	if cfg.MaxUploadSize <= 0 {
		cfg.MaxUploadSize = 8 << 30
	}
	if cfg.NarInfoMemory == 0 {
		cfg.NarInfoMemory = 64 << 20
	}
	if cfg.UploadIdleTimeout <= 0 {
		cfg.UploadIdleTimeout = 60 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	c := &Cache{
		cfg:     cfg,
		metrics: newMetrics(),
		log:     cfg.Log,

		closureWalks: make(chan struct{}, closureWalks),
	}
	c.durable = newDurability()
	wmq := 0
	if cfg.WantMassQuery {
		wmq = 1
	}
	c.info = []byte(fmt.Sprintf("StoreDir: %s\nWantMassQuery: %d\nPriority: %d\n", cfg.StoreDir, wmq, cfg.Priority))
	if cfg.Bucket != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if err := c.openBucket(ctx); err != nil {
			return nil, err
		}
		c.setInfoValidators()
		bg, stop := context.WithCancel(context.Background())
		c.stop = stop
		go c.bucket.index.relist(bg)
		return c, nil
	}
	c.tmpDir = filepath.Join(cfg.Dir, ".tmp")
	c.locks = dirLocks{cachelock.New(cfg.Dir)}
	if cfg.NarInfoMemory > 0 {
		c.narinfos = newMemCache(cfg.NarInfoMemory)
	}
	for _, d := range []string{cfg.Dir, filepath.Join(cfg.Dir, "nar"), filepath.Join(cfg.Dir, "gcroots")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create cache directory: %w", err)
		}
	}
	if err := os.MkdirAll(c.tmpDir, 0o700); err != nil {
		return nil, fmt.Errorf("create cache directory: %w", err)
	}
	var err error
	if c.root, err = openCacheRoot(cfg.Dir); err != nil {
		return nil, err
	}
	c.removeDeadUploads()
	infoPath := filepath.Join(cfg.Dir, "nix-cache-info")
	if old, err := os.ReadFile(infoPath); err != nil || string(old) != string(c.info) {
		if err := atomicfile.WriteFile(infoPath, c.info, 0o644); err != nil {
			return nil, err
		}
	}
	c.infoTime = time.Now()
	if fi, err := os.Stat(infoPath); err == nil {
		c.infoTime = fi.ModTime()
	}
	c.setInfoValidators()
	return c, nil
}

func (c *Cache) setInfoValidators() {
	c.infoETag = etagOf(int64(len(c.info)), c.infoTime)
	c.infoModified = c.infoTime.UTC().Format(http.TimeFormat)
}

// Close stops what the cache runs in the background (on a bucket, the
// listing of its narinfos). Servers of the cache must be shut down first.
func (c *Cache) Close() {
	if c.stop != nil {
		c.stop()
	}
}

// handler returns the net/http handler for role: the write role's server.
// The read role has its own, faster server (readserver.go); this one gives
// the same answers to reads.
func (c *Cache) handler(role Role) http.Handler {
	return &handler{c: c, role: role}
}

type handler struct {
	c    *Cache
	role Role
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t, err := route(r.URL)
	if err != nil {
		re := err.(*routeError)
		if re.status == http.StatusNotFound && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			http.NotFound(w, r)
			return
		}
		if !h.allowed(r.Method, t, re.status) {
			h.refuseMethod(w, r, t)
			return
		}
		h.c.refuse(w, r, re.status, "%s", re.msg)
		return
	}
	if !h.allowed(r.Method, t, 0) {
		h.refuseMethod(w, r, t)
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		h.c.serveFile(w, r, t)
	case http.MethodPut:
		h.c.put(w, r, t)
	case http.MethodDelete:
		h.c.delete(w, r, t)
	}
}

// allowed reports whether this role takes method on t. For a path that did
// not route, it answers for the method alone, so that a read listener says
// 405 to every write whatever its path.
func (h *handler) allowed(method string, t target, routeStatus int) bool {
	switch method {
	case http.MethodGet, http.MethodHead:
		return true
	case http.MethodPut:
		return h.role == Write && t.kind != kindClosure
	case http.MethodDelete:
		return h.role == Write && (routeStatus != 0 || t.kind == kindRoot || t.kind == kindLock || t.kind == kindNarInfo)
	}
	return false
}

func (h *handler) refuseMethod(w http.ResponseWriter, r *http.Request, t target) {
	allow := "GET, HEAD"
	if h.role == Write {
		allow = "GET, HEAD, PUT"
		if t.kind == kindRoot || t.kind == kindLock || t.kind == kindNarInfo {
			allow += ", DELETE"
		}
	}
	w.Header().Set("Allow", allow)
	h.c.refuse(w, r, http.StatusMethodNotAllowed, "method %s not allowed on the %s listener", r.Method, h.role)
}

// refuse answers a plain-text error and logs it with the request.
func (c *Cache) refuse(w http.ResponseWriter, r *http.Request, status int, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if c.log.Logger.IsLevelEnabled(logrus.InfoLevel) {
		c.log.WithFields(logrus.Fields{"method": r.Method, "path": r.URL.Path, "status": status, "remote": r.RemoteAddr, "reason": msg}).Info("refused")
	}
	writePlain(w, status, msg)
}

// writePlain answers status with msg as a line of plain text.
func writePlain(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Content-Length", strconv.Itoa(len(msg)+1))
	w.WriteHeader(status)
	io.WriteString(w, msg+"\n")
}

// narInfoType is a narinfo's media type, used on its own by the hot path.
const narInfoType = "text/x-nix-narinfo"

// contentType is the media type each kind of file is served as.
var contentType = map[kind]string{
	kindCacheInfo:   "text/x-nix-cache-info",
	kindNarInfo:     narInfoType,
	kindListing:     "application/json",
	kindNar:         "application/x-nix-nar",
	kindLog:         "text/plain; charset=utf-8",
	kindRealisation: "application/json",
	kindBuildTrace:  "application/json",
	kindDebugInfo:   "application/json",
	kindRoot:        "text/plain; charset=utf-8",
	kindLock:        "text/plain; charset=utf-8",
}

func (c *Cache) path(t target) string {
	return filepath.Join(c.cfg.Dir, filepath.FromSlash(t.rel))
}
