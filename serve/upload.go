package serve

import (
	"compress/gzip"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/prune"
)

// httpError is a refusal with its status, raised inside an upload.
type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func refusef(status int, format string, args ...any) error {
	return &httpError{status: status, msg: fmt.Sprintf(format, args...)}
}

// limitFor is the largest decoded body each kind of upload may have.
func (c *Cache) limitFor(k kind) int64 {
	switch k {
	case kindNarInfo, kindCacheInfo:
		return maxNarInfoSize
	case kindRoot:
		return maxMarkerSize
	case kindLock:
		return maxLockSize
	case kindRealisation, kindBuildTrace, kindDebugInfo:
		return maxMetaSize
	}
	return c.cfg.MaxUploadSize
}

func (c *Cache) put(w http.ResponseWriter, r *http.Request, t target) {
	after, err := c.putErr(w, r, t)
	if err == nil {
		if after != nil {
			// Answer first, then finish making the upload durable: the
			// client goes on with its next path meanwhile, while this
			// connection's next request, and a graceful shutdown, wait.
			w.Header().Set("Content-Length", "0")
			w.WriteHeader(http.StatusCreated)
			http.NewResponseController(w).Flush()
			after()
			return
		}
		w.WriteHeader(http.StatusCreated)
		return
	}
	var he *httpError
	switch {
	case errors.As(err, &he):
		c.refuse(w, r, he.status, "%s", he.msg)
	case errors.Is(err, prune.ErrBusy):
		c.refuse(w, r, http.StatusServiceUnavailable, "%v", err)
	case isDiskFull(err):
		// No room: the partial file is already gone. 507 says the server,
		// not the request, is at fault.
		c.refuse(w, r, http.StatusInsufficientStorage, "no space left in the cache")
	default:
		// Whatever else went wrong was answered with a plain 4xx: Nix 2.8
		// retries a PUT that got 5xx with an empty body and then stalls.
		c.log.WithFields(map[string]any{"method": r.Method, "path": r.URL.Path}).WithError(err).Error("upload failed")
		c.refuse(w, r, http.StatusBadRequest, "upload failed: %v", err)
	}
}

func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// putErr stores an upload. It may return work to do after the answer,
// which the upload's durability needs (see putNarInfo).
func (c *Cache) putErr(w http.ResponseWriter, r *http.Request, t target) (after func(), err error) {
	limit := c.limitFor(t.kind)
	if r.ContentLength > limit {
		return nil, refusef(http.StatusRequestEntityTooLarge, "body of %d bytes is over the limit of %d for %s", r.ContentLength, limit, t.rel)
	}
	body, err := c.body(w, r, limit)
	if err != nil {
		return nil, err
	}
	defer body.Close()

	switch t.kind {
	case kindCacheInfo:
		// The cache's own settings win; a client PUTs one only when it
		// found none, which cannot happen here. Take it and keep ours.
		_, err := io.Copy(io.Discard, body)
		return nil, err
	case kindNarInfo:
		return c.putNarInfo(body, t)
	case kindRoot:
		return nil, c.putMarker(body, t)
	case kindLock:
		data, err := io.ReadAll(body)
		if err != nil {
			return nil, err
		}
		return nil, c.locks.Acquire(t.name, data)
	}
	return nil, c.putStream(body, t)
}

// body returns the request body, decoded per Content-Encoding, refusing
// more than limit decoded bytes and a client idle for too long.
func (c *Cache) body(w http.ResponseWriter, r *http.Request, limit int64) (io.ReadCloser, error) {
	var raw io.Reader = &idleReader{r: r.Body, rc: http.NewResponseController(w), idle: c.cfg.UploadIdleTimeout}
	var dec io.Reader
	var closer func()
	switch enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding"))); enc {
	case "", "identity":
		dec = raw
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(raw)
		if err != nil {
			return nil, refusef(http.StatusBadRequest, "body is not gzip: %v", err)
		}
		dec, closer = zr, func() { zr.Close() }
	case "zstd":
		zr, err := zstd.NewReader(raw, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(uint64(min(limit, 1<<30))+(1<<20)))
		if err != nil {
			return nil, refusef(http.StatusBadRequest, "body is not zstd: %v", err)
		}
		dec, closer = zr, zr.Close
	case "xz":
		xr, err := xz.NewReader(raw)
		if err != nil {
			return nil, refusef(http.StatusBadRequest, "body is not xz: %v", err)
		}
		dec = xr
	case "br":
		dec = brotli.NewReader(raw)
	default:
		return nil, refusef(http.StatusUnsupportedMediaType, "Content-Encoding %q not supported (gzip, zstd, xz, br)", enc)
	}
	return &limitedBody{r: dec, left: limit, limit: limit, close: closer}, nil
}

// idleReader extends the connection's read deadline on every read, so a
// slow but moving upload goes on and a stalled one is cut off.
type idleReader struct {
	r    io.Reader
	rc   *http.ResponseController
	idle time.Duration
}

func (ir *idleReader) Read(p []byte) (int, error) {
	ir.rc.SetReadDeadline(time.Now().Add(ir.idle))
	return ir.r.Read(p)
}

// limitedBody fails with 413 once more than limit bytes come out.
type limitedBody struct {
	r     io.Reader
	left  int64
	limit int64
	close func()
}

func (b *limitedBody) Read(p []byte) (int, error) {
	if b.left <= 0 {
		// One byte more tells a body of exactly limit bytes from a longer one.
		var one [1]byte
		if n, _ := b.r.Read(one[:]); n > 0 {
			return 0, refusef(http.StatusRequestEntityTooLarge, "body is over the limit of %d bytes", b.limit)
		}
		return b.r.Read(p[:0])
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= int64(n)
	if err != nil && !errors.Is(err, io.EOF) {
		var he *httpError
		if !errors.As(err, &he) {
			err = refusef(http.StatusBadRequest, "reading the body: %v", err)
		}
	}
	return n, err
}

func (b *limitedBody) Close() error {
	if b.close != nil {
		b.close()
	}
	return nil
}

// putStream stores a body of any size under its final name, atomically.
// A NAR named after its file hash (nar/<nix32 sha256>.nar...) must match it.
//
// A NAR is acknowledged before it is durable: the answer promises that
// its content matched its name and that it becomes visible, whole, once
// durable, moments later. A narinfo that names it waits for that (see
// putNarInfo). Should the server stop first, the NAR is lost and a narinfo
// naming it is refused, as if the NAR had never come. Other files are
// durable when acknowledged.
func (c *Cache) putStream(body io.Reader, t target) error {
	dst := c.path(t)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tf := c.startTemp(dst)
	var sum hash.Hash
	want := ""
	if t.kind == kindNar {
		want = narNameHash(t.rel)
		if want != "" {
			sum = sha256.New()
		}
	}
	if _, err := copyHashed(tf, body, sum); err != nil {
		tf.abort()
		return err
	}
	f, err := tf.get()
	if err != nil {
		return err
	}
	if sum != nil {
		if got := nixcache.Base32(sum.Sum(nil)); got != want {
			f.Abort()
			return refusef(http.StatusBadRequest, "%s: content has sha256 %s, not the hash in its name", t.rel, got)
		}
	}
	if t.kind != kindNar {
		return f.Commit()
	}
	cm := c.durable.begin(t.rel)
	go func() {
		err := f.Rename()
		visible := ""
		if err == nil {
			visible = dst
			err = c.durable.sync(filepath.Dir(dst))
		}
		if err != nil {
			c.log.WithField("path", t.rel).WithError(err).Error("storing an acknowledged NAR failed")
		}
		cm.end(err, visible)
	}()
	return nil
}

// narNameHash returns the nixbase32 sha256 that Nix names a NAR file after
// (nar/<52 chars>.nar[.ext]), or "" for a name of another form.
func narNameHash(rel string) string {
	name := strings.TrimPrefix(rel, "nar/")
	h, rest, ok := strings.Cut(name, ".")
	if !ok || !strings.HasPrefix(rest, "nar") || !nixcache.IsBase32(h, 52) {
		return ""
	}
	return h
}

// putNarInfo stores a narinfo once its NAR and references are durable.
// The answer comes once it is visible; the fsync that makes its name
// durable comes after (the returned func), before the server reads the
// connection's next request. Until it is done the narinfo is pending, and
// a narinfo naming it, or a marker, waits for it.
func (c *Cache) putNarInfo(body io.Reader, t target) (func(), error) {
	dst := c.path(t)
	tf := c.startTemp(dst)
	defer tf.abort()
	data, err := io.ReadAll(body)
	if err != nil {
		return nil, err
	}
	ni, err := nixcache.ParseNarInfo(data)
	if err != nil {
		return nil, refusef(http.StatusBadRequest, "%s: %v", t.rel, err)
	}
	if err := ni.Validate(c.cfg.StoreDir, t.name); err != nil {
		return nil, refusef(http.StatusBadRequest, "%s: %v", t.rel, err)
	}
	if len(c.cfg.TrustedKeys) > 0 && !ni.VerifiedBy(c.cfg.StoreDir, c.cfg.TrustedKeys) {
		return nil, refusef(http.StatusUnprocessableEntity, "%s: no valid signature by a trusted writer key", t.rel)
	}
	f, err := tf.get()
	if err != nil {
		return nil, err
	}
	if _, err := f.Write(data); err != nil {
		return nil, err
	}
	// While the NAR's own commit is still running.
	if err := f.Flush(); err != nil {
		return nil, err
	}
	// Under the guard no prune deletes anything, so what we check here is
	// still there when the narinfo appears.
	var cm *commit
	err = c.locks.Guard(func() error {
		if err := c.durable.wait(c.cfg.Dir, ni.URL); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return refusef(http.StatusConflict, "%s: its URL %s was not uploaded first", t.rel, ni.URL)
			}
			return refusef(http.StatusConflict, "%s: its URL %v", t.rel, err)
		}
		self := t.name
		for _, ref := range ni.References {
			if ref[:nixcache.HashLen] == self {
				continue
			}
			if err := c.durable.wait(c.cfg.Dir, ref[:nixcache.HashLen]+".narinfo"); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return refusef(http.StatusConflict, "%s: reference %s is not in the cache (upload references first)", t.rel, ref)
				}
				return refusef(http.StatusConflict, "%s: reference %v", t.rel, err)
			}
		}
		cm = c.durable.begin(t.rel)
		if err := f.Rename(); err != nil {
			cm.end(err, "")
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if c.narinfos != nil {
		c.narinfos.stored(c.cfg.Dir, t.rel, data)
	}
	return func() {
		err := c.durable.sync(c.cfg.Dir)
		if err != nil {
			c.log.WithField("path", t.rel).WithError(err).Error("making an acknowledged narinfo durable failed")
		}
		cm.end(err, dst)
	}, nil
}

func (c *Cache) putMarker(body io.Reader, t target) error {
	data, err := io.ReadAll(body)
	if err != nil {
		return err
	}
	roots, err := nixcache.ParseMarker(data, c.cfg.StoreDir)
	if err != nil {
		return refusef(http.StatusBadRequest, "%s: %v", t.rel, err)
	}
	// A marker's answer promises that all it names is durable: all that
	// was acknowledged before it.
	c.durable.barrier()
	dst := c.path(t)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	f, err := atomicfile.Create(c.tmpDir, dst, 0o644)
	if err != nil {
		return err
	}
	defer f.Abort()
	if _, err := f.Write(data); err != nil {
		return err
	}
	return c.locks.Guard(func() error {
		for _, root := range roots {
			if err := c.durable.wait(c.cfg.Dir, root[:nixcache.HashLen]+".narinfo"); err != nil {
				return refusef(http.StatusConflict, "%s: %s is not in the cache", t.rel, root)
			}
		}
		return f.Commit()
	})
}

func (c *Cache) delete(w http.ResponseWriter, r *http.Request, t target) {
	var err error
	switch t.kind {
	case kindLock:
		err = c.locks.Release(t.name)
	case kindRoot:
		err = os.Remove(c.path(t))
		if errors.Is(err, fs.ErrNotExist) {
			c.refuse(w, r, http.StatusNotFound, "%s: no such marker", t.rel)
			return
		}
		if err == nil {
			err = atomicfile.SyncDir(filepath.Dir(c.path(t)))
		}
	}
	if err != nil {
		c.refuse(w, r, http.StatusConflict, "delete %s: %v", t.rel, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}
