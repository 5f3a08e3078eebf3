package testnet

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// Sizes of the network: SPEC section 5 measured that 3 authorities and 1
// relay work and 3 authorities alone never do; 3 relays leave room.
const (
	numAuthorities = 3
	numRelays      = 3
)

// Voting schedule of the authorities, in seconds (initial and regular): the
// fastest that is stable. Vote and distribution delays must fit in half an
// interval.
const (
	votingInterval = 10
	voteDelay      = 2
	distDelay      = 2
)

// firstVoteLead is how many seconds after launch the authorities should
// send their first votes: enough for the relays to start and upload their
// descriptors.
const firstVoteLead = 5

// readyTimeout bounds each stage of Start unless ctx ends sooner.
const readyTimeout = 4 * time.Minute

// pollEvery is the pause between two polls of a node's DirPort.
const pollEvery = 500 * time.Millisecond

// Network is a running private Tor network. Its methods may be called from
// several goroutines.
type Network struct {
	dir   string
	log   *logrus.Entry
	nodes []*node
	lines []string

	mu      sync.Mutex
	clients map[*Client]struct{}
	closed  bool
}

// node is one authority or relay.
type node struct {
	name      string
	dir       string // its DataDirectory
	authority bool
	orPort    int
	dirPort   int
	v3ident   string // authorities: the v3 signing identity (tor-gencert)
	identity  string // the relay identity fingerprint, hex
	proc      *proc
}

// Start creates (or reuses the keys of) a private Tor network under dir and
// returns once it is ready to carry onion services: every relay is in the
// consensus and every relay's DirPort serves the microdescriptors. log
// receives the nodes' output (tor's notices at Debug) and the progress; nil
// means logrus's standard logger.
//
// ctx bounds only the start: the tors keep running until Close. When Start
// fails, nothing it started is left running.
func Start(ctx context.Context, dir string, log *logrus.Entry) (*Network, error) {
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	log = log.WithField("component", "testnet")
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("start tor test network: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("start tor test network: %w", err)
	}
	n := &Network{dir: dir, log: log, clients: map[*Client]struct{}{}}
	began := time.Now()
	if err := n.start(ctx); err != nil {
		n.Close()
		return nil, fmt.Errorf("start tor test network in %s: %w", dir, err)
	}
	log.WithField("elapsed", time.Since(began).Round(time.Millisecond)).Info("tor test network ready")
	return n, nil
}

func (n *Network) start(ctx context.Context) error {
	for i := range numAuthorities {
		n.nodes = append(n.nodes, &node{name: fmt.Sprintf("auth%d", i), authority: true})
	}
	for i := range numRelays {
		n.nodes = append(n.nodes, &node{name: fmt.Sprintf("relay%d", i)})
	}
	ports, err := freePorts(2 * len(n.nodes))
	if err != nil {
		return err
	}
	for i, nd := range n.nodes {
		nd.dir = filepath.Join(n.dir, nd.name)
		nd.orPort, nd.dirPort = ports[2*i], ports[2*i+1]
		if err := nd.prepare(ctx); err != nil {
			return err
		}
	}
	for _, nd := range n.nodes {
		if nd.authority {
			n.lines = append(n.lines, fmt.Sprintf("DirAuthority %s orport=%d no-v2 v3ident=%s 127.0.0.1:%d %s",
				nd.name, nd.orPort, nd.v3ident, nd.dirPort, nd.identity))
		}
	}
	n.lines = append(n.lines, "TestingTorNetwork 1", "VanguardsLiteEnabled 0")

	// The first votes go out voteDelay+distDelay before an interval starts;
	// intervals start where (time - offset) is a multiple of votingInterval.
	offset := (time.Now().Unix() + firstVoteLead + voteDelay + distDelay) % votingInterval
	for _, nd := range n.nodes {
		torrc := filepath.Join(nd.dir, "torrc")
		if err := writeFile(torrc, []byte(n.torrc(nd, offset)), 0o600); err != nil {
			return err
		}
		nd.proc, err = startTor(nd.name, torrc, n.log.WithField("tor", nd.name), nil)
		if err != nil {
			return err
		}
	}
	n.log.WithField("nodes", len(n.nodes)).Info("tor test network launched, waiting for a consensus listing every relay")

	sctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	if err := n.poll(sctx, "a consensus listing every relay", func() (bool, error) {
		c, err := fetchConsensus(n.nodes[0].dirPort)
		if err != nil {
			return false, nil
		}
		return c.listsAll(n.nodes), nil
	}); err != nil {
		return err
	}
	n.log.Info("consensus lists every relay, waiting for the relays to serve it")
	for _, nd := range n.nodes {
		if !nd.authority {
			if err := nd.proc.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				return fmt.Errorf("signal tor %s: %w", nd.name, err)
			}
		}
	}
	for _, nd := range n.nodes {
		if nd.authority {
			continue
		}
		if err := n.poll(sctx, nd.name+" serving the consensus and microdescriptors", func() (bool, error) {
			c, err := fetchConsensus(nd.dirPort)
			if err != nil || !c.listsAll(n.nodes) {
				return false, nil
			}
			return servesMicrodescs(nd.dirPort, c.microdescs), nil
		}); err != nil {
			return err
		}
	}
	return nil
}

// poll calls ready every pollEvery until it reports true, fails, ctx ends,
// or a node exits.
func (n *Network) poll(ctx context.Context, what string, ready func() (bool, error)) error {
	t := time.NewTicker(pollEvery)
	defer t.Stop()
	for {
		for _, nd := range n.nodes {
			if nd.proc.exited() {
				return fmt.Errorf("wait for %s: %w", what, nd.proc.exitError())
			}
		}
		ok, err := ready()
		if err != nil {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		case <-t.C:
		}
	}
}

// torrc returns a node's configuration.
func (n *Network) torrc(nd *node, offset int64) string {
	lines := []string{
		"DataDirectory " + nd.dir,
		"Nickname " + nd.name,
		"ContactInfo " + nd.name + "@testnet.invalid",
		"Address 127.0.0.1",
		fmt.Sprintf("ORPort 127.0.0.1:%d", nd.orPort),
		fmt.Sprintf("DirPort 127.0.0.1:%d", nd.dirPort),
		"SocksPort 0",
		"AssumeReachable 1",
		"ExitRelay 0",
		"ExitPolicy reject *:*",
		"ShutdownWaitLength 0",
		"GeoIPFile /dev/null",
		"GeoIPv6File /dev/null",
		"Log notice stdout",
		"Log notice file " + filepath.Join(nd.dir, "notice.log"),
		// tor exits on its own when this process is gone (it checks every few
		// seconds), so that a crashed test leaves no tor behind.
		fmt.Sprintf("__OwningControllerProcess %d", os.Getpid()),
	}
	if nd.authority {
		lines = append(lines,
			"AuthoritativeDirectory 1",
			"V3AuthoritativeDirectory 1",
			fmt.Sprintf("TestingV3AuthInitialVotingInterval %d", votingInterval),
			fmt.Sprintf("TestingV3AuthInitialVoteDelay %d", voteDelay),
			fmt.Sprintf("TestingV3AuthInitialDistDelay %d", distDelay),
			fmt.Sprintf("V3AuthVotingInterval %d", votingInterval),
			fmt.Sprintf("V3AuthVoteDelay %d", voteDelay),
			fmt.Sprintf("V3AuthDistDelay %d", distDelay),
			fmt.Sprintf("TestingV3AuthVotingStartOffset %d", offset),
			"TestingDirAuthVoteGuard *",
			"TestingDirAuthVoteHSDir *",
		)
	}
	lines = append(lines, n.lines...)
	return strings.Join(lines, "\n") + "\n"
}

// TorrcLines returns the configuration lines a tor needs to join the
// network: TestingTorNetwork, the three DirAuthority lines, and
// VanguardsLiteEnabled 0 (which avoids a rare path-selection loop in so
// small a network).
func (n *Network) TorrcLines() []string { return slices.Clone(n.lines) }

// Close stops every tor of the network and of its clients, and returns once
// they are all gone.
func (n *Network) Close() error {
	n.mu.Lock()
	n.closed = true
	clients := make([]*Client, 0, len(n.clients))
	for c := range n.clients {
		clients = append(clients, c)
	}
	n.mu.Unlock()
	var errs []error
	for _, c := range clients {
		errs = append(errs, c.Close())
	}
	var wg sync.WaitGroup
	stopErrs := make([]error, len(n.nodes))
	for i, nd := range n.nodes {
		if nd.proc == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			stopErrs[i] = nd.proc.stop()
		}()
	}
	wg.Wait()
	return errors.Join(append(errs, stopErrs...)...)
}

// prepare creates the node's data directory and keys (or reuses them) and
// discards any other state a previous run left there.
func (nd *node) prepare(ctx context.Context) error {
	if err := os.MkdirAll(filepath.Join(nd.dir, "keys"), 0o700); err != nil {
		return fmt.Errorf("prepare tor %s: %w", nd.name, err)
	}
	if err := os.Chmod(nd.dir, 0o700); err != nil {
		return fmt.Errorf("prepare tor %s: %w", nd.name, err)
	}
	entries, err := os.ReadDir(nd.dir)
	if err != nil {
		return fmt.Errorf("prepare tor %s: %w", nd.name, err)
	}
	for _, e := range entries {
		switch e.Name() {
		case "keys", "fingerprint", "fingerprint-ed25519":
			continue
		}
		if err := os.RemoveAll(filepath.Join(nd.dir, e.Name())); err != nil {
			return fmt.Errorf("prepare tor %s: %w", nd.name, err)
		}
	}
	if !nd.authority {
		return nil
	}
	cert := filepath.Join(nd.dir, "keys", "authority_certificate")
	if _, err := os.Stat(cert); errors.Is(err, os.ErrNotExist) {
		// An authority's v3 identity and signing keys, valid 12 months; the
		// empty stdin is an empty passphrase.
		cmd := exec.CommandContext(ctx, "tor-gencert", "--create-identity-key", "-m", "12",
			"-i", "keys/authority_identity_key", "-s", "keys/authority_signing_key",
			"-c", "keys/authority_certificate", "--passphrase-fd", "0")
		cmd.Dir = nd.dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("generate authority keys for %s: %w: %s", nd.name, err, strings.TrimSpace(string(out)))
		}
	}
	if nd.v3ident, err = certFingerprint(cert); err != nil {
		return fmt.Errorf("prepare tor %s: %w", nd.name, err)
	}
	fpFile := filepath.Join(nd.dir, "fingerprint")
	if _, err := os.Stat(fpFile); errors.Is(err, os.ErrNotExist) {
		// tor creates the relay identity key and writes the fingerprint file.
		empty := filepath.Join(nd.dir, "torrc")
		if err := writeFile(empty, nil, 0o600); err != nil {
			return err
		}
		cmd := exec.CommandContext(ctx, "tor", "-f", empty, "--list-fingerprint",
			"--DataDirectory", nd.dir, "--Nickname", nd.name, "--ORPort", "127.0.0.1:1",
			"--Address", "127.0.0.1", "--ExitRelay", "0", "--ContactInfo", nd.name+"@testnet.invalid",
			"--GeoIPFile", "/dev/null", "--GeoIPv6File", "/dev/null", "--Log", "err stderr")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("generate relay keys for %s: %w: %s", nd.name, err, strings.TrimSpace(string(out)))
		}
	}
	data, err := os.ReadFile(fpFile)
	if err != nil {
		return fmt.Errorf("prepare tor %s: %w", nd.name, err)
	}
	// "auth0 0872A1A815663DAA7B5D5781A1A3C8964BF7A0E5"
	fields := strings.Fields(string(data))
	if len(fields) != 2 || len(fields[1]) != 40 {
		return fmt.Errorf("prepare tor %s: malformed %s", nd.name, fpFile)
	}
	nd.identity = fields[1]
	return nil
}

// certFingerprint reads the "fingerprint" line of an authority certificate.
func certFingerprint(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read authority certificate: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fp, ok := strings.CutPrefix(sc.Text(), "fingerprint "); ok && len(fp) == 40 {
			return fp, nil
		}
	}
	return "", fmt.Errorf("read authority certificate %s: no fingerprint line", path)
}

// consensus is what Start needs from a microdescriptor consensus.
type consensus struct {
	flags      map[string][]string // by nickname
	microdescs []string            // base64 sha256 digests ("m" lines)
}

// listsAll reports whether every node is in the consensus, Running and HSDir.
func (c *consensus) listsAll(nodes []*node) bool {
	for _, nd := range nodes {
		f := c.flags[nd.name]
		if !slices.Contains(f, "Running") || !slices.Contains(f, "HSDir") {
			return false
		}
	}
	return true
}

var dirClient = &http.Client{Timeout: 10 * time.Second}

func dirGet(port int, path string) ([]byte, error) {
	req, err := http.NewRequest(http.MethodGet, "http://127.0.0.1:"+strconv.Itoa(port)+path, nil)
	if err != nil {
		return nil, err
	}
	// Otherwise Go asks for gzip, and tor may answer with zstd or lzma.
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := dirClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return body, nil
}

func fetchConsensus(dirPort int) (*consensus, error) {
	body, err := dirGet(dirPort, "/tor/status-vote/current/consensus-microdesc")
	if err != nil {
		return nil, err
	}
	c := &consensus{flags: map[string][]string{}}
	var current string
	for line := range strings.SplitSeq(string(body), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "r":
			current = f[1]
			c.flags[current] = nil
		case "s":
			if current != "" {
				c.flags[current] = f[1:]
			}
		case "m":
			c.microdescs = append(c.microdescs, f[1])
		}
	}
	return c, nil
}

// servesMicrodescs reports whether the DirPort serves every microdescriptor.
func servesMicrodescs(dirPort int, digests []string) bool {
	if len(digests) == 0 {
		return false
	}
	body, err := dirGet(dirPort, "/tor/micro/d/"+strings.Join(digests, "-"))
	if err != nil {
		return false
	}
	served := 0
	for line := range strings.SplitSeq(string(body), "\n") {
		if line == "onion-key" {
			served++
		}
	}
	return served == len(digests)
}
