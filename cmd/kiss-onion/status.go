package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/kiss-onion/kiss-onion/access"
	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/serve"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

func init() {
	register("status", "what to check first: serve, onions, clients, size, last prune, locks", runStatus)
}

const statusUsage = `
Usage:
	kiss-onion status [--state-dir DIR] [--cache-dir DIR] [--json]

Prints one screen of what to check first on the cache machine: whether
serve runs and since when, the onions and whether serve has them
published, the local listeners, the clients of each role (name, door,
key fingerprint, when added, when revoked), the cache's size and the
room left on its disk, the last prune's time and result, and the locks
held now (uploads, and a prune or forget holding the cache).

It asks a running serve over the unix socket STATE/sock/status.sock
(mode 0600: run it as the user serve runs as). Without an answer it says
serve is not running and prints what the files of the state and cache
directories say, counting the cache's files itself.

Arguments:
	none

Examples:
	kiss-onion status
	kiss-onion status --state-dir /var/lib/kiss-onion --json | jq .cache
`

// doorOnion is the door of clients whose key is authorized on the onions;
// those with a TLS certificate come through tlsca.DoorName too.
const doorOnion = "onion"

// statusReport is what 'kiss-onion status' shows, and what serve's status
// socket answers (GET /status) as JSON.
type statusReport struct {
	CacheDir  string           `json:"cache_dir"`
	StateDir  string           `json:"state_dir"`
	Serve     serveStatus      `json:"serve"`
	Onions    []onionStatus    `json:"onions"`
	Listeners []listenerStatus `json:"listeners"`
	Clients   []clientStatus   `json:"clients"`
	Cache     cacheStatus      `json:"cache"`
	LastPrune *prune.Record    `json:"last_prune"`
	Locks     []lockStatus     `json:"locks"`
	// HeldBy says who holds the cache (a prune or a forget), if anyone.
	HeldBy string `json:"held_by,omitempty"`
	// Problems are what could not be read.
	Problems []string `json:"problems,omitempty"`
}

type serveStatus struct {
	Running bool       `json:"running"`
	Why     string     `json:"why_not,omitempty"` // why status got no answer
	PID     int        `json:"pid,omitempty"`
	Since   *time.Time `json:"since,omitempty"`
	Tor     string     `json:"tor,omitempty"` // public, local or off
	TorPID  int        `json:"tor_pid,omitempty"`
	// PruneInterval is serve's --prune-interval, "" when it does not prune.
	PruneInterval string `json:"prune_interval,omitempty"`
}

type onionStatus struct {
	Role      string     `json:"role"`
	Address   string     `json:"address"`
	Published bool       `json:"published"`
	Since     *time.Time `json:"since,omitempty"` // published, or taken down, since
	Keys      int        `json:"client_keys"`     // authorized when published
	Public    bool       `json:"public,omitempty"`
}

type listenerStatus struct {
	Role string `json:"role"`
	URL  string `json:"url"`
	// CertificateEnds is when the TLS door's server certificate ends.
	CertificateEnds *time.Time `json:"certificate_ends,omitempty"`

	cert *tlsca.ServedCert // the TLS door's, read at each report
}

type clientStatus struct {
	Name        string     `json:"name"`
	Role        string     `json:"role"`
	Door        string     `json:"door"`
	Fingerprint string     `json:"fingerprint"`
	Added       *time.Time `json:"added,omitempty"`
	Revoked     *time.Time `json:"revoked,omitempty"`
	Registry    string     `json:"registry"` // the file that lists it
}

type cacheStatus struct {
	NarInfos  int64      `json:"narinfos"`
	Files     int64      `json:"files"`
	Bytes     int64      `json:"bytes"`
	CountedAt *time.Time `json:"counted_at,omitempty"` // zero: not counted yet
	Counting  bool       `json:"counting,omitempty"`
	// Live: the figures are serve's, counted at its start (CountedAt) and
	// kept up to date since, those of its metrics; not: status walked
	// the cache directory itself.
	Live     bool  `json:"live,omitempty"`
	DiskFree int64 `json:"disk_free"`
	DiskSize int64 `json:"disk_size"`
}

type lockStatus struct {
	Name      string    `json:"name"`
	Refreshed time.Time `json:"refreshed"`
	Fresh     bool      `json:"fresh"` // stale locks no longer hold a prune back
}

// statusSocket returns the path of serve's status socket in stateDir.
func statusSocket(stateDir string) string {
	return filepath.Join(stateDir, "sock", "status.sock")
}

func runStatus(args []string) error {
	fs := newFlagSet("status", statusUsage)
	stateDir := fs.String("state-dir", "/var/lib/kiss-onion", "serve's state `directory`")
	cacheDir := fs.String("cache-dir", "/var/cache/kiss-onion", "the cache `directory` (when serve does not answer)")
	asJSON := fs.Bool("json", false, "print the report as JSON, for scripts")
	rest, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(rest) > 0 {
		return usagef("status takes no arguments, got %q", rest[0])
	}
	rep, err := askServe(*stateDir)
	if err != nil {
		rep = filesStatus(*stateDir, *cacheDir, []string{filepath.Join(*stateDir, clientauth.RegistryFileName)})
		rep.Serve.Why = err.Error()
		if c, err := countCache(*cacheDir); err != nil {
			rep.Problems = append(rep.Problems, fmt.Sprintf("count the cache: %v", err))
		} else {
			rep.Cache.NarInfos, rep.Cache.Files, rep.Cache.Bytes, rep.Cache.CountedAt = c.narinfos, c.files, c.bytes, &c.at
		}
	}
	if *asJSON {
		enc := json.NewEncoder(statusOut)
		enc.SetIndent("", "  ")
		return enc.Encode(rep)
	}
	printStatus(statusOut, rep, time.Now())
	for _, p := range rep.Problems {
		warningf("%s", p)
	}
	return nil
}

// statusOut is where status prints; a test replaces it.
var statusOut io.Writer = os.Stdout

// askServe asks the serve of stateDir for its report.
func askServe(stateDir string) (statusReport, error) {
	sock := statusSocket(stateDir)
	client := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}},
	}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://serve/status")
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, unix.ENOENT), errors.Is(err, unix.ECONNREFUSED):
		return statusReport{}, fmt.Errorf("not running (nothing answers on %s)", sock)
	case err != nil:
		return statusReport{}, fmt.Errorf("no answer on %s: %v", sock, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusReport{}, fmt.Errorf("answered %s on %s", resp.Status, sock)
	}
	var rep statusReport
	if err := json.NewDecoder(io.LimitReader(resp.Body, 16<<20)).Decode(&rep); err != nil {
		return statusReport{}, fmt.Errorf("answered nonsense on %s: %v", sock, err)
	}
	return rep, nil
}

// filesStatus is what the state and cache directories say, without serve:
// the onions' addresses, the clients of the registries, the room on the
// cache's disk, the last prune, the locks.
func filesStatus(stateDir, cacheDir string, registries []string) statusReport {
	rep := statusReport{CacheDir: cacheDir, StateDir: stateDir, Onions: []onionStatus{}, Listeners: []listenerStatus{},
		Clients: []clientStatus{}, Locks: []lockStatus{}}
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }
	for _, role := range []string{"read", "write"} {
		data, err := os.ReadFile(filepath.Join(stateDir, role+".onion"))
		if errors.Is(err, fs.ErrNotExist) {
			continue // never published
		}
		if err != nil {
			problem("%v", err)
			continue
		}
		rep.Onions = append(rep.Onions, onionStatus{Role: role, Address: strings.TrimSpace(string(data))})
	}
	for i, path := range registries {
		reg, err := clientauth.LoadRegistry(path)
		if err != nil {
			problem("%v", err)
			continue
		}
		if i == 0 {
			path = "" // the state directory's
		}
		for _, c := range reg.Clients() {
			cs := clientStatus{Name: c.Name, Role: string(c.Role), Door: doorOnion, Fingerprint: c.PublicKey.Fingerprint(), Registry: path}
			if !c.Created.IsZero() {
				t := c.Created.UTC()
				cs.Added = &t
			}
			if c.IsRevoked() {
				t := c.Revoked.UTC()
				cs.Revoked = &t
			}
			rep.Clients = append(rep.Clients, cs)
			if c.TLSCert != "" {
				cs.Door, cs.Fingerprint = tlsca.DoorName, c.TLSCert
				rep.Clients = append(rep.Clients, cs)
			}
		}
	}
	if isStoreURL(cacheDir) {
		// A bucket: its room is the store's business; serve adds its
		// locks (statusServer.report).
		addLastPrune(&rep, stateDir, cacheDir)
		return rep
	}
	var st unix.Statfs_t
	if err := unix.Statfs(cacheDir, &st); err != nil {
		problem("disk of the cache: %v", err)
	} else {
		rep.Cache.DiskFree, rep.Cache.DiskSize = int64(st.Bavail)*int64(st.Bsize), int64(st.Blocks)*int64(st.Bsize)
	}
	addLastPrune(&rep, stateDir, cacheDir)
	addLocks(&rep, cachelock.New(cacheDir))
	return rep
}

// addLastPrune adds the record of the last prune of the cache (a
// directory or a store URL) to rep.
func addLastPrune(rep *statusReport, stateDir, cache string) {
	if r, ok, err := prune.LastRun(stateDir, cache); err != nil {
		rep.Problems = append(rep.Problems, err.Error())
	} else if ok {
		rep.LastPrune = &r
	}
}

// cacheLocks is what status reads of a lock protocol, on a directory or a
// bucket.
type cacheLocks interface {
	List() ([]cachelock.LockInfo, error)
	Holder() (who string, held bool, err error)
}

// addLocks adds the upload locks and the prune's hold to rep.
func addLocks(rep *statusReport, locks cacheLocks) {
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }
	ls, err := locks.List()
	if err != nil {
		problem("%v", err)
	}
	for _, l := range ls {
		rep.Locks = append(rep.Locks, lockStatus{Name: l.Name, Refreshed: l.ModTime.UTC(), Fresh: l.Fresh})
	}
	if who, held, err := locks.Holder(); err != nil {
		problem("%v", err)
	} else if held {
		rep.HeldBy = who
		if who == "" {
			rep.HeldBy = "a prune or forget"
		}
	}
}

// cacheCount is a count of the cache's files.
type cacheCount struct {
	narinfos, files, bytes int64
	at                     time.Time // when the count ended
}

// countCache counts the narinfos, files and bytes of the cache directory,
// leaving out partial uploads (.tmp/) and lock files (gcroots/.lock/).
func countCache(dir string) (cacheCount, error) {
	var c cacheCount
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && path != dir {
				return nil // deleted meanwhile
			}
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if d.IsDir() {
			if rel == ".tmp" || rel == filepath.Join("gcroots", ".lock") {
				return filepath.SkipDir
			}
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil // deleted meanwhile
		}
		c.files++
		c.bytes += fi.Size()
		if filepath.Dir(rel) == "." && strings.HasSuffix(rel, ".narinfo") {
			c.narinfos++
		}
		return nil
	})
	c.at = time.Now().UTC()
	return c, err
}

// publishLog is the Publisher serve publishes its onions through: it
// remembers which onion is published, since when and with how many keys,
// for the status socket.
type publishLog struct {
	access.Publisher
	mu     sync.Mutex
	onions map[string]publishedOnion // by address
}

type publishedOnion struct {
	up    bool
	since time.Time // published, or taken down, since
	keys  int
}

func (l *publishLog) Publish(ctx context.Context, s onion.Service) error {
	err := l.Publisher.Publish(ctx, s)
	if err == nil {
		l.note(s.Identity.Address(), true, len(s.ClientKeys))
	}
	return err
}

func (l *publishLog) Unpublish(ctx context.Context, id *onion.Identity) error {
	err := l.Publisher.Unpublish(ctx, id)
	if err == nil {
		l.note(id.Address(), false, 0)
	}
	return err
}

// note records that the onion at address is published (up) with keys
// client keys, or not.
func (l *publishLog) note(address string, up bool, keys int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.onions == nil {
		l.onions = map[string]publishedOnion{}
	}
	o := l.onions[address]
	if o.up != up || o.since.IsZero() {
		o.since = time.Now().UTC()
	}
	o.up, o.keys = up, keys
	l.onions[address] = o
}

// get returns what was recorded of the onion at address.
func (l *publishLog) get(address string) (publishedOnion, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	o, ok := l.onions[address]
	return o, ok
}

// statusServer answers 'kiss-onion status' for a running serve, on
// statusSocket(STATE): GET /status, the report as JSON.
type statusServer struct {
	f       serveFlags
	started time.Time
	cache   *serve.Cache // its size
	// bucketLocks are the locks of a cache on a bucket (--store), and
	// cacheName its URL without keys.
	bucketLocks cacheLocks
	cacheName   string
	mu          sync.Mutex
	listeners   []listenerStatus
	onions      *onions // nil with --tor off
	srv         *http.Server
	sock        string
}

func newStatusServer(f serveFlags, cache *serve.Cache) *statusServer {
	return &statusServer{f: f, started: time.Now().UTC(), cache: cache, listeners: []listenerStatus{}}
}

// listening records a local listener of role at url.
func (s *statusServer) listening(role serve.Role, url string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, listenerStatus{Role: role.String(), URL: url})
}

// listeningDoor records a door (both roles, by credentials) at url, and
// the server certificate it serves (nil: none).
func (s *statusServer) listeningDoor(door, url string, cert *tlsca.ServedCert) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listeners = append(s.listeners, listenerStatus{Role: door, URL: url, cert: cert})
}

// setOnions records the onions serve runs.
func (s *statusServer) setOnions(o *onions) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onions = o
}

// start has the cache counted in the background (once: from then on the
// cache keeps its size up to date, as for the metrics) and listens on
// the socket: only serve's user can connect (the socket is 0600, in a
// directory of the 0700 state directory).
func (s *statusServer) start(log *logrus.Entry) error {
	s.cache.CountSize()
	s.sock = statusSocket(s.f.stateDir)
	if err := os.MkdirAll(filepath.Dir(s.sock), 0o700); err != nil {
		return fmt.Errorf("create socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", s.sock, time.Second); err == nil {
		c.Close()
		log.WithField("socket", s.sock).Warn("another serve answered on the status socket: taking it over")
	}
	os.Remove(s.sock) // a socket left by a killed serve
	ln, err := net.Listen("unix", s.sock)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", s.sock, err)
	}
	if err := os.Chmod(s.sock, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("status socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(s.report(time.Now()))
	})
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go s.srv.Serve(ln)
	return nil
}

// stop closes the socket.
func (s *statusServer) stop() {
	if s.srv != nil {
		s.srv.Close()
		os.Remove(s.sock)
	}
}

// report is what the files say, and what only serve knows.
func (s *statusServer) report(now time.Time) statusReport {
	registries := []string{filepath.Join(s.f.stateDir, clientauth.RegistryFileName)}
	if s.f.clientsFile != "" {
		registries = append(registries, s.f.clientsFile)
	}
	where := s.f.cacheDir
	if s.cacheName != "" {
		where = s.cacheName
	}
	rep := filesStatus(s.f.stateDir, where, registries)
	if s.bucketLocks != nil {
		addLocks(&rep, s.bucketLocks)
	}
	rep.Serve = serveStatus{Running: true, PID: os.Getpid(), Since: &s.started, Tor: s.f.torMode}
	if s.f.pruneEvery > 0 {
		rep.Serve.PruneInterval = s.f.pruneEvery.String()
	}
	s.mu.Lock()
	for _, l := range s.listeners {
		if l.cert != nil {
			end := l.cert.Current().Leaf.NotAfter.UTC()
			l.CertificateEnds = &end
		}
		rep.Listeners = append(rep.Listeners, l)
	}
	o := s.onions
	s.mu.Unlock()
	if o != nil && o.tor != nil {
		rep.Serve.TorPID = o.tor.PID()
	}
	for i := range rep.Onions {
		on := &rep.Onions[i]
		if o == nil || o.published == nil {
			continue
		}
		if p, ok := o.published.get(on.Address); ok {
			on.Published = p.up && rep.Serve.TorPID != 0
			on.Since = &p.since
			on.Keys = p.keys
			on.Public = p.up && p.keys == 0
		}
	}
	if s.f.torMode == "off" {
		rep.Onions = []onionStatus{} // addresses of another run's onions
	}
	rep.Cache.Live = true
	if size, ok := s.cache.Size(); ok {
		counted := size.Counted.UTC()
		rep.Cache.NarInfos, rep.Cache.Files, rep.Cache.Bytes, rep.Cache.CountedAt = size.NarInfos, size.Files, size.Bytes, &counted
	} else {
		rep.Cache.Counting = true
	}
	return rep
}

// printStatus prints rep as one screen of text.
func printStatus(w io.Writer, rep statusReport, now time.Time) {
	at := func(t time.Time) string {
		return fmt.Sprintf("%s (%s ago)", t.UTC().Format("2006-01-02 15:04:05 UTC"), now.Sub(t).Round(time.Second))
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(label, format string, args ...any) {
		fmt.Fprintf(tw, "%s\t%s\n", label, fmt.Sprintf(format, args...))
	}

	// serve
	switch s := rep.Serve; {
	case !s.Running:
		row("serve", "%s", s.Why)
	default:
		line := fmt.Sprintf("running, pid %d", s.PID)
		if s.Since != nil {
			line += ", since " + at(*s.Since)
		}
		switch {
		case s.Tor == "off":
			line += "; tor off"
		case s.TorPID != 0:
			line += fmt.Sprintf("; tor %s, pid %d", s.Tor, s.TorPID)
		default:
			line += fmt.Sprintf("; tor %s, not running (being restarted?)", s.Tor)
		}
		if s.PruneInterval != "" {
			line += "; prunes every " + s.PruneInterval
		}
		row("serve", "%s", line)
	}

	// onions and listeners
	label := "onions"
	if len(rep.Onions) == 0 {
		row(label, "none")
	}
	for _, o := range rep.Onions {
		state := "not published"
		switch {
		case !rep.Serve.Running:
			state = "serve did not answer"
		case o.Published && o.Public:
			state = "published without client authorization (--public-read) since " + at(*o.Since)
		case o.Published:
			state = fmt.Sprintf("published since %s, %d client keys", at(*o.Since), o.Keys)
		case o.Since != nil:
			state = "not published since " + at(*o.Since)
		}
		row(label, "%-5s  %s  %s", o.Role, o.Address, state)
		label = ""
	}
	label = "listeners"
	for _, l := range rep.Listeners {
		if l.CertificateEnds != nil {
			end := *l.CertificateEnds
			row(label, "%-5s  %s  certificate ends %s (in %d days)", l.Role, l.URL, end.Format("2006-01-02 15:04:05 UTC"), int(end.Sub(now).Hours()/24))
		} else {
			row(label, "%-5s  %s", l.Role, l.URL)
		}
		label = ""
	}

	// cache
	c := rep.Cache
	size := "not counted yet"
	switch {
	case c.CountedAt != nil && c.Live:
		size = fmt.Sprintf("%d narinfos, %d files, %s (serve's figures, as in its metrics: counted at its start, kept up to date since)", c.NarInfos, c.Files, prune.FormatBytes(c.Bytes))
	case c.CountedAt != nil:
		size = fmt.Sprintf("%d narinfos, %d files, %s (counted %s ago)", c.NarInfos, c.Files, prune.FormatBytes(c.Bytes), now.Sub(*c.CountedAt).Round(time.Second))
	}
	if c.Counting {
		size += "; counting"
	}
	row("cache", "%s: %s", rep.CacheDir, size)
	if c.DiskSize > 0 {
		row("", "disk: %s free of %s", prune.FormatBytes(c.DiskFree), prune.FormatBytes(c.DiskSize))
	}

	// last prune
	switch p := rep.LastPrune; {
	case p == nil:
		row("last prune", "none recorded in %s", rep.StateDir)
	case p.Error != "":
		row("last prune", "%s: failed: %s", at(p.Finished), p.Error)
	default:
		row("last prune", "%s: %s", at(p.Finished), p.Summary)
	}

	// locks
	label = "locks"
	if len(rep.Locks) == 0 && rep.HeldBy == "" {
		row(label, "none")
	}
	if rep.HeldBy != "" {
		row(label, "the cache is held by a prune or forget: %s", rep.HeldBy)
		label = ""
	}
	for _, l := range rep.Locks {
		state := "refreshed " + at(l.Refreshed)
		if !l.Fresh {
			state += ", stale"
		}
		row(label, "upload lock %s, %s", l.Name, state)
		label = ""
	}
	tw.Flush()

	// clients
	fmt.Fprintln(w)
	if len(rep.Clients) == 0 {
		fmt.Fprintln(w, "clients: none (add one with 'kiss-onion keys add NAME --role reader')")
	} else {
		sort.SliceStable(rep.Clients, func(i, j int) bool { return rep.Clients[i].Role < rep.Clients[j].Role })
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "CLIENT\tROLE\tDOOR\tFINGERPRINT\tADDED\tREVOKED")
		for _, cl := range rep.Clients {
			added, revoked := "-", "-"
			if cl.Added != nil {
				added = cl.Added.Format(time.RFC3339)
			}
			if cl.Revoked != nil {
				revoked = cl.Revoked.Format(time.RFC3339)
			}
			name := cl.Name
			if cl.Registry != "" {
				name += " (" + filepath.Base(cl.Registry) + ")"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", name, cl.Role, cl.Door, cl.Fingerprint, added, revoked)
		}
		tw.Flush()
	}
}
