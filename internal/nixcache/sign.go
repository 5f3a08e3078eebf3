package nixcache

import (
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// PublicKey is a named ed25519 key as Nix writes it: "name:base64".
type PublicKey struct {
	name string
	key  ed25519.PublicKey
}

// ParsePublicKey parses a "name:base64" ed25519 public key, the form of
// nix.conf's trusted-public-keys and of nix-store --generate-binary-cache-key.
func ParsePublicKey(s string) (PublicKey, error) {
	name, data, err := splitNamed(strings.TrimSpace(s), ed25519.PublicKeySize)
	if err != nil {
		return PublicKey{}, fmt.Errorf("public key: %w", err)
	}
	return PublicKey{name: name, key: ed25519.PublicKey(data)}, nil
}

// Name returns the key's name, the part before the colon.
func (k PublicKey) Name() string { return k.name }

// String returns the key in Nix's "name:base64" form.
func (k PublicKey) String() string {
	return k.name + ":" + base64.StdEncoding.EncodeToString(k.key)
}

// Verify reports whether sig ("name:base64") is k's signature of msg.
func (k PublicKey) Verify(msg string, sig string) bool {
	s, err := parseSignature(sig)
	return err == nil && k.verify(msg, s)
}

func (k PublicKey) verify(msg string, s signature) bool {
	return s.name == k.name && ed25519.Verify(k.key, []byte(msg), s.data)
}

// SecretKey is a named ed25519 signing key in Nix's "name:base64" form
// (nix-store --generate-binary-cache-key). Its bytes stay unexported.
type SecretKey struct {
	name string
	key  ed25519.PrivateKey
}

// ParseSecretKey parses a "name:base64" ed25519 secret key. Its error never
// contains the key.
func ParseSecretKey(s string) (SecretKey, error) {
	name, data, err := splitNamed(strings.TrimSpace(s), ed25519.PrivateKeySize)
	if err != nil {
		return SecretKey{}, fmt.Errorf("secret key: %w", err)
	}
	return SecretKey{name: name, key: ed25519.PrivateKey(data)}, nil
}

// PublicKey returns the public half of k, with the same name.
func (k SecretKey) PublicKey() PublicKey {
	return PublicKey{name: k.name, key: k.key.Public().(ed25519.PublicKey)}
}

// Sign returns k's signature of msg as "name:base64".
func (k SecretKey) Sign(msg string) string {
	return k.name + ":" + base64.StdEncoding.EncodeToString(ed25519.Sign(k.key, []byte(msg)))
}

type signature struct {
	name string
	data []byte
}

func parseSignature(s string) (signature, error) {
	name, data, err := splitNamed(s, ed25519.SignatureSize)
	if err != nil {
		return signature{}, fmt.Errorf("signature: %w", err)
	}
	return signature{name: name, data: data}, nil
}

// splitNamed splits "name:base64" and checks the decoded length. Its errors
// do not echo the data, which may be secret.
func splitNamed(s string, size int) (string, []byte, error) {
	name, b64, ok := strings.Cut(s, ":")
	if !ok || name == "" {
		return "", nil, errors.New(`want "name:base64"`)
	}
	data, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", nil, errors.New("invalid base64 after the name")
	}
	if len(data) != size {
		return "", nil, fmt.Errorf("decodes to %d bytes, want %d", len(data), size)
	}
	return name, data, nil
}
