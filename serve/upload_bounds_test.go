package serve

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// zstdRLE returns a zstd block of n copies of one zero byte.
func zstdRLE(n int, last bool) []byte {
	v := uint32(n)<<3 | 1<<1
	if last {
		v |= 1
	}
	return []byte{byte(v), byte(v >> 8), byte(v >> 16), 0}
}

// zstdFrame returns a zstd frame that asks for a window of
// 2^windowLog * (1 + eighths/8) bytes and holds 128 KiB of zeros: like
// `zstd --long` output, a window far larger than what the frame holds.
func zstdFrame(windowLog, eighths uint) []byte {
	f := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, byte((windowLog-10)<<3 | eighths)}
	return append(f, zstdRLE(128<<10, true)...)
}

// zstdSingleSegment returns a zstd frame that gives its content size,
// size, as its window, and then holds far less.
func zstdSingleSegment(size uint64) []byte {
	f := []byte{0x28, 0xb5, 0x2f, 0xfd, 0xe0}
	f = binary.LittleEndian.AppendUint64(f, size)
	return append(f, zstdRLE(128<<10, true)...)
}

func zstdEncode(t testing.TB, content []byte, opts ...zstd.EOption) []byte {
	var b bytes.Buffer
	zw, err := zstd.NewWriter(&b, opts...)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(content)
	zw.Close()
	return b.Bytes()
}

func xzEncode(t testing.TB, content []byte, cfg xz.WriterConfig) []byte {
	var b bytes.Buffer
	xw, err := cfg.NewWriter(&b)
	if err != nil {
		t.Fatal(err)
	}
	xw.Write(content)
	xw.Close()
	return b.Bytes()
}

// xzWithDict returns content as an xz stream whose block header asks for
// the LZMA2 dictionary of code d: (2 | d&1) << (d/2 + 11) bytes, 4 GiB - 1
// for 40. A decoder allocates it whole before the first byte of data.
func xzWithDict(t testing.TB, content []byte, d byte) []byte {
	s := xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16})
	hdr := s[12 : 12+(int(s[12])+1)*4]
	i := bytes.Index(hdr[2:], []byte{0x21, 0x01})
	if i < 0 {
		t.Fatal("no LZMA2 filter in the block header")
	}
	hdr[2+i+2] = d
	binary.LittleEndian.PutUint32(hdr[len(hdr)-4:], crc32.ChecksumIEEE(hdr[:len(hdr)-4]))
	return s
}

func brEncode(content []byte, quality, lgwin int) []byte {
	var b bytes.Buffer
	bw := brotli.NewWriterOptions(&b, brotli.WriterOptions{Quality: quality, LGWin: lgwin})
	bw.Write(content)
	bw.Close()
	return b.Bytes()
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// allocatedBy returns the bytes allocated on the heap while f ran.
func allocatedBy(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// noDecodingMemoryHeld fails the test when an upload still holds decoding
// memory after its answer.
func noDecodingMemoryHeld(t *testing.T) {
	t.Helper()
	if n := decodingInUse(); n != 0 {
		t.Errorf("%d bytes of decoding memory still held", n)
	}
}

func decodingInUse() int64 {
	n, _ := decoding.state()
	return n
}

// setDecodeWait sets how long uploads wait for decoding memory, until the
// test ends.
func setDecodeWait(t *testing.T, d time.Duration) {
	decoding.mu.Lock()
	old := decoding.wait
	decoding.wait = d
	decoding.mu.Unlock()
	t.Cleanup(func() {
		decoding.mu.Lock()
		decoding.wait = old
		decoding.mu.Unlock()
	})
}

func bufioReader(b []byte) *bufio.Reader { return bufio.NewReader(bytes.NewReader(b)) }

// put sends a PUT from any goroutine and returns its status.
func put(srv *testServer, path, enc string, body io.Reader) (int, error) {
	req, err := http.NewRequest("PUT", srv.URL+path, body)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Encoding", enc)
	resp, err := srv.Client().Do(req)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

func TestDecodingWindowsAreBounded(t *testing.T) {
	// The default upload limit, 8 GiB, as a real server has it.
	tc := newTestCache(t, func(c *Config) { c.MaxUploadSize = 0 })
	long29, err := os.ReadFile("testdata/oversized-windows/zeros-700MB-long29.zst")
	if err != nil {
		t.Fatal(err)
	}
	zeros := make([]byte, 128<<10)
	small := []byte("a small NAR")
	smallXZ := xzEncode(t, small, xz.WriterConfig{DictCap: 1 << 16})
	for _, tt := range []struct {
		name   string
		enc    string
		body   []byte
		stored []byte // what the body decodes to, when it is stored
		want   int
		say    string // in the refusal
	}{
		{name: "zstd --long=29: 700 MB of zeros in 24 KB ask for 512 MiB", enc: "zstd", body: long29, want: 413, say: "over the limit of 128 MiB"},
		{name: "zstd window just over the limit", enc: "zstd", body: zstdFrame(27, 1), stored: zeros, want: 413, say: "window of 150994944 bytes"},
		{name: "zstd single-segment frame claiming 1 GiB", enc: "zstd", body: zstdSingleSegment(1 << 30), want: 413, say: "window of 1073741824 bytes"},
		{name: "zstd window at the limit", enc: "zstd", body: zstdFrame(27, 0), stored: zeros, want: 201},
		{name: "zstd second frame over the limit", enc: "zstd", body: cat(zstdFrame(20, 0), zstdFrame(28, 0)), stored: cat(zeros, zeros), want: 413, say: "window of 268435456 bytes"},
		{name: "xz dictionary of 512 MiB", enc: "xz", body: xzWithDict(t, small, 34), stored: small, want: 413, say: "dictionary of 536870912 bytes"},
		{name: "xz dictionary of 4 GiB", enc: "xz", body: xzWithDict(t, small, 40), stored: small, want: 413, say: "over the limit of 128 MiB"},
		{name: "xz second stream asks for 1 GiB", enc: "xz", body: cat(smallXZ, xzWithDict(t, small, 36)), stored: cat(small, small), want: 413, say: "dictionary of 1073741824 bytes"},
		{name: "xz dictionary at the limit", enc: "xz", body: xzWithDict(t, small, 30), stored: small, want: 201},
	} {
		t.Run(tt.name, func(t *testing.T) {
			stored := tt.stored
			if stored == nil {
				stored = []byte("not what it decodes to")
			}
			url := narName(stored, "")
			var resp *http.Response
			var msg string
			alloc := allocatedBy(func() {
				resp, msg = do(t, tc.write, "PUT", "/"+url, tt.body, "Content-Encoding", tt.enc)
			})
			if resp.StatusCode != tt.want || !strings.Contains(msg, tt.say) {
				t.Fatalf("status %d %q, want %d saying %q", resp.StatusCode, strings.TrimSpace(msg), tt.want, tt.say)
			}
			tc.durable.barrier()
			if tt.want == 413 {
				// Refused before the decoder allocated its window.
				if alloc > 64<<20 {
					t.Errorf("the refused upload allocated %d MiB", alloc>>20)
				}
				if _, err := os.Stat(filepath.Join(tc.dir, url)); err == nil {
					t.Errorf("refused upload %s stored", url)
				}
			}
			noDecodingMemoryHeld(t)
			tc.checkNothingLeaked(t)
		})
	}
}

// stalledUpload is a PUT whose body stops after its first bytes, and that
// holds its decoding memory until it is let go.
type stalledUpload struct {
	w    *io.PipeWriter
	done chan int
}

func startStalledUpload(t *testing.T, srv *testServer, path, enc string, first []byte) *stalledUpload {
	t.Helper()
	pr, pw := io.Pipe()
	u := &stalledUpload{w: pw, done: make(chan int, 1)}
	go func() {
		status, _ := put(srv, path, enc, pr)
		u.done <- status
	}()
	if _, err := pw.Write(first); err != nil {
		t.Fatal(err)
	}
	return u
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("still waiting for %s", what)
		}
	}
}

func TestDecodingMemoryIsSharedByAllUploads(t *testing.T) {
	tc := newTestCache(t, func(c *Config) { c.UploadIdleTimeout = time.Minute })
	setDecodeWait(t, 100*time.Millisecond)

	// Uploads at the largest window that stall in their first block: each
	// holds its window, though its decoder has allocated nothing yet.
	// Four take all of decodeMemory.
	held := int64(maxDecodeWindow + decoderOverhead)
	frameHeader := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, (27 - 10) << 3}
	rawBlockOf100 := []byte{100 << 3 & 0xff, 100 << 3 >> 8, 0}
	stalled := cat(frameHeader, rawBlockOf100, make([]byte, 8))
	var uploads []*stalledUpload
	for i := int64(1); i*held <= decodeMemory; i++ {
		uploads = append(uploads, startStalledUpload(t, tc.write, "/"+narName([]byte{byte(i)}, ""), "zstd", stalled))
		waitFor(t, fmt.Sprintf("upload %d to hold its window", i), func() bool { return decodingInUse() == i*held })
	}
	if len(uploads) != 4 {
		t.Fatalf("%d uploads at the largest window fit, want 4", len(uploads))
	}

	content := []byte("a NAR that waits for memory")
	for _, enc := range []struct {
		name string
		body []byte
	}{
		{"gzip", gzipped(content)},
		{"zstd", zstdEncode(t, content)},
		{"xz", xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16})},
		{"br", brEncode(content, 5, 16)},
	} {
		resp, msg := do(t, tc.write, "PUT", "/"+narName(content, ""), enc.body, "Content-Encoding", enc.name)
		if resp.StatusCode != 413 || !strings.Contains(msg, "decoding memory") {
			t.Errorf("%s upload with all decoding memory held: %d %q, want 413", enc.name, resp.StatusCode, strings.TrimSpace(msg))
		}
	}
	if resp, msg := do(t, tc.write, "PUT", "/"+narName(content, ""), content); resp.StatusCode != 201 {
		t.Errorf("upload without Content-Encoding with all decoding memory held: %d %q", resp.StatusCode, msg)
	}

	// An upload that waits gets the memory the first one to end gives back.
	setDecodeWait(t, time.Minute)
	waiting := make(chan int, 1)
	body := zstdEncode(t, content)
	go func() {
		status, _ := put(tc.write, "/"+narName(content, ".zst"), "zstd", bytes.NewReader(body))
		waiting <- status
	}()
	waitFor(t, "an upload to wait for decoding memory", func() bool { _, w := decoding.state(); return w == 1 })
	uploads[0].w.CloseWithError(io.ErrUnexpectedEOF)
	if got := <-waiting; got != 201 {
		t.Errorf("upload that waited for decoding memory: %d, want 201", got)
	}
	for _, u := range uploads[1:] {
		u.w.CloseWithError(io.ErrUnexpectedEOF)
	}
	for _, u := range uploads {
		<-u.done
	}
	waitFor(t, "all decoding memory to be given back", func() bool { return decodingInUse() == 0 })
	tc.durable.barrier()
	tc.checkNothingLeaked(t)
}

// randomText is n bytes of words, compressible as NARs mostly are.
func randomText(rng *rand.Rand, n int) []byte {
	words := []string{"nix", "store", "lib", "bin", "share", "/", "-", "\n", "0.1.2", "x86_64-linux", "\x00\x01"}
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[rng.Intn(len(words))])
	}
	return b.Bytes()[:n]
}

func TestEncodedUploadsAreStored(t *testing.T) {
	tc := newTestCache(t, nil)
	rng := rand.New(rand.NewSource(7))
	content := append(randomText(rng, 300<<10), make([]byte, 50<<10)...)
	noise := make([]byte, 40<<10) // incompressible: xz stores it in uncompressed chunks
	rng.Read(noise)
	content = append(content, noise...)

	type upload struct {
		name    string
		enc     string
		body    []byte
		content []byte
	}
	uploads := []upload{
		{"as it is", "", content, content},
		{"identity", "identity", content, content},
		{"none, as Nix 2.32+ may send", "none", content, content},
		{"gzip", "gzip", gzipped(content), content},
		{"zstd", "zstd", zstdEncode(t, content), content},
		{"zstd, best level", "zstd", zstdEncode(t, content, zstd.WithEncoderLevel(zstd.SpeedBestCompression)), content},
		{"zstd, a small frame then a larger one", "zstd", cat(zstdEncode(t, content[:1000]), zstdEncode(t, content[1000:])), content},
		{"zstd, a skippable frame first", "zstd", cat([]byte{0x5e, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 'a', 'b', 'c'}, zstdEncode(t, content)), content},
		{"zstd, without checksum", "zstd", zstdEncode(t, content, zstd.WithEncoderCRC(false), zstd.WithWindowSize(1<<20)), content},
		{"xz", "xz", xzEncode(t, content, xz.WriterConfig{}), content},
		{"xz, many blocks, CRC32", "xz", xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16, BlockSize: 64 << 10, CheckSum: xz.CRC32}), content},
		{"xz, SHA-256", "xz", xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16, CheckSum: xz.SHA256}), content},
		{"xz, no check", "xz", xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16, NoCheckSum: true}), content},
		{"xz, two streams", "xz", cat(xzEncode(t, content[:1000], xz.WriterConfig{DictCap: 1 << 16}), make([]byte, 8), xzEncode(t, content[1000:], xz.WriterConfig{DictCap: 1 << 16})), content},
		{"xz, empty", "xz", xzEncode(t, nil, xz.WriterConfig{DictCap: 1 << 16}), nil},
		{"br, largest window", "br", brEncode(content, 9, 24), content},
		{"br, smallest window", "br", brEncode(content, 5, 10), content},
	}
	// What the C tools write, decoded by the libraries' own readers.
	files, _ := filepath.Glob("testdata/encoded-by-xz-and-zstd-cli/*.*")
	for _, f := range files {
		body, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var dec []byte
		switch filepath.Ext(f) {
		case ".xz":
			xr, err := xz.NewReader(bytes.NewReader(body))
			if err == nil {
				dec, err = io.ReadAll(xr)
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			uploads = append(uploads, upload{filepath.Base(f), "xz", body, dec})
		case ".zst":
			zr, _ := zstd.NewReader(nil)
			dec, err = zr.DecodeAll(body, nil)
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			uploads = append(uploads, upload{filepath.Base(f), "zstd", body, dec})
		}
	}
	if len(uploads) < 20 {
		t.Fatalf("only %d uploads; testdata missing?", len(uploads))
	}
	for _, u := range uploads {
		t.Run(u.name, func(t *testing.T) {
			url := narName(u.content, "")
			resp, msg := do(t, tc.write, "PUT", "/"+url, u.body, "Content-Encoding", u.enc)
			if resp.StatusCode != 201 {
				t.Fatalf("%d %q", resp.StatusCode, strings.TrimSpace(msg))
			}
			tc.durable.barrier()
			if got, _ := os.ReadFile(filepath.Join(tc.dir, url)); !bytes.Equal(got, u.content) {
				t.Errorf("stored %d bytes, want the %d decoded", len(got), len(u.content))
			}
			noDecodingMemoryHeld(t)
		})
	}

	// A narinfo may be at most 1 MiB and still come in a frame with a
	// larger window: libzstd streams with 2 MiB, 8 MiB at level 19.
	narURL := tc.upload(t, hashB, "dep")
	text := []byte(narInfo(hashA, "app", narURL, hashB+"-dep"))
	blockHeader := uint32(len(text))<<3 | 1 // raw, last
	body := cat([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, (23 - 10) << 3}, []byte{byte(blockHeader), byte(blockHeader >> 8), byte(blockHeader >> 16)}, text)
	if resp, msg := do(t, tc.write, "PUT", "/"+hashA+".narinfo", body, "Content-Encoding", "zstd"); resp.StatusCode != 201 {
		t.Errorf("narinfo in a frame with an 8 MiB window: %d %q", resp.StatusCode, strings.TrimSpace(msg))
	}
	noDecodingMemoryHeld(t)
}

// xzCorruption is a hostile or broken xz body, and what decoding it says.
type xzCorruption struct {
	name string
	body []byte
	say  string
}

func xzCorruptions(t testing.TB) []xzCorruption {
	content := randomText(rand.New(rand.NewSource(3)), 100<<10)
	good := xzEncode(t, content, xz.WriterConfig{DictCap: 1 << 16, BlockSize: 32 << 10})
	// The stream ends: last block's CRC64 check, index, 12-byte footer,
	// whose bytes 4-7 give the index size.
	index := len(good) - 12 - (int(binary.LittleEndian.Uint32(good[len(good)-8:]))+1)*4
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x40
		return b
	}
	return []xzCorruption{
		{"not xz", []byte("plain text, not xz"), "not an xz stream"},
		{"empty", nil, "unexpected EOF"},
		{"stream header CRC", flip(9), "stream header CRC"},
		{"block header", flip(14), "block header CRC"},
		{"data", flip(len(good) / 3), "xz: "},
		{"block check", flip(index - 3), "block check"},
		{"index record", flip(index + 3), "index does not match the blocks"},
		{"index CRC", flip(len(good) - 13), "index CRC"},
		{"stream footer", flip(len(good) - 3), "stream footer"},
		{"truncated", good[:len(good)-20], "unexpected EOF"},
		{"padding not a multiple of 4", cat(good, []byte{0, 0}), "stream padding"},
		{"garbage after the stream", cat(good, []byte("junk")), "unexpected EOF"},
	}
}

func TestXZReaderRefusesWhatXZRefuses(t *testing.T) {
	for _, tt := range xzCorruptions(t) {
		t.Run(tt.name, func(t *testing.T) {
			if xr, err := xz.NewReader(bytes.NewReader(tt.body)); err == nil {
				if _, err := io.ReadAll(xr); err == nil {
					t.Fatal("xz itself decodes it")
				}
			}
			mem := &decodeCharge{ctx: context.Background(), budget: newMemBudget(decodeMemory, 0)}
			_, err := io.ReadAll(&xzReader{in: bufioReader(tt.body), mem: mem})
			if err == nil || !strings.Contains(err.Error(), tt.say) {
				t.Fatalf("error %v, want one saying %q", err, tt.say)
			}
			if _, ok := err.(*httpError); ok {
				t.Errorf("error %v is a refusal of its own, want a decoding error", err)
			}
		})
	}
}

// fileHashCase is a narinfo that names, in its URL and FileHash, NARs of
// the cache.
type fileHashCase struct {
	name     string
	url      string
	fileHash string // "" for none
	want     int
}

func TestNarInfoFileHashMustMatchItsURL(t *testing.T) {
	sk, _ := nixcache.ParseSecretKey("test-1:RqDnNxL4OTWHkM8/F4h+NyEzq70mFZrggon5qLYJW+8Wj+tANHJmCfYwvdNFGfVx2PWORQavP+EzvlYKvkwDTA==")
	tc := newTestCache(t, func(c *Config) { c.TrustedKeys = []nixcache.PublicKey{sk.PublicKey()} })
	mine, other := []byte("this path's NAR"), []byte("another path's NAR")
	mineURL, otherURL := narName(mine, ".xz"), narName(other, ".xz")
	mineSum, otherSum := sha256.Sum256(mine), sha256.Sum256(other)
	custom := "nar/custom-name.nar"
	for _, n := range []struct {
		url     string
		content []byte
	}{{mineURL, mine}, {otherURL, other}, {custom, mine}} {
		if resp, msg := do(t, tc.write, "PUT", "/"+n.url, n.content); resp.StatusCode != 201 {
			t.Fatalf("PUT %s: %d %s", n.url, resp.StatusCode, msg)
		}
	}
	for _, tt := range []fileHashCase{
		{"FileHash is its URL's hash", mineURL, "sha256:" + nixcache.Base32(mineSum[:]), 201},
		{"FileHash in base16", mineURL, "sha256:" + hex.EncodeToString(mineSum[:]), 201},
		{"FileHash in SRI form", mineURL, "sha256-" + base64.StdEncoding.EncodeToString(mineSum[:]), 201},
		{"no FileHash", mineURL, "", 201},
		{"URL not named after a hash", custom, "sha256:" + nixcache.Base32(otherSum[:]), 201},
		{"FileHash of another NAR", mineURL, "sha256:" + nixcache.Base32(otherSum[:]), 400},
		{"URL names another path's NAR", otherURL, "sha256:" + nixcache.Base32(mineSum[:]), 400},
		{"FileHash of another NAR in base16", mineURL, "sha256:" + hex.EncodeToString(otherSum[:]), 400},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sum := sha256.Sum256([]byte(tt.name))
			hash := nixcache.Base32(sum[:20])
			text := narInfo(hash, "p", tt.url)
			if tt.fileHash != "" {
				text += "FileHash: " + tt.fileHash + "\n"
			}
			ni, err := nixcache.ParseNarInfo([]byte(text))
			if err != nil {
				t.Fatal(err)
			}
			fp, _ := ni.Fingerprint("/nix/store")
			text += "Sig: " + sk.Sign(fp) + "\n"
			resp, msg := do(t, tc.write, "PUT", "/"+hash+".narinfo", []byte(text))
			if resp.StatusCode != tt.want {
				t.Fatalf("%d %q, want %d", resp.StatusCode, strings.TrimSpace(msg), tt.want)
			}
			tc.durable.barrier()
			_, err = os.Stat(filepath.Join(tc.dir, hash+".narinfo"))
			if stored := err == nil; stored != (tt.want == 201) {
				t.Errorf("narinfo stored: %v, want %v", stored, tt.want == 201)
			}
			if tt.want == 400 && (!strings.Contains(msg, "FileHash") || !strings.Contains(msg, nixcache.NarURLHash(tt.url))) {
				t.Errorf("refusal %q does not name FileHash and the URL's hash", msg)
			}
		})
	}
}

// hostileUpload is a PUT with Content-Encoding enc, and the status it gets.
type hostileUpload struct {
	name string
	path string
	enc  string
	body []byte
	want int
}

// TestHostileEncodedRequests adds to TestHostileRequests the bodies that
// ask a decoder for too much, or are broken, and narinfos whose FileHash
// is not their NAR's.
func TestHostileEncodedRequests(t *testing.T) {
	tc := newTestCache(t, func(c *Config) { c.MaxUploadSize = 0 })
	long29, err := os.ReadFile("testdata/oversized-windows/zeros-700MB-long29.zst")
	if err != nil {
		t.Fatal(err)
	}
	nar := []byte("a NAR")
	narURL := narName(nar, ".xz")
	if resp, msg := do(t, tc.write, "PUT", "/"+narURL, nar); resp.StatusCode != 201 {
		t.Fatalf("PUT %s: %d %s", narURL, resp.StatusCode, msg)
	}
	tc.durable.barrier()
	otherSum := sha256.Sum256([]byte("another NAR"))
	zeros := narName(make([]byte, 128<<10), "")
	tests := []hostileUpload{
		{"zstd bomb asking for 512 MiB", "/" + zeros, "zstd", long29, 413},
		{"zstd bomb as a narinfo", "/" + hashA + ".narinfo", "zstd", long29, 413},
		{"zstd bomb as a listing", "/" + hashA + ".ls", "zstd", long29, 413},
		{"zstd window over the limit", "/" + zeros, "zstd", zstdFrame(28, 0), 413},
		{"zstd single segment claiming 4 GiB", "/" + zeros, "zstd", zstdSingleSegment(4 << 30), 413},
		{"zstd later frame over the limit", "/" + zeros, "zstd", cat(zstdFrame(17, 0), zstdFrame(29, 0)), 413},
		{"xz dictionary of 4 GiB", "/" + hashA + ".narinfo", "xz", xzWithDict(t, nar, 40), 413},
		{"xz dictionary of 256 MiB", "/" + narName(nar, ".xz2"), "xz", xzWithDict(t, nar, 32), 413},
		{"narinfo FileHash not its URL's", "/" + hashA + ".narinfo", "", []byte(narInfo(hashA, "a", narURL) + "FileHash: sha256:" + nixcache.Base32(otherSum[:]) + "\n"), 400},
	}
	for _, c := range xzCorruptions(t) {
		tests = append(tests, hostileUpload{"xz broken: " + c.name, "/" + hashB + ".ls", "xz", c.body, 400})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, msg := do(t, tc.write, "PUT", tt.path, tt.body, "Content-Encoding", tt.enc)
			if resp.StatusCode != tt.want {
				t.Errorf("status %d, want %d (%s)", resp.StatusCode, tt.want, strings.TrimSpace(msg))
			}
			if _, err := os.Stat(filepath.Join(tc.dir, strings.TrimPrefix(tt.path, "/"))); err == nil {
				t.Errorf("refused upload %s stored", tt.path)
			}
			noDecodingMemoryHeld(t)
			tc.checkNothingLeaked(t)
		})
	}
}

// FuzzXZReader checks that no body crashes the xz reader, that it never
// holds more than the largest window, and that it decodes what
// ulikunitz/xz's own reader decodes.
func FuzzXZReader(f *testing.F) {
	files, _ := filepath.Glob("testdata/encoded-by-xz-and-zstd-cli/*.xz")
	for _, name := range files {
		b, _ := os.ReadFile(name)
		f.Add(b)
	}
	for _, c := range xzCorruptions(f) {
		f.Add(c.body)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		mem := &decodeCharge{ctx: context.Background(), budget: newMemBudget(decodeMemory, 0)}
		got, err := io.ReadAll(io.LimitReader(&xzReader{in: bufioReader(body), mem: mem}, 8<<20))
		if mem.held > maxDecodeWindow+decoderOverhead {
			t.Fatalf("holds %d bytes", mem.held)
		}
		if err != nil || len(got) == 8<<20 {
			return
		}
		xr, err := xz.NewReader(bytes.NewReader(body))
		if err != nil {
			t.Fatalf("decoded %d bytes that xz refuses: %v", len(got), err)
		}
		want, err := io.ReadAll(xr)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("decoded %d bytes, xz %d (%v)", len(got), len(want), err)
		}
	})
}

// FuzzZstdFrames checks that no body crashes the reading of zstd frame
// headers, and that a body decodes as it does without it.
func FuzzZstdFrames(f *testing.F) {
	files, _ := filepath.Glob("testdata/encoded-by-xz-and-zstd-cli/*.zst")
	for _, name := range files {
		b, _ := os.ReadFile(name)
		f.Add(b)
	}
	content := randomText(rand.New(rand.NewSource(5)), 20<<10)
	f.Add(zstdEncode(f, content))
	f.Add(cat(zstdEncode(f, content[:100]), zstdEncode(f, content, zstd.WithEncoderCRC(false))))
	f.Add(cat([]byte{0x50, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 'x'}, zstdFrame(17, 0)))
	f.Add(zstdSingleSegment(300))
	f.Fuzz(func(t *testing.T, body []byte) {
		decode := func(r io.Reader) ([]byte, error) {
			zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxDecodeWindow))
			if err != nil {
				return nil, err
			}
			defer zr.Close()
			return io.ReadAll(io.LimitReader(zr, 8<<20))
		}
		mem := &decodeCharge{ctx: context.Background(), budget: newMemBudget(decodeMemory, 0)}
		got, err := decode(&zstdFrames{r: bytes.NewReader(body), mem: mem, want: 4})
		if mem.held > maxDecodeWindow+decoderOverhead {
			t.Fatalf("holds %d bytes", mem.held)
		}
		want, werr := decode(bytes.NewReader(body))
		if err != nil && werr != nil {
			return
		}
		if (err == nil) != (werr == nil) || !bytes.Equal(got, want) {
			t.Fatalf("decoded %d bytes (%v), without reading headers %d (%v)", len(got), err, len(want), werr)
		}
	})
}
