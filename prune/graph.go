package prune

import (
	"math/bits"
	"slices"
	"sync/atomic"
)

// key is a store path's 32-character nixbase32 hash part packed 5 bits a
// character into three words (12, 12 and 8 characters): compared in three
// instructions, never decoded into a digest, so the packing need not be
// Nix's byte order.
type key struct{ a, b, c uint64 }

const nix32Chars = "0123456789abcdfghijklmnpqrsvwxyz"

var nix32Value = func() (t [256]int8) {
	for i := range t {
		t[i] = -1
	}
	for i := 0; i < len(nix32Chars); i++ {
		t[nix32Chars[i]] = int8(i)
	}
	return t
}()

// parseKey packs the 32-character hash part s, reporting whether it is one.
func parseKey[S ~string | ~[]byte](s S) (key, bool) {
	if len(s) != 32 {
		return key{}, false
	}
	var w [3]uint64
	for i := 0; i < 32; i++ {
		d := nix32Value[s[i]]
		if d < 0 {
			return key{}, false
		}
		w[i/12] = w[i/12]<<5 | uint64(d)
	}
	return key{w[0], w[1], w[2]}, true
}

// String returns the 32-character hash part k was packed from.
func (k key) String() string {
	var s [32]byte
	w := [3]uint64{k.a, k.b, k.c}
	for i := 31; i >= 0; i-- {
		s[i] = nix32Chars[w[i/12]&31]
		w[i/12] >>= 5
	}
	return string(s[:])
}

func (k key) hash() uint64 {
	h := k.a ^ bits.RotateLeft64(k.b, 23) ^ bits.RotateLeft64(k.c, 41)
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	return h ^ h>>33
}

// Node flags.
const (
	fPresent   uint8 = 1 << iota // <hash>.narinfo exists
	fData                        // ident, urlHash, deriver and refs describe a version of the narinfo
	fMalformed                   // the narinfo does not parse or validate: kept, with its URL's file
	fKept                        // reached from a root
	fDrvKept                     // named as Deriver by a kept narinfo: log/<drv> stays
	fLs                          // <hash>.ls exists
	fRoot                        // kept whatever the markers say (malformed, young, landed during the prune)
	fDeleted                     // the narinfo was deleted by this prune
)

// graph is the store paths a prune knows of, one node per hash part, as
// parallel slices indexed by node: a million paths cost a few slices, not
// a million objects. Nodes are paths that have a narinfo, and paths only
// named by a reference, a deriver or a marker.
type graph struct {
	keys    []key
	flags   []uint8
	ident   []uint64 // fingerprint of the narinfo's stat (see identOf) when fData
	ino     []uint64 // inode of the narinfo seen by this prune, 0 if unknown
	urlHash []uint64 // hashURL of the narinfo's URL, 0 if none
	deriver []uint32 // node+1 of the Deriver, 0 if none
	refOff  []uint32 // the references are refs[refOff:refOff+refLen]
	refLen  []uint32
	refs    []uint32

	table []uint32 // open addressing over keys: node+1, 0 when empty
}

func newGraph(sizeHint int) *graph {
	g := &graph{}
	n := 1 << 10
	for n < 2*sizeHint {
		n <<= 1
	}
	g.table = make([]uint32, n)
	g.keys = make([]key, 0, sizeHint)
	g.flags = make([]uint8, 0, sizeHint)
	g.ident = make([]uint64, 0, sizeHint)
	g.ino = make([]uint64, 0, sizeHint)
	g.urlHash = make([]uint64, 0, sizeHint)
	g.deriver = make([]uint32, 0, sizeHint)
	g.refOff = make([]uint32, 0, sizeHint)
	g.refLen = make([]uint32, 0, sizeHint)
	return g
}

func (g *graph) len() int { return len(g.keys) }

// lookup returns the node of k.
func (g *graph) lookup(k key) (uint32, bool) {
	mask := uint64(len(g.table) - 1)
	for i := k.hash() & mask; ; i = (i + 1) & mask {
		v := g.table[i]
		if v == 0 {
			return 0, false
		}
		if g.keys[v-1] == k {
			return v - 1, true
		}
	}
}

// intern returns the node of k, adding it if it is new.
func (g *graph) intern(k key) uint32 {
	mask := uint64(len(g.table) - 1)
	i := k.hash() & mask
	for ; ; i = (i + 1) & mask {
		v := g.table[i]
		if v == 0 {
			break
		}
		if g.keys[v-1] == k {
			return v - 1
		}
	}
	n := uint32(len(g.keys))
	if len(g.keys) == cap(g.keys) {
		g.reserve(max(1024, 2*len(g.keys)))
	}
	g.keys = append(g.keys, k)
	g.flags = append(g.flags, 0)
	g.ident = append(g.ident, 0)
	g.ino = append(g.ino, 0)
	g.urlHash = append(g.urlHash, 0)
	g.deriver = append(g.deriver, 0)
	g.refOff = append(g.refOff, 0)
	g.refLen = append(g.refLen, 0)
	g.table[i] = n + 1
	if 2*len(g.keys) > len(g.table) {
		g.grow()
	}
	return n
}

// reserve makes room for n nodes, so that the columns grow by doubling
// rather than by append's small steps, each of which copies them all.
func (g *graph) reserve(n int) {
	if n <= cap(g.keys) {
		return
	}
	g.keys = slices.Grow(g.keys, n-len(g.keys))
	g.flags = slices.Grow(g.flags, n-len(g.flags))
	g.ident = slices.Grow(g.ident, n-len(g.ident))
	g.ino = slices.Grow(g.ino, n-len(g.ino))
	g.urlHash = slices.Grow(g.urlHash, n-len(g.urlHash))
	g.deriver = slices.Grow(g.deriver, n-len(g.deriver))
	g.refOff = slices.Grow(g.refOff, n-len(g.refOff))
	g.refLen = slices.Grow(g.refLen, n-len(g.refLen))
}

func (g *graph) grow() {
	g.table = make([]uint32, 2*len(g.table))
	mask := uint64(len(g.table) - 1)
	for n, k := range g.keys {
		i := k.hash() & mask
		for g.table[i] != 0 {
			i = (i + 1) & mask
		}
		g.table[i] = uint32(n) + 1
	}
}

// nodeRefs returns the references of node n.
func (g *graph) nodeRefs(n uint32) []uint32 {
	return g.refs[g.refOff[n] : g.refOff[n]+g.refLen[n]]
}

// setData records a parsed narinfo of node n. A re-parsed node leaves its
// old references unused in refs; that is rare enough not to compact.
func (g *graph) setData(n uint32, ident, urlHash uint64, deriver uint32, refs []uint32, malformed bool) {
	g.ident[n] = ident
	g.urlHash[n] = urlHash
	g.deriver[n] = deriver
	g.refOff[n] = uint32(len(g.refs))
	g.refLen[n] = uint32(len(refs))
	if len(g.refs)+len(refs) > cap(g.refs) {
		g.refs = slices.Grow(g.refs, max(len(refs), len(g.refs), 4096))
	}
	g.refs = append(g.refs, refs...)
	g.flags[n] |= fData
	if malformed {
		g.flags[n] |= fMalformed
	} else {
		g.flags[n] &^= fMalformed
	}
}

// has reports whether node n has all the flags f.
func (g *graph) has(n uint32, f uint8) bool { return g.flags[n]&f == f }

// usable reports whether node n is a narinfo present on disk whose data
// this prune has checked.
func (g *graph) usable(n uint32) bool { return g.has(n, fPresent|fData) }

// garbage reports whether node n is a narinfo present on disk that the
// closure did not keep.
func (g *graph) garbage(n uint32) bool { return g.flags[n]&(fPresent|fKept) == fPresent }

// keep marks the closure of the nodes in stack as kept, through the
// references and derivers of usable nodes, and marks derivers named by
// kept narinfos. It returns how many nodes it newly marked.
func (g *graph) keep(stack []uint32) int {
	marked := 0
	for _, n := range stack {
		if g.flags[n]&fKept != 0 {
			continue
		}
		g.flags[n] |= fKept
		marked++
	}
	// todo holds nodes marked kept whose edges are still to follow.
	todo := append([]uint32(nil), stack...)
	for len(todo) > 0 {
		n := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if !g.usable(n) {
			continue
		}
		for _, r := range g.nodeRefs(n) {
			if g.flags[r]&fKept == 0 {
				g.flags[r] |= fKept
				marked++
				todo = append(todo, r)
			}
		}
		if d := g.deriver[n]; d != 0 {
			d--
			g.flags[d] |= fDrvKept
			if g.flags[d]&fKept == 0 {
				g.flags[d] |= fKept
				marked++
				todo = append(todo, d)
			}
		}
	}
	return marked
}

// hashURL hashes a narinfo URL or a nar/ file's relative name ("nar/...")
// with 64-bit FNV-1a; never 0, which means "no URL". A collision can only
// keep a garbage file, never delete a kept one.
func hashURL[S ~string | ~[]byte](s S) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	if h == 0 {
		h = 1
	}
	return h
}

// u64set is an open-addressing set of non-zero uint64 values.
type u64set struct {
	slots []uint64
	n     int
}

func newU64Set(hint int) *u64set {
	n := 1 << 10
	for n < 2*hint {
		n <<= 1
	}
	return &u64set{slots: make([]uint64, n)}
}

func mix64(v uint64) uint64 {
	v ^= v >> 33
	v *= 0xff51afd7ed558ccd
	v ^= v >> 33
	return v
}

func (s *u64set) add(v uint64) {
	if v == 0 {
		return
	}
	mask := uint64(len(s.slots) - 1)
	for i := mix64(v) & mask; ; i = (i + 1) & mask {
		switch s.slots[i] {
		case v:
			return
		case 0:
			s.slots[i] = v
			s.n++
			if 2*s.n > len(s.slots) {
				old := s.slots
				s.slots = make([]uint64, 2*len(old))
				s.n = 0
				for _, o := range old {
					if o != 0 {
						s.add(o)
					}
				}
			}
			return
		}
	}
}

func (s *u64set) has(v uint64) bool {
	mask := uint64(len(s.slots) - 1)
	for i := mix64(v) & mask; ; i = (i + 1) & mask {
		switch s.slots[i] {
		case v:
			return true
		case 0:
			return false
		}
	}
}

// identOf fingerprints a file's stat: device, inode, size, modification
// and change times. Any rewrite or replacement changes it.
func identOf(dev, ino, size, mtime, ctime uint64) uint64 {
	h := uint64(0x9e3779b97f4a7c15)
	for _, v := range [...]uint64{dev, ino, size, mtime, ctime} {
		h ^= mix64(v + 0x9e3779b97f4a7c15)
		h = bits.RotateLeft64(h, 27)*0x94d049bb133111eb + 1
	}
	if h == 0 {
		h = 1
	}
	return h
}

// garbageOrder is the order in which garbage narinfos may go, referrers
// first: a narinfo goes once no garbage narinfo still there refers to it
// (by References or Deriver, itself aside), so that a prune stopped at any
// point never leaves a narinfo whose references are gone.
type garbageOrder struct {
	g       *graph
	garbage []bool
	indeg   []int32 // garbage referrers still there, by node
}

func (g *graph) garbageOrder() *garbageOrder {
	garbage := make([]bool, g.len())
	for n := uint32(0); n < uint32(g.len()); n++ {
		garbage[n] = g.garbage(n)
	}
	return g.orderOf(garbage)
}

// orderOf is the garbage order of the nodes marked in set rather than of
// the garbage: a forget deletes them in it.
func (g *graph) orderOf(set []bool) *garbageOrder {
	o := &garbageOrder{g: g, garbage: set, indeg: make([]int32, g.len())}
	for n := uint32(0); n < uint32(g.len()); n++ {
		if o.garbage[n] {
			o.edges(n, func(m uint32) { o.indeg[m]++ })
		}
	}
	return o
}

// edges calls fn for each garbage node that n refers to.
func (o *garbageOrder) edges(n uint32, fn func(m uint32)) {
	g := o.g
	if !g.has(n, fData) {
		return
	}
	for _, r := range g.nodeRefs(n) {
		if r != n && o.garbage[r] {
			fn(r)
		}
	}
	if d := g.deriver[n]; d != 0 && d-1 != n && o.garbage[d-1] {
		fn(d - 1)
	}
}

// first returns the garbage nodes that no garbage node refers to.
func (o *garbageOrder) first() []uint32 {
	var out []uint32
	for n, garbage := range o.garbage {
		if garbage && o.indeg[n] == 0 {
			out = append(out, uint32(n))
		}
	}
	return out
}

// gone records that n's narinfo went, and calls ready for each node it
// referred to that no garbage narinfo refers to any more. It is safe for
// concurrent use.
func (o *garbageOrder) gone(n uint32, ready func(m uint32)) {
	o.edges(n, func(m uint32) {
		if atomic.AddInt32(&o.indeg[m], -1) == 0 {
			ready(m)
		}
	})
}
