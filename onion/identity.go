package onion

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha3"
	"crypto/sha512"
	"encoding/base32"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// identityKeyPrefix starts the one line of an identity file that holds the
// secret: the 32-byte ed25519 seed in standard base64.
const identityKeyPrefix = "ed25519-seed:"

// Identity is a v3 onion service identity (ed25519).
//
// The secret stays unexported: an Identity prints only its address, and an
// error about an identity file never quotes the file's contents.
type Identity struct {
	seed   [ed25519.SeedSize]byte
	public ed25519.PublicKey
}

// LoadOrCreateIdentity reads the identity at path, or creates it (0600,
// O_EXCL, parent dir created 0700) when missing.
//
// The file is text: comment lines starting with "#" (a new file carries one
// naming the onion address) and one line "ed25519-seed:<base64 of the 32-byte
// seed>". A file readable by group or others is refused, as ssh does.
func LoadOrCreateIdentity(path string) (*Identity, error) {
	id, err := loadIdentity(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return id, err
	}
	id, err = generateIdentity()
	if err != nil {
		return nil, fmt.Errorf("create onion identity %s: %w", path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create onion identity %s: %w", path, err)
	}
	err = writeFile(path, id.fileContent(), true)
	if errors.Is(err, fs.ErrExist) {
		// Another process created it between our read and our write: theirs wins.
		return loadIdentity(path)
	}
	if err != nil {
		return nil, fmt.Errorf("create onion identity %s: %w", path, err)
	}
	return id, nil
}

// Address returns the onion address: 56 lowercase base32 characters then ".onion".
func (id *Identity) Address() string { return id.ServiceID() + ".onion" }

// ServiceID returns the onion address without ".onion", as tor's control
// protocol spells it.
func (id *Identity) ServiceID() string { return serviceIDFromPublicKey(id.public) }

// String returns the onion address, so that printing an Identity never
// prints its secret.
func (id *Identity) String() string { return id.Address() }

// addOnionKey returns the key argument of tor's ADD_ONION command:
// "ED25519-V3:" and the base64 of the 64-byte expanded secret key (the
// SHA-512 of the seed, its first half clamped as ed25519 does).
func (id *Identity) addOnionKey() string {
	h := sha512.Sum512(id.seed[:])
	h[0] &= 248
	h[31] &= 127
	h[31] |= 64
	return "ED25519-V3:" + base64.StdEncoding.EncodeToString(h[:])
}

func generateIdentity() (*Identity, error) {
	var seed [ed25519.SeedSize]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return nil, fmt.Errorf("generate ed25519 seed: %w", err)
	}
	return identityFromSeed(seed), nil
}

func identityFromSeed(seed [ed25519.SeedSize]byte) *Identity {
	priv := ed25519.NewKeyFromSeed(seed[:])
	return &Identity{seed: seed, public: priv.Public().(ed25519.PublicKey)}
}

// serviceIDFromPublicKey encodes a v3 onion address (rend-spec-v3):
// base32(pubkey || checksum[:2] || version), checksum = SHA3-256(".onion
// checksum" || pubkey || version), version 3.
func serviceIDFromPublicKey(pub ed25519.PublicKey) string {
	const version = 0x03
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(pub)
	h.Write([]byte{version})
	sum := h.Sum(nil)
	raw := make([]byte, 0, ed25519.PublicKeySize+3)
	raw = append(raw, pub...)
	raw = append(raw, sum[0], sum[1], version)
	return strings.ToLower(base32.StdEncoding.EncodeToString(raw))
}

func (id *Identity) fileContent() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# kiss-onion onion service identity (v3, ed25519); secret, keep it 0600\n")
	fmt.Fprintf(&b, "# address: %s\n", id.Address())
	fmt.Fprintf(&b, "%s%s\n", identityKeyPrefix, base64.StdEncoding.EncodeToString(id.seed[:]))
	return b.Bytes()
}

func loadIdentity(path string) (*Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read onion identity: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("read onion identity: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("read onion identity %s: file mode is %#o, readable by others (chmod 600 it)", path, st.Mode().Perm())
	}
	var data bytes.Buffer
	if _, err := data.ReadFrom(f); err != nil {
		return nil, fmt.Errorf("read onion identity: %w", err)
	}
	id, err := parseIdentity(data.Bytes())
	if err != nil {
		return nil, fmt.Errorf("read onion identity %s: %w", path, err)
	}
	return id, nil
}

// parseIdentity parses an identity file's content. Its errors name the line
// but never quote it, since that line holds the secret.
func parseIdentity(data []byte) (*Identity, error) {
	var id *Identity
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		enc, ok := strings.CutPrefix(line, identityKeyPrefix)
		if !ok {
			return nil, fmt.Errorf("line %d: malformed line (want %q followed by a base64 seed)", n, identityKeyPrefix)
		}
		if id != nil {
			return nil, fmt.Errorf("line %d: a second key (one identity per file)", n)
		}
		seed, err := base64.StdEncoding.DecodeString(enc)
		if err != nil || len(seed) != ed25519.SeedSize {
			return nil, fmt.Errorf("line %d: malformed key (want the base64 of %d bytes)", n, ed25519.SeedSize)
		}
		id = identityFromSeed([ed25519.SeedSize]byte(seed))
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if id == nil {
		return nil, fmt.Errorf("no %q line", identityKeyPrefix)
	}
	return id, nil
}
