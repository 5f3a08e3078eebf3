package serve

import (
	"context"
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

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
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
	err := c.putErr(w, r, t)
	if err == nil {
		w.WriteHeader(http.StatusCreated)
		return
	}
	var he *httpError
	switch {
	case errors.As(err, &he):
		c.refuse(w, r, he.status, "%s", he.msg)
	case errors.Is(err, cachelock.ErrBusy):
		c.metrics.busy.Add(1)
		c.refuse(w, r, http.StatusServiceUnavailable, "%v", err)
	case errors.Is(err, errNoRoom) || isDiskFull(err):
		// The partial file is already gone.
		c.refuseNoRoom(w, r)
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

// putErr stores an upload.
func (c *Cache) putErr(w http.ResponseWriter, r *http.Request, t target) error {
	start := time.Now()
	limit := c.limitFor(t.kind)
	if r.ContentLength > limit {
		return refusef(http.StatusRequestEntityTooLarge, "body of %d bytes is over the limit of %d for %s", r.ContentLength, limit, t.rel)
	}
	if err := c.checkRoom(w, r.ContentLength); err != nil {
		return err
	}
	body, err := c.body(w, r, limit)
	if err != nil {
		return err
	}
	defer body.Close()

	if c.bucket != nil && t.kind != kindCacheInfo && t.kind != kindLock {
		size := int64(-1)
		if lb, ok := body.(*limitedBody); ok && lb.decoded == nil && r.ContentLength >= 0 {
			size = r.ContentLength
		}
		return c.putBucket(r.Context(), body, t, size, start)
	}
	switch t.kind {
	case kindCacheInfo:
		// The cache's own settings win; a client PUTs one only when it
		// found none, which cannot happen here. Take it and keep ours.
		_, err := io.Copy(io.Discard, body)
		return err
	case kindNarInfo:
		return c.putNarInfo(body, t, start)
	case kindRoot:
		return c.putMarker(body, t, start)
	case kindLock:
		data, err := io.ReadAll(body)
		if err != nil {
			return err
		}
		return c.locks.Acquire(t.name, data)
	}
	return c.putStream(body, t, start)
}

// body returns the request body, decoded per Content-Encoding, refusing
// more than limit decoded bytes and a client idle for too long. A body
// being decoded holds decoding memory until it is closed.
func (c *Cache) body(w http.ResponseWriter, r *http.Request, limit int64) (io.ReadCloser, error) {
	var raw io.Reader = &idleReader{r: r.Body, rc: http.NewResponseController(w), idle: c.cfg.UploadIdleTimeout}
	enc := strings.ToLower(strings.TrimSpace(r.Header.Get("Content-Encoding")))
	if enc == "" || enc == "identity" || enc == "none" { // Nix 2.32+ may send "none"
		return &limitedBody{r: raw, left: limit, limit: limit}, nil
	}
	mem := &decodeCharge{ctx: r.Context()}
	dec, err := newDecoder(enc, raw, mem)
	if err != nil {
		mem.release()
		return nil, err
	}
	return &limitedBody{r: dec, left: limit, limit: limit, decoded: dec, mem: mem}, nil
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
	r       io.Reader
	left    int64
	limit   int64
	decoded *decodedBody  // nil for a body sent as it is
	mem     *decodeCharge // the decoding memory the body holds
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
			var over error
			if b.decoded != nil && b.decoded.overBound != nil {
				over = b.decoded.overBound(err)
			}
			if over == nil {
				over = refusef(http.StatusBadRequest, "reading the body: %v", err)
			}
			err = over
		}
	}
	return n, err
}

func (b *limitedBody) Close() error {
	if b.decoded != nil && b.decoded.close != nil {
		b.decoded.close()
	}
	b.mem.release()
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
// durable when acknowledged. start is when the request came, for the
// metrics.
func (c *Cache) putStream(body io.Reader, t target, start time.Time) error {
	dst := c.path(t)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	tf := c.startTemp(dst)
	var sum hash.Hash
	want := ""
	if t.kind == kindNar {
		want = nixcache.NarURLHash(t.rel)
		if want != "" {
			sum = sha256.New()
		}
	}
	size, err := copyHashed(tf, body, sum)
	if err != nil {
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
		old := sizeOf(dst)
		if err := f.Commit(); err != nil {
			return err
		}
		c.metrics.stored(uploadOther, start, old, size)
		return nil
	}
	cm := c.durable.begin(t.rel)
	go func() {
		old := sizeOf(dst)
		err := f.Rename()
		visible := ""
		if err == nil {
			visible = dst
			c.metrics.stored(uploadNar, start, old, size)
			err = c.durable.sync(filepath.Dir(dst))
		}
		if err != nil {
			c.log.WithField("path", t.rel).WithError(err).Error("storing an acknowledged NAR failed")
		}
		if cm.end(err, visible) {
			c.metrics.resized(size, -1)
		}
	}()
	return nil
}

// putNarInfo takes a narinfo whose NAR and references are in the cache,
// and answers before it is visible: it becomes visible once they are
// durable and its own content is, and durable just after (commitNarInfo).
// Until then it is pending: reads of it wait for it, as do a narinfo
// naming it, a marker and a graceful shutdown. Nix 2.8 uploads one path
// at a time, so the fsyncs of one path overlap the transfer of the next;
// from 2.11 paths go in parallel, a narinfo after its NAR and its
// references' narinfos got their 2xx, and Nix 2.35 sends all NARs first
// (prune keeps those waiting for their narinfo while uploads go on).
func (c *Cache) putNarInfo(body io.Reader, t target, start time.Time) error {
	tf := c.startTemp(c.path(t))
	data, err := io.ReadAll(body)
	if err != nil {
		tf.abort()
		return err
	}
	f, cm, deps, err := c.stageNarInfo(tf, t, data, func() ([]dependency, error) { return c.checkNarInfo(data, t) })
	if err != nil {
		return err
	}
	go func() {
		visible, err := c.commitNarInfo(f, t, data, deps, start)
		if err != nil {
			c.log.WithField("path", t.rel).WithError(err).Error("storing an acknowledged narinfo failed")
			if c.narinfos != nil {
				c.narinfos.drop(t.rel)
			}
		}
		if cm.end(err, visible) {
			c.metrics.resized(int64(len(data)), -1)
		}
	}()
	return nil
}

// stageNarInfo runs check, writes data to tf and begins the narinfo's
// commit, with no forget running meanwhile: none deletes what check found
// until the commit has begun. On an error tf is gone.
func (c *Cache) stageNarInfo(tf *tempFile, t target, data []byte, check func() ([]dependency, error)) (*atomicfile.File, *commit, []dependency, error) {
	c.forgetting.RLock()
	defer c.forgetting.RUnlock()
	deps, err := check()
	if err != nil {
		tf.abort()
		return nil, nil, nil, err
	}
	f, err := tf.get()
	if err != nil {
		return nil, nil, nil, err
	}
	if _, err := f.Write(data); err != nil {
		f.Abort()
		return nil, nil, nil, err
	}
	return f, c.durable.begin(t.rel), deps, nil
}

// checkNarInfo refuses a narinfo that is malformed, names another path,
// lacks a trusted signature, or names a NAR or references that are not in
// the cache. It returns what the narinfo must wait for.
func (c *Cache) checkNarInfo(data []byte, t target) ([]dependency, error) {
	ni, err := c.parseNarInfoUpload(data, t)
	if err != nil {
		return nil, err
	}
	return c.narInfoDeps(ni, t)
}

// parseNarInfoUpload refuses a narinfo that is malformed, names another
// path or lacks a trusted signature.
func (c *Cache) parseNarInfoUpload(data []byte, t target) (*nixcache.NarInfo, error) {
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
	return ni, nil
}

// narInfoDeps returns what a well-formed narinfo must wait for: its NAR
// and its references, refused when they are not in the cache.
func (c *Cache) narInfoDeps(ni *nixcache.NarInfo, t target) ([]dependency, error) {
	deps := make([]dependency, 0, 1+len(ni.References))
	dep, err := c.durable.need(c.cfg.Dir, ni.URL)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, refusef(http.StatusConflict, "%s: its URL %s was not uploaded first", t.rel, ni.URL)
	} else if err != nil {
		return nil, refusef(http.StatusConflict, "%s: its URL %v", t.rel, err)
	}
	deps = append(deps, dep)
	for _, ref := range ni.References {
		if ref[:nixcache.HashLen] == t.name {
			continue
		}
		dep, err := c.durable.need(c.cfg.Dir, ref[:nixcache.HashLen]+".narinfo")
		if errors.Is(err, fs.ErrNotExist) {
			return nil, refusef(http.StatusConflict, "%s: reference %s is not in the cache (upload references first)", t.rel, ref)
		} else if err != nil {
			return nil, refusef(http.StatusConflict, "%s: reference %v", t.rel, err)
		}
		deps = append(deps, dep)
	}
	return deps, nil
}

// commitNarInfo makes an acknowledged narinfo visible once its content
// and deps are durable, then makes its name durable. It returns the path
// it became visible at, if it did.
func (c *Cache) commitNarInfo(f *atomicfile.File, t target, data []byte, deps []dependency, start time.Time) (visible string, err error) {
	defer f.Abort()
	if err := f.Flush(); err != nil {
		return "", err
	}
	// Under the guard no prune deletes anything, so what we check here is
	// still there when the narinfo appears.
	old := int64(-1)
	err = c.locks.Guard(context.Background(), func(context.Context) error {
		for _, dep := range deps {
			if err := c.durable.ready(c.cfg.Dir, dep); err != nil {
				return fmt.Errorf("%s needs %s: %w", t.rel, dep.rel, err)
			}
		}
		old = sizeOf(f.Path())
		return f.Rename()
	})
	if err != nil {
		return "", err
	}
	c.metrics.stored(uploadNarInfo, start, old, int64(len(data)))
	if c.narinfos != nil {
		c.narinfos.stored(c.cfg.Dir, t.rel, data)
	}
	return f.Path(), c.durable.sync(c.cfg.Dir)
}

func (c *Cache) putMarker(body io.Reader, t target, start time.Time) error {
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
	return c.locks.Guard(context.Background(), func(context.Context) error {
		for _, root := range roots {
			if err := c.durable.wait(c.cfg.Dir, root[:nixcache.HashLen]+".narinfo"); err != nil {
				return refusef(http.StatusConflict, "%s: %s is not in the cache", t.rel, root)
			}
		}
		old := sizeOf(dst)
		if err := f.Commit(); err != nil {
			return err
		}
		c.metrics.stored(uploadOther, start, old, int64(len(data)))
		return nil
	})
}

func (c *Cache) delete(w http.ResponseWriter, r *http.Request, t target) {
	var err error
	switch t.kind {
	case kindNarInfo:
		if c.bucket != nil {
			c.forgetBucket(w, r, t)
			return
		}
		c.forget(w, r, t)
		return
	case kindLock:
		err = c.locks.Release(t.name)
	case kindRoot:
		if c.bucket != nil {
			err = c.deleteMarkerBucket(t)
			if errors.Is(err, fs.ErrNotExist) {
				c.refuse(w, r, http.StatusNotFound, "%s: no such marker", t.rel)
				return
			}
			break
		}
		old := sizeOf(c.path(t))
		err = os.Remove(c.path(t))
		if errors.Is(err, fs.ErrNotExist) {
			c.refuse(w, r, http.StatusNotFound, "%s: no such marker", t.rel)
			return
		}
		if err == nil {
			c.metrics.resized(old, -1)
			err = atomicfile.SyncDir(filepath.Dir(c.path(t)))
		}
	}
	if err != nil {
		c.refuse(w, r, http.StatusConflict, "delete %s: %v", t.rel, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// spaceHeadroom is room an upload must leave free on the cache's file
// system, for its narinfo, the metadata and other uploads.
const spaceHeadroom = 1 << 20

// checkRoom answers 507 before the body is read when the declared length
// cannot fit, and closes the connection after the answer: Nix 2.8-2.32
// retry a PUT that got a 5xx with the same Content-Length and no body,
// which would otherwise wait out the idle timeout and cost a minute per
// retry. (A compressed body may still fill the disk as it is decoded;
// that is caught as it is written.)
func (c *Cache) checkRoom(w http.ResponseWriter, length int64) error {
	if length <= 0 || c.bucket != nil {
		return nil
	}
	free, ok := freeSpace(c.tmpDir)
	if !ok || length+spaceHeadroom <= free {
		return nil
	}
	return errNoRoom
}

// errNoRoom is a full disk found before an upload began.
var errNoRoom = errors.New("no space left in the cache")

// How long, and how much, refuseNoRoom reads of a refused body.
const (
	noRoomLinger      = 2 * time.Second
	noRoomLingerBytes = 64 << 20
)

// refuseNoRoom answers 507 (the server, not the request, is at fault) and
// closes the connection. It answers at once, then reads what the client
// still sends for a moment, so that a client sending its body reads the
// answer rather than a reset, and a retry that sends no body is let go
// after that moment rather than the idle timeout.
func (c *Cache) refuseNoRoom(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	rc.EnableFullDuplex()
	w.Header().Set("Connection", "close")
	c.refuse(w, r, http.StatusInsufficientStorage, "no space left in the cache")
	rc.Flush()
	rc.SetReadDeadline(time.Now().Add(noRoomLinger))
	io.Copy(io.Discard, io.LimitReader(r.Body, noRoomLingerBytes))
}
