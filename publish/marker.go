package publish

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// A signed marker is a plain marker (store paths, one a line) followed by
// comment lines that plain readers, serve and prune skip:
//
//	/nix/store/<hash>-nixos-system-web1
//	# kiss-onion-statement: kiss-onion-marker-1;web1;1764150000123456789;/nix/store/<hash>-nixos-system-web1
//	# kiss-onion-signature: fleet-1:<base64 ed25519 signature of the statement>
//
// The statement names the marker, a generation that only grows (publish
// takes the time in nanoseconds, or one more than the marker's current
// generation if that is larger) and the paths, comma-joined as listed. The
// signature is Nix's "name:base64" form; several signature lines may
// follow one statement (a key rotation), and one that verifies is enough.
const (
	statementPrefix = "# kiss-onion-statement: "
	signaturePrefix = "# kiss-onion-signature: "
	statementMagic  = "kiss-onion-marker-1"
)

// Errors of Marker.Verify, wrapped.
var (
	// ErrUnsigned: the marker has no signed statement.
	ErrUnsigned = errors.New("the marker is not signed")
	// ErrBadSignature: no signature of the statement verifies with the key.
	ErrBadSignature = errors.New("the marker's signature does not verify")
	// ErrMismatch: the statement names another marker or other paths.
	ErrMismatch = errors.New("the marker's signed statement does not match it")
	// ErrRollback: the marker's generation is older than one applied before.
	ErrRollback = errors.New("the marker is older than the system applied before (a rollback)")
)

// Statement is what a publisher signs: a marker's name, its generation
// and the store paths it names.
type Statement struct {
	Name       string
	Generation uint64
	Paths      []string
}

// String returns the statement in the form that is signed.
func (s Statement) String() string {
	return fmt.Sprintf("%s;%s;%d;%s", statementMagic, s.Name, s.Generation, strings.Join(s.Paths, ","))
}

// ParseStatement parses a statement's String form.
func ParseStatement(text string) (Statement, error) {
	parts := strings.Split(text, ";")
	if len(parts) != 4 || parts[0] != statementMagic {
		return Statement{}, fmt.Errorf("statement: want %s;NAME;GENERATION;PATHS", statementMagic)
	}
	gen, err := strconv.ParseUint(parts[2], 10, 64)
	if err != nil {
		return Statement{}, fmt.Errorf("statement: generation %q is not a number", parts[2])
	}
	if parts[1] == "" || parts[3] == "" {
		return Statement{}, errors.New("statement: empty name or paths")
	}
	return Statement{Name: parts[1], Generation: gen, Paths: strings.Split(parts[3], ",")}, nil
}

// Marker is the content of a GC-root marker.
type Marker struct {
	Paths []string // the store paths, in order
	// Statement and Signatures are the signed statement, if any.
	Statement  *Statement
	Signatures []string
}

// FormatMarker returns the file of a marker naming paths; with key, it
// carries a statement for name and generation, signed by key.
func FormatMarker(name string, generation uint64, paths []string, key *nixcache.SecretKey) []byte {
	var b strings.Builder
	for _, p := range paths {
		b.WriteString(p + "\n")
	}
	if key != nil {
		st := Statement{Name: name, Generation: generation, Paths: paths}.String()
		b.WriteString(statementPrefix + st + "\n")
		b.WriteString(signaturePrefix + key.Sign(st) + "\n")
	}
	return []byte(b.String())
}

// ParseMarker parses a marker's file: its store paths (under storeDir)
// and, when present, its signed statement.
func ParseMarker(data []byte, storeDir string) (Marker, error) {
	var m Marker
	if _, err := nixcache.ParseMarker(data, storeDir); err != nil {
		return Marker{}, err
	}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSuffix(line, "\r")
		switch {
		case line == "":
		case strings.HasPrefix(line, statementPrefix):
			if m.Statement != nil {
				return Marker{}, fmt.Errorf("line %d: a second statement", i+1)
			}
			st, err := ParseStatement(strings.TrimPrefix(line, statementPrefix))
			if err != nil {
				return Marker{}, fmt.Errorf("line %d: %w", i+1, err)
			}
			m.Statement = &st
		case strings.HasPrefix(line, signaturePrefix):
			m.Signatures = append(m.Signatures, strings.TrimPrefix(line, signaturePrefix))
		case line[0] == '#':
		default:
			m.Paths = append(m.Paths, line)
		}
	}
	if len(m.Paths) == 0 {
		return Marker{}, errors.New("the marker names no store path")
	}
	return m, nil
}

// Generation returns the generation of the marker's statement, 0 when
// it has none. It is not verified.
func (m Marker) Generation() uint64 {
	if m.Statement == nil {
		return 0
	}
	return m.Statement.Generation
}

// Verify checks that the marker carries a statement for name and for its
// own paths, signed by key, and returns it. The errors wrap ErrUnsigned,
// ErrBadSignature or ErrMismatch.
func (m Marker) Verify(name string, key nixcache.PublicKey) (Statement, error) {
	if m.Statement == nil || len(m.Signatures) == 0 {
		return Statement{}, ErrUnsigned
	}
	st := *m.Statement
	text := st.String()
	ok := false
	for _, sig := range m.Signatures {
		if key.Verify(text, sig) {
			ok = true
			break
		}
	}
	if !ok {
		var names []string
		for _, sig := range m.Signatures {
			n, _, _ := strings.Cut(sig, ":")
			names = append(names, n)
		}
		return Statement{}, fmt.Errorf("%w with key %s (signed by %s)", ErrBadSignature, key.Name(), strings.Join(names, ", "))
	}
	if st.Name != name {
		return Statement{}, fmt.Errorf("%w: it was signed for marker %q, not %q", ErrMismatch, st.Name, name)
	}
	if strings.Join(st.Paths, ",") != strings.Join(m.Paths, ",") {
		return Statement{}, fmt.Errorf("%w: it names %s, the marker %s", ErrMismatch, strings.Join(st.Paths, ","), strings.Join(m.Paths, ","))
	}
	return st, nil
}
