// Package prunetest writes synthetic Nix binary caches: valid narinfos,
// NAR files, markers, listings, logs, realisations and debuginfo, with
// store paths named after readable names. The pruner's tests build
// exact scenarios with it and its benchmark builds a million paths.
//
// It writes plain files with the layout of SPEC section 3; it is not a
// Nix implementation: NARs are filler bytes and nothing is signed.
package prunetest

import (
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// StoreDir is the store directory of generated caches.
const StoreDir = "/nix/store"

// HashPart returns the store-path hash part derived from name.
func HashPart(name string) string {
	sum := sha256.Sum256([]byte("path:" + name))
	return nixcache.Base32(sum[:20])
}

// BaseName returns the store path base name of name: "<hash>-<name>".
func BaseName(name string) string { return HashPart(name) + "-" + name }

// StorePath returns the absolute store path of name.
func StorePath(name string) string { return StoreDir + "/" + BaseName(name) }

// NarURL returns the URL of name's NAR: nar/<file hash>.nar.zst.
func NarURL(name string) string {
	sum := sha256.Sum256([]byte("nar:" + name))
	return "nar/" + nixcache.Base32(sum[:]) + ".nar.zst"
}

// NarInfoFile returns name's narinfo file name, relative to the cache.
func NarInfoFile(name string) string { return HashPart(name) + ".narinfo" }

// Path is a store path to write.
type Path struct {
	Name    string   // store path name; the hash derives from it
	Refs    []string // names of the referenced paths (may include Name)
	Deriver string   // name of the deriver (ending in .drv), or ""
	NarSize int      // bytes of the NAR file; 64 when 0
}

// NarInfo returns a valid narinfo for p.
func NarInfo(p Path) []byte {
	var b strings.Builder
	narSum := sha256.Sum256([]byte("narhash:" + p.Name))
	fileSum := sha256.Sum256([]byte("nar:" + p.Name))
	size := p.NarSize
	if size == 0 {
		size = 64
	}
	fmt.Fprintf(&b, "StorePath: %s\nURL: %s\nCompression: zstd\n", StorePath(p.Name), NarURL(p.Name))
	fmt.Fprintf(&b, "FileHash: sha256:%s\nFileSize: %d\n", nixcache.Base32(fileSum[:]), size)
	fmt.Fprintf(&b, "NarHash: sha256:%s\nNarSize: %d\n", nixcache.Base32(narSum[:]), size+40)
	b.WriteString("References:")
	for _, r := range p.Refs {
		b.WriteString(" " + BaseName(r))
	}
	b.WriteString("\n")
	if p.Deriver != "" {
		fmt.Fprintf(&b, "Deriver: %s\n", BaseName(p.Deriver))
	}
	return []byte(b.String())
}

// Init creates an empty cache in dir: nix-cache-info and gcroots/.
func Init(dir string) error {
	if err := os.MkdirAll(filepath.Join(dir, "gcroots"), 0o755); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "nar"), 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "nix-cache-info"),
		[]byte("StoreDir: "+StoreDir+"\nWantMassQuery: 1\nPriority: 40\n"), 0o644)
}

// Write writes p's NAR, then its narinfo, as an upload would.
func Write(dir string, p Path) error {
	size := p.NarSize
	if size == 0 {
		size = 64
	}
	if err := os.WriteFile(filepath.Join(dir, NarURL(p.Name)), filler(size), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, NarInfoFile(p.Name)), NarInfo(p), 0o644)
}

var fill = []byte(strings.Repeat("nar-bytes ", 410))

func filler(n int) []byte {
	if n <= len(fill) {
		return fill[:n]
	}
	return make([]byte, n)
}

// WriteMarker writes the marker gcroots/<name> naming the store paths of
// names, one a line.
func WriteMarker(dir, name string, names ...string) error {
	var b strings.Builder
	for _, n := range names {
		b.WriteString(StorePath(n) + "\n")
	}
	p := filepath.Join(dir, "gcroots", filepath.FromSlash(name))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, []byte(b.String()), 0o644)
}

// WriteFile writes a file at rel (slash-separated) under dir, creating
// directories.
func WriteFile(dir, rel string, data []byte) error {
	p := filepath.Join(dir, filepath.FromSlash(rel))
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	return os.WriteFile(p, data, 0o644)
}

// ListingFile returns name's .ls file name.
func ListingFile(name string) string { return HashPart(name) + ".ls" }

// LogFile returns the log file of the deriver drv: log/<drv base name>.
func LogFile(drv string) string { return "log/" + BaseName(drv) }

// RealisationFile returns an old-style realisation's file for output out
// of drv, and its JSON naming the output path name.
func RealisationFile(drv, out, name string) (string, []byte) {
	sum := sha256.Sum256([]byte("drvhash:" + drv))
	rel := "realisations/sha256:" + fmt.Sprintf("%x", sum) + "!" + out + ".doi"
	return rel, []byte(fmt.Sprintf(`{"dependentRealisations":{},"id":"sha256:%x!%s","outPath":"%s","signatures":[]}`, sum, out, BaseName(name)))
}

// BuildTraceFile returns a build-trace-v2 entry's file for output out of
// drv, and its JSON naming the output path name.
func BuildTraceFile(drv, out, name string) (string, []byte) {
	return "build-trace-v2/" + BaseName(drv) + "/" + out + ".doi",
		[]byte(fmt.Sprintf(`{"outPath":"%s","signatures":[{"keyName":"k","sig":"AA=="}]}`, BaseName(name)))
}

// DebugInfoFile returns a debuginfo entry pointing into name's NAR.
func DebugInfoFile(buildID, name string) (string, []byte) {
	return "debuginfo/" + buildID, []byte(fmt.Sprintf(`{"archive":"../%s","member":"lib/debug/.build-id/%s/%s.debug"}`,
		NarURL(name), buildID[:2], buildID[2:]))
}
