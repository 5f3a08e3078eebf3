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
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/access"
	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/onion"
	"github.com/kiss-onion/kiss-onion/onion/testnet"
	"github.com/kiss-onion/kiss-onion/serve"
)

// onions is what `serve --tor public|local` runs: a tor, the read and write
// onion services in front of the cache's unix sockets, and (local) the
// private Tor network they live on. Which clients they admit is package
// access's to keep.
type onions struct {
	tor     *onion.Tor
	network *testnet.Network
	access  *access.Onions
	socks   map[serve.Role]string // unix socket of each role
	// published tells the status socket what is published, and since when.
	published *publishLog
}

// identityPaths are where the onion identities live in the state directory;
// `keys` creates them too, so bundles can be handed out before any serve.
func identityPaths(stateDir string) (read, write string) {
	return filepath.Join(stateDir, "onion", "read.key"), filepath.Join(stateDir, "onion", "write.key")
}

// registryPaths are the client registries serve admits: the state
// directory's, and --clients-file.
func registryPaths(f serveFlags) []string {
	paths := []string{filepath.Join(f.stateDir, clientauth.RegistryFileName)}
	if f.clientsFile != "" {
		paths = append(paths, f.clientsFile)
	}
	return paths
}

func startOnions(ctx context.Context, f serveFlags, log *logrus.Entry, serveOn func(net.Listener, serve.Role), metrics *serveMetrics) (*onions, error) {
	o := &onions{socks: map[serve.Role]string{}}
	readPath, writePath := identityPaths(f.stateDir)
	read, err := onion.LoadOrCreateIdentity(readPath)
	if err != nil {
		return nil, err
	}
	write, err := onion.LoadOrCreateIdentity(writePath)
	if err != nil {
		return nil, err
	}
	registries := registryPaths(f)
	keys, err := access.Load(registries...)
	if err != nil {
		return nil, err
	}
	if len(keys.Read) == 0 && !f.publicRead {
		return nil, withHint(fmt.Errorf("no client keys in %s: the read onion would admit nobody", registries[0]),
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
		Socks:      f.upstream.viaTor, // for upstream requests
		Log:        log,
	})
	if err != nil {
		return nil, err
	}
	o.published = &publishLog{Publisher: o.tor}
	metrics.watchTor(o.tor)
	o.access = access.New(access.Config{
		Read:       access.Onion{Identity: read, Target: "unix:" + o.socks[serve.Read]},
		Write:      access.Onion{Identity: write, Target: "unix:" + o.socks[serve.Write]},
		Registries: registries,
		PublicRead: f.publicRead,
		Publisher:  o.published,
		Log:        log,
		Published:  metrics.published,
	})
	if err := o.access.Apply(ctx, keys); err != nil {
		return nil, err
	}
	// The write onion's file last: whoever waits for the files waits for
	// that one (not a map: its order is random).
	for _, file := range []struct {
		role string
		id   *onion.Identity
	}{{"read", read}, {"write", write}} {
		if err := atomicfile.WriteFile(filepath.Join(f.stateDir, file.role+".onion"), []byte(file.id.Address()+"\n"), 0o644); err != nil {
			return nil, err
		}
	}
	ok = true
	return o, nil
}

// watchClients keeps the onions' client keys in step with the registries
// until ctx ends (see access.Onions.Watch): the files are polled, and
// SIGHUP forces a reload.
func (o *onions) watchClients(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	reload := make(chan struct{})
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
			}
			select {
			case <-ctx.Done():
				return
			case reload <- struct{}{}:
			}
		}
	}()
	o.access.Watch(ctx, reload)
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
