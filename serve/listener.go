package serve

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Every connection holds a file descriptor, and over the onions every
// client stream is a connection from tor: descriptors are what a flood
// exhausts first. Server.Serve therefore wraps each listener in a
// limitListener, which
//
//   - retries an Accept that failed for want of descriptors or memory,
//     after a back-off (5 ms doubling to 1 s), as net/http does, instead of
//     handing the error to the HTTP server, which may stop serving;
//   - holds at most a cap of connections. Past it, a new connection takes
//     the place of the one that has waited longest for a request (an idle
//     keep-alive connection, or one that has sent nothing yet), as nginx
//     reuses its idle connections; only when every connection is busy is
//     the new one refused, with a line of plain text;
//   - counts its connections against a budget shared by all listeners of
//     the process, which leaves a reserve of descriptors for the cache's
//     own files, upload temp files and directories.
//
// Each onion is its own listener (tor forwards it to a unix socket per
// role), so the cap of a listener is the cap of an onion: a flood of the
// read onion leaves the write onion its own connections.

// Descriptor arithmetic, from the soft RLIMIT_NOFILE, which the Go runtime
// raises to (one below) the hard limit at start (fdlimit_*.go read it).
const (
	// minReserve descriptors, or a quarter of the limit if more, are kept
	// out of the connection budget.
	minReserve = 64
	// maxConnsPerListener caps a listener whatever the descriptor limit:
	// an idle connection still costs memory (a goroutine and its buffers).
	maxConnsPerListener = 4096
)

// connLimits returns, for a descriptor limit of fds, how many connections
// all listeners together may hold and how many one listener may. A
// connection may hold a second descriptor (the file it downloads, the
// temp file of its upload), hence the halving; a listener gets half the
// budget so that one flooded listener leaves room for the others.
func connLimits(fds int) (budget, perListener int) {
	reserve := max(minReserve, fds/4)
	budget = max((fds-reserve)/2, 16)
	perListener = min(max(budget/2, 8), maxConnsPerListener)
	return budget, perListener
}

// connBudget counts the connections of all listeners of the process.
type connBudget struct {
	max  int64
	open atomic.Int64
}

func (b *connBudget) take() bool {
	if b.open.Add(1) > b.max {
		b.open.Add(-1)
		return false
	}
	return true
}

func (b *connBudget) give() { b.open.Add(-1) }

// processLimits are the budget shared by the listeners of this process and
// the default cap of one, computed from the descriptor limit at first use.
var processLimits = sync.OnceValues(func() (*connBudget, int) {
	budget, per := connLimits(fdLimit())
	return &connBudget{max: int64(budget)}, per
})

// Accept's back-off after an error it retries.
const (
	acceptMinDelay = 5 * time.Millisecond
	acceptMaxDelay = time.Second
)

// retryAccept reports whether an Accept that failed with err may succeed
// later: descriptors or memory run out, or a client gave up too early.
func retryAccept(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.ECONNRESET} {
		if errors.Is(err, errno) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Refusals past the cap.
const (
	// maxLingering refusals per listener at a time wait for what the client
	// sends, on descriptors of the reserve; more are answered at once.
	maxLingering = 8
	// refusalWrite bounds the write of a refusal; lingerTime the wait for
	// the request before it, and for the rest of what the client sends
	// after it.
	refusalWrite = 100 * time.Millisecond
	lingerTime   = time.Second
)

// refusalFor is what a connection past the cap of a listener of role gets.
//
// The read role answers 503 with Retry-After: Nix retries a read that got
// a 5xx, and Nix 2.35 waits as told. The write role answers 400: Nix 2.8
// retries a PUT that got a 5xx, 408 or 429 with the same Content-Length
// and an empty body, which, once a connection is free, would wait out the
// upload timeouts before failing; a 400 fails the upload at once, with
// this message. The write onion admits only writers, so a writer past its
// cap is most likely the one that opened all the others.
func refusalFor(role Role, maxConns int) []byte {
	status := "503 Service Unavailable\r\nRetry-After: 1"
	if role == Write {
		status = "400 Bad Request"
	}
	msg := fmt.Sprintf("kiss-onion: too many connections to the %s listener (cap %d)\n", role, maxConns)
	return fmt.Appendf(nil, "HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s",
		status, len(msg), msg)
}

// limitListener is a listener with a cap on its connections (see above).
type limitListener struct {
	net.Listener
	max     int
	budget  *connBudget
	refusal []byte
	log     *logrus.Entry

	done      chan struct{} // closed by Close
	closeOnce sync.Once
	lingering chan struct{} // a token per lingering refusal

	mu   sync.Mutex
	open int
	// waiting holds the connections on which the server waits for a
	// request, longest waiting first: a ring with waiting as its sentinel.
	waiting limitConn
	// Since the last log of the cap: connections closed and refused.
	evicted, refused int
	lastLog          time.Time

	// refusedTotal counts every refusal, for the metrics (nil: not counted).
	refusedTotal *atomic.Uint64
}

func newLimitListener(ln net.Listener, role Role, maxConns int, budget *connBudget, log *logrus.Entry) *limitListener {
	l := &limitListener{
		Listener:  ln,
		max:       maxConns,
		budget:    budget,
		refusal:   refusalFor(role, maxConns),
		log:       log.WithFields(logrus.Fields{"role": role.String(), "listener": ln.Addr().String()}),
		done:      make(chan struct{}),
		lingering: make(chan struct{}, maxLingering),
	}
	l.waiting.prev, l.waiting.next = &l.waiting, &l.waiting
	return l
}

// Accept returns the next connection within the cap. It returns an error
// only when the listener fails for good (closed, for one).
func (l *limitListener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if !retryAccept(err) {
				return nil, err
			}
			if delay == 0 {
				delay = acceptMinDelay
				l.log.WithError(err).WithField("open", l.openConns()).Warn("accept failed, retrying")
			} else {
				delay = min(2*delay, acceptMaxDelay)
			}
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.done: // the next Accept says it is closed
				t.Stop()
			}
			continue
		}
		if delay > 0 {
			delay = 0
			l.log.WithField("open", l.openConns()).Info("accepting again")
		}
		if lc := l.admit(c); lc != nil {
			return lc, nil
		}
		l.refuse(c)
	}
}

// admit counts c in, making room by closing the connection that has
// waited longest for a request if need be, or returns nil.
func (l *limitListener) admit(c net.Conn) *limitConn {
	for range 2 {
		l.mu.Lock()
		if l.open < l.max && l.budget.take() {
			l.open++
			lc := &limitConn{Conn: c, l: l}
			l.push(lc) // it waits for its first request
			l.mu.Unlock()
			return lc
		}
		victim := l.waiting.next
		if victim == &l.waiting {
			l.mu.Unlock()
			return nil
		}
		l.remove(victim)
		l.evicted++
		l.noteCap()
		l.mu.Unlock()
		// A request that arrives just now meets a closed connection; a
		// client retries an idempotent request on a reused connection.
		victim.Close()
	}
	return nil
}

// refuse answers c past the cap and closes it.
func (l *limitListener) refuse(c net.Conn) {
	l.mu.Lock()
	l.refused++
	l.noteCap()
	l.mu.Unlock()
	if l.refusedTotal != nil {
		l.refusedTotal.Add(1)
	}
	select {
	case l.lingering <- struct{}{}:
		go func() {
			defer func() { <-l.lingering }()
			sayNo(c, l.refusal, true)
		}()
	default:
		sayNo(c, l.refusal, false)
	}
}

// sayNo writes the refusal to c and closes it. With linger, it first
// waits a moment for the request, so that the answer follows it as HTTP
// clients expect, and then for the rest of what the client sends: closing
// a connection with unread input resets it, and the client may lose the
// answer. Without, it answers at once.
func sayNo(c net.Conn, refusal []byte, linger bool) {
	defer c.Close()
	if linger {
		c.SetReadDeadline(time.Now().Add(lingerTime))
		readHead(c)
	}
	c.SetWriteDeadline(time.Now().Add(refusalWrite))
	if _, err := c.Write(refusal); err != nil || !linger {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	c.SetReadDeadline(time.Now().Add(lingerTime))
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
}

// readHead reads from c up to the end of a request head, or up to 16 KiB,
// an error or the deadline.
func readHead(c net.Conn) {
	buf := make([]byte, 16<<10)
	n := 0
	for n < len(buf) {
		m, err := c.Read(buf[n:])
		n += m
		if err != nil || bytes.Contains(buf[max(0, n-m-3):n], []byte("\r\n\r\n")) {
			return
		}
	}
}

// noteCap logs that the cap was reached: at once, then at most once a
// minute while it goes on. l.mu is held.
func (l *limitListener) noteCap() {
	now := time.Now()
	if now.Sub(l.lastLog) < time.Minute {
		return
	}
	l.log.WithFields(logrus.Fields{"cap": l.max, "closed_idle": l.evicted, "refused": l.refused}).Warn("connection cap reached")
	l.lastLog, l.evicted, l.refused = now, 0, 0
}

func (l *limitListener) openConns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

// Close stops Accept, also one waiting out a back-off.
func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// push appends c to the waiting connections; l.mu is held.
func (l *limitListener) push(c *limitConn) {
	if c.prev != nil || c.closed {
		return
	}
	c.prev, c.next = l.waiting.prev, &l.waiting
	c.prev.next, l.waiting.prev = c, c
}

// remove takes c out of the waiting connections; l.mu is held.
func (l *limitListener) remove(c *limitConn) {
	if c.prev == nil {
		return
	}
	c.prev.next, c.next.prev = c.next, c.prev
	c.prev, c.next = nil, nil
}

// limitConn is a connection counted by its limitListener until closed.
type limitConn struct {
	net.Conn
	l *limitListener
	// heard is set once a byte came: the first request began.
	heard atomic.Bool

	// Guarded by l.mu: the place among the waiting, and whether Close
	// already gave the connection's place back.
	prev, next *limitConn
	closed     bool
}

func (c *limitConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && !c.heard.Load() {
		c.heard.Store(true)
		c.l.mu.Lock()
		c.l.remove(c)
		c.l.mu.Unlock()
	}
	return n, err
}

// Close closes the connection and gives its place back, once.
func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.l.mu.Lock()
	if !c.closed {
		c.closed = true
		c.l.remove(c)
		c.l.open--
		c.l.budget.give()
	}
	c.l.mu.Unlock()
	return err
}

// ReadFrom hands a file to the connection's own ReadFrom (sendfile), as
// the HTTP servers would without the wrapper.
func (c *limitConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// SyscallConn gives access to the socket (cork uses it).
func (c *limitConn) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errors.ErrUnsupported
}

// CloseWrite half-closes the connection where it can, as net/http does
// before closing one.
func (c *limitConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// idle records that the server waits for the next request on c.
func (c *limitConn) idle() {
	c.l.mu.Lock()
	c.l.push(c)
	c.l.mu.Unlock()
}

// active records that a request is being read or answered on c. Servers
// that say so before the first byte of a connection came (fasthttp) leave
// it among the waiting until then.
func (c *limitConn) active() {
	if !c.heard.Load() {
		return
	}
	c.l.mu.Lock()
	c.l.remove(c)
	c.l.mu.Unlock()
}

// trackHTTP is the write role's http.Server.ConnState.
func trackHTTP(c net.Conn, st http.ConnState) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	lc, ok := c.(*limitConn)
	if !ok {
		return
	}
	switch st {
	case http.StateIdle:
		lc.idle()
	case http.StateActive:
		lc.active()
	}
}
