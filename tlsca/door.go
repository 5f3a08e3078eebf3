package tlsca

import (
	"crypto/tls"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/serve"
)

// DoorName is the Door of the identities Door grants.
const DoorName = "tls"

// DoorConfig configures NewDoor.
type DoorConfig struct {
	// CA signs the client certificates let in.
	CA *CA
	// Registries are the registry files whose clients' certificates are
	// let in (the state directory's first); a certificate revoked in any
	// of them is out.
	Registries []string
	// Next authenticates a request that comes with no client certificate
	// (a bearer token, say); nil refuses it with serve.ErrNoCredentials.
	Next serve.Authenticator
	// Log receives reload errors; logrus's standard logger when nil.
	Log *logrus.Entry
}

// Door is the serve.Authenticator of the TLS door: a request whose client
// certificate the CA signed, valid now, and registered to a client that
// no registry revoked, comes in with the registry's role. The handshake
// already refused certificates of another CA and expired ones (see
// TLSConfig); the registries are looked at again on every request (their
// stamps, reloaded when they changed), so that 'keys revoke' shuts the
// next request out, on open connections too, with no restart.
type Door struct {
	cfg DoorConfig
	log *logrus.Entry

	mu      sync.Mutex
	stamps  []clientauth.Stamp
	clients map[string]clientauth.Client // by certificate fingerprint
	revoked map[string]string            // fingerprint to client name
}

// NewDoor returns a Door over the registries, as they are now.
func NewDoor(cfg DoorConfig) (*Door, error) {
	if cfg.CA == nil {
		return nil, fmt.Errorf("tls door: no CA")
	}
	d := &Door{cfg: cfg, log: cfg.Log}
	if d.log == nil {
		d.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if err := d.load(d.stat()); err != nil {
		return nil, err
	}
	return d, nil
}

// TLSConfig returns the configuration of a TLS listener serving cert that
// asks clients for a certificate of the CA: a certificate of another CA,
// expired or not yet valid fails the handshake; none is let through, for
// Next (tls.VerifyClientCertIfGiven).
func (d *Door) TLSConfig(cert *ServedCert) *tls.Config {
	return &tls.Config{
		GetCertificate: cert.GetCertificate,
		ClientCAs:      d.cfg.CA.Pool(),
		ClientAuth:     tls.VerifyClientCertIfGiven,
		MinVersion:     tls.VersionTLS12,
		NextProtos:     []string{"http/1.1"}, // serve tracks HTTP/1 connections
	}
}

// Authenticate implements serve.Authenticator.
func (d *Door) Authenticate(r *http.Request) (serve.Identity, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		if d.cfg.Next != nil {
			return d.cfg.Next.Authenticate(r)
		}
		return serve.Identity{}, serve.ErrNoCredentials
	}
	if len(r.TLS.VerifiedChains) == 0 {
		// Not reached with TLSConfig's listener: the handshake verifies.
		return serve.Identity{}, fmt.Errorf("client certificate not signed by this cache's CA")
	}
	leaf := r.TLS.PeerCertificates[0]
	if now := time.Now(); now.After(leaf.NotAfter) || now.Before(leaf.NotBefore) {
		return serve.Identity{}, fmt.Errorf("client certificate %q expired on %s", leaf.Subject.CommonName, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	fp := Fingerprint(leaf)
	c, name, ok := d.lookup(fp)
	switch {
	case name != "":
		return serve.Identity{}, fmt.Errorf("client certificate %s of %q was revoked", fp, name)
	case !ok:
		return serve.Identity{}, fmt.Errorf("client certificate %s (%q) is not registered", fp, leaf.Subject.CommonName)
	}
	role := serve.Read
	if c.Role == clientauth.RoleWriter {
		role = serve.Write
	}
	return serve.Identity{Name: c.Name, Door: DoorName, Role: role}, nil
}

// lookup returns the client of a fingerprint, or the name of the revoked
// client it was, reloading the registries first when they changed.
func (d *Door) lookup(fp string) (clientauth.Client, string, bool) {
	stamps := d.stat()
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.Equal(stamps, d.stamps) {
		if err := d.load(stamps); err != nil {
			// A registry that does not load keeps what was let in: the
			// next change is tried again.
			d.stamps = stamps
			d.log.WithError(err).Error("client certificates not reloaded")
		}
	}
	if name, ok := d.revoked[fp]; ok {
		return clientauth.Client{}, name, false
	}
	c, ok := d.clients[fp]
	return c, "", ok
}

// load reads the registries; stamps are theirs from before the read, so
// that a change made meanwhile is read again.
func (d *Door) load(stamps []clientauth.Stamp) error {
	var regs []*clientauth.Registry
	revoked := map[string]string{}
	for _, p := range d.cfg.Registries {
		reg, err := clientauth.LoadRegistry(p)
		if err != nil {
			return err
		}
		regs = append(regs, reg)
		for _, c := range reg.Clients() {
			if c.IsRevoked() && c.TLSCert != "" {
				revoked[c.TLSCert] = c.Name
			}
		}
	}
	d.clients, d.revoked, d.stamps = clientauth.MergeTLS(regs...), revoked, stamps
	return nil
}

func (d *Door) stat() []clientauth.Stamp {
	var stamps []clientauth.Stamp
	for _, p := range d.cfg.Registries {
		st, _ := clientauth.StatRegistry(p)
		stamps = append(stamps, st)
	}
	return stamps
}
