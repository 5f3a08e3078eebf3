package nixcache

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
)

// DefaultStoreDir is the Nix store directory unless one is given.
const DefaultStoreDir = "/nix/store"

// MaxMarkerDepth bounds how deep a marker's name under gcroots/ may nest.
const MaxMarkerDepth = 8

// CheckMarkerName checks the name of a marker under gcroots/, like "web1"
// or "hosts/web1": 1 to MaxMarkerDepth segments, each one name that
// CheckName accepts.
func CheckMarkerName(name string) error {
	segs := strings.Split(name, "/")
	if len(segs) > MaxMarkerDepth {
		return fmt.Errorf("marker name %q: nested deeper than %d", name, MaxMarkerDepth)
	}
	for _, s := range segs {
		if err := CheckName(s); err != nil {
			return fmt.Errorf("marker name %q: %w", name, err)
		}
	}
	return nil
}

// CheckName checks one path segment of a file name the cache stores: at
// most 255 bytes of letters, digits and -_.+=:!?, not starting with '.'
// (names starting with '.' are the implementation's own, like .tmp/ and
// gcroots/.lock/).
func CheckName(s string) error {
	if s == "" || len(s) > 255 {
		return errors.New("name must be 1 to 255 bytes")
	}
	if s[0] == '.' {
		return errors.New("name must not start with '.'")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("-_.+=:!?", c) >= 0:
		default:
			return errors.New("name has a character other than letters, digits and -_.+=:!?")
		}
	}
	return nil
}

// ParseMarker parses a GC-root marker: one absolute store path a line.
// Empty lines and lines starting with '#' (comments, and room for signed
// statements) are skipped. Every other line must be a store path under
// storeDir; the error names the first line that is not. It returns the
// roots' base names.
func ParseMarker(data []byte, storeDir string) ([]string, error) {
	var roots []string
	for i, l := range bytes.Split(data, []byte("\n")) {
		l = bytes.TrimSuffix(l, []byte("\r"))
		if len(l) == 0 || l[0] == '#' {
			continue
		}
		base, err := BaseName(storeDir, string(l))
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		roots = append(roots, base)
	}
	return roots, nil
}
