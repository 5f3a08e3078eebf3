package serve

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

func TestConnLimitsLeaveAReserve(t *testing.T) {
	for _, tt := range []struct {
		fds, budget, perListener int
	}{
		{fds: 256, budget: 96, perListener: 48}, // the ulimit -n 256
		{fds: 1024, budget: 384, perListener: 192},
		{fds: 4096, budget: 1536, perListener: 768},
		{fds: 1 << 20, budget: 393216, perListener: 4096}, // capped for memory
		{fds: 64, budget: 16, perListener: 8},             // floors
	} {
		t.Run(fmt.Sprint(tt.fds), func(t *testing.T) {
			budget, per := connLimits(tt.fds)
			if budget != tt.budget || per != tt.perListener {
				t.Errorf("connLimits(%d) = %d, %d; want %d, %d", tt.fds, budget, per, tt.budget, tt.perListener)
			}
			if tt.fds >= 256 && 2*budget+minReserve > tt.fds {
				t.Errorf("%d connections of two descriptors each leave less than %d of %d", budget, minReserve, tt.fds)
			}
		})
	}
}

// stubListener returns the errors it holds, one per Accept, then conn,
// then net.ErrClosed; once closed, only net.ErrClosed.
type stubListener struct {
	errs   []error
	conn   net.Conn
	closed atomic.Bool
}

func (s *stubListener) Accept() (net.Conn, error) {
	if s.closed.Load() {
		return nil, net.ErrClosed
	}
	if len(s.errs) > 0 {
		err := s.errs[0]
		s.errs = s.errs[1:]
		return nil, err
	}
	if c := s.conn; c != nil {
		s.conn = nil
		return c, nil
	}
	return nil, net.ErrClosed
}
func (s *stubListener) Close() error   { s.closed.Store(true); return nil }
func (s *stubListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

func acceptErr(errno syscall.Errno) error {
	return &net.OpError{Op: "accept", Net: "tcp", Err: &syscallError{errno}}
}

// syscallError is an os.SyscallError look-alike: accept4: errno.
type syscallError struct{ errno syscall.Errno }

func (e *syscallError) Error() string { return "accept4: " + e.errno.Error() }
func (e *syscallError) Unwrap() error { return e.errno }

func TestAcceptRetriesWhenDescriptorsRunOut(t *testing.T) {
	for _, tt := range []struct {
		name  string
		errs  []error
		retry bool
	}{
		{"EMFILE", []error{acceptErr(syscall.EMFILE), acceptErr(syscall.EMFILE), acceptErr(syscall.EMFILE)}, true},
		{"ENFILE", []error{acceptErr(syscall.ENFILE)}, true},
		{"ENOBUFS", []error{acceptErr(syscall.ENOBUFS)}, true},
		{"ENOMEM", []error{acceptErr(syscall.ENOMEM)}, true},
		{"ECONNABORTED", []error{acceptErr(syscall.ECONNABORTED)}, true},
		{"all kinds in one episode", []error{acceptErr(syscall.EMFILE), acceptErr(syscall.ENFILE), acceptErr(syscall.ENOMEM), acceptErr(syscall.EMFILE)}, true},
		{"closed listener", []error{net.ErrClosed}, false},
		{"EINVAL", []error{acceptErr(syscall.EINVAL)}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			server, client := net.Pipe()
			defer client.Close()
			log, hook := logtest.NewNullLogger()
			stub := &stubListener{errs: tt.errs, conn: server}
			l := newLimitListener(stub, Read, 4, &connBudget{max: 4}, logrus.NewEntry(log))
			start := time.Now()
			c, err := l.Accept()
			if !tt.retry {
				if err == nil || !errors.Is(err, tt.errs[0]) {
					t.Fatalf("Accept = %v, %v; want the error %v", c, err, tt.errs[0])
				}
				return
			}
			if err != nil {
				t.Fatalf("Accept failed with %v; want it retried", err)
			}
			defer c.Close()
			// Back-off 5, 10, 20, ... ms.
			var want time.Duration
			for i := range tt.errs {
				want += acceptMinDelay << i
			}
			if took := time.Since(start); took < want {
				t.Errorf("retried %d errors in %v, want a back-off of %v", len(tt.errs), took, want)
			}
			var warns, infos int
			for _, e := range hook.AllEntries() {
				switch e.Message {
				case "accept failed, retrying":
					warns++
				case "accepting again":
					infos++
				}
			}
			if warns != 1 || infos != 1 {
				t.Errorf("logged %d warnings and %d recoveries for one episode, want 1 and 1", warns, infos)
			}
			if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("Accept after the stub closed = %v, want net.ErrClosed", err)
			}
		})
	}
}

func TestAcceptBackOffEndsWithClose(t *testing.T) {
	// A listener that fails forever: Close must end Accept's back-off.
	errs := make([]error, 100)
	for i := range errs {
		errs[i] = acceptErr(syscall.EMFILE)
	}
	l := newLimitListener(&stubListener{errs: errs}, Read, 4, &connBudget{max: 4}, logrus.NewEntry(logrus.New()))
	l.log.Logger.SetOutput(io.Discard)
	done := make(chan error, 1)
	go func() { _, err := l.Accept(); done <- err }()
	time.Sleep(300 * time.Millisecond) // deep into the back-off
	l.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept still backing off after Close")
	}
}

func TestConnectionCountedUntilClosedOnce(t *testing.T) {
	budget := &connBudget{max: 10}
	l := newLimitListener(&stubListener{}, Read, 2, budget, logrus.NewEntry(logrus.New()))
	var conns []*limitConn
	for range 2 {
		a, b := net.Pipe()
		defer b.Close()
		lc := l.admit(a)
		if lc == nil {
			t.Fatal("refused a connection under the cap")
		}
		lc.heard.Store(true) // busy: not to be closed for room
		lc.active()
		conns = append(conns, lc)
	}
	a, b := net.Pipe()
	defer b.Close()
	if l.admit(a) != nil {
		t.Fatal("admitted a connection past the cap of 2 busy ones")
	}
	for range 3 {
		conns[0].Close()
	}
	if n, open := l.openConns(), budget.open.Load(); n != 1 || open != 1 {
		t.Fatalf("after closing one of two connections three times: %d open, %d in the budget; want 1 and 1", n, open)
	}
	if lc := l.admit(a); lc == nil {
		t.Fatal("refused a connection after one closed")
	}
}

func TestBudgetIsSharedByListeners(t *testing.T) {
	budget := &connBudget{max: 3}
	one := newLimitListener(&stubListener{}, Read, 2, budget, logrus.NewEntry(logrus.New()))
	two := newLimitListener(&stubListener{}, Write, 2, budget, logrus.NewEntry(logrus.New()))
	busy := func(l *limitListener) *limitConn {
		a, b := net.Pipe()
		t.Cleanup(func() { a.Close(); b.Close() })
		lc := l.admit(a)
		if lc != nil {
			lc.heard.Store(true)
			lc.active()
		}
		return lc
	}
	if busy(one) == nil || busy(one) == nil || busy(two) == nil {
		t.Fatal("refused a connection within both caps and the budget")
	}
	if busy(two) != nil {
		t.Fatal("admitted a fourth connection into a budget of 3")
	}
}
