package serve

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"hash/crc64"
	"io"
	"math"
	"net/http"
	"sync"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"
)

// Decoding a Content-Encoding takes memory for the decoder's window: the
// decoded bytes a compressed stream may refer back to, a size its header
// declares in a few bytes (700 MB of zeros compressed with
// `zstd --long=29` is 25 KB and asks for a 512 MiB window). An upload is
// charged its window before its decoder allocates it, and gets 413 when
// the window is over maxDecodeWindow, or when the uploads being decoded
// hold all of decodeMemory for too long (see decoding).
const (
	// maxDecodeWindow is the largest window an upload may ask for. Nix
	// compresses with libzstd at its default level and without long mode:
	// a 2 MiB window (8 MiB at level 19; 128 MiB at libzstd's strongest,
	// --ultra -22, and for --long without a size); with xz -6, an 8 MiB
	// dictionary (64 MiB at -9); with brotli, at most 16 MiB by format.
	// 128 MiB takes all of that, and refuses what only zstd --long=28 and
	// above or a hand-made header asks for.
	maxDecodeWindow = 128 << 20
	// decoderOverhead is what a decoder takes besides its window: zstd's
	// block buffers, xz's probability tables, gzip's Huffman tables (0.05
	// to 0.4 MiB, measured). Brotli's Huffman tables and context maps take
	// up to about 3 MiB more (256 trees of each kind).
	decoderOverhead = 1 << 20
	brotliTables    = 3 << 20
	// decodeMemory bounds the memory of all uploads being decoded at
	// once: four at the largest window, well over a hundred at Nix's
	// defaults.
	decodeMemory = 4 * (maxDecodeWindow + decoderOverhead)
)

// decoding is the decoding memory that all uploads share: one budget for
// the process, whose memory it is. An upload waits up to 10 s for its
// share before it gets 413: long enough for a burst of parallel uploads
// (Nix 2.11+ sends one per core, Lix more) to pass, too short to queue for
// long behind uploads that hold memory and do not move. A plain 4xx, as
// Nix 2.8 stalls on a 5xx.
var decoding = newMemBudget(decodeMemory, 10*time.Second)

// decodedBody is a request body being decoded.
type decodedBody struct {
	io.Reader
	close func() // frees the decoder, when it must be
	// overBound returns the 413 a decoding error deserves when it says
	// the body needs more memory than it was given, else nil.
	overBound func(error) error
}

// newDecoder returns raw decoded per enc, once mem holds the memory that
// takes.
func newDecoder(enc string, raw io.Reader, mem *decodeCharge) (*decodedBody, error) {
	switch enc {
	case "gzip", "x-gzip":
		if err := mem.need(32<<10 + decoderOverhead); err != nil {
			return nil, err
		}
		zr, err := gzip.NewReader(raw)
		if err != nil {
			return nil, refusef(http.StatusBadRequest, "body is not gzip: %v", err)
		}
		return &decodedBody{Reader: zr, close: func() { zr.Close() }}, nil
	case "zstd":
		return newZstdDecoder(raw, mem)
	case "xz":
		if err := mem.need(decoderOverhead); err != nil {
			return nil, err
		}
		return &decodedBody{Reader: &xzReader{in: bufio.NewReader(raw), mem: mem}}, nil
	case "br":
		in := bufio.NewReader(raw)
		first, _ := in.Peek(1)
		if err := mem.need(brotliWindow(first) + brotliTables + decoderOverhead); err != nil {
			return nil, err
		}
		return &decodedBody{Reader: brotli.NewReader(in)}, nil
	case "bzip2", "x-bzip2":
		// Blocks of at most 900 kB, and tables a few times that.
		if err := mem.need(bzip2Memory + decoderOverhead); err != nil {
			return nil, err
		}
		return &decodedBody{Reader: bzip2.NewReader(raw)}, nil
	case "lzma":
		return newLZMADecoder(raw, mem)
	case "lz4":
		// An lz4 frame's blocks are at most 4 MiB; the reader holds one
		// compressed and one decoded, and the 64 KiB it may refer back to.
		if err := mem.need(lz4Memory + decoderOverhead); err != nil {
			return nil, err
		}
		return &decodedBody{Reader: lz4.NewReader(raw)}, nil
	}
	return nil, refusef(http.StatusUnsupportedMediaType, "Content-Encoding %q not supported: send none, gzip, zstd, xz, br, bzip2, lzma or lz4", enc)
}

// What a bzip2 and an lz4 decoder take at most, besides decoderOverhead.
const (
	bzip2Memory = 8 << 20
	lz4Memory   = 9 << 20
)

// newLZMADecoder returns the decoder of a body in the .lzma format (LZMA
// "alone", as xz --format=lzma and Nix's lzma compression write it): its
// 13-byte header declares the dictionary, which must be under
// maxDecodeWindow and is charged before the decoder allocates it.
func newLZMADecoder(raw io.Reader, mem *decodeCharge) (*decodedBody, error) {
	in := bufio.NewReader(raw)
	h, err := in.Peek(lzma.HeaderLen)
	if err != nil {
		return nil, refusef(http.StatusBadRequest, "body is not lzma: %v", xzTruncated(err))
	}
	dict := int64(binary.LittleEndian.Uint32(h[1:5]))
	if dict > maxDecodeWindow {
		return nil, refusef(http.StatusRequestEntityTooLarge, "lzma dictionary of %d bytes is over the limit of %d", dict, int64(maxDecodeWindow))
	}
	if err := mem.need(dict + decoderOverhead); err != nil {
		return nil, err
	}
	zr, err := lzma.NewReader(in)
	if err != nil {
		return nil, refusef(http.StatusBadRequest, "body is not lzma: %v", err)
	}
	return &decodedBody{Reader: zr}, nil
}

// newZstdDecoder returns a zstd body's decoder, which reads the body
// through zstdFrames.
func newZstdDecoder(raw io.Reader, mem *decodeCharge) (*decodedBody, error) {
	frames := &zstdFrames{r: raw, mem: mem, want: 4}
	zr, err := zstd.NewReader(frames, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(maxDecodeWindow))
	if frames.err != nil {
		return nil, frames.err
	}
	if err != nil {
		return nil, refusef(http.StatusBadRequest, "body is not zstd: %v", err)
	}
	return &decodedBody{Reader: zr, close: zr.Close, overBound: func(err error) error {
		if frames.err != nil {
			return frames.err
		}
		if errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded) {
			return refusef(http.StatusRequestEntityTooLarge, "a zstd frame needs a window over the limit of %d MiB", maxDecodeWindow>>20)
		}
		return nil
	}}, nil
}

// zstdFrames passes a zstd body on to the decoder, reading the headers of
// its frames and blocks on the way: it charges the upload each frame's
// window before the decoder sees the frame, and refuses a window over
// maxDecodeWindow. The decoder reads frames and blocks by the sizes their
// headers give, as this does, so the two see the same headers.
type zstdFrames struct {
	r   io.Reader
	mem *decodeCharge
	err error // once set, what every Read returns

	at       int    // what hdr is: zstdMagic, ...
	hdr      []byte // the header being read
	want     int    // its length
	skip     int64  // bytes of data to pass before the next header
	checksum bool   // whether the current frame ends with a checksum
}

// What zstdFrames reads next.
const (
	zstdMagic       = iota // a frame's magic number
	zstdSkipSize           // a skippable frame's size
	zstdDescriptor         // a frame header's first byte
	zstdFrameHeader        // the rest of a frame header
	zstdBlockHeader
)

func (z *zstdFrames) Read(p []byte) (int, error) {
	if z.err != nil {
		return 0, z.err
	}
	n, err := z.r.Read(p)
	for b := p[:n]; len(b) > 0 && z.err == nil; {
		if z.skip > 0 {
			k := int(min(z.skip, int64(len(b))))
			z.skip -= int64(k)
			b = b[k:]
			continue
		}
		k := min(z.want-len(z.hdr), len(b))
		z.hdr = append(z.hdr, b[:k]...)
		b = b[k:]
		if len(z.hdr) == z.want {
			z.err = z.header()
		}
	}
	if z.err != nil {
		return 0, z.err
	}
	return n, err
}

// header reads the header just read, and says what comes next.
func (z *zstdFrames) header() error {
	h := z.hdr
	z.hdr = z.hdr[:0]
	switch z.at {
	case zstdMagic:
		switch {
		case string(h) == "\x28\xb5\x2f\xfd":
			z.at, z.want = zstdDescriptor, 1
		case h[0]&0xf0 == 0x50 && string(h[1:]) == "\x2a\x4d\x18":
			z.at, z.want = zstdSkipSize, 4
		default:
			return refusef(http.StatusBadRequest, "body is not zstd: no frame magic number")
		}
	case zstdSkipSize:
		z.skip = int64(binary.LittleEndian.Uint32(h))
		z.at, z.want = zstdMagic, 4
	case zstdDescriptor:
		// The descriptor, a window descriptor unless the frame is a
		// single segment, a dictionary ID and the content size.
		d := h[0]
		z.checksum = d&4 != 0
		z.want = 1 + []int{0, 1, 2, 4}[d&3] + zstdContentSizeLen(d)
		if d&0x20 == 0 {
			z.want++
		}
		z.hdr = append(z.hdr, d)
		z.at = zstdFrameHeader
	case zstdFrameHeader:
		if err := z.chargeWindow(h); err != nil {
			return err
		}
		z.at, z.want = zstdBlockHeader, 3
	case zstdBlockHeader:
		v := uint32(h[0]) | uint32(h[1])<<8 | uint32(h[2])<<16
		switch v >> 1 & 3 {
		case 0, 2: // raw, compressed
			z.skip = int64(v >> 3)
		case 1: // RLE: one byte
			z.skip = 1
		default:
			return refusef(http.StatusBadRequest, "body is not zstd: reserved block type")
		}
		if v&1 != 0 { // the frame's last block
			if z.checksum {
				z.skip += 4
			}
			z.at, z.want = zstdMagic, 4
		}
	}
	return nil
}

// chargeWindow charges the upload the window of the frame whose header,
// from its descriptor byte on, is h.
func (z *zstdFrames) chargeWindow(h []byte) error {
	d := h[0]
	var window uint64
	if d&0x20 == 0 {
		// Window descriptor: exponent and eighths of a power of two.
		w := h[1]
		base := uint64(1) << (10 + w>>3)
		window = base + base/8*uint64(w&7)
	} else {
		// Single segment: the window is the content size.
		fcs := h[len(h)-zstdContentSizeLen(d):]
		var b [8]byte
		copy(b[:], fcs)
		window = binary.LittleEndian.Uint64(b[:])
		if len(fcs) == 2 {
			window += 256
		}
	}
	if window > maxDecodeWindow {
		return refusef(http.StatusRequestEntityTooLarge, "zstd frame needs a window of %d bytes, over the limit of %d MiB", window, maxDecodeWindow>>20)
	}
	return z.mem.need(int64(max(window, zstd.MinWindowSize)) + decoderOverhead)
}

// zstdContentSizeLen returns the length of the content size in the
// header of a frame whose descriptor is d.
func zstdContentSizeLen(d byte) int {
	if d>>6 == 0 && d&0x20 != 0 {
		return 1
	}
	return []int{0, 2, 4, 8}[d>>6]
}

// brotliWindow returns the ring buffer a brotli stream that begins with
// first needs: 2^WBITS bytes, WBITS read from its first 1 to 7 bits (RFC
// 7932, section 9.1), so at most 16 MiB. It is 0 for the large-window
// extension, which the decoder refuses, and for an empty body.
func brotliWindow(first []byte) int64 {
	if len(first) == 0 {
		return 0
	}
	b := first[0]
	var wbits uint
	switch {
	case b&1 == 0:
		wbits = 16
	case b>>1&7 != 0:
		wbits = 17 + uint(b>>1&7)
	case b>>4&7 == 1:
		return 0
	case b>>4&7 != 0:
		wbits = 8 + uint(b>>4&7)
	default:
		wbits = 17
	}
	return 1 << wbits
}

// memBudget is an amount of memory that holders take and give back.
type memBudget struct {
	size int64
	mu   sync.Mutex
	used int64
	wait time.Duration // how long a taker waits for memory to be freed
	// waiting counts the takers waiting.
	waiting int
	// freed is closed, and replaced, when memory is given back.
	freed chan struct{}
}

func newMemBudget(size int64, wait time.Duration) *memBudget {
	return &memBudget{size: size, wait: wait, freed: make(chan struct{})}
}

// take takes n bytes, waiting for them to be freed up to b.wait, or until
// ctx ends. It reports whether it took them.
func (b *memBudget) take(ctx context.Context, n int64) bool {
	var timeout <-chan time.Time
	for {
		b.mu.Lock()
		if b.used+n <= b.size {
			b.used += n
			b.mu.Unlock()
			return true
		}
		if n > b.size {
			b.mu.Unlock()
			return false
		}
		freed, wait := b.freed, b.wait
		b.waiting++
		b.mu.Unlock()
		if timeout == nil {
			t := time.NewTimer(wait)
			defer t.Stop()
			timeout = t.C
		}
		var ok bool
		select {
		case <-freed:
			ok = true
		case <-timeout:
		case <-ctx.Done():
		}
		b.mu.Lock()
		b.waiting--
		b.mu.Unlock()
		if !ok {
			return false
		}
	}
}

func (b *memBudget) give(n int64) {
	b.mu.Lock()
	b.used -= n
	close(b.freed)
	b.freed = make(chan struct{})
	b.mu.Unlock()
}

// state returns the memory taken and the number of takers waiting.
func (b *memBudget) state() (used int64, waiting int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used, b.waiting
}

// decodeCharge is the decoding memory one upload holds.
type decodeCharge struct {
	ctx    context.Context
	budget *memBudget // decoding, when nil
	held   int64
}

// need makes the upload hold at least n bytes of decoding memory.
func (m *decodeCharge) need(n int64) error {
	if n <= m.held {
		return nil
	}
	if m.budget == nil {
		m.budget = decoding
	}
	if !m.budget.take(m.ctx, n-m.held) {
		return refusef(http.StatusRequestEntityTooLarge, "the uploads being decoded hold all %d MiB of decoding memory and this one needs %d MiB more: retry later, or upload without Content-Encoding", m.budget.size>>20, (n-m.held+1<<20-1)>>20)
	}
	m.held = n
	return nil
}

// release gives the memory back.
func (m *decodeCharge) release() {
	if m != nil && m.held > 0 {
		m.budget.give(m.held)
		m.held = 0
	}
}

// xzReader decodes an xz body (the .xz format, version 1.0.4) with
// ulikunitz/xz's LZMA2 decoder, but reads the container itself: that
// package's xz reader allocates whatever dictionary a block header asks
// for, up to 4 GiB (its DictCap is only a least size). Here every block's
// dictionary is held to maxDecodeWindow and charged to the upload before
// it is allocated. (Reading headers on the way, as zstdFrames does, would
// not do: that reader does not check that an LZMA chunk uses all the bytes
// its header gives, so a body can make it read a block header where the
// headers say data.) As xz does, it checks the CRCs of headers, index and
// footer, each block's check and sizes, and that the index lists the
// blocks; it takes any number of concatenated streams and padding.
type xzReader struct {
	in  *bufio.Reader
	mem *decodeCharge
	err error // once set, what every Read returns

	streams  int       // streams begun
	flags    [2]byte   // the current stream's flags
	inStream bool      // past a stream's header, before its index
	check    hash.Hash // of the current block's data; nil for no check
	blocks   int64     // blocks of the current stream
	records  hash.Hash // of the blocks' index records, to compare with the index

	block     io.Reader   // the current block's LZMA2 decoder, nil between blocks
	packed    countReader // what it reads
	headerLen int64       // the current block's header size,
	csize     int64       // compressed size (-1 when the header has none),
	usize     int64       // uncompressed size (idem)
	decoded   int64       // and the bytes decoded from it so far
}

// countReader counts the bytes read through it.
type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (x *xzReader) Read(p []byte) (int, error) {
	for x.err == nil {
		if x.block == nil {
			x.err = x.next()
			continue
		}
		n, err := x.block.Read(p)
		x.decoded += int64(n)
		if x.check != nil {
			x.check.Write(p[:n])
		}
		if errors.Is(err, io.EOF) {
			err = x.endBlock()
		} else if err != nil {
			err = fmt.Errorf("xz: %w", err)
		}
		x.err = err
		if n > 0 || err != nil {
			return n, err
		}
	}
	return 0, x.err
}

// next reads up to the next block's data, and returns io.EOF after the
// last stream.
func (x *xzReader) next() error {
	if !x.inStream {
		return x.startStream()
	}
	b, err := x.in.ReadByte()
	if err != nil {
		return xzTruncated(err)
	}
	if b == 0 {
		return x.endStream()
	}
	return x.startBlock(b)
}

func xzTruncated(err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("xz: %w", err)
}

func (x *xzReader) startStream() error {
	if x.streams > 0 {
		// Stream padding: groups of four zero bytes.
		for {
			pad, err := x.in.Peek(4)
			if len(pad) == 0 && errors.Is(err, io.EOF) {
				return io.EOF
			}
			if len(pad) > 0 && pad[0] != 0 {
				break
			}
			if string(pad) != "\x00\x00\x00\x00" {
				return errors.New("xz: stream padding is not groups of four zero bytes")
			}
			x.in.Discard(4)
		}
	}
	var h [12]byte
	if _, err := io.ReadFull(x.in, h[:]); err != nil {
		return xzTruncated(err)
	}
	if string(h[:6]) != "\xfd7zXZ\x00" {
		return errors.New("xz: not an xz stream")
	}
	if crc32.ChecksumIEEE(h[6:8]) != binary.LittleEndian.Uint32(h[8:]) {
		return errors.New("xz: stream header CRC does not match")
	}
	switch {
	case h[6] != 0:
		return errors.New("xz: unsupported stream flags")
	case h[7] == 0x00:
		x.check = nil
	case h[7] == 0x01:
		x.check = crc32.NewIEEE()
	case h[7] == 0x04:
		x.check = crc64.New(crc64.MakeTable(crc64.ECMA))
	case h[7] == 0x0a:
		x.check = sha256.New()
	default:
		return fmt.Errorf("xz: unsupported check type %#x", h[7])
	}
	copy(x.flags[:], h[6:8])
	x.streams++
	x.inStream = true
	x.blocks = 0
	x.records = sha256.New()
	return nil
}

// startBlock reads a block header, whose first byte is b, and starts
// decoding the block once its dictionary is bounded and charged.
func (x *xzReader) startBlock(b byte) error {
	h := make([]byte, (int(b)+1)*4)
	h[0] = b
	if _, err := io.ReadFull(x.in, h[1:]); err != nil {
		return xzTruncated(err)
	}
	end := len(h) - 4
	if crc32.ChecksumIEEE(h[:end]) != binary.LittleEndian.Uint32(h[end:]) {
		return errors.New("xz: block header CRC does not match")
	}
	flags := h[1]
	if flags&0x3c != 0 {
		return errors.New("xz: unsupported block flags")
	}
	r := bytes.NewReader(h[2:end])
	x.csize, x.usize = -1, -1
	for _, f := range []struct {
		bit  byte
		size *int64
	}{{0x40, &x.csize}, {0x80, &x.usize}} {
		if flags&f.bit != 0 {
			v, err := binary.ReadUvarint(r)
			if err != nil || v > math.MaxInt64 {
				return errors.New("xz: bad size in block header")
			}
			*f.size = int64(v)
		}
	}
	// One filter, LZMA2 (0x21), with one byte of properties: what xz and
	// liblzma write, and all the decoder knows.
	id, err1 := binary.ReadUvarint(r)
	nprops, err2 := binary.ReadUvarint(r)
	d, err3 := r.ReadByte()
	if flags&3 != 0 || err1 != nil || err2 != nil || err3 != nil || id != 0x21 || nprops != 1 {
		return errors.New("xz: unsupported filters (only LZMA2 alone)")
	}
	for r.Len() > 0 {
		if c, _ := r.ReadByte(); c != 0 {
			return errors.New("xz: block header padding is not zero")
		}
	}
	if d > 40 {
		return errors.New("xz: bad LZMA2 dictionary size")
	}
	dict := int64(math.MaxUint32)
	if d < 40 {
		dict = int64(2|d&1) << (d/2 + 11)
	}
	if dict > maxDecodeWindow {
		return refusef(http.StatusRequestEntityTooLarge, "xz block needs a dictionary of %d bytes, over the limit of %d MiB", dict, maxDecodeWindow>>20)
	}
	dict = max(dict, lzma.MinDictCap)
	if err := x.mem.need(dict + decoderOverhead); err != nil {
		return err
	}
	x.packed = countReader{r: x.in}
	lr, err := lzma.Reader2Config{DictCap: int(dict)}.NewReader2(&x.packed)
	if err != nil {
		return fmt.Errorf("xz: %w", err)
	}
	x.block = lr
	x.headerLen = int64(len(h))
	x.decoded = 0
	if x.check != nil {
		x.check.Reset()
	}
	return nil
}

// endBlock checks a block whose data ended, and reads its padding and check.
func (x *xzReader) endBlock() error {
	x.block = nil
	if x.csize >= 0 && x.packed.n != x.csize || x.usize >= 0 && x.decoded != x.usize {
		return errors.New("xz: block sizes are not those in its header")
	}
	pad := (4 - (x.headerLen+x.packed.n)%4) % 4
	var sum []byte
	switch c := x.check.(type) {
	case nil:
	case hash.Hash32:
		sum = binary.LittleEndian.AppendUint32(nil, c.Sum32())
	case hash.Hash64:
		sum = binary.LittleEndian.AppendUint64(nil, c.Sum64())
	default:
		sum = c.Sum(nil)
	}
	tail := make([]byte, pad+int64(len(sum)))
	if _, err := io.ReadFull(x.in, tail); err != nil {
		return xzTruncated(err)
	}
	if !bytes.Equal(tail[:pad], make([]byte, pad)) {
		return errors.New("xz: block padding is not zero")
	}
	if !bytes.Equal(tail[pad:], sum) {
		return errors.New("xz: block check does not match its data")
	}
	unpadded := x.headerLen + x.packed.n + int64(len(sum))
	x.records.Write(binary.AppendUvarint(binary.AppendUvarint(nil, uint64(unpadded)), uint64(x.decoded)))
	x.blocks++
	return nil
}

// endStream reads the index, whose indicator byte was read, and the
// stream footer.
func (x *xzReader) endStream() error {
	crc := crc32.NewIEEE()
	crc.Write([]byte{0})
	in := &crcByteReader{r: x.in, crc: crc, n: 1}
	count, err := binary.ReadUvarint(in)
	if err != nil {
		return xzTruncated(err)
	}
	if count != uint64(x.blocks) {
		return fmt.Errorf("xz: index lists %d blocks, the stream has %d", count, x.blocks)
	}
	records := sha256.New()
	for i := uint64(0); i < 2*count; i++ {
		v, err := binary.ReadUvarint(in)
		if err != nil {
			return xzTruncated(err)
		}
		records.Write(binary.AppendUvarint(nil, v))
	}
	if !bytes.Equal(records.Sum(nil), x.records.Sum(nil)) {
		return errors.New("xz: index does not match the blocks")
	}
	for in.n%4 != 0 {
		if c, err := in.ReadByte(); err != nil || c != 0 {
			return errors.New("xz: bad index padding")
		}
	}
	var tail [16]byte // index CRC32, then the stream footer
	if _, err := io.ReadFull(x.in, tail[:]); err != nil {
		return xzTruncated(err)
	}
	footer := tail[4:]
	switch {
	case binary.LittleEndian.Uint32(tail[:4]) != crc.Sum32():
		return errors.New("xz: index CRC does not match")
	case binary.LittleEndian.Uint32(footer[:4]) != crc32.ChecksumIEEE(footer[4:10]):
		return errors.New("xz: stream footer CRC does not match")
	case (int64(binary.LittleEndian.Uint32(footer[4:8]))+1)*4 != in.n+4:
		return errors.New("xz: stream footer does not give the index size")
	case !bytes.Equal(footer[8:10], x.flags[:]) || string(footer[10:]) != "YZ":
		return errors.New("xz: bad stream footer")
	}
	x.inStream = false
	return nil
}

// crcByteReader reads bytes, adding them to a CRC and counting them.
type crcByteReader struct {
	r   io.ByteReader
	crc hash.Hash32
	n   int64
}

func (c *crcByteReader) ReadByte() (byte, error) {
	b, err := c.r.ReadByte()
	if err == nil {
		c.crc.Write([]byte{b})
		c.n++
	}
	return b, err
}
