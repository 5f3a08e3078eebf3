package serve

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/valyala/fasthttp"
)

// The read role runs on fasthttp rather than net/http. Reads are the hot
// path of a cache (Nix asks for every narinfo of a closure, one request
// each), and net/http's fixed cost per request (a Request with its header
// map, a goroutine for its background read, the Date header) held narinfo
// GETs to about 0.65 of nginx's rate; fasthttp reuses its request state
// and reaches 0.9-1.1 of it (docs/benchmarks.md). Uploads stream bodies of
// gigabytes and stay on net/http.

// newReadServer returns the fasthttp server of the read role.
func (c *Cache) newReadServer(l *logrus.Entry) *fasthttp.Server {
	return &fasthttp.Server{
		Handler:               c.handleRead,
		NoDefaultServerHeader: true,
		NoDefaultContentType:  true,
		ReadTimeout:           10 * time.Second, // the request, headers and all
		IdleTimeout:           2 * time.Minute,
		// No WriteTimeout: every answer sets a deadline for its own size.
		ReadBufferSize:               16 << 10, // also the longest request head
		MaxRequestBodySize:           4 << 10,  // reads have no body worth the name
		DisablePreParseMultipartForm: true,
		CloseOnShutdown:              true,
		ConnState:                    trackFast, // for the connection cap (listener.go)
		Logger:                       fastLogger{l},
	}
}

// fastLogger sends fasthttp's own messages (broken connections and the
// like) to the debug log.
type fastLogger struct{ l *logrus.Entry }

func (f fastLogger) Printf(format string, args ...any) { f.l.Debugf(format, args...) }

// trackFast is the read role's fasthttp.Server.ConnState: it tells the
// connection's listener when the server waits for a request on it.
func trackFast(c net.Conn, st fasthttp.ConnState) {
	lc, ok := c.(*limitConn)
	if !ok {
		return
	}
	switch st {
	case fasthttp.StateIdle:
		lc.idle()
	case fasthttp.StateActive:
		lc.active()
	}
}

// narInfoPathLen is the length of "/<hash>.narinfo".
const narInfoPathLen = 1 + 32 + len(".narinfo")

func (c *Cache) handleRead(ctx *fasthttp.RequestCtx) {
	c.serveRead(ctx)
	c.countFast(ctx)
}

// countFast counts an answered read (metrics.go): a file's bytes are
// counted as they are sent (fileBody), the rest here.
func (c *Cache) countFast(ctx *fasthttp.RequestCtx) {
	m := c.metrics
	method := methodIndex(string(ctx.Method()))
	m.count(Read, method, ctx.Response.StatusCode())
	if method != methodHead && !ctx.Response.IsBodyStream() {
		m.sent[Read].Add(uint64(len(ctx.Response.Body())))
	}
}

func (c *Cache) serveRead(ctx *fasthttp.RequestCtx) {
	// fasthttp takes any HTTP/d.d; net/http, on the write role, answers
	// 505 to all but HTTP/1.x.
	if p := ctx.Request.Header.Protocol(); len(p) != len("HTTP/1.1") || p[5] != '1' {
		ctx.SetConnectionClose()
		c.refuseFast(ctx, answer{status: http.StatusHTTPVersionNotSupported, msg: "unsupported protocol version " + string(p)})
		return
	}
	m := ctx.Method()
	head := string(m) == http.MethodHead
	if !head && string(m) != http.MethodGet {
		ctx.Response.Header.Set("Allow", "GET, HEAD")
		c.refuseFast(ctx, answer{status: http.StatusMethodNotAllowed, msg: "method " + string(m) + " not allowed on the read listener"})
		return
	}
	q := query{head: head}
	// One pass over the headers; Nix sends none of these.
	ctx.Request.Header.VisitAll(func(k, v []byte) {
		if len(k) < 5 || (k[0] != 'I' && k[0] != 'R') {
			return
		}
		switch string(k) {
		case "Range":
			q.rng = string(v)
		case "If-Range":
			q.ifRange = string(v)
		case "If-Match":
			q.ifMatch = string(v)
		case "If-Unmodified-Since":
			q.ifUnmodifiedSince = string(v)
		case "If-None-Match":
			q.ifNoneMatch = string(v)
		case "If-Modified-Since":
			q.ifModifiedSince = string(v)
		}
	})

	uri := ctx.RequestURI()
	if c.narinfos != nil && len(uri) == narInfoPathLen && uri[0] == '/' && isNarInfoName(uri[1:]) {
		// The common case, answered from memory without a single allocation.
		if e := c.narinfos.fresh(uri[1:], ctx.Time().UnixNano()); e != nil {
			c.writeFast(ctx, respond(&q, narInfoType, e.etag, e.modified, e.mod, e.data, nil))
			return
		}
	}
	u, err := url.ParseRequestURI(string(uri))
	if err != nil {
		c.refuseFast(ctx, answer{status: http.StatusBadRequest, msg: "bad request target"})
		return
	}
	t, err := route(u)
	if err != nil {
		re := err.(*routeError)
		c.refuseFast(ctx, answer{status: re.status, msg: re.msg})
		return
	}
	c.writeFast(ctx, c.read(t, &q))
}

// isNarInfoName reports whether b is "<32 nixbase32 characters>.narinfo".
func isNarInfoName(b []byte) bool {
	if string(b[32:]) != ".narinfo" {
		return false
	}
	for _, ch := range b[:32] {
		if !(ch >= '0' && ch <= '9' || ch >= 'a' && ch <= 'z' && ch != 'e' && ch != 'o' && ch != 'u' && ch != 't') {
			return false
		}
	}
	return true
}

// writeFast sends an answer through fasthttp.
func (c *Cache) writeFast(ctx *fasthttp.RequestCtx, a answer) {
	ctx.Conn().SetWriteDeadline(ctx.Time().Add(sendDeadline(a.length)))
	if a.status >= 400 {
		if a.file != nil {
			a.file.Close()
		}
		if a.stream != nil {
			a.stream.Close()
		}
		c.refuseFast(ctx, a)
		return
	}
	h := &ctx.Response.Header
	h.SetStatusCode(a.status)
	if a.ctype != "" {
		h.SetContentType(a.ctype)
	}
	if a.etag != "" {
		h.Set("Etag", a.etag)
	}
	if a.modified != "" {
		h.Set("Last-Modified", a.modified)
	}
	if a.contentRange != "" {
		h.Set("Content-Range", a.contentRange)
	}
	if a.status == http.StatusNotModified {
		return
	}
	if a.stream != nil {
		// As it downloads from upstream (fallback.go): a length only
		// when the narinfo gave one (else chunked). From a bucket: a
		// file, which takes ranges.
		if a.ranges {
			h.Set("Accept-Ranges", "bytes")
		}
		ctx.SetBodyStream(a.stream, int(a.length))
		return
	}
	h.Set("Accept-Ranges", "bytes")
	switch {
	case a.file != nil:
		ctx.SetBodyStream(&fileBody{f: a.file, n: a.length, conn: ctx.Conn(), sent: &c.metrics.sent[Read]}, int(a.length))
	case a.data != nil:
		ctx.SetBody(a.data)
	default: // HEAD
		h.SetContentLength(int(a.length))
	}
}

// refuseFast answers an error in plain text; refusals other than 404 are
// logged, as on the write role.
func (c *Cache) refuseFast(ctx *fasthttp.RequestCtx, a answer) {
	switch {
	case a.err != nil:
		c.log.WithFields(logrus.Fields{"method": string(ctx.Method()), "path": string(ctx.Path())}).WithError(a.err).Error("request failed")
	case a.status != http.StatusNotFound && c.log.Logger.IsLevelEnabled(logrus.InfoLevel):
		c.log.WithFields(logrus.Fields{"method": string(ctx.Method()), "path": string(ctx.Path()), "status": a.status,
			"remote": ctx.RemoteAddr().String(), "reason": a.msg}).Info("refused")
	}
	h := &ctx.Response.Header
	h.SetStatusCode(a.status)
	h.SetContentType("text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	if a.contentRange != "" {
		h.Set("Content-Range", a.contentRange)
	}
	ctx.SetBodyString(a.msg + "\n")
}

// fileBody is a response body of n bytes from f's current offset. fasthttp
// closes it once sent; WriteTo hands the file to the connection's ReadFrom,
// which sends it with sendfile. sent counts the bytes sent.
type fileBody struct {
	f    *os.File
	n    int64
	conn net.Conn
	sent *atomic.Uint64
}

func (b *fileBody) Read(p []byte) (int, error) {
	if b.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.n {
		p = p[:b.n]
	}
	n, err := b.f.Read(p)
	b.n -= int64(n)
	b.sent.Add(uint64(n))
	return n, err
}

func (b *fileBody) WriteTo(w io.Writer) (int64, error) {
	// bufio.Writer passes a ReadFrom on to the connection only when it is
	// empty; a small file rather goes out in one write with the headers.
	if bw, ok := w.(*bufio.Writer); ok && b.n > 64<<10 {
		// Corked, the head leaves with the first pages of the file.
		cork(b.conn, true)
		defer cork(b.conn, false)
		if err := bw.Flush(); err != nil {
			return 0, err
		}
	}
	lr := &io.LimitedReader{R: b.f, N: b.n}
	n, err := io.Copy(w, lr)
	b.n -= n
	b.sent.Add(uint64(n))
	if err == nil && b.n > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *fileBody) Close() error { return b.f.Close() }
