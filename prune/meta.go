package prune

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
)

// The metadata cache remembers, from one prune to the next, what each
// narinfo said (its references, deriver and URL) and which version of the
// file said it (identOf its stat). A prune trusts an entry only while the
// narinfo's stat still has that identity, so a narinfo deleted, replaced
// or rewritten in place since is read again; a file that does not check
// out (magic, version, cache, checksum, bounds) is ignored and rewritten.
//
// Narinfos are stored in the order the last prune listed them, which is
// the order the next listing finds them in: the prune then walks the
// nodes in step with the directory instead of probing the hash table. The
// hash table is stored too, so loading is a few copies.
//
// Layout, little-endian, columns:
//
//	"KOPRMETA" version:u32 0:u32 cacheID:u64
//	nodes:u32 stored:u32 refs:u32 aux:u32 table:u32 0:u32 rootsHash:u64
//	sweeps [2]{dev:u64 ino:u64 mtime:u64}   (nar/, log/; zero: sweep next time)
//	keys [nodes][3]u64
//	flags [nodes]u8 (fData, fMalformed)
//	ident [nodes]u64, urlHash [nodes]u64
//	deriver [nodes]u32 (node+1), refLen [nodes]u32
//	refs [refs]u32 (nodes)
//	table [table]u32
//	aux: {len:u16 path ident:u64 kind:u8 target:[3]u64 urlHash:u64}...
//	crc32c of all the above:u32
//
// The first stored nodes are the narinfos; the others are paths they name.
const (
	metaMagic   = "KOPRMETA"
	metaVersion = 3
	metaHeader  = 8 + 4 + 4 + 8 + 6*4 + 8 + 2*24
)

// metaPath returns the metadata cache file for cacheDir in stateDir; the
// name is tied to the cache's absolute path, so one state directory can
// serve several caches.
func metaPath(stateDir, cacheDir string) string {
	abs := absCache(cacheDir)
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(stateDir, "prune-"+hex.EncodeToString(sum[:8])+".meta")
}

// cacheIDOf ties a metadata file to a cache and the settings that shape
// what it holds.
func cacheIDOf(cacheDir, storeDir string) uint64 {
	abs := absCache(cacheDir)
	return hashURL(abs + "\x00" + storeDir)
}

// absCache names a cache for its state files: a directory by its absolute
// path, a bucket by its store URL (which has a scheme).
func absCache(cache string) string {
	if strings.Contains(cache, "://") {
		return cache
	}
	if abs, err := filepath.Abs(cache); err == nil {
		return abs
	}
	return cache
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// aux kinds: what a realisation, build trace or debuginfo file names.
const (
	auxMalformed uint8 = iota // unreadable: kept
	auxOutPath                // keeps when the store path target is kept
	auxNar                    // keeps when the NAR whose URL hashes to urlHash is kept
)

// auxInfo is what a realisations/, build-trace-v2/ or debuginfo/ file says.
type auxInfo struct {
	ident   uint64
	kind    uint8
	target  key    // auxOutPath: the output path
	urlHash uint64 // auxNar: hashURL of the NAR's URL
}

const auxRecord = 8 + 1 + 24 + 8 // after the path

// dirStamp identifies a directory's state: any entry added, removed or
// renamed changes its modification time.
type dirStamp struct{ dev, ino, mtime uint64 }

// Swept directories whose state the metadata cache remembers.
const (
	sweepNar = iota
	sweepLog
	numSweeps
)

var sweepDirs = [numSweeps]string{"nar", "log"}

// meta is a metadata cache: the graph of the last prune and what it knew.
type meta struct {
	g         *graph
	aux       map[string]auxInfo
	stored    int                 // narinfos in g (nodes 0..stored-1 when loaded)
	rootsHash uint64              // of the roots the last prune kept
	sweeps    [numSweeps]dirStamp // directories left with nothing to delete
}

func emptyMeta() *meta { return &meta{g: newGraph(0), aux: map[string]auxInfo{}} }

var errBadMeta = errors.New("not a valid metadata cache")

// loadMeta reads a metadata cache. A missing file gives an empty one and
// no error; a bad one gives an empty one and errBadMeta (wrapped), and the
// prune rebuilds it.
func loadMeta(path string, cacheID uint64) (*meta, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return emptyMeta(), nil
		}
		return emptyMeta(), err
	}
	m, err := decodeMeta(data, cacheID)
	if err != nil {
		return emptyMeta(), fmt.Errorf("%s: %w: %v", path, errBadMeta, err)
	}
	return m, nil
}

func decodeMeta(data []byte, cacheID uint64) (*meta, error) {
	le := binary.LittleEndian
	if len(data) < metaHeader+4 || string(data[:8]) != metaMagic {
		return nil, errors.New("bad magic")
	}
	body, sum := data[:len(data)-4], le.Uint32(data[len(data)-4:])
	if crc32.Checksum(body, crcTable) != sum {
		return nil, errors.New("checksum mismatch")
	}
	if v := le.Uint32(data[8:]); v != metaVersion {
		return nil, fmt.Errorf("version %d", v)
	}
	if le.Uint64(data[16:]) != cacheID {
		return nil, errors.New("written for another cache")
	}
	h := data[24:]
	nodes, stored, nrefs := int(le.Uint32(h[0:])), int(le.Uint32(h[4:])), int(le.Uint32(h[8:]))
	naux, tableLen := int(le.Uint32(h[12:])), int(le.Uint32(h[16:]))
	m := &meta{stored: stored, rootsHash: le.Uint64(h[24:])}
	for i := range m.sweeps {
		s := h[32+24*i:]
		m.sweeps[i] = dirStamp{le.Uint64(s), le.Uint64(s[8:]), le.Uint64(s[16:])}
	}
	b := body[metaHeader:]
	if stored > nodes || tableLen&(tableLen-1) != 0 || tableLen < 2*nodes ||
		uint64(nodes)*(24+1+8+8+4+4)+uint64(nrefs)*4+uint64(tableLen)*4 > uint64(len(b)) {
		return nil, errors.New("sizes out of range")
	}
	g := &graph{}
	g.keys = make([]key, nodes, nodes+nodes/4)
	for n := range g.keys {
		g.keys[n] = key{le.Uint64(b[24*n:]), le.Uint64(b[24*n+8:]), le.Uint64(b[24*n+16:])}
	}
	b = b[nodes*24:]
	g.flags = append(make([]uint8, 0, cap(g.keys)), b[:nodes]...)
	b = b[nodes:]
	g.ident, b = readU64s(b, nodes, cap(g.keys)), b[nodes*8:]
	g.urlHash, b = readU64s(b, nodes, cap(g.keys)), b[nodes*8:]
	g.deriver, b = readU32s(b, nodes, cap(g.keys)), b[nodes*4:]
	g.refLen, b = readU32s(b, nodes, cap(g.keys)), b[nodes*4:]
	g.refs, b = readU32s(b, nrefs, nrefs+nrefs/4), b[nrefs*4:]
	g.table, b = readU32s(b, tableLen, tableLen), b[tableLen*4:]
	g.ino = make([]uint64, nodes, cap(g.keys))
	g.refOff = make([]uint32, nodes, cap(g.keys))
	off := uint64(0)
	for n := 0; n < nodes; n++ {
		g.flags[n] &= fData | fMalformed
		if n >= stored {
			g.flags[n] = 0
		}
		if g.deriver[n] > uint32(nodes) {
			return nil, errors.New("deriver out of range")
		}
		g.refOff[n] = uint32(off)
		off += uint64(g.refLen[n])
	}
	if off != uint64(nrefs) {
		return nil, errors.New("reference counts do not add up")
	}
	for _, r := range g.refs {
		if r >= uint32(nodes) {
			return nil, errors.New("reference out of range")
		}
	}
	used := 0
	for _, v := range g.table {
		if v > uint32(nodes) {
			return nil, errors.New("table entry out of range")
		}
		if v != 0 {
			used++
		}
	}
	if used != nodes {
		return nil, errors.New("table does not hold every node")
	}
	m.g = g
	m.aux = make(map[string]auxInfo, naux)
	for i := 0; i < naux; i++ {
		if len(b) < 2 {
			return nil, errors.New("truncated aux")
		}
		l := int(le.Uint16(b))
		if len(b) < 2+l+auxRecord {
			return nil, errors.New("truncated aux")
		}
		p := string(b[2 : 2+l])
		b = b[2+l:]
		m.aux[p] = auxInfo{ident: le.Uint64(b), kind: b[8],
			target: key{le.Uint64(b[9:]), le.Uint64(b[17:]), le.Uint64(b[25:])}, urlHash: le.Uint64(b[33:])}
		b = b[auxRecord:]
	}
	if len(b) != 0 {
		return nil, errors.New("trailing data")
	}
	return m, nil
}

func readU64s(b []byte, n, capacity int) []uint64 {
	dst := make([]uint64, n, capacity)
	for i := range dst {
		dst[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	return dst
}

func readU32s(b []byte, n, capacity int) []uint32 {
	dst := make([]uint32, n, capacity)
	for i := range dst {
		dst[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return dst
}

// saveMeta writes the narinfos still present after the prune (usable and
// not deleted) with the nodes they name, and m's other fields, atomically.
// listed is the order the prune listed narinfos in; the file keeps it.
func saveMeta(path string, cacheID uint64, m *meta, listed []uint32) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("write metadata cache: %w", err)
	}
	l := layOutMeta(m, listed)
	f, err := atomicfile.Create(filepath.Dir(path), path, 0o600)
	if err != nil {
		return fmt.Errorf("write metadata cache: %w", err)
	}
	defer f.Abort()
	crc := crc32.New(crcTable)
	w := &metaWriter{Writer: bufio.NewWriterSize(io.MultiWriter(f, crc), 1<<20)}
	w.header(cacheID, m, l)
	w.nodes(m.g, l)
	w.aux(m.aux)
	if err := w.Flush(); err != nil {
		return fmt.Errorf("write metadata cache: %w", err)
	}
	var sum [4]byte
	binary.LittleEndian.PutUint32(sum[:], crc.Sum32())
	if _, err := f.Write(sum[:]); err != nil {
		return fmt.Errorf("write metadata cache: %w", err)
	}
	if err := f.Commit(); err != nil {
		return fmt.Errorf("write metadata cache: %w", err)
	}
	return nil
}

// metaLayout is where saveMeta puts the nodes of a graph in the file.
type metaLayout struct {
	order  []uint32 // the nodes written, in file order
	newIdx []uint32 // node+1 in the file, 0 if not written
	stored int      // the narinfos, order[:stored]; the rest are nodes they name
	nrefs  int      // references of the narinfos
	table  []uint32 // the hash table over order
	naux   int      // aux entries with a path short enough to store
}

// layOutMeta renumbers the nodes for the file: the narinfos as listed,
// then those found otherwise, then the nodes they name; so that the next
// prune walks them in step with its listing.
func layOutMeta(m *meta, listed []uint32) *metaLayout {
	g := m.g
	l := &metaLayout{newIdx: make([]uint32, g.len())}
	add := func(n uint32) {
		if l.newIdx[n] == 0 {
			l.order = append(l.order, n)
			l.newIdx[n] = uint32(len(l.order))
		}
	}
	keep := func(n uint32) bool { return g.usable(n) && g.flags[n]&fDeleted == 0 }
	for _, n := range listed {
		if keep(n) {
			add(n)
		}
	}
	for n := uint32(0); n < uint32(g.len()); n++ {
		if keep(n) {
			add(n)
		}
	}
	l.stored = len(l.order)
	for _, n := range l.order[:l.stored] {
		for _, r := range g.nodeRefs(n) {
			add(r)
		}
		l.nrefs += int(g.refLen[n])
		if d := g.deriver[n]; d != 0 {
			add(d - 1)
		}
	}
	tableLen := 1 << 10
	for tableLen < 2*(len(l.order)+len(l.order)/4) {
		tableLen <<= 1
	}
	l.table = make([]uint32, tableLen)
	mask := uint64(tableLen - 1)
	for i, n := range l.order {
		j := g.keys[n].hash() & mask
		for l.table[j] != 0 {
			j = (j + 1) & mask
		}
		l.table[j] = uint32(i) + 1
	}
	for p := range m.aux {
		if len(p) <= 0xffff {
			l.naux++
		}
	}
	return l
}

// metaWriter writes the little-endian fields of a metadata cache. Write
// errors stick in the bufio.Writer until Flush reports them.
type metaWriter struct {
	*bufio.Writer
	s [64]byte
}

func (w *metaWriter) put32(v uint32) {
	binary.LittleEndian.PutUint32(w.s[:], v)
	w.Write(w.s[:4])
}

func (w *metaWriter) put64(v uint64) {
	binary.LittleEndian.PutUint64(w.s[:], v)
	w.Write(w.s[:8])
}

// header writes the magic, the version, the cache's identity, the sizes
// of the columns, the roots' hash and the swept directories' stamps.
func (w *metaWriter) header(cacheID uint64, m *meta, l *metaLayout) {
	w.WriteString(metaMagic)
	w.put32(metaVersion)
	w.put32(0)
	w.put64(cacheID)
	for _, v := range []int{len(l.order), l.stored, l.nrefs, l.naux, len(l.table), 0} {
		w.put32(uint32(v))
	}
	w.put64(m.rootsHash)
	for _, st := range m.sweeps {
		w.put64(st.dev)
		w.put64(st.ino)
		w.put64(st.mtime)
	}
}

// nodes writes the columns of the nodes in l's order, the references of
// the narinfos and the hash table. Only narinfos have flags and data; the
// nodes they name are written as keys alone.
func (w *metaWriter) nodes(g *graph, l *metaLayout) {
	for _, n := range l.order {
		k := g.keys[n]
		w.put64(k.a)
		w.put64(k.b)
		w.put64(k.c)
	}
	for i, n := range l.order {
		fl := byte(0)
		if i < l.stored {
			fl = g.flags[n] & (fData | fMalformed)
		}
		w.WriteByte(fl)
	}
	col := func(get func(n uint32) uint64, wide bool) {
		for i, n := range l.order {
			v := uint64(0)
			if i < l.stored {
				v = get(n)
			}
			if wide {
				w.put64(v)
			} else {
				w.put32(uint32(v))
			}
		}
	}
	col(func(n uint32) uint64 { return g.ident[n] }, true)
	col(func(n uint32) uint64 { return g.urlHash[n] }, true)
	col(func(n uint32) uint64 {
		if d := g.deriver[n]; d != 0 {
			return uint64(l.newIdx[d-1])
		}
		return 0
	}, false)
	col(func(n uint32) uint64 { return uint64(g.refLen[n]) }, false)
	for _, n := range l.order[:l.stored] {
		for _, r := range g.nodeRefs(n) {
			w.put32(l.newIdx[r] - 1)
		}
	}
	for _, v := range l.table {
		w.put32(v)
	}
}

// aux writes the records of the aux files, skipping those whose path does
// not fit its 16-bit length.
func (w *metaWriter) aux(aux map[string]auxInfo) {
	le := binary.LittleEndian
	s := w.s[:]
	for p, a := range aux {
		if len(p) > 0xffff {
			continue
		}
		le.PutUint16(s, uint16(len(p)))
		w.Write(s[:2])
		w.WriteString(p)
		le.PutUint64(s[0:], a.ident)
		s[8] = a.kind
		le.PutUint64(s[9:], a.target.a)
		le.PutUint64(s[17:], a.target.b)
		le.PutUint64(s[25:], a.target.c)
		le.PutUint64(s[33:], a.urlHash)
		w.Write(s[:auxRecord])
	}
}
