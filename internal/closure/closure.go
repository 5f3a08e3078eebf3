// Package closure is the format of a closure query's answer: the
// narinfos of the closure of some store paths, in one response, which
// serve answers on its read role and the gateway asks for, so that a Nix
// client behind Tor's round trips need not walk references one GET at a
// time.
//
// The query is
//
//	GET /kiss-onion/closure/<hash>[,<hash>...]
//
// for up to MaxRoots hashes. The answer (ContentType) is text: a first
// line "KissOnion-Closure: 1", then one record per path of the closure,
// the roots first, breadth first:
//
//	<hash> <n>\n<n bytes: the narinfo, as a GET of <hash>.narinfo returns it>\n
//	<hash> missing\n   (not in the cache: a GET of its narinfo would get 404)
//	<hash> unknown\n   (ask for its narinfo on its own: an upstream may
//	                    have it, or its upload is about to become visible)
//
// and a last line: "end" when the closure is complete, "truncated" when
// the server stopped early (at its limits of paths or bytes).
package closure

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// ContentType is the media type of an answer.
const ContentType = "text/x-kiss-onion-closure"

// PathPrefix starts the path of a query; no Nix cache layout has a
// kiss-onion/ directory.
const PathPrefix = "/kiss-onion/closure/"

// MaxRoots bounds the hashes of one query.
const MaxRoots = 64

// header is an answer's first line.
const header = "KissOnion-Closure: 1\n"

// maxNarInfo bounds one narinfo in an answer; serve takes none larger.
const maxNarInfo = 1 << 20

// Status is what an answer says of one path.
type Status int

// The Statuses of a Record.
const (
	Found   Status = iota // the record holds its narinfo
	Missing               // not in the cache
	Unknown               // ask for it on its own
)

// Record is what an answer says of one path.
type Record struct {
	Hash    string
	Status  Status
	NarInfo []byte // when Found
}

// Answer is a parsed answer.
type Answer struct {
	Records []Record
	// Complete is false when the server stopped early: paths of the
	// closure may be missing from Records.
	Complete bool
}

// Query returns the path of the query for hashes (at most MaxRoots).
func Query(hashes []string) string { return PathPrefix + strings.Join(hashes, ",") }

// ParseQuery returns the hashes of a query's path (after PathPrefix).
func ParseQuery(list string) ([]string, error) {
	hashes := strings.Split(list, ",")
	if len(hashes) > MaxRoots {
		return nil, fmt.Errorf("closure query of %d paths, more than %d", len(hashes), MaxRoots)
	}
	for _, h := range hashes {
		if !nixcache.IsHashPart(h) {
			return nil, fmt.Errorf("closure query: %q is not a 32-character store hash", h)
		}
	}
	return hashes, nil
}

// Writer writes an answer to a buffer.
type Writer struct{ buf bytes.Buffer }

// NewWriter starts an answer.
func NewWriter() *Writer {
	w := &Writer{}
	w.buf.WriteString(header)
	return w
}

// Len is the answer's length so far.
func (w *Writer) Len() int { return w.buf.Len() }

// Found adds the narinfo of hash.
func (w *Writer) Found(hash string, narinfo []byte) {
	w.buf.WriteString(hash)
	w.buf.WriteByte(' ')
	w.buf.WriteString(strconv.Itoa(len(narinfo)))
	w.buf.WriteByte('\n')
	w.buf.Write(narinfo)
	w.buf.WriteByte('\n')
}

// Missing says that hash is not in the cache.
func (w *Writer) Missing(hash string) { w.buf.WriteString(hash + " missing\n") }

// Unknown says that hash is to be asked for on its own.
func (w *Writer) Unknown(hash string) { w.buf.WriteString(hash + " unknown\n") }

// End ends the answer and returns it.
func (w *Writer) End(complete bool) []byte {
	if complete {
		w.buf.WriteString("end\n")
	} else {
		w.buf.WriteString("truncated\n")
	}
	return w.buf.Bytes()
}

// Parse reads an answer of at most max bytes. An answer cut short (no
// last line) is an error: a client must not take part of a closure for
// the whole of it.
func Parse(r io.Reader, max int64) (Answer, error) {
	br := bufio.NewReader(&io.LimitedReader{R: r, N: max + 1})
	var a Answer
	var n int64
	line := func() (string, error) {
		s, err := br.ReadString('\n')
		n += int64(len(s))
		if n > max {
			return "", fmt.Errorf("closure answer larger than %d bytes", max)
		}
		if err == io.EOF {
			return "", io.ErrUnexpectedEOF
		}
		return strings.TrimSuffix(s, "\n"), err
	}
	first, err := line()
	if err != nil || first+"\n" != header {
		return a, fmt.Errorf("not a closure answer (first line %q)", first)
	}
	for i := 1; ; i++ {
		l, err := line()
		if err != nil {
			return a, fmt.Errorf("closure answer, record %d: %w", i, err)
		}
		switch l {
		case "end", "truncated":
			a.Complete = l == "end"
			if _, err := br.ReadByte(); err != io.EOF {
				return a, fmt.Errorf("closure answer: data after its last line")
			}
			return a, nil
		}
		hash, what, _ := strings.Cut(l, " ")
		if !nixcache.IsHashPart(hash) {
			return a, fmt.Errorf("closure answer, record %d: %q is not a store hash", i, hash)
		}
		rec := Record{Hash: hash}
		switch what {
		case "missing":
			rec.Status = Missing
		case "unknown":
			rec.Status = Unknown
		default:
			size, err := strconv.Atoi(what)
			if err != nil || size < 0 || size > maxNarInfo {
				return a, fmt.Errorf("closure answer, record %d (%s): bad status or size %q", i, hash, what)
			}
			n += int64(size + 1)
			if n > max {
				return a, fmt.Errorf("closure answer larger than %d bytes", max)
			}
			rec.NarInfo = make([]byte, size+1)
			if _, err := io.ReadFull(br, rec.NarInfo); err != nil {
				return a, fmt.Errorf("closure answer, record %d (%s): %w", i, hash, io.ErrUnexpectedEOF)
			}
			if rec.NarInfo[size] != '\n' {
				return a, fmt.Errorf("closure answer, record %d (%s): narinfo not followed by a newline", i, hash)
			}
			rec.NarInfo = rec.NarInfo[:size]
		}
		a.Records = append(a.Records, rec)
	}
}

// References returns the hash parts of a narinfo's References line.
// What is not a store path's base name is skipped.
func References(narinfo []byte) []string {
	var refs []string
	for rest := narinfo; len(rest) > 0; {
		line := rest
		if i := bytes.IndexByte(rest, '\n'); i >= 0 {
			line, rest = rest[:i], rest[i+1:]
		} else {
			rest = nil
		}
		v, ok := bytes.CutPrefix(line, []byte("References:"))
		if !ok {
			continue
		}
		for _, f := range strings.Fields(string(v)) {
			if len(f) > 33 && f[32] == '-' && nixcache.IsHashPart(f[:32]) {
				refs = append(refs, f[:32])
			}
		}
		break
	}
	return refs
}
