// Package torlog routes the output of a tor process into a logrus logger.
//
// It is shared by package onion (the product's tors, started through bine)
// and package onion/testnet (the tors of a private network, started with
// os/exec). It only parses tor's log line format; it starts nothing.
package torlog

import (
	"bytes"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// maxLine caps one buffered line, so that a process that never prints a
// newline cannot grow the buffer without bound.
const maxLine = 64 << 10

// recentKept is how many warning and error lines Recent returns at most,
// and recentWindow how old they may be: a crash's cause, not the warnings
// of a start long ago.
const (
	recentKept   = 8
	recentWindow = time.Minute
)

// Writer is an io.Writer for a tor process's stdout and stderr. It splits
// the output into lines and logs each one, without tor's own timestamp:
// [err] at Error, [warn] at Warn, anything else ([notice] included) at
// Debug. tor's notices are its bootstrap chatter, fifty lines at every
// start; what matters of them (bootstrapped, published) kiss-onion says
// itself.
type Writer struct {
	// Log receives the lines. It must not be nil; change it with SetLog once
	// the Writer is in use.
	Log *logrus.Entry
	// Quiet logs every line at Debug: for a test network, whose tors warn
	// about many things that are expected there.
	Quiet bool
	// OnLine, when set, is called with each line's severity ("notice",
	// "warn", ...) and message, after it is logged.
	OnLine func(severity, msg string)

	mu     sync.Mutex
	buf    []byte
	recent []recentLine
}

type recentLine struct {
	at  time.Time
	msg string
}

// Write logs every complete line in p and buffers the rest.
func (w *Writer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			if len(w.buf) > maxLine {
				w.line(string(w.buf))
				w.buf = w.buf[:0]
			}
			return len(p), nil
		}
		w.line(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}

// SetLog replaces Log, e.g. once the process id is known.
func (w *Writer) SetLog(log *logrus.Entry) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.Log = log
}

// Recent returns the last few [warn] and [err] lines of the last minute,
// oldest first: what to quote when tor exits unexpectedly.
func (w *Writer) Recent() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var lines []string
	for _, r := range w.recent {
		if time.Since(r.at) < recentWindow {
			lines = append(lines, r.msg)
		}
	}
	return lines
}

func (w *Writer) line(s string) {
	s = strings.TrimRight(s, "\r")
	if strings.TrimSpace(s) == "" {
		return
	}
	sev, msg := Parse(s)
	var level logrus.Level
	switch sev {
	case "err":
		level = logrus.ErrorLevel
	case "warn":
		level = logrus.WarnLevel
	default:
		level = logrus.DebugLevel
	}
	if w.Quiet {
		level = logrus.DebugLevel
	}
	if sev == "err" || sev == "warn" {
		w.recent = append(w.recent, recentLine{time.Now(), msg})
		if len(w.recent) > recentKept {
			w.recent = w.recent[len(w.recent)-recentKept:]
		}
	}
	w.Log.Log(level, "tor: "+msg)
	if w.OnLine != nil {
		w.OnLine(sev, msg)
	}
}

// Parse splits one line of tor's log ("Nov 26 09:27:34.802 [notice] Tor
// 0.4.9 running") into its severity ("notice") and message ("Tor 0.4.9
// running"). A line in another shape comes back whole, with severity "".
func Parse(line string) (severity, msg string) {
	open := strings.Index(line, " [")
	if open < 0 {
		return "", line
	}
	rest := line[open+2:]
	end := strings.Index(rest, "] ")
	if end < 0 {
		return "", line
	}
	sev := rest[:end]
	switch sev {
	case "debug", "info", "notice", "warn", "err":
		return sev, rest[end+2:]
	}
	return "", line
}
