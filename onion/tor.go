package onion

import (
	"context"
	"errors"
	"fmt"
	"net/textproto"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cretz/bine/control"
	"github.com/cretz/bine/tor"
	"github.com/kiss-onion/kiss-onion/onion/internal/torlog"
	"github.com/sirupsen/logrus"
)

// Timings of the supervision. Variables, so that a test can shorten them.
var (
	// controlTimeout bounds one control port command; a tor that takes longer
	// is taken for hung, killed and restarted.
	controlTimeout = 30 * time.Second
	// healthEvery is how often the supervisor checks that tor answers.
	healthEvery = 10 * time.Second
)

const (
	// stopTimeout is how long tor gets to exit before it is killed, and
	// then how long the kill gets.
	stopTimeout = 10 * time.Second
	// minBackoff and maxBackoff bound the pause before a restart; it doubles
	// after each restart that does not last stableAfter.
	minBackoff  = time.Second
	maxBackoff  = time.Minute
	stableAfter = 5 * time.Minute
	// bootstrapPoll is the pause between two bootstrap status polls.
	bootstrapPoll = 250 * time.Millisecond
)

// ErrClosed is returned by the methods of a Tor after Close.
var ErrClosed = errors.New("tor closed")

// Config configures a tor started by Start.
type Config struct {
	// Binary is the tor program; empty means "tor" from PATH.
	Binary string
	// DataDir is tor's DataDirectory, created 0700. Required. kiss-onion
	// writes its torrc there at each start.
	DataDir string
	// TorrcLines are extra torrc lines, e.g. a private network's
	// DirAuthority lines (testnet.Network.TorrcLines). They come after
	// kiss-onion's own lines, so they override them; they must not set
	// SocksPort, ControlPort or DataDirectory.
	TorrcLines []string
	// Socks opens a SOCKS5 port on 127.0.0.1 (a port tor picks, with
	// ExtendedErrors, see SocksAddr): a client tor. A service-only tor
	// leaves it false and listens on no TCP port but its control port.
	Socks bool
	// Log receives tor's output and the supervision's messages; nil means
	// logrus's standard logger.
	Log *logrus.Entry
}

// Tor is a supervised tor process started by Start: when tor exits or stops
// answering its control port, it is restarted (with backoff) and every
// published service and client authorization is restored. Its methods may
// be called from several goroutines.
type Tor struct {
	cfg Config
	log *logrus.Entry

	// lock is a one-slot semaphore held while inst is used or replaced, and
	// while services or auths change: a channel, so waiting for it can end
	// with a context.
	lock     chan struct{}
	inst     *instance
	services map[string]Service  // by service ID: what every tor must publish
	auths    map[string][32]byte // client keys, by service ID

	pid   atomic.Int64
	socks atomic.Pointer[string]
	// restarts counts the restarts that republished the services, the
	// last at restored (Unix ns); see Restarts.
	restarts, restored atomic.Int64

	life   context.Context // done once Close is called
	cancel context.CancelFunc
	done   chan struct{} // closed when the supervisor has returned
}

// instance is one tor process and its control connection.
type instance struct {
	bt      *tor.Tor
	proc    *torProcess
	out     *torlog.Writer
	kill    context.CancelFunc // SIGKILLs the process
	started time.Time
	log     *logrus.Entry
}

// Start launches tor through bine, waits for it to bootstrap (tor's
// progress goes to the log) and supervises it until Close.
//
// ctx bounds only the start (launch and bootstrap); tor then runs until
// Close. tor is owned by this process (TAKEOWNERSHIP and
// __OwningControllerProcess): it exits when this process does, even
// killed. When Start fails, no tor is left running.
func Start(ctx context.Context, cfg Config) (*Tor, error) {
	if cfg.DataDir == "" {
		return nil, errors.New("start tor: no data directory")
	}
	if cfg.Binary == "" {
		cfg.Binary = "tor"
	}
	dir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start tor: %w", err)
	}
	cfg.DataDir = dir
	cfg.TorrcLines = append([]string(nil), cfg.TorrcLines...)
	t := &Tor{
		cfg:      cfg,
		log:      cfg.Log,
		lock:     make(chan struct{}, 1),
		services: map[string]Service{},
		auths:    map[string][32]byte{},
		done:     make(chan struct{}),
	}
	if t.log == nil {
		t.log = logrus.NewEntry(logrus.StandardLogger())
	}
	t.life, t.cancel = context.WithCancel(context.Background())
	began := time.Now()
	inst, err := t.launch(ctx)
	if err != nil {
		t.cancel()
		return nil, fmt.Errorf("start tor: %w", err)
	}
	if err := inst.waitBootstrap(ctx); err != nil {
		inst.stop()
		t.cancel()
		return nil, fmt.Errorf("start tor: %w", err)
	}
	inst.log.WithField("elapsed", time.Since(began).Round(time.Millisecond)).Info("tor bootstrapped")
	t.inst = inst
	go t.supervise()
	return t, nil
}

// PID returns the process id of the running tor, or 0 while none runs
// (during a restart, after Close).
func (t *Tor) PID() int { return int(t.pid.Load()) }

// SocksAddr returns the address of the SOCKS5 port ("127.0.0.1:PORT") when
// Config.Socks is set, or "". The port may change when tor is restarted.
func (t *Tor) SocksAddr() string {
	if p := t.socks.Load(); p != nil {
		return *p
	}
	return ""
}

// Restarts returns how many times tor was restarted after it exited or
// hung, and when the last restart republished the services (the zero
// time when it never was).
func (t *Tor) Restarts() (int, time.Time) {
	var at time.Time
	if ns := t.restored.Load(); ns != 0 {
		at = time.Unix(0, ns)
	}
	return int(t.restarts.Load()), at
}

// Close stops supervision and tor, and returns once tor is gone.
func (t *Tor) Close() error {
	t.cancel()
	<-t.done
	t.lock <- struct{}{}
	defer func() { <-t.lock }()
	if t.inst == nil {
		return nil
	}
	err := t.inst.stop()
	t.inst = nil
	t.pid.Store(0)
	if err != nil {
		return fmt.Errorf("close tor: %w", err)
	}
	return nil
}

// acquire takes the lock, unless ctx ends or Close is called first.
func (t *Tor) acquire(ctx context.Context) error {
	select {
	case t.lock <- struct{}{}:
		if t.life.Err() != nil {
			<-t.lock
			return ErrClosed
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.life.Done():
		return ErrClosed
	}
}

func (t *Tor) release() { <-t.lock }

// launch starts a tor and connects to its control port; it does not wait
// for the bootstrap.
func (t *Tor) launch(ctx context.Context) (*instance, error) {
	dir := t.cfg.DataDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create data directory: %w", err)
	}
	removeControlPortFiles(dir)
	torrc := filepath.Join(dir, "torrc")
	if err := writeFile(torrc, []byte(t.torrc()), false); err != nil {
		return nil, fmt.Errorf("write torrc: %w", err)
	}
	inst := &instance{started: time.Now(), log: t.log}
	inst.out = &torlog.Writer{Log: t.log}
	procCtx, kill := context.WithCancel(context.Background())
	inst.kill = kill
	creator := &processCreator{binary: t.cfg.Binary, out: inst.out, startCtx: ctx}
	bt, err := tor.Start(procCtx, &tor.StartConf{
		ProcessCreator:  creator,
		DataDir:         dir,
		TorrcFile:       torrc,
		EnableNetwork:   true,
		NoHush:          true,
		NoAutoSocksPort: true,
	})
	inst.proc = creator.last
	if err != nil {
		inst.stop()
		return nil, withRecent(fmt.Errorf("launch tor: %w", err), inst.out)
	}
	inst.bt = bt
	inst.log = t.log.WithField("tor_pid", inst.proc.pid())
	inst.out.SetLog(inst.log)
	removeControlPortFiles(dir)
	if _, err := inst.request("TAKEOWNERSHIP"); err != nil {
		inst.stop()
		return nil, fmt.Errorf("take ownership of tor: %w", err)
	}
	socks := ""
	if t.cfg.Socks {
		if socks, err = inst.socksAddr(); err != nil {
			inst.stop()
			return nil, err
		}
	}
	t.socks.Store(&socks)
	t.pid.Store(int64(inst.proc.pid()))
	inst.log.Info("tor started")
	return inst, nil
}

// torrc returns the configuration file of the product's tors.
func (t *Tor) torrc() string {
	lines := []string{
		"# Written by kiss-onion at each start of tor: edits are lost.",
		"Log notice stdout",
		// Saves about 35 MB of memory; a private network or a country
		// restriction in TorrcLines can set them again.
		"GeoIPFile /dev/null",
		"GeoIPv6File /dev/null",
		// tor exits when this process is gone, even if killed.
		fmt.Sprintf("__OwningControllerProcess %d", os.Getpid()),
	}
	if t.cfg.Socks {
		lines = append(lines, "SocksPort 127.0.0.1:auto ExtendedErrors")
	} else {
		lines = append(lines, "SocksPort 0")
	}
	lines = append(lines, t.cfg.TorrcLines...)
	return strings.Join(lines, "\n") + "\n"
}

// removeControlPortFiles removes the files bine creates for tor to write
// its control port into: one per start, read once.
func removeControlPortFiles(dir string) {
	old, _ := filepath.Glob(filepath.Join(dir, "control-port-*"))
	for _, f := range old {
		os.Remove(f)
	}
}

// supervise restarts tor whenever it dies or hangs, until Close.
func (t *Tor) supervise() {
	defer close(t.done)
	backoff := minBackoff
	for {
		inst := t.inst // only this goroutine replaces t.inst once Start returned
		reason := t.watch(inst)
		if t.life.Err() != nil {
			return
		}
		if time.Since(inst.started) > stableAfter {
			backoff = minBackoff
		}
		if err := t.acquire(t.life); err != nil {
			return
		}
		inst.stop()
		t.inst = nil
		t.pid.Store(0)
		t.release()
		t.log.WithFields(logrus.Fields{"restart_in": backoff, "reason": reason}).Warn("restart tor")
		for {
			select {
			case <-t.life.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, maxBackoff)
			next, err := t.launch(t.life)
			if err != nil {
				if t.life.Err() != nil {
					return
				}
				t.log.WithError(err).WithField("restart_in", backoff).Error("restart tor")
				continue
			}
			if err := t.acquire(t.life); err != nil {
				next.stop()
				return
			}
			t.inst = next
			t.restore(next)
			t.restored.Store(time.Now().UnixNano())
			t.restarts.Add(1)
			t.release()
			go t.logBootstrap(next)
			break
		}
	}
}

// watch returns why inst is no longer usable: it exited, or it did not
// answer a health check. It returns "" once Close is called.
func (t *Tor) watch(inst *instance) string {
	tick := time.NewTicker(healthEvery)
	defer tick.Stop()
	for {
		select {
		case <-t.life.Done():
			return ""
		case <-inst.proc.done:
			return withRecent(fmt.Errorf("exited unexpectedly (%v)", inst.proc.err), inst.out).Error()
		case <-tick.C:
		}
		// Skip the check when someone else uses the control port: they
		// will notice a dead tor as well.
		select {
		case t.lock <- struct{}{}:
		default:
			continue
		}
		_, err := inst.request("GETINFO version")
		t.release()
		if err != nil && !inst.proc.exited() {
			return fmt.Sprintf("stopped answering its control port (%v)", err)
		}
	}
}

// restore republishes every service and client authorization on a new tor.
// The caller holds the lock.
func (t *Tor) restore(inst *instance) {
	for _, s := range t.services {
		if err := inst.addOnion(s); err != nil {
			inst.log.WithError(err).WithFields(serviceFields(s)).Error("republish onion service")
			continue
		}
		inst.log.WithFields(serviceFields(s)).Info("onion service republished")
	}
	for id, key := range t.auths {
		if err := inst.addClientAuth(id, key); err != nil {
			inst.log.WithError(err).WithField("onion", id+".onion").Error("restore client authorization")
		}
	}
}

// request sends one control command and waits at most controlTimeout for
// the answer; a tor that does not answer in time is killed, so that the
// supervisor restarts it. The command is never logged nor quoted in the
// error: it may hold a secret key.
func (inst *instance) request(cmd string) (*control.Response, error) {
	type result struct {
		resp *control.Response
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		resp, err := inst.bt.Control.SendRequest("%s", cmd)
		ch <- result{resp, err}
	}()
	t := time.NewTimer(controlTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r.resp, r.err
	case <-t.C:
		inst.kill()
		return nil, fmt.Errorf("tor did not answer in %v", controlTimeout)
	}
}

// waitBootstrap polls tor's bootstrap status until it reaches 100%. Only
// Start calls it, before anyone else can use inst.
func (inst *instance) waitBootstrap(ctx context.Context) error {
	tick := time.NewTicker(bootstrapPoll)
	defer tick.Stop()
	for {
		done, err := inst.bootstrapped()
		if err != nil {
			return fmt.Errorf("wait for bootstrap: %w", err)
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for bootstrap: %w", ctx.Err())
		case <-inst.proc.done:
		case <-tick.C:
		}
	}
}

// logBootstrap logs when a restarted tor has bootstrapped. The services
// were republished before: tor publishes them once it can.
func (t *Tor) logBootstrap(inst *instance) {
	for {
		if err := t.acquire(t.life); err != nil {
			return
		}
		if t.inst != inst {
			t.release()
			return
		}
		done, err := inst.bootstrapped()
		t.release()
		if err != nil {
			return
		}
		if done {
			inst.log.WithField("elapsed", time.Since(inst.started).Round(time.Millisecond)).Info("tor bootstrapped again")
			return
		}
		select {
		case <-t.life.Done():
			return
		case <-inst.proc.done:
			return
		case <-time.After(bootstrapPoll):
		}
	}
}

// bootstrapped asks tor whether it has bootstrapped.
func (inst *instance) bootstrapped() (bool, error) {
	if inst.proc.exited() {
		return false, withRecent(fmt.Errorf("tor exited (%v)", inst.proc.err), inst.out)
	}
	resp, err := inst.request("GETINFO status/bootstrap-phase")
	if err != nil {
		if inst.proc.exited() {
			return false, withRecent(fmt.Errorf("tor exited (%v)", inst.proc.err), inst.out)
		}
		return false, err
	}
	// status/bootstrap-phase=NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"
	return len(resp.Data) > 0 && strings.Contains(resp.Data[0], " PROGRESS=100 "), nil
}

// socksAddr asks tor where its SOCKS port listens.
func (inst *instance) socksAddr() (string, error) {
	resp, err := inst.request("GETINFO net/listeners/socks")
	if err != nil {
		return "", fmt.Errorf("get socks address: %w", err)
	}
	for _, line := range resp.Data {
		// net/listeners/socks="127.0.0.1:39871"
		if v, ok := strings.CutPrefix(line, "net/listeners/socks="); ok {
			for _, f := range strings.Fields(v) {
				if s, err := strconv.Unquote(f); err == nil && s != "" {
					return s, nil
				}
			}
		}
	}
	return "", errors.New("get socks address: tor lists no socks listener")
}

// stop ends the process: HALT on the control port, then SIGKILL when it
// has not exited within stopTimeout. It returns once the process is reaped.
func (inst *instance) stop() error {
	defer inst.kill()
	if inst.proc == nil {
		return nil
	}
	if inst.bt == nil {
		inst.kill() // it never answered on its control port: nothing to wait for
	} else if !inst.proc.exited() {
		inst.request("SIGNAL HALT")
	}
	if !inst.proc.waitExit(stopTimeout) {
		inst.log.Warn("tor did not exit on HALT, killing it")
		inst.kill()
		if !inst.proc.waitExit(stopTimeout) {
			return fmt.Errorf("tor pid %d still running after SIGKILL", inst.proc.pid())
		}
	}
	if inst.bt != nil && inst.bt.Control != nil {
		inst.bt.Control.Close()
	}
	return nil
}

// withRecent adds tor's last warnings to err: why tor failed, in its words.
func withRecent(err error, out *torlog.Writer) error {
	if out == nil {
		return err
	}
	if recent := out.Recent(); len(recent) > 0 {
		return fmt.Errorf("%w; tor said: %s", err, strings.Join(recent, "; "))
	}
	return err
}

// isRefusal reports whether err is tor's answer refusing a command (a 5xx
// reply), as opposed to a dead or unreachable tor.
func isRefusal(err error) bool {
	var te *textproto.Error
	return errors.As(err, &te) && te.Code >= 500
}

// replyCode returns the reply code of a control answer bine took for an
// error (bine accepts only 250, 251 and 650), or 0.
func replyCode(err error) int {
	var te *textproto.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}
