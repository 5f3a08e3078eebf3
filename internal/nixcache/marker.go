package nixcache

import (
	"bytes"
	"fmt"
)

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
