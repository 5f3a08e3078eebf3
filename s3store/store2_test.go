package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/minio/minio-go/v7"
)

// stallReader yields its bytes up to stop, then calls kill and fails:
// after the context is done when kill cancels it, at once otherwise.
type stallReader struct {
	data []byte
	off  int
	stop int
	kill func()
	ctx  context.Context
}

var errReader = errors.New("the client went away")

func (r *stallReader) Read(p []byte) (int, error) {
	if r.off >= r.stop {
		if r.kill != nil {
			r.kill()
			<-r.ctx.Done()
			return 0, r.ctx.Err()
		}
		return 0, errReader
	}
	n := copy(p, r.data[r.off:min(r.stop, len(r.data))])
	r.off += n
	return n, nil
}

// testKilledUpload kills uploads in the middle, by cancelling their
// context or by failing their reader: no object appears, an object that
// was there stays as it was, and no upload is left in progress.
func testKilledUpload(t *testing.T, srv *s3test.Server, s *Store) {
	client, err := srv.Client()
	if err != nil {
		t.Fatal(err)
	}
	part := int(s.partSize)
	tests := []struct {
		name     string
		size     int
		stop     int
		known    bool
		cancel   bool
		replaces bool
	}{
		{"one PUT, cancelled", 1 << 20, 300 << 10, true, true, false},
		{"one PUT, reader fails", 1 << 20, 300 << 10, true, false, false},
		{"multipart, cancelled in the second part", 3 * part, part + 1000, true, true, false},
		{"multipart, reader fails in the third part", 3 * part, 2*part + 1000, true, false, false},
		{"size unknown, cancelled in the second part", 3 * part, part + 1000, false, true, false},
		{"size unknown, reader fails in the first part", 3 * part, 1000, false, false, false},
		{"replacement cancelled keeps the old object", 3 * part, part + 1000, true, true, true},
		{"replacement by one PUT cancelled keeps the old object", 1 << 20, 300 << 10, true, true, true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			name := fmt.Sprintf("nar/killed-%d.nar", i)
			old := []byte("the object before")
			if tc.replaces {
				if _, err := s.Put(context.Background(), name, bytes.NewReader(old), int64(len(old))); err != nil {
					t.Fatal(err)
				}
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := &stallReader{data: randBytes(int64(tc.size), uint64(i)), stop: tc.stop, ctx: ctx}
			if tc.cancel {
				r.kill = cancel
			}
			size := int64(tc.size)
			if !tc.known {
				size = -1
			}
			if _, err := s.Put(ctx, name, r, size); err == nil {
				t.Fatal("put of a killed upload succeeded")
			}
			st, err := s.Stat(context.Background(), name)
			switch {
			case tc.replaces && err != nil:
				t.Fatalf("the old object: %v", err)
			case tc.replaces:
				if got := readAll(t, s, name); !bytes.Equal(got, old) {
					t.Errorf("the old object now reads %d bytes, want %q", len(got), old)
				}
			case !errors.Is(err, fs.ErrNotExist):
				t.Errorf("after a killed upload, stat: %+v, %v; want fs.ErrNotExist", st, err)
			}
			for u := range client.ListIncompleteUploads(context.Background(), srv.Bucket, s.prefix+name, false) {
				t.Errorf("an upload is left in progress: %+v", u)
			}
		})
	}
}

func testRange(t *testing.T, _ *s3test.Server, s *Store) {
	ctx := context.Background()
	data := randBytes(1<<20+17, 3)
	size := int64(len(data))
	if _, err := s.Put(ctx, "nar/range.nar", bytes.NewReader(data), size); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		off, n  int64
		want    []byte
		wantErr bool
	}{
		{"whole", 0, -1, data, false},
		{"first bytes", 0, 10, data[:10], false},
		{"middle", 1000, 5000, data[1000:6000], false},
		{"from the middle to the end", 4097, -1, data[4097:], false},
		{"last byte", size - 1, 1, data[size-1:], false},
		{"length past the end is cut", size - 3, 10, data[size-3:], false},
		{"offset past the end", size + 10, 5, nil, true},
		{"zero length", 5, 0, nil, true},
		{"negative offset", -1, 5, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rc, info, err := s.Get(ctx, "nar/range.nar", tc.off, tc.n)
			if tc.wantErr {
				if err == nil {
					rc.Close()
					t.Fatal("no error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			got, err := io.ReadAll(rc)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.want) {
				t.Errorf("read %d bytes, want %d, or they differ", len(got), len(tc.want))
			}
			if info.Size != size {
				t.Errorf("info size %d, want the whole object's %d", info.Size, size)
			}
		})
	}
}

// putMany puts names with small bodies, from 16 goroutines.
func putMany(t *testing.T, s *Store, names []string) {
	t.Helper()
	var wg sync.WaitGroup
	ch := make(chan string)
	errs := make(chan error, len(names))
	for range 16 {
		wg.Go(func() {
			for name := range ch {
				if _, err := s.Put(context.Background(), name, strings.NewReader(name), int64(len(name))); err != nil {
					errs <- err
				}
			}
		})
	}
	for _, n := range names {
		ch <- n
	}
	close(ch)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// listAll lists prefix (or the folder, with dir) and returns the names
// and the page sizes.
func listAll(t *testing.T, s *Store, prefix string, dir bool) (names []string, pages []int) {
	t.Helper()
	fn := func(page []Info) error {
		pages = append(pages, len(page))
		for _, o := range page {
			names = append(names, o.Name)
		}
		return nil
	}
	var err error
	if dir {
		err = s.ListDir(context.Background(), prefix, fn)
	} else {
		err = s.List(context.Background(), prefix, fn)
	}
	if err != nil {
		t.Fatal(err)
	}
	return names, pages
}

func numbered(format string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf(format, i)
	}
	return names
}

func testList(t *testing.T, _ *s3test.Server, s *Store) {
	many := numbered("nar/%05d.nar", 2500)
	top := []string{"a.narinfo", "b.narinfo", "nix-cache-info"}
	putMany(t, s, append(append([]string{"log/x.drv"}, many...), top...))
	tests := []struct {
		name      string
		prefix    string
		dir       bool
		want      []string
		wantPages int
	}{
		{"thousands of keys in pages", "nar/", false, many, 3},
		{"a prefix inside a name", "nar/0249", false, many[2490:2500], 1},
		{"the top folder only", "", true, top, 1},
		{"everything", "", false, append(append(append([]string{}, top...), "log/x.drv"), many...), 3},
		{"nothing", "nope/", false, nil, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			names, pages := listAll(t, s, tc.prefix, tc.dir)
			want := append([]string{}, tc.want...)
			sort.Strings(want)
			if !sort.StringsAreSorted(names) || strings.Join(names, " ") != strings.Join(want, " ") {
				t.Errorf("listed %d names (sorted %v), want %d", len(names), sort.StringsAreSorted(names), len(want))
			}
			if len(pages) != tc.wantPages {
				t.Errorf("%d pages %v, want %d", len(pages), pages, tc.wantPages)
			}
			for _, p := range pages {
				if p > listPage {
					t.Errorf("a page of %d", p)
				}
			}
		})
	}
	if err := s.ListDir(context.Background(), "nar", func([]Info) error { return nil }); err == nil {
		t.Error("ListDir of a folder without / succeeded")
	}
	stop := errors.New("stop")
	if err := s.List(context.Background(), "", func([]Info) error { return stop }); err != stop {
		t.Errorf("List did not return fn's error: %v", err)
	}
}

func testDelete(t *testing.T, _ *s3test.Server, s *Store) {
	all := numbered("nar/%05d.nar", 2500)
	putMany(t, s, all)
	tests := []struct {
		name   string
		delete []string
		left   []string
	}{
		{"nothing", nil, all},
		{"missing names are no error", []string{"nar/nope.nar", "nope.narinfo"}, all},
		{"one", all[:1], all[1:]},
		{"two batches", all[1:1500], all[1500:]},
		{"the rest and a missing one", append([]string{"nar/nope.nar"}, all[1500:]...), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.Delete(context.Background(), tc.delete); err != nil {
				t.Fatal(err)
			}
			names, _ := listAll(t, s, "nar/", false)
			if strings.Join(names, " ") != strings.Join(tc.left, " ") {
				t.Errorf("%d left, want %d", len(names), len(tc.left))
			}
		})
	}
}

// testCreateRace has writers race to create the same names: for each,
// exactly one wins, the others are told it exists, and it holds the
// winner's body.
func testCreateRace(t *testing.T, _ *s3test.Server, s *Store) {
	ctx := context.Background()
	conditional, err := s.Probe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !conditional {
		t.Fatal("SeaweedFS ignored If-None-Match: * on PUT")
	}
	if names, _ := listAll(t, s, "", false); len(names) != 0 {
		t.Errorf("the probe left %v", names)
	}
	// SeaweedFS serializes contended writes with a lock that it retries
	// once a second, so the rounds of many writers are few.
	for _, tc := range []struct{ writers, rounds int }{{2, 20}, {8, 4}} {
		writers := tc.writers
		t.Run(fmt.Sprintf("%d writers", writers), func(t *testing.T) {
			for round := range tc.rounds {
				name := fmt.Sprintf("gcroots/.lock/w%d-r%d", writers, round)
				errs := make([]error, writers)
				var wg sync.WaitGroup
				start := make(chan struct{})
				for w := range writers {
					wg.Go(func() {
						<-start
						_, errs[w] = s.Create(ctx, name, []byte(fmt.Sprint("writer ", w)))
					})
				}
				close(start)
				wg.Wait()
				winner := -1
				for w, err := range errs {
					switch {
					case err == nil && winner >= 0:
						t.Fatalf("round %d: writers %d and %d both created %s", round, winner, w, name)
					case err == nil:
						winner = w
					case !errors.Is(err, fs.ErrExist) && !errors.Is(err, ErrConflict):
						t.Fatalf("round %d: writer %d: %v, want fs.ErrExist or ErrConflict", round, w, err)
					}
				}
				if winner < 0 {
					t.Fatalf("round %d: no writer created %s", round, name)
				}
				if got := string(readAll(t, s, name)); got != fmt.Sprint("writer ", winner) {
					t.Fatalf("round %d: %s holds %q, want writer %d's", round, name, got, winner)
				}
			}
		})
	}
}

func testAbortUploads(t *testing.T, srv *s3test.Server, s *Store) {
	ctx := context.Background()
	// What a killed process leaves: an upload begun, a part sent.
	id, err := s.core.NewMultipartUpload(ctx, srv.Bucket, s.prefix+"nar/orphan.nar", minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.core.PutObjectPart(ctx, srv.Bucket, s.prefix+"nar/orphan.nar", id, 1, strings.NewReader("part"), 4, minio.PutObjectPartOptions{}); err != nil {
		t.Fatal(err)
	}
	if n, err := s.AbortUploads(ctx, 24*3600e9); n != 0 || err != nil {
		t.Errorf("AbortUploads of uploads older than a day: %d, %v; want 0, nil", n, err)
	}
	if n, err := s.AbortUploads(ctx, 0); n != 1 || err != nil {
		t.Errorf("AbortUploads: %d, %v; want 1, nil", n, err)
	}
	if n, err := s.AbortUploads(ctx, 0); n != 0 || err != nil {
		t.Errorf("AbortUploads again: %d, %v; want 0, nil", n, err)
	}
	if _, err := s.Stat(ctx, "nar/orphan.nar"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stat of the aborted upload: %v", err)
	}
}

func testBadNames(t *testing.T, _ *s3test.Server, s *Store) {
	for _, name := range []string{"", "/etc/passwd", "../x", "nar/../../x", "nar//x", "a/.."} {
		if _, err := s.Put(context.Background(), name, strings.NewReader("x"), 1); err == nil {
			t.Errorf("put %q succeeded", name)
		}
		if _, err := s.Stat(context.Background(), name); err == nil || errors.Is(err, fs.ErrNotExist) {
			t.Errorf("stat %q: %v, want a refusal", name, err)
		}
	}
	bad := []Config{
		{Endpoint: "http://127.0.0.1:1", Bucket: "b"},
		{Endpoint: "127.0.0.1:1"},
		{Endpoint: "127.0.0.1:1", Bucket: "b", PartSize: MinPartSize - 1},
	}
	for _, cfg := range bad {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}

// testSigning checks that the gateway checks signatures (a wrong secret
// is refused) and that keys can come from the AWS environment variables.
func testSigning(t *testing.T, srv *s3test.Server, _ *Store) {
	wrong := newStore(t, srv, "signing", func(c *Config) { c.SecretKey = "not" + c.SecretKey })
	if _, err := wrong.Put(context.Background(), "x", strings.NewReader("x"), 1); err == nil {
		t.Error("a put signed with the wrong secret succeeded")
	}
	t.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	env := newStore(t, srv, "signing", func(c *Config) { c.AccessKey, c.SecretKey = "", "" })
	if _, err := env.Put(context.Background(), "x", strings.NewReader("x"), 1); err != nil {
		t.Errorf("a put signed with keys from the environment: %v", err)
	}
}
