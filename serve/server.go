package serve

import (
	"log"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
)

// NewServer returns an http.Server for h with the timeouts a cache facing
// slow or hostile clients needs: headers within 10 s, idle connections
// closed after 2 minutes. Bodies get their own idle deadline (see Cache),
// and large downloads a deadline proportional to their size.
func NewServer(h http.Handler, l *logrus.Entry) *http.Server {
	if l == nil {
		l = logrus.NewEntry(logrus.StandardLogger())
	}
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          log.New(l.WriterLevel(logrus.DebugLevel), "", 0),
	}
}
