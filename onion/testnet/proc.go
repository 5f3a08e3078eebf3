package testnet

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/onion/internal/torlog"
	"github.com/sirupsen/logrus"
)

// stopTimeout is how long a tor gets to exit after SIGTERM before SIGKILL.
const stopTimeout = 10 * time.Second

// proc is one running tor.
type proc struct {
	name string
	cmd  *exec.Cmd
	out  *torlog.Writer
	done chan struct{} // closed when the process has exited and been reaped
	err  error         // its exit status, once done is closed
}

// startTor runs `tor -f torrc`, its output routed into log at Debug (the
// last warnings are kept for exitError), onLine called on each line.
func startTor(name, torrc string, log *logrus.Entry, onLine func(sev, msg string)) (*proc, error) {
	p := &proc{
		name: name,
		out:  &torlog.Writer{Log: log, Quiet: true, OnLine: onLine},
		done: make(chan struct{}),
	}
	p.cmd = exec.Command("tor", "-f", torrc)
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	p.cmd.WaitDelay = stopTimeout
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start tor %s: %w", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// exitError describes how the process ended, quoting tor's last warnings.
func (p *proc) exitError() error {
	msg := fmt.Sprintf("tor %s exited (%v)", p.name, p.err)
	if recent := p.out.Recent(); len(recent) > 0 {
		msg += ": " + strings.Join(recent, "; ")
	}
	return errors.New(msg)
}

// stop ends the process: SIGTERM, then SIGKILL after stopTimeout. It
// returns once the process is reaped.
func (p *proc) stop() error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(stopTimeout):
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.done:
		return nil
	case <-time.After(stopTimeout):
		return fmt.Errorf("stop tor %s (pid %d): still running after SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// freePorts returns n distinct TCP ports that were free on 127.0.0.1 a
// moment ago.
func freePorts(n int) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// writeFile writes a non-secret file atomically: a temporary file in the
// same directory, synced, renamed into place, the directory synced.
func writeFile(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
