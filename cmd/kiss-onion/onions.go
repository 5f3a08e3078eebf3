package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/onion"
	"github.com/kiss-onion/kiss-onion/onion/testnet"
	"github.com/kiss-onion/kiss-onion/serve"
)

// clientsPoll is how often serve looks for changes in the client keys.
const clientsPoll = 2 * time.Second

// onions is what `serve --tor public|local` runs: a tor, the read and write
// onion services in front of the cache's unix sockets, and (local) the
// private Tor network they live on.
type onions struct {
	f       serveFlags
	log     *logrus.Entry
	tor     *onion.Tor
	network *testnet.Network
	read    *onion.Identity
	write   *onion.Identity
	socks   map[serve.Role]string // unix socket of each role

	// What is published now, to publish again only on a change.
	readKeys, writeKeys [][32]byte
	readUp, writeUp     bool
	stamps              []clientauth.Stamp
}

// identityPaths are where the onion identities live in the state directory;
// `keys` creates them too, so bundles can be handed out before any serve.
func identityPaths(stateDir string) (read, write string) {
	return filepath.Join(stateDir, "onion", "read.key"), filepath.Join(stateDir, "onion", "write.key")
}

func startOnions(ctx context.Context, f serveFlags, log *logrus.Entry, serveOn func(net.Listener, serve.Role)) (*onions, error) {
	o := &onions{f: f, log: log, socks: map[serve.Role]string{}}
	readPath, writePath := identityPaths(f.stateDir)
	var err error
	if o.read, err = onion.LoadOrCreateIdentity(readPath); err != nil {
		return nil, err
	}
	if o.write, err = onion.LoadOrCreateIdentity(writePath); err != nil {
		return nil, err
	}
	readKeys, writeKeys, stamps, err := o.loadKeys()
	if err != nil {
		return nil, err
	}
	if len(readKeys) == 0 && !f.publicRead {
		return nil, withHint(fmt.Errorf("no client keys in %s: the read onion would admit nobody", filepath.Join(f.stateDir, clientauth.RegistryFileName)),
			"add one with 'kiss-onion keys add NAME --role reader --state-dir %s', or serve anyone with --public-read", f.stateDir)
	}
	var lines []string
	if f.torConfig != "" {
		if lines, err = readTorrcLines(f.torConfig); err != nil {
			return nil, err
		}
	}

	// tor forwards each onion to a unix socket in the state directory:
	// only this user and tor can connect, and no TCP port is opened.
	sockDir := filepath.Join(f.stateDir, "sock")
	if err := os.MkdirAll(sockDir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	for _, role := range []serve.Role{serve.Read, serve.Write} {
		path := filepath.Join(sockDir, role.String()+".sock")
		os.Remove(path) // a socket left by a killed serve
		ln, err := net.Listen("unix", path)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", path, err)
		}
		o.socks[role] = path
		serveOn(ln, role)
	}

	ok := false
	defer func() {
		if !ok {
			o.close()
		}
	}()
	if f.torMode == "local" {
		dir := filepath.Join(f.stateDir, "testnet")
		log.WithField("dir", dir).Info("starting the private Tor network (--tor local)")
		if o.network, err = testnet.Start(ctx, dir, log); err != nil {
			return nil, err
		}
		netLines := o.network.TorrcLines()
		// Clients join the same network with these lines (tor -f, or
		// kiss-onion proxy --tor-config).
		conf := filepath.Join(f.stateDir, "testnet.torrc")
		if err := atomicfile.WriteFile(conf, []byte(strings.Join(netLines, "\n")+"\n"), 0o644); err != nil {
			return nil, err
		}
		lines = append(netLines, lines...)
	}
	o.tor, err = onion.Start(ctx, onion.Config{
		Binary:     f.torBinary,
		DataDir:    filepath.Join(f.stateDir, "tor"),
		TorrcLines: lines,
		Log:        log,
	})
	if err != nil {
		return nil, err
	}
	if err := o.publish(ctx, readKeys, writeKeys); err != nil {
		return nil, err
	}
	o.stamps = stamps
	for role, id := range map[string]*onion.Identity{"read": o.read, "write": o.write} {
		if err := atomicfile.WriteFile(filepath.Join(f.stateDir, role+".onion"), []byte(id.Address()+"\n"), 0o644); err != nil {
			return nil, err
		}
	}
	ok = true
	return o, nil
}

// publish makes the onions admit exactly these keys: a service whose keys
// changed is published again, one left with no key is taken down (never
// published open, unless --public-read says so for the read onion).
func (o *onions) publish(ctx context.Context, readKeys, writeKeys [][32]byte) error {
	type svc struct {
		name   string
		id     *onion.Identity
		role   serve.Role
		keys   [][32]byte
		public bool
		up     *bool
		cur    *[][32]byte
	}
	for _, s := range []svc{
		{"read", o.read, serve.Read, readKeys, o.f.publicRead, &o.readUp, &o.readKeys},
		{"write", o.write, serve.Write, writeKeys, false, &o.writeUp, &o.writeKeys},
	} {
		if s.public {
			s.keys = nil
		}
		if *s.up && sameKeys(s.keys, *s.cur) {
			continue
		}
		l := o.log.WithFields(logrus.Fields{"onion": s.name, "address": s.id.Address(), "clients": len(s.keys)})
		if len(s.keys) == 0 && !s.public {
			if *s.up {
				if err := o.tor.Unpublish(ctx, s.id); err != nil {
					return err
				}
				*s.up = false
				l.Warn("no client keys left: onion taken down")
			} else {
				l.Warn("no client keys: onion not published")
			}
			*s.cur = nil
			continue
		}
		err := o.tor.Publish(ctx, onion.Service{Name: s.name, Identity: s.id, Target: "unix:" + o.socks[s.role], ClientKeys: s.keys})
		if err != nil {
			return err
		}
		*s.up, *s.cur = true, s.keys
		if s.public {
			l.Warn("onion published without client authorization (--public-read)")
		} else {
			l.Info("onion published")
		}
	}
	return nil
}

func sameKeys(a, b [][32]byte) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	cmp := func(x, y [32]byte) int { return bytes.Compare(x[:], y[:]) }
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(a, b)
}

// loadKeys reads the registry in the state directory and the
// --clients-file, and returns the keys of each onion (each key once; a key
// revoked in either file is out, whatever the other says) and the files'
// stamps.
func (o *onions) loadKeys() (readKeys, writeKeys [][32]byte, stamps []clientauth.Stamp, err error) {
	revoked := map[[32]byte]bool{}
	var regs []*clientauth.Registry
	for _, path := range o.registryPaths() {
		reg, err := clientauth.LoadRegistry(path)
		if err != nil {
			return nil, nil, nil, err
		}
		for _, c := range reg.Clients() {
			if c.IsRevoked() {
				revoked[c.PublicKey.Bytes()] = true
			}
		}
		regs = append(regs, reg)
		stamps = append(stamps, reg.Stamp())
	}
	add := func(list [][32]byte, keys [][32]byte) [][32]byte {
		for _, k := range keys {
			if !revoked[k] && !slices.Contains(list, k) {
				list = append(list, k)
			}
		}
		return list
	}
	for _, reg := range regs {
		readKeys = add(readKeys, reg.ReadKeys())
		writeKeys = add(writeKeys, reg.WriteKeys())
	}
	return readKeys, writeKeys, stamps, nil
}

func (o *onions) registryPaths() []string {
	paths := []string{filepath.Join(o.f.stateDir, clientauth.RegistryFileName)}
	if o.f.clientsFile != "" {
		paths = append(paths, o.f.clientsFile)
	}
	return paths
}

// watchClients publishes the onions again when the client keys change (the
// files are polled, and SIGHUP forces a reload), so that `keys add` and
// `keys revoke` take effect without a restart.
func (o *onions) watchClients(ctx context.Context, errc chan<- error) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(clientsPoll)
	defer tick.Stop()
	for {
		forced := false
		select {
		case <-ctx.Done():
			return
		case <-hup:
			forced = true
		case <-tick.C:
		}
		if !forced && !o.clientsChanged() {
			continue
		}
		readKeys, writeKeys, stamps, err := o.loadKeys()
		if err != nil {
			// A half-edited file: keep what is published, say why, and
			// try again when the file changes.
			o.log.WithError(err).Error("client keys not reloaded")
			o.stamps = o.statClients()
			continue
		}
		o.stamps = stamps
		if err := o.publish(ctx, readKeys, writeKeys); err != nil {
			o.log.WithError(err).Error("onions not published with the new client keys")
		}
	}
}

func (o *onions) clientsChanged() bool {
	return !slices.Equal(o.statClients(), o.stamps)
}

// statClients returns the stamps of the client files now; a file that
// cannot be read has the zero stamp.
func (o *onions) statClients() []clientauth.Stamp {
	var stamps []clientauth.Stamp
	for _, path := range o.registryPaths() {
		st, _ := clientauth.StatRegistry(path)
		stamps = append(stamps, st)
	}
	return stamps
}

func (o *onions) close() {
	if o.tor != nil {
		o.tor.Close()
	}
	if o.network != nil {
		o.network.Close()
	}
	for _, p := range o.socks {
		os.Remove(p)
	}
}

// readTorrcLines reads extra torrc lines, skipping blank lines and comments.
func readTorrcLines(path string) ([]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read --tor-config: %w", err)
	}
	var lines []string
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' {
			continue
		}
		key := strings.ToLower(strings.Fields(l)[0])
		switch key {
		case "socksport", "controlport", "datadirectory", "hiddenservicedir", "hiddenserviceport":
			return nil, fmt.Errorf("%s:%d: %s is kiss-onion's to set", path, n, strings.Fields(l)[0])
		}
		lines = append(lines, l)
	}
	return lines, sc.Err()
}
