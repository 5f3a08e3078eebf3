package prune

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// readRoots reads every marker: the plain files under CacheDir/gcroots and
// the extra root directories, recursively, not following symlinks,
// skipping names that start with '.'. Each line that names a store path
// (or a file inside one) is a root; other lines are ignored with a
// warning. A marker that cannot be read fails the prune: deleting without
// knowing the roots is never safe.
func (p *pruner) readRoots() ([]key, error) {
	var roots []key
	var markers, expired int64
	now := time.Now()
	walk := func(top string, required bool) error {
		if real, err := filepath.EvalSymlinks(top); err == nil {
			top = real
		} else if errors.Is(err, fs.ErrNotExist) && !required {
			return nil
		} else {
			return fmt.Errorf("gcroots directory: %w", err)
		}
		return filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return fmt.Errorf("read gcroots: %w", err)
			}
			if path != top && strings.HasPrefix(d.Name(), ".") {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
			if !d.Type().IsRegular() {
				return nil // directories are walked; symlinks and the rest ignored
			}
			fi, err := d.Info()
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil // removed meanwhile
				}
				return fmt.Errorf("read marker %s: %w", path, err)
			}
			if p.opt.MaxRootAge > 0 && now.Sub(fi.ModTime()) > p.opt.MaxRootAge {
				expired++
				p.log.WithFields(logrus.Fields{"path": path, "max_root_age": p.opt.MaxRootAge}).
					Info("marker older than the maximum root age: it no longer counts")
				return nil
			}
			if fi.Size() > maxMarkerSize {
				return fmt.Errorf("read marker %s: larger than %d bytes", path, maxMarkerSize)
			}
			data, err := os.ReadFile(path)
			if err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return fmt.Errorf("read marker %s: %w", path, err)
			}
			markers++
			roots = p.parseMarker(path, data, roots)
			return nil
		})
	}
	if p.opt.CacheDir != "" { // else a bucket's, read by readBucketRoots
		if err := walk(filepath.Join(p.opt.CacheDir, "gcroots"), false); err != nil {
			return nil, err
		}
	}
	for _, dir := range p.opt.GCRoots {
		if err := walk(dir, true); err != nil {
			return nil, err
		}
	}
	p.c.markers.Store(markers)
	p.c.expired.Store(expired)
	p.c.roots.Store(int64(len(roots)))
	return roots, nil
}

// parseMarker appends the roots a marker names. Lines are store paths,
// possibly of a file inside the path; empty lines and '#' comments are
// skipped.
func (p *pruner) parseMarker(path string, data []byte, roots []key) []key {
	prefix := strings.TrimSuffix(p.opt.StoreDir, "/") + "/"
	for i, l := range bytes.Split(data, []byte("\n")) {
		l = bytes.TrimSpace(l)
		if len(l) == 0 || l[0] == '#' {
			continue
		}
		if base, ok := markerLine(string(l), prefix); ok {
			k, _ := parseKey(base[:nixcache.HashLen])
			roots = append(roots, k)
			continue
		}
		p.log.WithFields(logrus.Fields{"path": path, "line": i + 1, "store_dir": p.opt.StoreDir}).
			Warn("marker line is not a store path: ignored")
	}
	return roots
}

// markerLine returns the base name of the store path that the marker line
// l names (l may name a file inside it), prefix being the store directory
// and a slash.
func markerLine(l, prefix string) (string, bool) {
	base, ok := strings.CutPrefix(l, prefix)
	if !ok {
		return "", false
	}
	base, _, _ = strings.Cut(base, "/")
	return base, nixcache.CheckBaseName(base) == nil
}
