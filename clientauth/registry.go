package clientauth

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/filestamp"
	"github.com/pelletier/go-toml/v2"
)

// RegistryFileName is the name of the registry in the state directory.
const RegistryFileName = "clients.toml"

// registryVersion is the format version written to and required of the file.
const registryVersion = 1

// registryHeader starts every registry file written.
const registryHeader = `# kiss-onion client registry: public keys only, written by 'kiss-onion keys'.
# A running 'kiss-onion serve' reloads it when it changes.
`

// Errors of Registry methods that callers may branch on.
var (
	ErrNoClient      = errors.New("no client")
	ErrClientExists  = errors.New("already exists")
	ErrKeyRegistered = errors.New("public key already registered")
	ErrRevoked       = errors.New("already revoked")
)

// Client is one entry of the registry.
type Client struct {
	Name      string
	Role      Role
	PublicKey PublicKey
	Created   time.Time
	Revoked   time.Time // zero while the key is valid
	// TLSCert is the fingerprint of the client's TLS certificate
	// ("sha256:" and the hex SHA-256 of its DER), "" when it has none.
	// Revoking the client revokes it too.
	TLSCert string
}

// IsRevoked reports whether the client's key was revoked.
func (c Client) IsRevoked() bool { return !c.Revoked.IsZero() }

// Registry is the list of clients allowed on the onions, kept in a TOML file
// in the state directory (see RegistryFileName). It holds public keys only.
// Revoked clients stay in the file, so that neither their name nor their key
// can be registered again by mistake.
type Registry struct {
	path    string
	clients []Client
	stamp   Stamp
	now     func() time.Time
}

// registryFile is the registry's file format.
type registryFile struct {
	Version int           `toml:"version"`
	Clients []clientEntry `toml:"client"`
}

type clientEntry struct {
	Name      string    `toml:"name"`
	Role      string    `toml:"role"`
	PublicKey string    `toml:"public_key"`
	Created   time.Time `toml:"created"`
	Revoked   time.Time `toml:"revoked,omitempty"`
	TLSCert   string    `toml:"tls_cert,omitempty"`
}

// Stamp identifies one version of the registry file cheaply, from its
// metadata: any write by Registry.Save replaces the file and changes its
// Stamp. Stamps are comparable with ==; the Stamp of a missing file is the
// zero Stamp.
type Stamp = filestamp.Stamp

// StatRegistry returns the Stamp of the registry file at path without
// reading it. A running service polls it and reloads the registry (with
// LoadRegistry) when the Stamp differs from the loaded Registry's.
func StatRegistry(path string) (Stamp, error) {
	st, err := filestamp.Stat(path)
	if err != nil {
		return Stamp{}, fmt.Errorf("client registry: %w", err)
	}
	return st, nil
}

// LoadRegistry reads the registry at path. A missing file is an empty
// registry (Save creates it). Errors in the file are *FileError naming the
// file and the line.
func LoadRegistry(path string) (*Registry, error) {
	r := &Registry{path: path, now: time.Now}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read client registry: %w", err)
	}
	defer f.Close()
	// The stamp comes from the open file, so it describes exactly the
	// content read even if the file is replaced meanwhile.
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read client registry: %w", err)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		// Whoever can write the registry can let themselves in.
		return nil, fmt.Errorf("read client registry %s: writable by others (mode %#o): chmod 600 it", path, fi.Mode().Perm())
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("read client registry: %w", err)
	}
	r.stamp = filestamp.Of(fi)
	if err := r.parse(data); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Registry) parse(data []byte) error {
	var rf registryFile
	if err := decodeTOML(r.path, data, &rf); err != nil {
		return err
	}
	lines := tomlLines(data)
	fail := func(line int, format string, args ...any) error {
		return &FileError{Path: r.path, Line: line, Err: fmt.Errorf(format, args...)}
	}
	if _, ok := lines["version"]; !ok {
		return fail(0, "missing version = %d", registryVersion)
	}
	if rf.Version != registryVersion {
		return fail(lineOf(lines, "version"), "unsupported version %d, want version = %d", rf.Version, registryVersion)
	}
	for i, e := range rf.Clients {
		at := func(key string) int {
			table := fmt.Sprintf("client[%d]", i)
			return lineOf(lines, table+"."+key, table)
		}
		if err := ValidateName(e.Name); err != nil {
			return fail(at("name"), "%v", err)
		}
		role, err := ParseRole(e.Role)
		if err != nil {
			return fail(at("role"), "client %q: %v", e.Name, err)
		}
		pub, err := ParsePublicKey(e.PublicKey)
		if err != nil {
			return fail(at("public_key"), "client %q: %v", e.Name, err)
		}
		// created is optional: a declarative clients file (--clients-file)
		// has no time to give.
		c := Client{Name: e.Name, Role: role, PublicKey: pub, Created: e.Created, Revoked: e.Revoked}
		if err := r.checkNew(c.Name, c.PublicKey); err != nil {
			if errors.Is(err, ErrKeyRegistered) {
				return fail(at("public_key"), "client %q: %v", e.Name, err)
			}
			return fail(at("name"), "%v", err)
		}
		if e.TLSCert != "" {
			if c.TLSCert, err = ParseCertFingerprint(e.TLSCert); err != nil {
				return fail(at("tls_cert"), "client %q: %v", e.Name, err)
			}
			if err := r.checkNewCert(c.TLSCert); err != nil {
				return fail(at("tls_cert"), "client %q: %v", e.Name, err)
			}
		}
		r.clients = append(r.clients, c)
	}
	return nil
}

// checkNew refuses a name or a key already in the registry.
func (r *Registry) checkNew(name string, pub PublicKey) error {
	for _, c := range r.clients {
		if c.Name == name {
			return fmt.Errorf("client %q %w", name, ErrClientExists)
		}
		if c.PublicKey == pub {
			state := ""
			if c.IsRevoked() {
				state = ", revoked"
			}
			return fmt.Errorf("%w to client %q%s", ErrKeyRegistered, c.Name, state)
		}
	}
	return nil
}

// checkNewCert refuses a certificate fingerprint already in the registry.
func (r *Registry) checkNewCert(fp string) error {
	for _, c := range r.clients {
		if c.TLSCert == fp {
			return fmt.Errorf("TLS certificate %s already registered to client %q", fp, c.Name)
		}
	}
	return nil
}

// SetTLSCert records the fingerprint of the TLS certificate of the client
// named name (see ParseCertFingerprint). It refuses a revoked client, one
// that has a certificate already and a certificate already registered.
// Call Save to write the change.
func (r *Registry) SetTLSCert(name, fingerprint string) error {
	fp, err := ParseCertFingerprint(fingerprint)
	if err != nil {
		return err
	}
	if err := r.checkNewCert(fp); err != nil {
		return err
	}
	for i := range r.clients {
		c := &r.clients[i]
		if c.Name != name {
			continue
		}
		switch {
		case c.IsRevoked():
			return fmt.Errorf("client %q %w", name, ErrRevoked)
		case c.TLSCert != "":
			return fmt.Errorf("client %q has a TLS certificate already", name)
		}
		c.TLSCert = fp
		return nil
	}
	return fmt.Errorf("%w named %q", ErrNoClient, name)
}

// ParseCertFingerprint checks the form of a certificate fingerprint,
// "sha256:" and 64 hex digits, and returns it in lower case.
func ParseCertFingerprint(s string) (string, error) {
	h, ok := strings.CutPrefix(strings.ToLower(s), "sha256:")
	if b, err := hex.DecodeString(h); !ok || err != nil || len(b) != sha256.Size {
		return "", fmt.Errorf("%q is not a certificate fingerprint (sha256: and 64 hex digits)", s)
	}
	return "sha256:" + h, nil
}

// Changed reports whether the registry's file was replaced since r was
// loaded or saved, by comparing Stamps: a cheap check to poll.
func (r *Registry) Changed() (bool, error) {
	st, err := StatRegistry(r.path)
	if err != nil {
		return false, err
	}
	return st != r.stamp, nil
}

// Path returns the file the registry was loaded from and saves to.
func (r *Registry) Path() string { return r.path }

// Stamp returns the Stamp of the file as it was loaded or last saved.
func (r *Registry) Stamp() Stamp { return r.stamp }

// Clients returns all clients, revoked ones included, in file order.
func (r *Registry) Clients() []Client {
	return append([]Client(nil), r.clients...)
}

// Client returns the client named name.
func (r *Registry) Client(name string) (Client, bool) {
	for _, c := range r.clients {
		if c.Name == name {
			return c, true
		}
	}
	return Client{}, false
}

// Add registers a client. It refuses an invalid name, a name already used
// (even by a revoked client: ErrClientExists) and a key already registered
// (even a revoked one: ErrKeyRegistered). Call Save to write the change.
func (r *Registry) Add(name string, role Role, pub PublicKey) (Client, error) {
	if err := ValidateName(name); err != nil {
		return Client{}, err
	}
	if _, err := ParseRole(string(role)); err != nil {
		return Client{}, err
	}
	if pub.IsZero() {
		return Client{}, errors.New("missing public key")
	}
	if err := r.checkNew(name, pub); err != nil {
		return Client{}, err
	}
	c := Client{Name: name, Role: role, PublicKey: pub, Created: r.now().UTC().Truncate(time.Second)}
	r.clients = append(r.clients, c)
	return c, nil
}

// Revoke marks the client named name as revoked from now on. It returns an
// error matching ErrNoClient for an unknown name and ErrRevoked when the
// client was revoked already. Call Save to write the change.
func (r *Registry) Revoke(name string) error {
	for i := range r.clients {
		c := &r.clients[i]
		if c.Name != name {
			continue
		}
		if c.IsRevoked() {
			return fmt.Errorf("client %q %w (%s)", name, ErrRevoked, c.Revoked.Format(time.RFC3339))
		}
		c.Revoked = r.now().UTC().Truncate(time.Second)
		return nil
	}
	return fmt.Errorf("%w named %q", ErrNoClient, name)
}

// ReadKeys returns the keys to authorize on the read onion: every client's
// that is not revoked, readers and writers alike, in file order.
func (r *Registry) ReadKeys() [][32]byte {
	return r.keys(func(c Client) bool { return true })
}

// WriteKeys returns the keys to authorize on the write onion: the writers'
// that are not revoked, in file order.
func (r *Registry) WriteKeys() [][32]byte {
	return r.keys(func(c Client) bool { return c.Role == RoleWriter })
}

func (r *Registry) keys(keep func(Client) bool) [][32]byte {
	keys := [][32]byte{}
	for _, c := range r.clients {
		if !c.IsRevoked() && keep(c) {
			keys = append(keys, c.PublicKey.Bytes())
		}
	}
	return keys
}

// Save writes the registry atomically to its file, mode 0600, creating its
// directory (mode 0700) when missing.
func (r *Registry) Save() error {
	rf := registryFile{Version: registryVersion}
	for _, c := range r.clients {
		rf.Clients = append(rf.Clients, clientEntry{
			Name:      c.Name,
			Role:      string(c.Role),
			PublicKey: c.PublicKey.String(),
			Created:   c.Created,
			Revoked:   c.Revoked,
			TLSCert:   c.TLSCert,
		})
	}
	body, err := toml.Marshal(rf)
	if err != nil {
		return fmt.Errorf("encode client registry: %w", err)
	}
	data := append([]byte(registryHeader), body...)
	if err := ensureDir(filepath.Dir(r.path)); err != nil {
		return fmt.Errorf("save client registry: %w", err)
	}
	if err := replaceFile(r.path, data); err != nil {
		return fmt.Errorf("save client registry: %w", err)
	}
	if st, err := StatRegistry(r.path); err == nil {
		r.stamp = st
	}
	return nil
}

// UpdateRegistry loads the registry at path, calls fn and saves the result
// when fn returns nil, holding an exclusive lock (on path + ".lock") so that
// concurrent updates do not lose each other's changes. Readers need no lock:
// Save replaces the file atomically.
func UpdateRegistry(path string, fn func(r *Registry) error) error {
	if err := ensureDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("lock client registry: %w", err)
	}
	unlock, err := lockFile(path + ".lock")
	if err != nil {
		return fmt.Errorf("lock client registry: %w", err)
	}
	defer unlock()
	r, err := LoadRegistry(path)
	if err != nil {
		return err
	}
	if err := fn(r); err != nil {
		return err
	}
	return r.Save()
}
