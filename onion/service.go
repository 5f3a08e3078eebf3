package onion

import (
	"context"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/sirupsen/logrus"
)

// virtualPort is the port of every onion service: plain HTTP.
const virtualPort = 80

// base32NoPad is RFC 4648 base32 without padding: how tor writes x25519
// keys in ClientAuthV3= and in client authorization files.
var base32NoPad = base32.StdEncoding.WithPadding(base32.NoPadding)

// Service is a v3 onion service to publish.
type Service struct {
	// Name is what the logs call it ("read", "write").
	Name string
	// Identity is the onion's key: the service's address.
	Identity *Identity
	// Target is where the onion's port 80 goes: "unix:/abs/path/sock"
	// (preferred: then nothing listens on TCP) or "127.0.0.1:PORT".
	Target string
	// ClientKeys are the x25519 public keys of the clients authorized to
	// reach the onion (v3 client authorization). Empty publishes an onion
	// that anyone who knows the address can reach: whether that is allowed
	// is the caller's decision.
	ClientKeys [][32]byte
}

// Publish publishes s, or replaces the service published with the same
// Identity (DEL_ONION then ADD_ONION, so that new ClientKeys take effect
// without restarting tor: a client holding only a removed key is refused
// once its cached descriptor expires). s is remembered and republished at
// the same address whenever tor is restarted.
//
// Publish returns an error when s is malformed or tor refuses it; then the
// previous version, if any, stays published. When tor is down (being
// restarted), s is remembered, published as soon as tor is back, and
// Publish returns nil. ctx bounds the wait for a concurrent Publish or
// restart.
func (t *Tor) Publish(ctx context.Context, s Service) error {
	if err := s.check(); err != nil {
		return fmt.Errorf("publish onion service %q: %w", s.Name, err)
	}
	s.ClientKeys = append([][32]byte(nil), s.ClientKeys...)
	if err := t.acquire(ctx); err != nil {
		return fmt.Errorf("publish onion service %q: %w", s.Name, err)
	}
	defer t.release()
	id := s.Identity.ServiceID()
	prev, had := t.services[id]
	t.services[id] = s
	inst := t.inst
	if inst == nil {
		t.log.WithFields(serviceFields(s)).Warn("tor is restarting: the onion service will be published when it is back")
		return nil
	}
	if had {
		if _, err := inst.request("DEL_ONION " + id); err != nil && replyCode(err) != 552 {
			if isRefusal(err) {
				t.services[id] = prev
				return fmt.Errorf("publish onion service %q: remove the previous version: %w", s.Name, err)
			}
			t.log.WithError(err).WithFields(serviceFields(s)).Warn("tor failed during publish: the onion service will be published when it is back")
			return nil
		}
	}
	if err := inst.addOnion(s); err != nil {
		if !isRefusal(err) {
			t.log.WithError(err).WithFields(serviceFields(s)).Warn("tor failed during publish: the onion service will be published when it is back")
			return nil
		}
		if had {
			t.services[id] = prev
			if rerr := inst.addOnion(prev); rerr != nil {
				t.log.WithError(rerr).WithFields(serviceFields(prev)).Error("restore the previous version of the onion service")
			}
		} else {
			delete(t.services, id)
		}
		return fmt.Errorf("publish onion service %q: %w", s.Name, err)
	}
	verb := "onion service published"
	if had {
		verb = "onion service replaced"
	}
	inst.log.WithFields(serviceFields(s)).Info(verb)
	return nil
}

// Unpublish takes down the service published with id (DEL_ONION) and
// forgets it, so that a restart does not bring it back either. A service
// that was not published is no error. When tor is down (being restarted)
// the service is forgotten and not restored.
func (t *Tor) Unpublish(ctx context.Context, id *Identity) error {
	if err := t.acquire(ctx); err != nil {
		return fmt.Errorf("unpublish onion service %s: %w", id.Address(), err)
	}
	defer t.release()
	sid := id.ServiceID()
	s, had := t.services[sid]
	if !had {
		return nil
	}
	delete(t.services, sid)
	if t.inst == nil {
		return nil
	}
	if _, err := t.inst.request("DEL_ONION " + sid); err != nil && replyCode(err) != 552 {
		if isRefusal(err) {
			t.services[sid] = s
			return fmt.Errorf("unpublish onion service %q: %w", s.Name, err)
		}
		// tor died: the restarted one will not publish it.
		return nil
	}
	t.inst.log.WithFields(serviceFields(s)).Info("onion service removed")
	return nil
}

// check validates s before it reaches tor, whose command line is split on
// spaces.
func (s Service) check() error {
	if s.Identity == nil {
		return errors.New("no identity")
	}
	if path, ok := strings.CutPrefix(s.Target, "unix:"); ok {
		if !filepath.IsAbs(path) || strings.ContainsAny(path, " \t\r\n\"\\") {
			return fmt.Errorf("target %q: want unix: and an absolute path without spaces, quotes or backslashes", s.Target)
		}
		return nil
	}
	host, port, err := net.SplitHostPort(s.Target)
	if err != nil {
		return fmt.Errorf("target %q: want \"unix:/path\" or \"IP:PORT\"", s.Target)
	}
	if net.ParseIP(host) == nil {
		return fmt.Errorf("target %q: want an IP address, not a host name", s.Target)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("target %q: bad port", s.Target)
	}
	return nil
}

// addOnion sends ADD_ONION for s and checks that tor derived the address
// s.Identity has. Without Flags=Detach the service lives as long as the
// control connection, that is as long as this tor instance.
func (inst *instance) addOnion(s Service) error {
	var b strings.Builder
	b.WriteString("ADD_ONION ")
	b.WriteString(s.Identity.addOnionKey())
	if len(s.ClientKeys) > 0 {
		// tor refuses ClientAuthV3 without V3Auth, and V3Auth without keys.
		b.WriteString(" Flags=V3Auth")
	}
	fmt.Fprintf(&b, " Port=%d,%s", virtualPort, s.Target)
	for _, k := range s.ClientKeys {
		b.WriteString(" ClientAuthV3=")
		b.WriteString(base32NoPad.EncodeToString(k[:]))
	}
	resp, err := inst.request(b.String())
	if err != nil {
		return fmt.Errorf("add onion: %w", err)
	}
	want := s.Identity.ServiceID()
	for _, line := range resp.Data {
		if got, ok := strings.CutPrefix(line, "ServiceID="); ok {
			if got != want {
				inst.request("DEL_ONION " + got)
				return fmt.Errorf("add onion: tor derived the address %s.onion from the key of %s", got, s.Identity.Address())
			}
			return nil
		}
	}
	return errors.New("add onion: tor's answer has no ServiceID")
}

func serviceFields(s Service) logrus.Fields {
	return logrus.Fields{
		"service":     s.Name,
		"onion":       s.Identity.Address(),
		"target":      s.Target,
		"client_keys": len(s.ClientKeys),
	}
}

// AddClientAuth gives this tor (a client) the x25519 private key that
// authorizes it on the onion at address (with or without ".onion"), with
// ONION_CLIENT_AUTH_ADD. It replaces a key added before for that onion, and
// is remembered and restored whenever tor is restarted. The key is never
// logged.
func (t *Tor) AddClientAuth(ctx context.Context, address string, privateKey [32]byte) error {
	id := strings.TrimSuffix(strings.ToLower(address), ".onion")
	if len(id) != 56 || strings.Trim(id, "abcdefghijklmnopqrstuvwxyz234567") != "" {
		return fmt.Errorf("add client authorization: %q is not a v3 onion address", address)
	}
	if err := t.acquire(ctx); err != nil {
		return fmt.Errorf("add client authorization for %s.onion: %w", id, err)
	}
	defer t.release()
	prev, had := t.auths[id]
	t.auths[id] = privateKey
	if t.inst == nil {
		return nil
	}
	if err := t.inst.addClientAuth(id, privateKey); err != nil {
		if !isRefusal(err) {
			return nil // tor died: the key is restored when it is back
		}
		if had {
			t.auths[id] = prev
		} else {
			delete(t.auths, id)
		}
		return fmt.Errorf("add client authorization for %s.onion: %w", id, err)
	}
	return nil
}

// addClientAuth sends ONION_CLIENT_AUTH_ADD. tor answers 251 when it
// replaced a key and 252 when it could now decrypt a cached descriptor;
// bine counts only 250 and 251 as success, so 252 comes back as an error.
func (inst *instance) addClientAuth(id string, key [32]byte) error {
	_, err := inst.request("ONION_CLIENT_AUTH_ADD " + id + " x25519:" + base64.StdEncoding.EncodeToString(key[:]))
	if err != nil && replyCode(err) != 252 {
		return fmt.Errorf("onion client auth add: %w", err)
	}
	return nil
}
