package clientauth

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// The files of a bundle besides its ".auth_private" files.
const (
	BundleConfigFile = "kiss-onion.toml"
	BundleKeyFile    = "client.key"
	// The files of a bundle's TLS door: the client certificate and its
	// key, and the cache's CA, for Nix's ssl-cert-file (kiss-onion.toml
	// holds the CA too).
	BundleTLSCertFile = "tls-client.crt"
	BundleTLSKeyFile  = "tls-client.key"
	BundleTLSCAFile   = "tls-ca.crt"
)

// Bundle is what a client machine needs to reach the cache: its key and the
// onion addresses, written by WriteBundle into a directory holding
//
//	client.key             the private key (an age-like key file), 0600
//	<onion>.auth_private   one per onion the key may reach, for tor's
//	                       ClientOnionAuthDir, 0600
//	kiss-onion.toml        name, role, public key, read_url and write_url,
//	                       one [[frontend]] table (read_url, write_url) per
//	                       further front end of the cache, and for the TLS
//	                       door tls_url, tls_ca and the fingerprints of the
//	                       certificates
//	tls-client.crt, .key   the TLS client certificate and its key, 0600
//	tls-ca.crt             the cache's CA (for Nix's ssl-cert-file)
//
// A bundle without a private key holds kiss-onion.toml only, for a client
// that keeps its key itself.
type Bundle struct {
	Name       string
	Role       Role
	Key        *PrivateKey // nil for a bundle without the private key
	PublicKey  PublicKey   // may be left zero when Key is set
	Created    time.Time   // when the key was made, noted in client.key; not read back
	ReadOnion  string      // the read onion's address, with or without ".onion"
	WriteOnion string      // the write onion's address: writers only
	// Frontends are the cache's further front ends (serves over the same
	// store, each with its own onions), besides ReadOnion and WriteOnion;
	// nil for a cache with one.
	Frontends []Frontend
	TLS       *BundleTLS // the TLS door; nil for a bundle of the onions alone
}

// Frontend is one front end of a cache: a serve's read onion and, in a
// writer's bundle, its write onion.
type Frontend struct {
	ReadOnion  string
	WriteOnion string // writers only
}

// BundleTLS is what a bundle holds to reach the cache's TLS door.
type BundleTLS struct {
	// URL is the door's base URL, https://HOST:PORT.
	URL string
	// CA is the PEM certificate of the cache's CA, which signed the
	// client certificate (and the server's, when ServerFingerprint is set).
	CA []byte
	// ServerFingerprint pins the cache's own server certificate; "" when
	// the server's certificate is one the user supplied, trusted through
	// the system's roots.
	ServerFingerprint string
	// CertFingerprint is the client certificate's fingerprint, as the
	// registry records it.
	CertFingerprint string
	// Cert and Key are the PEM client certificate and its private key;
	// nil in a bundle without private keys.
	Cert, Key []byte
}

// bundleConfig is the format of kiss-onion.toml.
type bundleConfig struct {
	Name      string `toml:"name"`
	Role      string `toml:"role"`
	PublicKey string `toml:"public_key"`
	ReadURL   string `toml:"read_url"`
	WriteURL  string `toml:"write_url,omitempty"`
	// The TLS door, all empty in a bundle without it.
	TLSURL      string `toml:"tls_url,omitempty"`
	TLSCertFP   string `toml:"tls_cert_fingerprint,omitempty"`
	TLSServerFP string `toml:"tls_server_fingerprint,omitempty"`
	TLSCA       string `toml:"tls_ca,multiline,omitempty"`
	// The further front ends, each a [[frontend]] table.
	Frontends []frontendConfig `toml:"frontend,omitempty"`
}

// frontendConfig is a [[frontend]] table of kiss-onion.toml.
type frontendConfig struct {
	ReadURL  string `toml:"read_url"`
	WriteURL string `toml:"write_url,omitempty"`
}

const bundleConfigHeader = `# kiss-onion client bundle, written by 'kiss-onion keys'.
# Copy this directory to the client and run 'kiss-onion proxy --bundle DIR',
# or put its .auth_private files in tor's ClientOnionAuthDir.
`

// ReadURL returns the URL of the read onion: "http://<address>.onion".
func (b Bundle) ReadURL() string { return onionURL(b.ReadOnion) }

// WriteURL returns the URL of the write onion, or "" for a reader.
func (b Bundle) WriteURL() string { return onionURL(b.WriteOnion) }

// AllFrontends returns every front end of the cache: the first (ReadOnion
// and WriteOnion), then Frontends.
func (b Bundle) AllFrontends() []Frontend {
	return append([]Frontend{{b.ReadOnion, b.WriteOnion}}, b.Frontends...)
}

// ReadURLs returns the URLs of every front end's read onion, the first
// front end's first.
func (b Bundle) ReadURLs() []string {
	var urls []string
	for _, f := range b.AllFrontends() {
		urls = append(urls, onionURL(f.ReadOnion))
	}
	return urls
}

// WriteURLs returns the URLs of every front end's write onion, or nil
// for a reader.
func (b Bundle) WriteURLs() []string {
	if b.WriteOnion == "" {
		return nil
	}
	var urls []string
	for _, f := range b.AllFrontends() {
		urls = append(urls, onionURL(f.WriteOnion))
	}
	return urls
}

// Onions returns the addresses of every onion the bundle's key reaches,
// each once, in the order of the front ends (read before write).
func (b Bundle) Onions() []string {
	var out []string
	for _, f := range b.AllFrontends() {
		for _, o := range []string{f.ReadOnion, f.WriteOnion} {
			if o != "" {
				out = append(out, o)
			}
		}
	}
	return out
}

// checkOnions checks the addresses of every front end against the role:
// a read onion each, a write onion each for a writer and none for a
// reader, and no onion twice.
func (b Bundle) checkOnions() error {
	seen := map[string]bool{}
	for i, f := range b.AllFrontends() {
		what := "bundle"
		if i > 0 {
			what = fmt.Sprintf("front end %d", i+1)
		}
		switch {
		case f.ReadOnion == "":
			return fmt.Errorf("%s has no read onion address", what)
		case b.Role == RoleWriter && f.WriteOnion == "":
			return fmt.Errorf("writer %s has no write onion address", what)
		case b.Role == RoleReader && f.WriteOnion != "":
			return fmt.Errorf("reader %s has a write onion address", what)
		}
		for _, o := range []string{f.ReadOnion, f.WriteOnion} {
			if o == "" {
				continue
			}
			addr, err := ParseOnionAddress(o)
			if err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			if seen[addr] {
				return fmt.Errorf("%s: onion %s.onion is listed twice", what, addr)
			}
			seen[addr] = true
		}
	}
	return nil
}

func onionURL(addr string) string {
	if addr == "" {
		return ""
	}
	return "http://" + strings.TrimSuffix(strings.ToLower(addr), ".onion") + ".onion"
}

// bundleFile is one file of a bundle, by name in the bundle's directory.
type bundleFile struct {
	name string
	data []byte
}

// Files returns the names of the files WriteBundle writes for b, in the
// order it writes them (kiss-onion.toml last).
func (b Bundle) Files() ([]string, error) {
	files, _, err := b.files()
	if err != nil {
		return nil, err
	}
	names := make([]string, len(files))
	for i, f := range files {
		names[i] = f.name
	}
	return names, nil
}

// files checks b and renders its files; it returns the public key too.
func (b Bundle) files() ([]bundleFile, PublicKey, error) {
	if err := ValidateName(b.Name); err != nil {
		return nil, PublicKey{}, err
	}
	if _, err := ParseRole(string(b.Role)); err != nil {
		return nil, PublicKey{}, err
	}
	pub := b.PublicKey
	if b.Key != nil {
		if !pub.IsZero() && pub != b.Key.PublicKey() {
			return nil, PublicKey{}, errors.New("bundle's public key does not match its private key")
		}
		pub = b.Key.PublicKey()
	}
	if pub.IsZero() {
		return nil, PublicKey{}, errors.New("bundle has no key")
	}
	if err := b.checkOnions(); err != nil {
		return nil, PublicKey{}, err
	}
	onions := b.Onions()
	var files []bundleFile
	if b.Key != nil {
		files = append(files, bundleFile{BundleKeyFile, keyFileData(b.Key, b.Created)})
		for _, o := range onions {
			line, err := ClientAuthLine(o, b.Key)
			if err != nil {
				return nil, PublicKey{}, err
			}
			name, _ := AuthPrivateFileName(o)
			files = append(files, bundleFile{name, []byte(line + "\n")})
		}
	}
	conf := bundleConfig{
		Name:      b.Name,
		Role:      string(b.Role),
		PublicKey: pub.String(),
		ReadURL:   b.ReadURL(),
		WriteURL:  b.WriteURL(),
	}
	for _, f := range b.Frontends {
		conf.Frontends = append(conf.Frontends, frontendConfig{ReadURL: onionURL(f.ReadOnion), WriteURL: onionURL(f.WriteOnion)})
	}
	if t := b.TLS; t != nil {
		if err := t.check(); err != nil {
			return nil, PublicKey{}, err
		}
		if b.Key != nil && t.Key != nil {
			files = append(files, bundleFile{BundleTLSKeyFile, t.Key}, bundleFile{BundleTLSCertFile, t.Cert})
		}
		files = append(files, bundleFile{BundleTLSCAFile, t.CA})
		conf.TLSURL, conf.TLSCertFP, conf.TLSServerFP, conf.TLSCA = t.URL, t.CertFingerprint, t.ServerFingerprint, string(t.CA)
	}
	cfg, err := toml.Marshal(conf)
	if err != nil {
		return nil, PublicKey{}, fmt.Errorf("encode %s: %w", BundleConfigFile, err)
	}
	files = append(files, bundleFile{BundleConfigFile, append([]byte(bundleConfigHeader), cfg...)})
	return files, pub, nil
}

// WriteBundle writes b into dir, creating dir (mode 0700) when missing;
// every file is written atomically with mode 0600. It refuses, with an
// error matching fs.ErrExist, to overwrite any file of an existing bundle,
// and leaves nothing behind when it fails. See ReplaceBundle.
func WriteBundle(dir string, b Bundle) error {
	files, _, err := b.files()
	if err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	if err := ensureBundleDir(dir); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("write bundle: %s: %w", p, fs.ErrExist)
		}
	}
	var written []string
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if err := createFile(p, f.data); err != nil {
			for _, w := range written {
				os.Remove(w)
			}
			return fmt.Errorf("write bundle: %w", err)
		}
		written = append(written, p)
	}
	return nil
}

// ReplaceBundle writes b into dir like WriteBundle, but replaces the files
// of an existing bundle, each atomically. It still refuses to replace a
// client.key holding another key, or one it cannot read: a private key is
// the one thing that cannot be made again. Other files in dir are left
// alone.
func ReplaceBundle(dir string, b Bundle) error {
	files, pub, err := b.files()
	if err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	if err := ensureBundleDir(dir); err != nil {
		return fmt.Errorf("write bundle: %w", err)
	}
	keyPath := filepath.Join(dir, BundleKeyFile)
	old, err := ReadKeyFile(keyPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("write bundle: refusing to replace %s: %w", keyPath, err)
	case old.PublicKey() != pub:
		return fmt.Errorf("write bundle: refusing to replace %s, which holds another key (%s)", keyPath, old.PublicKey().Fingerprint())
	}
	for _, f := range files {
		if err := replaceFile(filepath.Join(dir, f.name), f.data); err != nil {
			return fmt.Errorf("write bundle: %w", err)
		}
	}
	return nil
}

// ensureBundleDir creates dir (0700) when missing. An existing one must be
// a directory itself, not a symlink to one, that no one else may write to:
// whoever can write to it can swap the private key's file.
func ensureBundleDir(dir string) error {
	fi, err := os.Lstat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return ensureDir(dir)
	case err != nil:
		return err
	case fi.Mode()&fs.ModeSymlink != 0:
		return fmt.Errorf("%s is a symlink: give the directory itself", dir)
	case !fi.IsDir():
		return fmt.Errorf("%s is not a directory", dir)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%s is writable by others (mode %#o): chmod go-w it, or give a new directory", dir, fi.Mode().Perm())
	}
	return nil
}

// LoadBundle reads the bundle in dir: kiss-onion.toml and, when present,
// client.key, which must hold the key kiss-onion.toml names. Errors in a
// file are *FileError naming the file and the line. The ".auth_private"
// files are not read; Created is left zero.
func LoadBundle(dir string) (Bundle, error) {
	path := filepath.Join(dir, BundleConfigFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return Bundle{}, fmt.Errorf("read bundle: %w", err)
	}
	var cfg bundleConfig
	if err := decodeTOML(path, data, &cfg); err != nil {
		return Bundle{}, err
	}
	lines := tomlLines(data)
	fail := func(key string, format string, args ...any) error {
		return &FileError{Path: path, Line: lineOf(lines, key), Err: fmt.Errorf(format, args...)}
	}
	b := Bundle{Name: cfg.Name}
	if err := ValidateName(cfg.Name); err != nil {
		return Bundle{}, fail("name", "%v", err)
	}
	if b.Role, err = ParseRole(cfg.Role); err != nil {
		return Bundle{}, fail("role", "%v", err)
	}
	if b.PublicKey, err = ParsePublicKey(cfg.PublicKey); err != nil {
		return Bundle{}, fail("public_key", "%v", err)
	}
	if b.ReadOnion, err = parseOnionURL(cfg.ReadURL); err != nil {
		return Bundle{}, fail("read_url", "read_url: %v", err)
	}
	switch {
	case b.Role == RoleWriter && cfg.WriteURL == "":
		return Bundle{}, fail("role", "a writer needs write_url")
	case b.Role == RoleReader && cfg.WriteURL != "":
		return Bundle{}, fail("write_url", "a reader has no write_url")
	case cfg.WriteURL != "":
		if b.WriteOnion, err = parseOnionURL(cfg.WriteURL); err != nil {
			return Bundle{}, fail("write_url", "write_url: %v", err)
		}
	}
	if err := b.loadFrontends(cfg.Frontends, lines); err != nil {
		return Bundle{}, &FileError{Path: path, Line: err.line, Err: err.err}
	}
	keyPath := filepath.Join(dir, BundleKeyFile)
	k, err := ReadKeyFile(keyPath)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return Bundle{}, err
	case k.PublicKey() != b.PublicKey:
		return Bundle{}, fmt.Errorf("%s holds key %s, but %s names %s", keyPath, k.PublicKey().Fingerprint(), path, b.PublicKey.Fingerprint())
	default:
		b.Key = k
	}
	if cfg.TLSURL == "" {
		for _, kv := range [][2]string{{"tls_ca", cfg.TLSCA}, {"tls_cert_fingerprint", cfg.TLSCertFP}, {"tls_server_fingerprint", cfg.TLSServerFP}} {
			if kv[1] != "" {
				return Bundle{}, fail(kv[0], "%s without tls_url", kv[0])
			}
		}
		return b, nil
	}
	t := &BundleTLS{URL: cfg.TLSURL, CA: []byte(cfg.TLSCA), CertFingerprint: cfg.TLSCertFP, ServerFingerprint: cfg.TLSServerFP}
	if err := t.check(); err != nil {
		return Bundle{}, &FileError{Path: path, Err: err}
	}
	if err := t.readCert(dir); err != nil {
		return Bundle{}, err
	}
	b.TLS = t
	return b, nil
}

// lineError is an error at a line of kiss-onion.toml.
type lineError struct {
	line int
	err  error
}

// loadFrontends sets b.Frontends from kiss-onion.toml's [[frontend]]
// tables, checking each against the role and all onions against each
// other.
func (b *Bundle) loadFrontends(tables []frontendConfig, lines map[string]int) *lineError {
	for i, t := range tables {
		at := func(key string) int {
			return lineOf(lines, fmt.Sprintf("frontend[%d].%s", i, key), fmt.Sprintf("frontend[%d]", i))
		}
		var f Frontend
		var err error
		if f.ReadOnion, err = parseOnionURL(t.ReadURL); err != nil {
			return &lineError{at("read_url"), fmt.Errorf("[[frontend]] %d: read_url: %w", i+1, err)}
		}
		switch {
		case b.Role == RoleWriter && t.WriteURL == "":
			return &lineError{at("read_url"), fmt.Errorf("[[frontend]] %d: a writer needs write_url", i+1)}
		case b.Role == RoleReader && t.WriteURL != "":
			return &lineError{at("write_url"), fmt.Errorf("[[frontend]] %d: a reader has no write_url", i+1)}
		case t.WriteURL != "":
			if f.WriteOnion, err = parseOnionURL(t.WriteURL); err != nil {
				return &lineError{at("write_url"), fmt.Errorf("[[frontend]] %d: write_url: %w", i+1, err)}
			}
		}
		b.Frontends = append(b.Frontends, f)
	}
	if err := b.checkOnions(); err != nil {
		return &lineError{lineOf(lines, "frontend[0]"), err}
	}
	return nil
}

// check checks what kiss-onion.toml says of the TLS door.
func (t *BundleTLS) check() error {
	host, ok := strings.CutPrefix(t.URL, "https://")
	if !ok || host == "" || strings.ContainsAny(host, "/?#@") {
		return fmt.Errorf("tls_url %q is not https://HOST[:PORT]", t.URL)
	}
	if block, _ := pem.Decode(t.CA); block == nil || block.Type != "CERTIFICATE" {
		return errors.New("tls_ca holds no PEM certificate")
	}
	if _, err := ParseCertFingerprint(t.CertFingerprint); err != nil {
		return fmt.Errorf("tls_cert_fingerprint: %w", err)
	}
	if t.ServerFingerprint != "" {
		if _, err := ParseCertFingerprint(t.ServerFingerprint); err != nil {
			return fmt.Errorf("tls_server_fingerprint: %w", err)
		}
	}
	if (t.Cert == nil) != (t.Key == nil) {
		return errors.New("a TLS client certificate without its key, or a key without its certificate")
	}
	if t.Cert != nil && CertFingerprint(t.Cert) != t.CertFingerprint {
		return errors.New("the TLS client certificate is not the one tls_cert_fingerprint names")
	}
	return nil
}

// readCert reads the client certificate and its key from dir, when there:
// both or neither.
func (t *BundleTLS) readCert(dir string) error {
	certPath, keyPath := filepath.Join(dir, BundleTLSCertFile), filepath.Join(dir, BundleTLSKeyFile)
	cert, cerr := os.ReadFile(certPath)
	key, kerr := os.ReadFile(keyPath)
	switch {
	case errors.Is(cerr, fs.ErrNotExist) && errors.Is(kerr, fs.ErrNotExist):
		return nil
	case cerr != nil:
		return fmt.Errorf("read bundle: %w", cerr)
	case kerr != nil:
		return fmt.Errorf("read bundle: %w", kerr)
	}
	if fp := CertFingerprint(cert); fp != t.CertFingerprint {
		return &FileError{Path: certPath, Err: fmt.Errorf("certificate %s, but %s names %s", fp, BundleConfigFile, t.CertFingerprint)}
	}
	t.Cert, t.Key = cert, key
	return nil
}

// CertFingerprint returns the fingerprint of the first certificate of a
// PEM text, in the form the registry records ("sha256:" and the hex
// SHA-256 of its DER), or "" when it holds none.
func CertFingerprint(certPEM []byte) string {
	rest := certPEM
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return ""
		}
		if block.Type == "CERTIFICATE" {
			sum := sha256.Sum256(block.Bytes)
			return "sha256:" + hex.EncodeToString(sum[:])
		}
	}
}

// parseOnionURL parses "http://<v3 onion address>" (a final "/" allowed)
// and returns the address with ".onion".
func parseOnionURL(u string) (string, error) {
	host, ok := strings.CutPrefix(u, "http://")
	if !ok {
		return "", fmt.Errorf("%q is not http://<address>.onion", u)
	}
	host = strings.TrimSuffix(host, "/")
	if !strings.HasSuffix(strings.ToLower(host), ".onion") {
		return "", fmt.Errorf("%q is not http://<address>.onion", u)
	}
	addr, err := ParseOnionAddress(host)
	if err != nil {
		return "", err
	}
	return addr + ".onion", nil
}

// keyFileData renders a key file: comment lines with the creation time and
// the public key, then the private key.
func keyFileData(k *PrivateKey, created time.Time) []byte {
	var b bytes.Buffer
	if !created.IsZero() {
		fmt.Fprintf(&b, "# created: %s\n", created.UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(&b, "# public key: %s\n", k.PublicKey())
	fmt.Fprintf(&b, "%s\n", k)
	return b.Bytes()
}

// WriteKeyFile writes k to a new key file at path, mode 0600, as in a
// bundle's client.key. It refuses to overwrite a file (fs.ErrExist).
func WriteKeyFile(path string, k *PrivateKey, created time.Time) error {
	return createFile(path, keyFileData(k, created))
}

// ReadKeyFile reads a key file: blank lines and lines starting with '#' are
// ignored, and exactly one line must hold a private key. Errors are
// *FileError naming the line, and never quote the key; a missing file gives
// an error matching fs.ErrNotExist.
func ReadKeyFile(path string) (*PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	var key *PrivateKey
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if key != nil {
			return nil, &FileError{Path: path, Line: n, Err: errors.New("more than one key")}
		}
		k, err := ParsePrivateKey(line)
		if err != nil {
			return nil, &FileError{Path: path, Line: n, Err: err}
		}
		key = k
	}
	if err := sc.Err(); err != nil {
		return nil, &FileError{Path: path, Err: errors.New("malformed key file")}
	}
	if key == nil {
		return nil, &FileError{Path: path, Err: errors.New("no key in file")}
	}
	return key, nil
}
