package serve

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"
)

// Nix 2.32+ may send narinfo, .ls and log uploads with any compression
// method it has (narinfo-compression, ls-compression, log-compression).
func TestEncodingsNixMaySendAreDecoded(t *testing.T) {
	tc := newTestCache(t, nil)
	dir := "testdata/encoded-by-bzip2-lz4-lzma-cli"
	content, err := os.ReadFile(filepath.Join(dir, "content.txt"))
	if err != nil {
		t.Fatal(err)
	}
	file := func(name string) []byte {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var lz4Go bytes.Buffer
	zw := lz4.NewWriter(&lz4Go)
	zw.Write(content)
	zw.Close()
	var lzmaGo bytes.Buffer
	lw, err := lzma.NewWriter(&lzmaGo)
	if err != nil {
		t.Fatal(err)
	}
	lw.Write(content)
	lw.Close()
	for i, tt := range []struct {
		name, enc string
		body      []byte
	}{
		{"none", "none", content},
		{"None, any case", "None", content},
		{"identity", "identity", content},
		{"bzip2 (the bzip2 tool)", "bzip2", file("content.txt.bz2")},
		{"x-bzip2", "x-bzip2", file("content.txt.bz2")},
		{"lz4 (the lz4 tool)", "lz4", file("content.txt.lz4")},
		{"lz4 (pierrec/lz4)", "lz4", lz4Go.Bytes()},
		{"lzma (xz --format=lzma)", "lzma", file("content.txt.lzma")},
		{"lzma (ulikunitz/xz/lzma)", "lzma", lzmaGo.Bytes()},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rel := "log/" + hashA + "-enc" + string(rune('a'+i)) + ".drv"
			resp, body := do(t, tc.write, "PUT", "/"+rel, tt.body, "Content-Encoding", tt.enc)
			if resp.StatusCode != 201 {
				t.Fatalf("PUT with Content-Encoding %s: %d %q, want 201", tt.enc, resp.StatusCode, body)
			}
			got, err := os.ReadFile(filepath.Join(tc.dir, rel))
			if err != nil || !bytes.Equal(got, content) {
				t.Errorf("stored %d bytes (%v), want the %d decoded bytes", len(got), err, len(content))
			}
		})
	}
}

func TestEncodingsWithoutADecoderAreRefused(t *testing.T) {
	tc := newTestCache(t, nil)
	hugeDict := make([]byte, lzma.HeaderLen)
	hugeDict[0] = 0x5d
	binary.LittleEndian.PutUint32(hugeDict[1:5], 1<<31)
	binary.LittleEndian.PutUint64(hugeDict[5:], ^uint64(0))
	for _, tt := range []struct {
		name, enc string
		body      []byte
		status    int
		want      string
	}{
		{"compress (LZW)", "compress", []byte{0x1f, 0x9d, 0x90}, 415, "none, gzip, zstd, xz, br, bzip2, lzma or lz4"},
		{"lzip", "lzip", []byte("LZIP"), 415, "not supported"},
		{"grzip", "grzip", []byte("x"), 415, "not supported"},
		{"lzma with a 2 GiB dictionary", "lzma", hugeDict, 413, "dictionary"},
		{"bzip2 that is not", "bzip2", []byte("not bzip2 at all"), 400, ""},
		{"lz4 that is not", "lz4", []byte("not lz4 at all"), 400, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := do(t, tc.write, "PUT", "/log/"+hashA+"-refused.drv", tt.body, "Content-Encoding", tt.enc)
			if resp.StatusCode != tt.status || !strings.Contains(body, tt.want) {
				t.Errorf("PUT with Content-Encoding %s: %d %q, want %d naming %q", tt.enc, resp.StatusCode, body, tt.status, tt.want)
			}
		})
	}
	tc.checkNothingLeaked(t)
}
