package cachelock

import (
	"os"
	"path/filepath"
	"strings"
)

// Holder reports whether a prune (or a forget, which holds the cache the
// same way) holds the cache now and, when one does, what its marker says
// of it ("pid N on HOST since TIME"). It takes nothing.
func (l *Locks) Holder() (who string, held bool, err error) {
	held, err = l.pruneHeld()
	if err != nil || !held {
		return "", held, err
	}
	data, _ := os.ReadFile(filepath.Join(l.dir, pruneFile))
	return strings.TrimSpace(string(data)), true, nil
}
