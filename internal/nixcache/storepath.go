package nixcache

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// HashLen is the length of the nixbase32 hash part of a store path's base name.
const HashLen = 32

// maxNameLen is the longest name Nix accepts after the hash and the dash.
const maxNameLen = 211

// isNix32 reports whether c is in Nix's base-32 alphabet (no e, o, u, t).
func isNix32(c byte) bool {
	switch {
	case c >= '0' && c <= '9':
		return true
	case c >= 'a' && c <= 'z':
		return c != 'e' && c != 'o' && c != 'u' && c != 't'
	}
	return false
}

// IsHashPart reports whether s is a 32-character nixbase32 store-path hash.
func IsHashPart(s string) bool { return IsBase32(s, HashLen) }

func isNameChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	switch c {
	case '+', '-', '.', '_', '?', '=':
		return true
	}
	return false
}

// CheckBaseName checks that s is a store path's base name,
// "<32 nixbase32 chars>-<name>", as Nix accepts it.
func CheckBaseName(s string) error {
	if len(s) < HashLen+2 || s[HashLen] != '-' {
		return errors.New("not a store path base name (<32-char hash>-<name>)")
	}
	if !IsHashPart(s[:HashLen]) {
		return errors.New("store path hash is not 32 nixbase32 characters")
	}
	name := s[HashLen+1:]
	if len(name) > maxNameLen {
		return fmt.Errorf("store path name longer than %d characters", maxNameLen)
	}
	if name[0] == '.' {
		return errors.New("store path name starts with '.'")
	}
	for i := 0; i < len(name); i++ {
		if !isNameChar(name[i]) {
			return fmt.Errorf("store path name has invalid character %q", name[i])
		}
	}
	return nil
}

// BaseName returns the base name of the absolute store path p under
// storeDir, checking that it is a valid store path with nothing below it.
func BaseName(storeDir, p string) (string, error) {
	prefix := strings.TrimSuffix(storeDir, "/") + "/"
	if !strings.HasPrefix(p, prefix) {
		return "", fmt.Errorf("%q is not under the store directory %s", p, storeDir)
	}
	base := p[len(prefix):]
	if err := CheckBaseName(base); err != nil {
		return "", fmt.Errorf("%q: %w", p, err)
	}
	return base, nil
}

// Base32 encodes b in Nix's base-32 (as in NAR file names and hashes).
func Base32(b []byte) string { return nixbase32.EncodeToString(b) }

// IsBase32 reports whether s is n characters of Nix's base-32 alphabet.
func IsBase32(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isNix32(s[i]) {
			return false
		}
	}
	return true
}
