package onion

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/cretz/bine/process"
)

// controlPortFileTimeout bounds the wait for tor to write its control port
// file. bine v0.2.0 itself reads that file for only about two seconds, too
// short on a busy machine, so torProcess.Start waits for it first.
const controlPortFileTimeout = 2 * time.Minute

// processCreator is the bine process.Creator of the product's tors: tor's
// output goes to out (a torlog.Writer), never to this process's stdout.
type processCreator struct {
	binary   string
	out      io.Writer
	startCtx context.Context // bounds the wait for the control port file
	last     *torProcess     // the process New made, so that launch can reap it
}

// New implements process.Creator. ctx is bine's: cancelling it kills tor.
func (c *processCreator) New(ctx context.Context, args ...string) (process.Process, error) {
	cmd := exec.CommandContext(ctx, c.binary, args...)
	cmd.Stdout = c.out
	cmd.Stderr = c.out
	cmd.WaitDelay = stopTimeout
	p := &torProcess{cmd: cmd, done: make(chan struct{}), startCtx: c.startCtx}
	for i, a := range args {
		if a == "--ControlPortWriteToFile" && i+1 < len(args) {
			p.portFile = args[i+1]
		}
	}
	c.last = p
	return p, nil
}

// torProcess is one tor process. Unlike exec.Cmd, its Wait may be called
// any number of times, from any goroutine (bine's Close calls it, and so
// does the supervisor).
type torProcess struct {
	cmd      *exec.Cmd
	portFile string
	startCtx context.Context
	done     chan struct{} // closed once the process is reaped
	err      error         // the exit status, once done is closed
}

// Start starts tor and returns once it has written its control port file.
func (p *torProcess) Start() error {
	if err := p.cmd.Start(); err != nil {
		return err
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	if p.portFile == "" {
		return nil
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.NewTimer(controlPortFileTimeout)
	defer deadline.Stop()
	for {
		if b, err := os.ReadFile(p.portFile); err == nil && strings.HasPrefix(string(b), "PORT=") {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("tor exited before opening its control port (%v)", p.err)
		case <-p.startCtx.Done():
			return fmt.Errorf("wait for tor's control port: %w", p.startCtx.Err())
		case <-deadline.C:
			return fmt.Errorf("wait for tor's control port: none after %v", controlPortFileTimeout)
		case <-tick.C:
		}
	}
}

// Wait implements process.Process.
func (p *torProcess) Wait() error {
	<-p.done
	return p.err
}

// EmbeddedControlConn implements process.Process: not supported.
func (p *torProcess) EmbeddedControlConn() (net.Conn, error) {
	return nil, process.ErrControlConnUnsupported
}

func (p *torProcess) pid() int {
	if p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

func (p *torProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// waitExit waits up to d for the process to end.
func (p *torProcess) waitExit(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}
