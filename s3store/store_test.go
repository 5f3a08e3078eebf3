package s3store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"runtime"
	"testing"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// TestStore runs every test below against one real SeaweedFS, each in a
// folder of its own.
func TestStore(t *testing.T) {
	srv := s3test.Start(t)
	tests := []struct {
		name string
		fn   func(t *testing.T, srv *s3test.Server, s *Store)
	}{
		{"PutGetRoundTrips", testPutGet},
		{"LargeBodyStreamsInParts", testStreamsInParts},
		{"PutMemoryStaysBounded", testPutMemory},
		{"KilledUploadLeavesNoObject", testKilledUpload},
		{"RangeReads", testRange},
		{"ListPagesThousandsOfKeys", testList},
		{"DeleteBatches", testDelete},
		{"CreateRacingWritersOneWins", testCreateRace},
		{"AbortUploadsRemovesLeftovers", testAbortUploads},
		{"BadNamesRefused", testBadNames},
		{"SigningIsChecked", testSigning},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, srv, newStore(t, srv, tc.name, nil))
		})
	}
	if rss, peak, err := srv.Memory(); err == nil {
		t.Logf("seaweedfs resident memory after the tests: %d MiB, at its peak %d MiB", rss>>20, peak>>20)
	}
}

func newStore(t *testing.T, srv *s3test.Server, prefix string, change func(*Config)) *Store {
	t.Helper()
	cfg := Config{
		Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket, Prefix: "/" + prefix + "/",
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey, PartSize: MinPartSize,
	}
	if change != nil {
		change(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func randBytes(n int64, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	return b
}

// onlyReader hides everything but Read, as a request body does.
type onlyReader struct{ r io.Reader }

func (o onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

func readAll(t *testing.T, s *Store, name string) []byte {
	t.Helper()
	rc, _, err := s.Get(context.Background(), name, 0, -1)
	if err != nil {
		t.Fatalf("get %s: %v", name, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	return data
}

func testPutGet(t *testing.T, _ *s3test.Server, s *Store) {
	ctx := context.Background()
	part := s.partSize
	tests := []struct {
		name  string
		size  int64
		known bool
	}{
		{"empty", 0, true},
		{"empty, size unknown", 0, false},
		{"small", 1000, true},
		{"small, size unknown", 1000, false},
		{"one whole part", part, true},
		{"one whole part, size unknown", part, false},
		{"a byte over a part", part + 1, true},
		{"a byte over a part, size unknown", part + 1, false},
		{"parts and a half", 3*part + part/2, true},
		{"parts and a half, size unknown", 3*part + part/2, false},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			data := randBytes(tc.size, uint64(i))
			size := tc.size
			if !tc.known {
				size = -1
			}
			name := fmt.Sprintf("nar/%d.nar", i)
			info, err := s.Put(ctx, name, onlyReader{bytes.NewReader(data)}, size)
			if err != nil {
				t.Fatalf("put: %v", err)
			}
			if info.Size != tc.size || info.Name != name {
				t.Errorf("put answered %+v, want size %d", info, tc.size)
			}
			st, err := s.Stat(ctx, name)
			if err != nil || st.Size != tc.size || st.ETag == "" || st.ModTime.IsZero() {
				t.Errorf("stat: %+v, %v; want size %d, an ETag and a time", st, err, tc.size)
			}
			if got := readAll(t, s, name); sha256.Sum256(got) != sha256.Sum256(data) {
				t.Errorf("read back %d bytes that differ from the %d put", len(got), len(data))
			}
		})
	}
	if _, err := s.Stat(ctx, "nar/missing.nar"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stat of a missing object: %v, want fs.ErrNotExist", err)
	}
	if _, _, err := s.Get(ctx, "nar/missing.nar", 0, -1); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("get of a missing object: %v, want fs.ErrNotExist", err)
	}
}

// watchReader calls at once when the reader has passed offset.
type watchReader struct {
	r      io.Reader
	read   int64
	offset int64
	at     func()
}

func (w *watchReader) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.read += int64(n)
	if w.at != nil && w.read > w.offset {
		at := w.at
		w.at = nil
		at()
	}
	return n, err
}

// testStreamsInParts looks at the store while a body of three parts is
// being read: in the second part, the first has gone up as a part of an
// upload in progress, and no object is visible yet.
func testStreamsInParts(t *testing.T, srv *s3test.Server, s *Store) {
	ctx := context.Background()
	client, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	for _, known := range []bool{true, false} {
		t.Run(fmt.Sprintf("size known %v", known), func(t *testing.T) {
			name := fmt.Sprintf("nar/streamed-%v.nar", known)
			key := s.prefix + name
			data := randBytes(3*s.partSize, 7)
			size := int64(len(data))
			if !known {
				size = -1
			}
			checked := false
			w := &watchReader{r: bytes.NewReader(data), offset: s.partSize + 1, at: func() {
				checked = true
				var parts int
				for u := range client.ListIncompleteUploads(ctx, srv.Bucket, key, false) {
					if u.Err != nil {
						t.Errorf("list uploads: %v", u.Err)
					}
					if u.Key == key {
						parts++
					}
				}
				if parts != 1 {
					t.Errorf("during the second part: %d uploads in progress, want 1", parts)
				}
				if _, err := s.Stat(ctx, name); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("during the second part, stat: %v, want fs.ErrNotExist", err)
				}
			}}
			if _, err := s.Put(ctx, name, w, size); err != nil {
				t.Fatal(err)
			}
			if !checked {
				t.Fatal("the reader never reached the second part")
			}
			if got := readAll(t, s, name); !bytes.Equal(got, data) {
				t.Error("read back differs")
			}
		})
	}
}

// testPutMemory puts a body of sixteen parts and checks, as it is read,
// that the live heap never grows by more than two parts: the body streams.
func testPutMemory(t *testing.T, _ *s3test.Server, s *Store) {
	ctx := context.Background()
	const parts = 16
	for _, known := range []bool{true, false} {
		t.Run(fmt.Sprintf("size known %v", known), func(t *testing.T) {
			size := int64(parts * s.partSize)
			m := &heapReader{r: io.LimitReader(zeros{}, size), every: s.partSize / 2}
			m.sample()
			base := m.max
			if !known {
				size = -1
			}
			if _, err := s.Put(ctx, "nar/big.nar", m, size); err != nil {
				t.Fatal(err)
			}
			grew := int64(m.max) - int64(base)
			t.Logf("put of %d MiB: the live heap grew by at most %d KiB", parts*s.partSize>>20, grew>>10)
			if limit := 2 * s.partSize; grew > limit {
				t.Errorf("put of %d bytes: the live heap grew by %d bytes, over %d", parts*s.partSize, grew, limit)
			}
		})
	}
}

// heapReader records the largest live heap (after a collection) seen
// every so many bytes read.
type heapReader struct {
	r           io.Reader
	read, every int64
	next        int64
	max         uint64
}

func (h *heapReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.read += int64(n)
	if h.read >= h.next {
		h.sample()
		h.next = h.read + h.every
	}
	return n, err
}

func (h *heapReader) sample() {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	h.max = max(h.max, ms.HeapAlloc)
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
