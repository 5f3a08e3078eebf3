package publish

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/gateway"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// ErrLockLost is the error (wrapped) of a refresh that the cache refused:
// the lock went stale or was released, and a prune may have run since.
var ErrLockLost = errors.New("the upload lock was lost")

// MarkerURL is a GC-root marker of a cache: gcroots/<Name> on a cache's
// write role over HTTP, or in a local cache directory. Its upload locks
// are gcroots/.lock/<lock name> next to it.
type MarkerURL struct {
	// Name is the marker's name under gcroots/, like "web1" or "hosts/web1".
	Name string

	base     *url.URL         // HTTP: the cache's base URL, without a trailing '/'
	client   *http.Client     // HTTP
	cacheDir string           // local
	locks    *cachelock.Locks // local
}

// ParseMarkerURL parses a marker's location: http(s)://HOST[/PREFIX]/gcroots/NAME,
// or a local path CACHEDIR/gcroots/NAME. proxy, if not empty, is the
// proxy URL for HTTP requests (http://, socks5:// or socks5h://); else
// the environment's HTTP_PROXY and friends apply.
func ParseMarkerURL(s, proxy string) (*MarkerURL, error) {
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("marker URL: %w", err)
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return nil, fmt.Errorf("marker URL %q: scheme must be http or https", s)
		}
		if u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("marker URL %q: no query or fragment allowed", s)
		}
		base, name, err := splitMarkerPath(u.Path)
		if err != nil {
			return nil, fmt.Errorf("marker URL %q: %w", s, err)
		}
		b := *u
		b.Path, b.RawPath = base, ""
		client, err := withLockClient(proxy)
		if err != nil {
			return nil, err
		}
		return &MarkerURL{Name: name, base: &b, client: client}, nil
	}
	if proxy != "" {
		return nil, fmt.Errorf("--proxy is for a marker URL, not a local path like %q", s)
	}
	abs, err := filepath.Abs(s)
	if err != nil {
		return nil, err
	}
	dir, name, err := splitMarkerPath(filepath.ToSlash(abs))
	if err != nil {
		return nil, fmt.Errorf("marker path %q: %w", s, err)
	}
	dir = filepath.FromSlash(dir)
	if _, err := os.Stat(filepath.Join(dir, "nix-cache-info")); err != nil {
		return nil, fmt.Errorf("marker path %q: %s is not a binary cache (no nix-cache-info)", s, dir)
	}
	return &MarkerURL{Name: name, cacheDir: dir, locks: cachelock.New(dir)}, nil
}

// splitMarkerPath splits ".../gcroots/NAME" at its last "/gcroots/" into
// the cache's path and the marker's name, checking the name's segments.
func splitMarkerPath(p string) (base, name string, err error) {
	i := strings.LastIndex(p, "/gcroots/")
	if i < 0 {
		return "", "", errors.New(`must end in "/gcroots/NAME"`)
	}
	base, name = p[:i], p[i+len("/gcroots/"):]
	if name == "" {
		return "", "", errors.New("no marker name after /gcroots/")
	}
	if err := nixcache.CheckMarkerName(name); err != nil {
		return "", "", err
	}
	return base, name, nil
}

func withLockClient(proxy string) (*http.Client, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if proxy != "" {
		u, err := url.Parse(proxy)
		if err != nil {
			return nil, fmt.Errorf("--proxy %q: %w", proxy, err)
		}
		switch u.Scheme {
		case "http", "https", "socks5", "socks5h":
		default:
			return nil, fmt.Errorf("--proxy %q: scheme must be http, https, socks5 or socks5h", proxy)
		}
		t.Proxy = http.ProxyURL(u)
	}
	// Over Tor a request can take long; a stuck one must not hang the lock forever.
	return &http.Client{Transport: t, Timeout: 2 * time.Minute}, nil
}

// String returns where the marker is.
func (m *MarkerURL) String() string {
	if m.base != nil {
		return m.base.String() + "/gcroots/" + m.Name
	}
	return filepath.Join(m.cacheDir, "gcroots", filepath.FromSlash(m.Name))
}

// NewLockName returns a lock name for the marker that no other holder
// uses: the marker's name ('/' made ':') and a random suffix. Two
// with-lock runs for one marker then never drop each other's lock.
func (m *MarkerURL) NewLockName() string {
	var b [4]byte
	rand.Read(b[:])
	name := strings.ReplaceAll(m.Name, "/", ":")
	if len(name) > 200 {
		name = name[:200]
	}
	return name + "." + hex.EncodeToString(b[:])
}

// request sends method to the file rel of the cache, with body if not
// nil. An answer other than 2xx is a *StatusError; op says what was being
// done, for the error.
func (m *MarkerURL) request(ctx context.Context, op, method, rel string, body []byte) error {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	segs := strings.Split(rel, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	req, err := http.NewRequestWithContext(ctx, method, m.base.String()+"/"+strings.Join(segs, "/"), r)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "text/plain; charset=utf-8")
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		return nil
	}
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return newStatusError(op, resp, msg)
}

// StatusError is an answer other than 2xx to a request to the cache.
type StatusError struct {
	Op      string // what was being done, like "lock web1.1a2b3c4d"
	Status  int
	Message string // the start of the answer's body
	// FromGateway is set when a local gateway made the answer itself
	// because the onion could not take the request: it says nothing of
	// what the cache holds.
	FromGateway bool
}

func newStatusError(op string, resp *http.Response, body []byte) *StatusError {
	return &StatusError{
		Op:          op,
		Status:      resp.StatusCode,
		Message:     strings.TrimSpace(string(body)),
		FromGateway: resp.Header.Get(gateway.ErrorHeader) != "",
	}
}

func (e *StatusError) Error() string {
	if e.Message != "" {
		return fmt.Sprintf("%s: %s: %s", e.Op, http.StatusText(e.Status), e.Message)
	}
	return fmt.Sprintf("%s: %d %s", e.Op, e.Status, http.StatusText(e.Status))
}

// cacheSaid reports whether err is the cache's own answer with status.
func cacheSaid(err error, status int) bool {
	var se *StatusError
	return errors.As(err, &se) && !se.FromGateway && se.Status == status
}

// TryLock takes or refreshes the lock once: nil when held, an error
// wrapping cachelock.ErrBusy when a prune holds the cache.
func (m *MarkerURL) TryLock(ctx context.Context, name string, body []byte) error {
	if m.locks != nil {
		return m.locks.Acquire(name, body)
	}
	if body == nil {
		body = []byte{}
	}
	err := m.request(ctx, "lock "+name, http.MethodPut, "gcroots/.lock/"+name, body)
	if cacheSaid(err, http.StatusServiceUnavailable) {
		return fmt.Errorf("lock %s: %w", name, cachelock.ErrBusy)
	}
	return err
}

// Lock takes the lock, retrying while a prune holds the cache (and on
// network errors) until wait has passed.
func (m *MarkerURL) Lock(ctx context.Context, name string, body []byte, wait time.Duration, log *logrus.Entry) error {
	deadline := time.Now().Add(wait)
	delay := time.Second
	for {
		err := m.TryLock(ctx, name, body)
		if err == nil {
			return nil
		}
		busy := errors.Is(err, cachelock.ErrBusy)
		var ue *url.Error
		transient := busy || errors.As(err, &ue)
		if !transient {
			return err
		}
		if !time.Now().Add(delay).Before(deadline) {
			if busy {
				return fmt.Errorf("lock %s: %w; gave up after %s", name, cachelock.ErrBusy, wait)
			}
			return fmt.Errorf("%w; gave up after %s", err, wait)
		}
		if log != nil {
			if busy {
				log.WithFields(logrus.Fields{"lock": name, "retry_in": delay}).Info("a prune holds the cache; retrying the lock")
			} else {
				log.WithFields(logrus.Fields{"lock": name, "retry_in": delay}).WithError(err).Warn("take the upload lock")
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 15*time.Second)
	}
}

// Unlock drops the lock; a lock already gone is no error.
func (m *MarkerURL) Unlock(ctx context.Context, name string) error {
	if m.locks != nil {
		return m.locks.Release(name)
	}
	err := m.request(ctx, "unlock "+name, http.MethodDelete, "gcroots/.lock/"+name, nil)
	if cacheSaid(err, http.StatusNotFound) {
		return nil
	}
	return err
}

// Put writes the marker: the store path and a newline.
func (m *MarkerURL) Put(ctx context.Context, storePath string) error {
	body := []byte(storePath + "\n")
	if m.locks == nil {
		return m.request(ctx, "write marker "+m.Name, http.MethodPut, "gcroots/"+m.Name, body)
	}
	// Local: as serve does, refuse a marker naming a path the cache lacks.
	i := strings.LastIndexByte(storePath, '/')
	hash := storePath[i+1:]
	if len(hash) > nixcache.HashLen {
		hash = hash[:nixcache.HashLen]
	}
	if _, err := os.Stat(filepath.Join(m.cacheDir, hash+".narinfo")); err != nil {
		return fmt.Errorf("write marker %s: %s is not in the cache", m.Name, storePath)
	}
	p := filepath.Join(m.cacheDir, "gcroots", filepath.FromSlash(m.Name))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return fmt.Errorf("write marker %s: %w", m.Name, err)
	}
	return m.locks.Guard(func() error {
		return atomicfile.WriteFile(p, body, 0o644)
	})
}

// WithLockOptions configure WithLock.
type WithLockOptions struct {
	Marker    *MarkerURL
	StorePath string   // what the marker will name
	Command   []string // the command to run under the lock
	// LockWait is how long to keep retrying the lock while a prune holds
	// the cache; 30 minutes when 0.
	LockWait time.Duration
	// Refresh is how often the lock is refreshed; 5 minutes when 0. It
	// must stay well under cachelock.StaleAfter.
	Refresh time.Duration
	// Stdin, Stdout and Stderr are the command's; the process's when nil.
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Log receives notes and warnings; the standard logger when nil.
	Log *logrus.Entry
}

// WithLock runs a command under an upload lock: it takes a lock next to
// the marker (waiting while a prune holds the cache), refreshes it while
// the command runs, writes the marker only if the command succeeded and
// the lock was never lost, and always drops the lock. It returns the
// command's exit status (128+n when a signal n ended it), and an error
// when something else failed: then the status is meaningless unless the
// command ran.
func WithLock(ctx context.Context, o WithLockOptions) (int, error) {
	log := o.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	if len(o.Command) == 0 {
		return 0, errors.New("no command to run")
	}
	status := 0
	err := o.Marker.Hold(ctx, "with-lock for "+o.StorePath, o.LockWait, o.Refresh, log, func(ctx context.Context) error {
		var err error
		status, err = runUnderLock(ctx, o)
		if err == nil && status != 0 {
			err = errCommandFailed
		}
		return err
	}, func(ctx context.Context) error {
		return o.Marker.Put(ctx, o.StorePath)
	})
	switch {
	case errors.Is(err, errCommandFailed):
		return status, nil
	case errors.Is(err, ErrLockLost):
		return status, fmt.Errorf("%w; the marker %s was not written", err, o.Marker.Name)
	}
	return status, err
}

// errCommandFailed stops Hold from writing the marker after a command that
// exited non-zero; WithLock passes the status on instead.
var errCommandFailed = errors.New("command failed")

// runUnderLock runs o.Command to its end and returns its exit status. It
// passes on the signals that would stop us, and ctx's end as SIGTERM, so
// that the lock is dropped only after the command is gone.
func runUnderLock(ctx context.Context, o WithLockOptions) (int, error) {
	cmd := exec.Command(o.Command[0], o.Command[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = o.Stdin, o.Stdout, o.Stderr
	if cmd.Stdin == nil {
		cmd.Stdin = os.Stdin
	}
	if cmd.Stdout == nil {
		cmd.Stdout = os.Stdout
	}
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("run %s: %w", o.Command[0], err)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	done := ctx.Done()
	for {
		select {
		case err := <-waited:
			return exitStatus(cmd.ProcessState, err), nil
		case s := <-sigs:
			cmd.Process.Signal(s)
		case <-done:
			done = nil
			cmd.Process.Signal(syscall.SIGTERM)
		}
	}
}

// Hold takes an upload lock next to the marker (named after it, unique to
// this holder; holder goes into the lock's body), runs work while
// refreshing the lock every refresh, then, if work succeeded and the lock
// held throughout, runs commit, still under the lock. The lock is always
// dropped. A lost lock is an error wrapping ErrLockLost. lockWait bounds
// the wait for a prune to let go (default 30 minutes), refresh defaults to
// 5 minutes.
func (m *MarkerURL) Hold(ctx context.Context, holder string, lockWait, refresh time.Duration, log *logrus.Entry, work, commit func(context.Context) error) error {
	if lockWait == 0 {
		lockWait = 30 * time.Minute
	}
	if refresh == 0 {
		refresh = 5 * time.Minute
	}
	name := m.NewLockName()
	host, _ := os.Hostname()
	body := []byte(fmt.Sprintf("%s, pid %d on %s, since %s\n", holder, os.Getpid(), host, time.Now().UTC().Format(time.RFC3339)))
	if len(body) > cachelock.MaxLockBody {
		body = body[:cachelock.MaxLockBody]
	}
	log.WithField("lock", name).Info("take the upload lock")
	if err := m.Lock(ctx, name, body, lockWait, log); err != nil {
		return err
	}
	// Whatever happens now, drop the lock (with a context of its own: ctx
	// may be cancelled by then).
	defer func() {
		uctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := m.Unlock(uctx, name); err != nil {
			log.WithFields(logrus.Fields{"lock": name, "stale_in": cachelock.StaleAfter}).WithError(err).Warn("drop the upload lock")
		}
	}()

	lost := make(chan error, 1)
	stop := make(chan struct{})
	refreshed := make(chan struct{})
	go func() {
		defer close(refreshed)
		tick := time.NewTicker(refresh)
		defer tick.Stop()
		lastOK := time.Now()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			err := m.TryLock(ctx, name, body)
			var lostErr error
			switch {
			case err == nil:
				lastOK = time.Now()
				continue
			case errors.Is(err, cachelock.ErrBusy):
				lostErr = fmt.Errorf("%w: refreshing it was refused while a prune holds the cache", ErrLockLost)
			case isDefinite(err):
				lostErr = fmt.Errorf("%w: %v", ErrLockLost, err)
			case time.Since(lastOK) > cachelock.StaleAfter-2*refresh:
				lostErr = fmt.Errorf("%w: not refreshed since %s: %v", ErrLockLost, lastOK.Format(time.RFC3339), err)
			default:
				log.WithField("lock", name).WithError(err).Warn("refresh the upload lock; will retry")
				continue
			}
			log.WithField("lock", name).WithError(lostErr).Warn("the marker will not be written")
			lost <- lostErr
			return
		}
	}()
	err := work(ctx)
	close(stop)
	<-refreshed
	if err != nil {
		return err
	}
	select {
	case err := <-lost:
		return err
	default:
	}
	// One last refresh proves the lock still holds as the marker goes in.
	if err := m.TryLock(ctx, name, body); err != nil {
		return fmt.Errorf("%w: %v", ErrLockLost, err)
	}
	return commit(ctx)
}

// isDefinite reports whether a lock error is the cache's answer rather
// than a failure to reach it: a gateway's own answer only says that the
// onion was out of reach for a moment.
func isDefinite(err error) bool {
	var ue *url.Error
	var se *StatusError
	return !errors.As(err, &ue) && !(errors.As(err, &se) && se.FromGateway)
}

// exitStatus returns a finished command's status, 128+n for signal n.
func exitStatus(ps *os.ProcessState, err error) int {
	if ps == nil {
		return 1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	if code := ps.ExitCode(); code >= 0 {
		return code
	}
	return 1
}
