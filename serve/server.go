package serve

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/valyala/fasthttp"
)

// Server serves one role of a cache on any number of listeners, with the
// limits a cache facing slow or hostile clients needs: a cap on the
// connections of each listener (listener.go), a request's head within
// 10 s, idle connections closed after 2 minutes, every response written
// within a deadline proportional to its size, and uploads cut off when
// idle (see Config.UploadIdleTimeout) or slower on average than downloads
// may be (see paced).
type Server struct {
	// MaxConns caps the connections of each listener given to Serve; set
	// it before Serve. Zero means the default, derived from the descriptor
	// limit (connLimits): at most 4096.
	MaxConns int

	read  *fasthttp.Server // the read role
	write *http.Server     // the write role, or a door (door.go)
	tls   *tls.Config      // a door's TLS, when it has one
	cache *Cache
	role  Role
	log   *logrus.Entry
	// budget is shared with the other listeners of the process.
	budget *connBudget
	// An upload must average uploadMinRate bytes a second after its
	// first uploadGrace (paced).
	uploadGrace   time.Duration
	uploadMinRate int64
}

// NewServer returns the server of role for c; l receives what the server
// has to say about its connections (accept errors, the connection cap)
// and, at debug level, what the HTTP server itself has to say.
func (c *Cache) NewServer(role Role, l *logrus.Entry) *Server {
	if l == nil {
		l = c.log
	}
	s := &Server{cache: c, role: role, log: l, uploadGrace: sendGrace, uploadMinRate: minSendRate}
	if role == Read {
		s.read = c.newReadServer(l)
		return s
	}
	s.write = &http.Server{
		Handler:           s.paced(c.countHTTP(Write, c.handler(Write))),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ConnState:         trackHTTP, // for the connection cap (listener.go)
		ErrorLog:          log.New(l.WriterLevel(logrus.DebugLevel), "", 0),
	}
	return s
}

// Serve answers the connections ln accepts, within the cap, until
// Shutdown, when it returns nil.
func (s *Server) Serve(ln net.Listener) error {
	budget, maxConns := processLimits()
	if s.budget != nil {
		budget = s.budget
	}
	if s.MaxConns > 0 {
		maxConns = s.MaxConns
	}
	ll := newLimitListener(ln, s.role, maxConns, budget, s.log)
	ll.refusedTotal = &s.cache.metrics.refusedConns[s.role]
	s.log.WithFields(logrus.Fields{"role": s.role.String(), "listener": ln.Addr().String(), "cap": maxConns, "budget": budget.max}).Info("connection limits")
	if s.read != nil {
		return s.read.Serve(ll)
	}
	var inner net.Listener = ll
	if s.tls != nil {
		inner = tls.NewListener(ll, s.tls)
	}
	if err := s.write.Serve(inner); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops accepting connections and waits, until ctx ends, for the
// requests in flight, then for the uploads they acknowledged to become
// durable.
func (s *Server) Shutdown(ctx context.Context) error {
	var err error
	if s.read != nil {
		err = s.read.ShutdownWithContext(ctx)
	} else {
		err = s.write.Shutdown(ctx)
	}
	done := make(chan struct{})
	go func() {
		s.cache.durable.barrier()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		if err == nil {
			err = ctx.Err()
		}
	}
	return err
}

// paced bounds the time an upload may take as a whole: besides going idle
// for no longer than Config.UploadIdleTimeout, its body must arrive at an
// average of uploadMinRate bytes a second once uploadGrace is over, the
// floor downloads have too (16 KiB/s after a minute; Tor runs at MB/s):
// an upload of n bytes may take a minute and n/16 KiB seconds, 1 h 45 min
// for 100 MB. A body trickling in a byte at a time, just often enough to
// stay out of the idle timeout, would otherwise hold its connection
// forever.
func (s *Server) paced(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = &pacedBody{
				ReadCloser: r.Body,
				rc:         http.NewResponseController(w),
				start:      time.Now(),
				grace:      s.uploadGrace,
				rate:       s.uploadMinRate,
				idle:       s.cache.cfg.UploadIdleTimeout,
			}
		}
		h.ServeHTTP(w, r)
	})
}

// pacedBody is a request body that fails once it falls behind its pace:
// after n bytes, the next must come before start + grace + n/rate.
type pacedBody struct {
	io.ReadCloser
	rc    *http.ResponseController
	start time.Time
	grace time.Duration
	rate  int64
	idle  time.Duration
	n     int64
}

func (b *pacedBody) due() time.Time {
	return b.start.Add(b.grace + time.Duration(float64(b.n)/float64(b.rate)*float64(time.Second)))
}

func (b *pacedBody) Read(p []byte) (int, error) {
	now := time.Now()
	due := b.due()
	if !now.Before(due) {
		return 0, b.tooSlow(now)
	}
	// The reader above (upload.go's idleReader) set an idle deadline; a
	// sooner due time wins.
	if idle := now.Add(b.idle); idle.Before(due) {
		due = idle
	}
	b.rc.SetReadDeadline(due)
	n, err := b.ReadCloser.Read(p)
	b.n += int64(n)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if now := time.Now(); !now.Before(b.due()) {
			err = b.tooSlow(now)
		}
	}
	return n, err
}

// tooSlow is the refusal of a body behind its pace: a plain 400, since Nix
// 2.8 would retry a 408 with an empty body.
func (b *pacedBody) tooSlow(now time.Time) error {
	return refusef(http.StatusBadRequest, "upload too slow: %d bytes in %s, under the minimum of %d bytes a second after the first %s",
		b.n, now.Sub(b.start).Round(time.Millisecond), b.rate, b.grace)
}
