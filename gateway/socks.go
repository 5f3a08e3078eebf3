package gateway

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// SocksError is a SOCKS5 server's refusal to connect. Tor's ExtendedErrors
// replies (0xF0-0xF7) say why an onion could not be reached.
type SocksError struct {
	Code byte
}

// socksReplies are the SOCKS5 reply codes (RFC 1928) and tor's extended
// ones for onion services.
var socksReplies = map[byte]string{
	0x01: "general SOCKS server failure",
	0x02: "connection not allowed by ruleset",
	0x03: "network unreachable",
	0x04: "host unreachable",
	0x05: "connection refused",
	0x06: "TTL expired",
	0x07: "command not supported",
	0x08: "address type not supported",
	0xF0: "onion service descriptor not found (the onion is not published, or not yet)",
	0xF1: "onion service descriptor is invalid",
	0xF2: "onion service introduction failed",
	0xF3: "onion service rendezvous failed",
	0xF4: "onion service needs client authorization, and this key is not authorized on it",
	0xF5: "onion service refused this client authorization key (revoked, or not authorized on it)",
	0xF6: "invalid onion address",
	0xF7: "onion service introduction timed out",
}

func (e *SocksError) Error() string {
	if msg, ok := socksReplies[e.Code]; ok {
		return fmt.Sprintf("tor: %s (SOCKS5 reply %#x)", msg, e.Code)
	}
	return fmt.Sprintf("tor: SOCKS5 reply %#x", e.Code)
}

// socksHandshakeTimeout bounds the SOCKS5 exchange, which includes tor
// fetching the onion's descriptor and building a rendezvous circuit.
const socksHandshakeTimeout = 2 * time.Minute

// dialSocks connects to addr ("host:port", the host resolved by the proxy)
// through the SOCKS5 server at proxy. user and password, when user is not
// empty, are sent with the username/password method (RFC 1929): tor's
// IsolateSOCKSAuth then keeps the streams of distinct credentials on
// distinct circuits.
func dialSocks(ctx context.Context, proxy, addr, user, password string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port <= 0 || port > 65535 {
		return nil, fmt.Errorf("bad port in %q", addr)
	}
	if len(host) > 255 || len(user) > 255 || len(password) > 255 {
		return nil, errors.New("SOCKS5: host name, user or password too long")
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", proxy)
	if err != nil {
		return nil, fmt.Errorf("connect to tor's SOCKS port: %w", err)
	}
	deadline := time.Now().Add(socksHandshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	c.SetDeadline(deadline)
	// Cancelling ctx interrupts the handshake.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	err = socksHandshake(c, host, port, user, password)
	if !stop() || err != nil {
		c.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

func socksHandshake(c net.Conn, host string, port int, user, password string) error {
	method := byte(0x00) // no authentication
	if user != "" {
		method = 0x02 // username/password
	}
	if _, err := c.Write([]byte{5, 1, method}); err != nil {
		return fmt.Errorf("SOCKS5 greeting: %w", err)
	}
	r := bufio.NewReader(c)
	var b [2]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return fmt.Errorf("SOCKS5 greeting: %w", err)
	}
	if b[0] != 5 || b[1] != method {
		return fmt.Errorf("SOCKS5 greeting: the proxy refused method %d", method)
	}
	if user != "" {
		msg := append([]byte{1, byte(len(user))}, user...)
		msg = append(msg, byte(len(password)))
		msg = append(msg, password...)
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("SOCKS5 authentication: %w", err)
		}
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return fmt.Errorf("SOCKS5 authentication: %w", err)
		}
		if b[1] != 0 {
			return errors.New("SOCKS5 authentication refused")
		}
	}
	req := []byte{5, 1, 0}
	if ip := net.ParseIP(host); ip != nil && ip.To4() != nil {
		req = append(append(req, 1), ip.To4()...)
	} else if ip != nil {
		req = append(append(req, 4), ip.To16()...)
	} else {
		req = append(append(req, 3, byte(len(host))), host...)
	}
	req = append(req, byte(port>>8), byte(port))
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("SOCKS5 connect: %w", err)
	}
	var head [4]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return fmt.Errorf("SOCKS5 connect: %w", err)
	}
	if head[0] != 5 {
		return errors.New("SOCKS5 connect: not a SOCKS5 reply")
	}
	if head[1] != 0 {
		return &SocksError{Code: head[1]}
	}
	var skip int
	switch head[3] {
	case 1:
		skip = 4
	case 4:
		skip = 16
	case 3:
		n, err := r.ReadByte()
		if err != nil {
			return fmt.Errorf("SOCKS5 connect: %w", err)
		}
		skip = int(n)
	default:
		return fmt.Errorf("SOCKS5 connect: unknown address type %d", head[3])
	}
	if _, err := io.CopyN(io.Discard, r, int64(skip+2)); err != nil {
		return fmt.Errorf("SOCKS5 connect: %w", err)
	}
	if r.Buffered() > 0 {
		// The server spoke before we did: nothing to do with it.
		return errors.New("SOCKS5 connect: unexpected data after the reply")
	}
	return nil
}
