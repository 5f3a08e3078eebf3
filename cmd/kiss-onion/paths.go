package main

import (
	"fmt"
	"path/filepath"
	"strings"
)

// inside reports whether the directory dir is parent or lies below it.
// Both are made absolute first; a path that cannot be is an error, never a
// "no".
func inside(dir, parent string) (bool, error) {
	d, err := filepath.Abs(dir)
	if err != nil {
		return false, fmt.Errorf("resolve %s: %w", dir, err)
	}
	p, err := filepath.Abs(parent)
	if err != nil {
		return false, fmt.Errorf("resolve %s: %w", parent, err)
	}
	rel, err := filepath.Rel(p, d)
	if err != nil {
		return false, nil
	}
	return rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)), nil
}
