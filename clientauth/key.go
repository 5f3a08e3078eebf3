package clientauth

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
)

// keyEncoding is the base32 of Tor's key files: RFC 4648, uppercase, no
// padding. Tor decodes either case but rejects padding.
var keyEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// keyChars is the length of a 32-byte key in keyEncoding.
const keyChars = 52

// PrivateKey is a client's x25519 private key: whoever holds it can decrypt
// the descriptors of the onions its public half is authorized on.
type PrivateKey struct {
	k *ecdh.PrivateKey
}

// PublicKey is the public half of a client key, the part a service is
// configured with. The zero PublicKey is not a valid key.
type PublicKey struct {
	b [32]byte
}

// GeneratePrivateKey returns a new random private key.
func GeneratePrivateKey() (*PrivateKey, error) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate x25519 key: %w", err)
	}
	return &PrivateKey{k: k}, nil
}

// ParsePrivateKey parses a private key in its String form (base32 without
// padding, either case). Its errors never contain the input.
func ParsePrivateKey(s string) (*PrivateKey, error) {
	b, err := decodeKey(s)
	if err != nil {
		return nil, fmt.Errorf("malformed x25519 private key: %w", err)
	}
	k, err := ecdh.X25519().NewPrivateKey(b)
	if err != nil {
		return nil, errors.New("malformed x25519 private key")
	}
	return &PrivateKey{k: k}, nil
}

// String returns the private key in Tor's form: 52 characters of uppercase
// RFC 4648 base32 without padding. It is the secret itself.
func (k *PrivateKey) String() string {
	return keyEncoding.EncodeToString(k.k.Bytes())
}

// PublicKey returns the public half of k.
func (k *PrivateKey) PublicKey() PublicKey {
	var p PublicKey
	copy(p.b[:], k.k.PublicKey().Bytes())
	return p
}

// ParsePublicKey parses a public key in its String form (base32 without
// padding, either case). Its errors never contain the input, which could be a
// private key given by mistake.
func ParsePublicKey(s string) (PublicKey, error) {
	b, err := decodeKey(s)
	if err != nil {
		return PublicKey{}, fmt.Errorf("malformed x25519 public key: %w", err)
	}
	var p PublicKey
	copy(p.b[:], b)
	if p.IsZero() {
		return PublicKey{}, errors.New("malformed x25519 public key: all zero")
	}
	return p, nil
}

// String returns the public key in Tor's form: 52 characters of uppercase
// RFC 4648 base32 without padding.
func (p PublicKey) String() string {
	return keyEncoding.EncodeToString(p.b[:])
}

// Bytes returns the 32 bytes of the public key.
func (p PublicKey) Bytes() [32]byte {
	return p.b
}

// IsZero reports whether p is the zero PublicKey, which no key parses to.
func (p PublicKey) IsZero() bool {
	return p == PublicKey{}
}

// Fingerprint returns a short name for p in listings: the first 16
// characters of its String form, so that it can be found in Tor's files.
func (p PublicKey) Fingerprint() string {
	return p.String()[:16]
}

// decodeKey decodes the base32 of a 32-byte key. Its errors never contain s.
func decodeKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if len(s) != keyChars {
		if strings.HasSuffix(s, "=") {
			return nil, errors.New("base32 padding is not allowed")
		}
		return nil, fmt.Errorf("%d characters, want %d", len(s), keyChars)
	}
	b, err := keyEncoding.DecodeString(strings.ToUpper(s))
	if err != nil {
		return nil, errors.New("not RFC 4648 base32")
	}
	if len(b) != 32 {
		return nil, fmt.Errorf("%d bytes, want 32", len(b))
	}
	return b, nil
}
