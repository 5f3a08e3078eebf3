package nixcache

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
	"github.com/nix-community/go-nix/pkg/nixhash"
)

// NarInfo is a parsed .narinfo file. Values are kept as written, so that a
// NarInfo prints back to what Nix signed.
type NarInfo struct {
	StorePath   string   // absolute store path
	URL         string   // where the (compressed) NAR is, relative to the cache
	Compression string   // "bzip2" when the file omits it, as Nix reads it
	FileHash    string   // hash of the file at URL; may be empty
	FileSize    uint64   // size of the file at URL; 0 when absent
	NarHash     string   // hash of the uncompressed NAR
	NarSize     uint64   // size of the uncompressed NAR
	References  []string // store path base names
	Deriver     string   // base name of the .drv, or ""
	Sigs        []string // "keyname:base64" signatures
	CA          string   // content address, or ""

	lines [numFields]int // line of each single-valued field, for errors
}

// Single-valued fields, in the order of NarInfo.lines.
const (
	fStorePath = iota
	fURL
	fCompression
	fFileHash
	fNarHash
	fFileSize
	fNarSize
	fDeriver
	fCA
	fReferences
	numFields
)

var fieldIndex = map[string]int{
	"StorePath": fStorePath, "URL": fURL, "Compression": fCompression,
	"FileHash": fFileHash, "NarHash": fNarHash, "FileSize": fFileSize,
	"NarSize": fNarSize, "Deriver": fDeriver, "CA": fCA, "References": fReferences,
}

// line returns the line a field was read from, 0 if absent.
func (n *NarInfo) line(field string) int {
	if i, ok := fieldIndex[field]; ok {
		return n.lines[i]
	}
	return 0
}

// FieldError is a narinfo problem tied to one field and, where there is one,
// the line it was found on (1-based; 0 for a missing field).
type FieldError struct {
	Line  int
	Field string
	Err   error
}

func (e *FieldError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("line %d: %s: %v", e.Line, e.Field, e.Err)
	}
	return fmt.Sprintf("%s: %v", e.Field, e.Err)
}

func (e *FieldError) Unwrap() error { return e.Err }

// errMissing is the Err of a FieldError for a required field that is absent.
var errMissing = errors.New("missing")

// ParseNarInfo parses a narinfo as Nix does: "Key: value" lines, unknown
// keys ignored, StorePath, URL, NarHash and NarSize required. It checks only
// the syntax; Validate checks the values.
func ParseNarInfo(data []byte) (*NarInfo, error) {
	n := &NarInfo{}
	line := 0
	for len(data) > 0 {
		line++
		var l []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			l, data = data[:i], data[i+1:]
		} else {
			l, data = data, nil
		}
		if len(l) == 0 {
			continue
		}
		colon := bytes.IndexByte(l, ':')
		if colon <= 0 {
			return nil, &FieldError{Line: line, Field: "line", Err: errors.New(`not a "Key: value" line`)}
		}
		key := string(l[:colon])
		val := string(bytes.TrimPrefix(l[colon+1:], []byte(" ")))
		if bytes.IndexByte(l, 0) >= 0 {
			return nil, &FieldError{Line: line, Field: key, Err: errors.New("contains a NUL byte")}
		}
		bad := func(err error) error { return &FieldError{Line: line, Field: key, Err: err} }
		if i, ok := fieldIndex[key]; ok {
			if n.lines[i] != 0 && i != fReferences {
				return nil, bad(fmt.Errorf("repeated (first on line %d)", n.lines[i]))
			}
			n.lines[i] = line
		}
		switch key {
		case "StorePath":
			n.StorePath = val
		case "URL":
			n.URL = val
		case "Compression":
			n.Compression = val
		case "FileHash":
			n.FileHash = val
		case "NarHash":
			n.NarHash = val
		case "FileSize", "NarSize":
			v, err := strconv.ParseUint(val, 10, 64)
			if err != nil {
				return nil, bad(errors.New("not a whole number"))
			}
			if key == "FileSize" {
				n.FileSize = v
			} else {
				n.NarSize = v
			}
		case "References":
			n.References = append(n.References, strings.Fields(val)...)
		case "Deriver":
			if val != "unknown-deriver" {
				n.Deriver = val
			}
		case "Sig":
			n.Sigs = append(n.Sigs, val)
		case "CA":
			n.CA = val
		}
	}
	if n.Compression == "" {
		n.Compression = "bzip2"
	}
	for _, f := range []struct {
		name  string
		empty bool
	}{
		{"StorePath", n.StorePath == ""},
		{"URL", n.URL == ""},
		{"NarHash", n.NarHash == ""},
		{"NarSize", n.lines[fNarSize] == 0},
	} {
		if f.empty {
			return nil, &FieldError{Field: f.name, Err: errMissing}
		}
	}
	return n, nil
}

// Validate checks what a cache must refuse in an uploaded narinfo: the
// store path lies under storeDir and its hash is hashPart (the file's name),
// references and deriver are store base names, URL is a safe relative path
// under nar/, NarSize is positive, the hashes and signatures parse, and a
// sha256 FileHash is the one a URL named after its file's hash gives.
func (n *NarInfo) Validate(storeDir, hashPart string) error {
	bad := func(field string, err error) error {
		return &FieldError{Line: n.line(field), Field: field, Err: err}
	}
	base, err := BaseName(storeDir, n.StorePath)
	if err != nil {
		return bad("StorePath", err)
	}
	if base[:HashLen] != hashPart {
		return bad("StorePath", fmt.Errorf("hash %s does not match the file name %s.narinfo", base[:HashLen], hashPart))
	}
	if err := CheckNarURL(n.URL); err != nil {
		return bad("URL", err)
	}
	if !isToken(n.Compression) {
		return bad("Compression", fmt.Errorf("%q is not a compression method", n.Compression))
	}
	if _, err := nixhash.ParseAny(n.NarHash, nil); err != nil {
		return bad("NarHash", errors.New("not a hash (want sha256:<nixbase32>)"))
	}
	if n.FileHash != "" {
		h, err := nixhash.ParseAny(n.FileHash, nil)
		if err != nil {
			return bad("FileHash", errors.New("not a hash (want sha256:<nixbase32>)"))
		}
		// Nix names a NAR file after its sha256: with another FileHash,
		// every substitution of the path fails. (The signature covers
		// neither.) Another algorithm, which Nix never writes, would take
		// reading the file to check.
		if named := NarURLHash(n.URL); named != "" && h.Algo() == nixhash.SHA256 {
			if got := nixbase32.EncodeToString(h.Digest()); got != named {
				return bad("FileHash", fmt.Errorf("sha256:%s does not match URL %s, which names the file by its sha256 %s", got, n.URL, named))
			}
		}
	}
	if n.NarSize == 0 {
		return bad("NarSize", errors.New("must be greater than 0"))
	}
	for _, r := range n.References {
		if err := CheckBaseName(r); err != nil {
			return &FieldError{Line: n.lines[fReferences], Field: "References", Err: fmt.Errorf("%q: %w", r, err)}
		}
	}
	if n.Deriver != "" {
		if err := CheckBaseName(n.Deriver); err != nil {
			return bad("Deriver", fmt.Errorf("%q: %w", n.Deriver, err))
		}
		if !strings.HasSuffix(n.Deriver, ".drv") {
			return bad("Deriver", fmt.Errorf("%q does not end in .drv", n.Deriver))
		}
	}
	for _, s := range n.Sigs {
		if _, err := parseSignature(s); err != nil {
			return &FieldError{Field: "Sig", Err: err}
		}
	}
	return nil
}

func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// CheckNarURL checks that u is a narinfo URL this cache can hold: a plain
// relative path "nar/<name>" with no directories, traversal or odd bytes.
func CheckNarURL(u string) error {
	name, ok := strings.CutPrefix(u, "nar/")
	if !ok {
		return errors.New(`must be a relative path under "nar/"`)
	}
	if name == "" || name[0] == '.' {
		return errors.New("file name must not be empty or start with '.'")
	}
	if strings.Contains(name, "..") {
		// One file name, so no traversal; but Nix never writes it, and a
		// name that reads like one is refused on sight.
		return errors.New(`file name must not contain ".."`)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_' || c == '+') {
			return fmt.Errorf("file name has invalid character %q", c)
		}
	}
	return nil
}

// NarURLHash returns the nixbase32 sha256 that Nix names a NAR file after
// when u has that form, nar/<52 characters>.nar[.<compression>], else "".
func NarURLHash(u string) string {
	name, ok := strings.CutPrefix(u, "nar/")
	if !ok {
		return ""
	}
	h, rest, ok := strings.Cut(name, ".")
	if !ok || !strings.HasPrefix(rest, "nar") || !IsBase32(h, 52) {
		return ""
	}
	return h
}

// Fingerprint returns the string Nix signs for this path:
// 1;<store path>;<sha256:nix32 NAR hash>;<NAR size>;<sorted full references>.
func (n *NarInfo) Fingerprint(storeDir string) (string, error) {
	h, err := nixhash.ParseAny(n.NarHash, nil)
	if err != nil {
		return "", &FieldError{Line: n.lines[fNarHash], Field: "NarHash", Err: errors.New("not a hash")}
	}
	refs := make([]string, len(n.References))
	dir := strings.TrimSuffix(storeDir, "/") + "/"
	for i, r := range n.References {
		refs[i] = dir + r
	}
	sort.Strings(refs)
	return "1;" + n.StorePath + ";" + h.Algo().String() + ":" + nixbase32.EncodeToString(h.Digest()) +
		";" + strconv.FormatUint(n.NarSize, 10) + ";" + strings.Join(refs, ","), nil
}

// VerifiedBy reports whether one of the narinfo's signatures is a valid
// signature by one of keys.
func (n *NarInfo) VerifiedBy(storeDir string, keys []PublicKey) bool {
	fp, err := n.Fingerprint(storeDir)
	if err != nil {
		return false
	}
	for _, s := range n.Sigs {
		sig, err := parseSignature(s)
		if err != nil {
			continue
		}
		for _, k := range keys {
			if k.verify(fp, sig) {
				return true
			}
		}
	}
	return false
}
