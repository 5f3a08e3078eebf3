package tlsca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// Files of the CA and of the server certificate, in the CA's directory.
const (
	CACertFile     = "ca.crt"
	CAKeyFile      = "ca.key"
	ServerCertFile = "server.crt"
	ServerKeyFile  = "server.key"
)

// Dir returns the directory of the CA in a state directory.
func Dir(stateDir string) string { return filepath.Join(stateDir, "tls") }

// Validity of what the CA signs. Client certificates are long-lived:
// revoking one is done in the registry, not by letting it expire.
const (
	CAValidity     = 20 * 365 * 24 * time.Hour
	ClientValidity = 10 * 365 * 24 * time.Hour
	ServerValidity = 2 * 365 * 24 * time.Hour
	// ServerRenewBefore is how long before its end the server
	// certificate is issued again (at serve's start, and by a running
	// serve: see NewOwnCert).
	ServerRenewBefore = 30 * 24 * time.Hour
)

// CA is the cache's certificate authority.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
	dir     string
}

// LoadOrCreate loads the CA from dir, creating it (dir 0700, key 0600)
// when neither file exists.
func LoadOrCreate(dir string) (*CA, error) {
	ca, err := Load(dir)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return ca, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	// serve and 'keys add --tls' may both be first: one makes the CA, the
	// other loads it.
	unlock, err := clientauth.LockFile(filepath.Join(dir, ".ca.lock"))
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	defer unlock()
	if ca, err := Load(dir); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return ca, err
	}
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); err == nil {
		return nil, fmt.Errorf("tls ca: %s exists without %s", filepath.Join(dir, CAKeyFile), CACertFile)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "kiss-onion cache CA " + randomHex(4)},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := sign(tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	keyPEM, err := keyPEM(key)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	// The key first: a certificate without its key would be taken for a
	// CA that cannot sign.
	if err := atomicfile.WriteFile(filepath.Join(dir, CAKeyFile), keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	if err := atomicfile.WriteFile(filepath.Join(dir, CACertFile), certPEM(der), 0o600); err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	return Load(dir)
}

// Load loads the CA from dir; an error matching fs.ErrNotExist when it
// has none.
func Load(dir string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	cb, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	cert, err := ParseCertPEM(cb)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %s: %w", certPath, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("tls ca: %s is not a CA certificate", certPath)
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, fmt.Errorf("tls ca: %w", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("tls ca: %s does not hold the key of %s", keyPath, certPath)
	}
	return &CA{cert: cert, certPEM: cb, key: key, dir: dir}, nil
}

// Cert returns the CA's certificate.
func (ca *CA) Cert() *x509.Certificate { return ca.cert }

// CertPEM returns the CA's certificate in PEM form, for clients to trust.
func (ca *CA) CertPEM() []byte { return append([]byte(nil), ca.certPEM...) }

// Pool returns a pool holding the CA's certificate alone.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// Issued is a certificate the CA signed, with its new private key.
type Issued struct {
	Cert    *x509.Certificate
	CertPEM []byte
	KeyPEM  []byte // a secret: write it 0600, never log it
}

// Fingerprint returns the certificate's fingerprint.
func (i Issued) Fingerprint() string { return Fingerprint(i.Cert) }

// Template is what an issued certificate says; Issue fills in the rest.
type Template struct {
	// Client issues a client certificate (for TLS client authentication),
	// else a server certificate.
	Client bool
	// Name is the common name: the client's name, or the server's first
	// name.
	Name string
	// Hosts are the DNS names and IP addresses of a server certificate.
	Hosts []string
	// NotBefore and NotAfter bound the validity; now and now plus
	// ClientValidity or ServerValidity when zero.
	NotBefore, NotAfter time.Time
}

// Issue mints a new key pair (ECDSA P-256) and a certificate for it
// signed by the CA.
func (ca *CA) Issue(t Template) (Issued, error) {
	if t.Name == "" {
		return Issued{}, errors.New("issue certificate: no name")
	}
	if !t.Client && len(t.Hosts) == 0 {
		return Issued{}, errors.New("issue server certificate: no host name or address")
	}
	now := time.Now()
	if t.NotBefore.IsZero() {
		t.NotBefore = now.Add(-time.Hour)
	}
	if t.NotAfter.IsZero() {
		t.NotAfter = now.Add(ServerValidity)
		if t.Client {
			t.NotAfter = now.Add(ClientValidity)
		}
	}
	if !t.NotAfter.After(t.NotBefore) {
		return Issued{}, errors.New("issue certificate: it would end before it begins")
	}
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: t.Name},
		NotBefore:             t.NotBefore,
		NotAfter:              t.NotAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if t.Client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	for _, h := range t.Hosts {
		if ip := net.ParseIP(strings.Trim(h, "[]")); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	der, err := sign(tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	kp, err := keyPEM(key)
	if err != nil {
		return Issued{}, fmt.Errorf("issue certificate: %w", err)
	}
	return Issued{Cert: cert, CertPEM: certPEM(der), KeyPEM: kp}, nil
}

// Fingerprint returns "sha256:" and the hex SHA-256 of the certificate's
// DER, the form the registry records.
func Fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// ParseCertPEM parses the first certificate of a PEM text.
func ParseCertPEM(b []byte) (*x509.Certificate, error) {
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			return nil, errors.New("no PEM certificate")
		}
		if block.Type == "CERTIFICATE" {
			return x509.ParseCertificate(block.Bytes)
		}
	}
}

func sign(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, key *ecdsa.PrivateKey) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	return x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
}

func certPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// readKey reads a PEM PKCS#8 ECDSA key; its errors never quote the key.
func readKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s: no PEM private key", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: malformed private key", path)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: not an ECDSA key", path)
	}
	return ek, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
