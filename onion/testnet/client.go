package testnet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// Client is a plain client tor on the network, with a SOCKS port.
type Client struct {
	net       *Network
	socksAddr string
	proc      *proc
	closeOnce sync.Once
	closeErr  error
}

// StartClient starts a client tor whose DataDirectory is dir (created 0700)
// and returns once it has bootstrapped. Its SOCKS port listens on
// 127.0.0.1 with ExtendedErrors, so a refused onion connection says why
// (0xF4: client authorization missing). When authDir is not empty it is the
// tor's ClientOnionAuthDir: one "<address>:descriptor:x25519:<base32 key>"
// .auth_private file per onion. ctx bounds only the start; Close (or the
// Network's Close) stops the tor.
func (n *Network) StartClient(ctx context.Context, dir, authDir string) (*Client, error) {
	n.mu.Lock()
	closed := n.closed
	n.mu.Unlock()
	if closed {
		return nil, errors.New("start tor test client: network closed")
	}
	c, err := n.startClient(ctx, dir, authDir)
	if err != nil {
		return nil, fmt.Errorf("start tor test client in %s: %w", dir, err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		c.proc.stop()
		return nil, errors.New("start tor test client: network closed")
	}
	n.clients[c] = struct{}{}
	return c, nil
}

func (n *Network) startClient(ctx context.Context, dir, authDir string) (*Client, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	socks := "127.0.0.1:" + strconv.Itoa(ports[0])
	lines := append(n.TorrcLines(),
		"DataDirectory "+dir,
		"SocksPort "+socks+" ExtendedErrors",
		"GeoIPFile /dev/null",
		"GeoIPv6File /dev/null",
		"Log notice stdout",
		fmt.Sprintf("__OwningControllerProcess %d", os.Getpid()),
	)
	if authDir != "" {
		if authDir, err = filepath.Abs(authDir); err != nil {
			return nil, err
		}
		lines = append(lines, "ClientOnionAuthDir "+authDir)
	}
	torrc := filepath.Join(dir, "torrc")
	if err := writeFile(torrc, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		return nil, err
	}
	bootstrapped := make(chan struct{})
	var once sync.Once
	name := "client-" + filepath.Base(dir)
	p, err := startTor(name, torrc, n.log.WithField("tor", name), func(sev, msg string) {
		if strings.HasPrefix(msg, "Bootstrapped 100%") {
			once.Do(func() { close(bootstrapped) })
		}
	})
	if err != nil {
		return nil, err
	}
	c := &Client{net: n, socksAddr: socks, proc: p}
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	select {
	case <-bootstrapped:
	case <-p.done:
		return nil, fmt.Errorf("wait for bootstrap: %w", p.exitError())
	case <-ctx.Done():
		p.stop()
		return nil, fmt.Errorf("wait for bootstrap: %w", ctx.Err())
	}
	n.log.WithFields(logrus.Fields{"tor": name, "socks": socks, "elapsed": time.Since(began).Round(time.Millisecond)}).Debug("test client tor bootstrapped")
	return c, nil
}

// SocksAddr returns the client's SOCKS5 address, "127.0.0.1:PORT".
func (c *Client) SocksAddr() string { return c.socksAddr }

// PID returns the client tor's process id.
func (c *Client) PID() int { return c.proc.cmd.Process.Pid }

// Close stops the client tor and returns once it is gone.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closeErr = c.proc.stop()
		c.net.mu.Lock()
		delete(c.net.clients, c)
		c.net.mu.Unlock()
	})
	return c.closeErr
}
