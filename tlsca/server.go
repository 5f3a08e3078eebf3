package tlsca

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// ServerCert returns the cache's own server certificate for hosts (DNS
// names and IP addresses), signed by the CA and kept beside it: the one
// already there when it was signed by this CA, names every host and is
// not about to end (ServerRenewBefore), else a new one.
func (ca *CA) ServerCert(hosts []string) (tls.Certificate, error) {
	return ca.serverCertAt(hosts, time.Now())
}

// serverCertAt is ServerCert at the time now.
func (ca *CA) serverCertAt(hosts []string, now time.Time) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(ca.dir, ServerCertFile), filepath.Join(ca.dir, ServerKeyFile)
	if c, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && ca.serves(c, hosts, now) {
		return c, nil
	}
	iss, err := ca.Issue(Template{Name: hosts[0], Hosts: hosts, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(ServerValidity)})
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := atomicfile.WriteFile(keyPath, iss.KeyPEM, 0o600); err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	if err := atomicfile.WriteFile(certPath, iss.CertPEM, 0o600); err != nil {
		return tls.Certificate{}, fmt.Errorf("server certificate: %w", err)
	}
	return tls.X509KeyPair(iss.CertPEM, iss.KeyPEM)
}

// serves reports whether c is a server certificate of this CA for every
// host, valid at now for a while yet.
func (ca *CA) serves(c tls.Certificate, hosts []string, now time.Time) bool {
	leaf := c.Leaf
	if leaf == nil || leaf.NotAfter.Sub(now) < ServerRenewBefore {
		return false
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: ca.Pool(), CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return false
	}
	for _, h := range hosts {
		if leaf.VerifyHostname(strings.Trim(h, "[]")) != nil {
			return false
		}
	}
	return true
}

// DoorFile is the file, in the CA's directory, where serve records how
// its TLS door is reached, for 'keys add --tls' to put in bundles.
const DoorFile = "door.toml"

// DoorInfo is how clients reach the TLS door.
type DoorInfo struct {
	// URL is the door's base URL: https://HOST:PORT.
	URL string `toml:"url"`
	// ServerFingerprint is the fingerprint of the cache's own server
	// certificate; empty when the user supplied the certificate (clients
	// then trust the system's roots).
	ServerFingerprint string `toml:"server_fingerprint,omitempty"`
}

// SaveDoor records d in dir (0600).
func SaveDoor(dir string, d DoorInfo) error {
	b, err := toml.Marshal(d)
	if err != nil {
		return fmt.Errorf("record tls door: %w", err)
	}
	b = append([]byte("# written by 'kiss-onion serve --listen-tls': how clients reach the TLS door\n"), b...)
	if err := atomicfile.WriteFile(filepath.Join(dir, DoorFile), b, 0o600); err != nil {
		return fmt.Errorf("record tls door: %w", err)
	}
	return nil
}

// LoadDoor reads what serve recorded in dir; an error matching
// fs.ErrNotExist when serve never listened for TLS.
func LoadDoor(dir string) (DoorInfo, error) {
	path := filepath.Join(dir, DoorFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return DoorInfo{}, fmt.Errorf("read tls door: %w", err)
	}
	var d DoorInfo
	if err := toml.Unmarshal(b, &d); err != nil {
		return DoorInfo{}, fmt.Errorf("read tls door: %s: %w", path, err)
	}
	if err := CheckURL(d.URL); err != nil {
		return DoorInfo{}, fmt.Errorf("read tls door: %s: %w", path, err)
	}
	return d, nil
}

// CheckURL checks that u is https://HOST[:PORT], with nothing after.
func CheckURL(u string) error {
	host, ok := strings.CutPrefix(u, "https://")
	host = strings.TrimSuffix(host, "/")
	if !ok || host == "" || strings.ContainsAny(host, "/?#@") {
		return fmt.Errorf("%q is not https://HOST[:PORT]", u)
	}
	return nil
}

// DefaultHosts returns the names a server certificate is issued for when
// none is given: the listen address's host (unless it is every address),
// localhost and the loopback addresses.
func DefaultHosts(listen string) []string {
	hosts := []string{}
	if h, _, err := net.SplitHostPort(listen); err == nil && h != "" {
		if ip := net.ParseIP(h); ip == nil || !ip.IsUnspecified() {
			hosts = append(hosts, h)
		}
	}
	for _, h := range []string{"localhost", "127.0.0.1", "::1"} {
		if !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	return hosts
}
