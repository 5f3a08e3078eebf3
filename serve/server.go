package serve

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/valyala/fasthttp"
)

// Server serves one role of a cache on any number of listeners, with the
// timeouts a cache facing slow or hostile clients needs: a request's head
// within 10 s, idle connections closed after 2 minutes, every response
// written within a deadline proportional to its size, and uploads cut off
// when idle (see Config.UploadIdleTimeout).
type Server struct {
	read  *fasthttp.Server // the read role
	write *http.Server     // the write role
	cache *Cache
}

// NewServer returns the server of role for c; l receives what the HTTP
// server itself has to say (at debug level).
func (c *Cache) NewServer(role Role, l *logrus.Entry) *Server {
	if l == nil {
		l = c.log
	}
	if role == Read {
		return &Server{read: c.newReadServer(l), cache: c}
	}
	return &Server{write: &http.Server{
		Handler:           c.handler(Write),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          log.New(l.WriterLevel(logrus.DebugLevel), "", 0),
	}, cache: c}
}

// Serve answers the connections ln accepts until Shutdown, when it
// returns nil.
func (s *Server) Serve(ln net.Listener) error {
	if s.read != nil {
		return s.read.Serve(ln)
	}
	if err := s.write.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
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
