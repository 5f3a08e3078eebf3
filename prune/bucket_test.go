package prune

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/internal/s3test"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// testWindow is the guard window of the bucket tests: each prune's hold
// waits a fraction of a second rather than half a minute.
const testWindow = 300 * time.Millisecond

// TestBucket runs the bucket pruner's tests against one real SeaweedFS,
// each cache under a prefix of its own.
func TestBucket(t *testing.T) {
	srv := runBucketTests(t, "c", []bucketTest{
		{"KeepsWhatTheDirectoryPruneKeeps", testBucketLikeDirectory},
		{"WarmPruneReadsNoNarInfo", testBucketWarm},
		{"KilledPruneLeavesAValidCache", testBucketKilled},
		{"RacingUploaderKeepsWhatItNeeds", testBucketRacingUploader},
		{"HoldsUploadsThroughTheSettle", testBucketSettle},
		{"RefusesWhatIsNotACache", testBucketNotACache},
	})
	if rss, peak, err := srv.Memory(); err == nil {
		t.Logf("seaweedfs resident memory after the tests: %d MiB, at its peak %d MiB", rss>>20, peak>>20)
	}
}

// bucketTest is a test of caches in a bucket: newStore gives it a store
// over a prefix of its own, and the store's name.
type bucketTest struct {
	name string
	fn   func(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string))
}

// runBucketTests runs tests against one real SeaweedFS, their caches
// under prefixes named prefix and a number.
func runBucketTests(t *testing.T, prefix string, tests []bucketTest) *s3test.Server {
	srv := s3test.Start(t)
	var n atomic.Int64
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, func(t *testing.T) (*s3store.Store, string) {
				cfg := s3store.Config{
					Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket,
					Prefix:    fmt.Sprintf("%s%d", prefix, n.Add(1)),
					AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
				}
				st, err := s3store.New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				return st, cfg.String()
			})
		})
	}
	return srv
}

// bucketOptions returns the options of a prune of st, named name, with
// the tests' short guard window.
func bucketOptions(st *s3store.Store, name string) BucketOptions {
	l := bucketlock.New(st, quietLog())
	l.SetGuardWindow(testWindow)
	return BucketOptions{Options: Options{Log: quietLog(), LockWait: time.Second}, Store: st, Name: name, Locks: l}
}

// comparable reports whether a file of a cache directory has a
// counterpart in a bucket: regular files, but the upload temporaries and
// the lock files, which a bucket keeps otherwise.
func comparable(rel string) bool {
	return !strings.HasPrefix(rel, ".tmp/") && !strings.HasPrefix(rel, "gcroots/.lock/")
}

// dirFiles returns the comparable regular files under dir, sorted.
func dirFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			rel, _ := filepath.Rel(dir, p)
			if rel = filepath.ToSlash(rel); comparable(rel) {
				out = append(out, rel)
			}
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// objects returns the names of st's objects, sorted, but the lock
// protocol's.
func objects(t *testing.T, st *s3store.Store) []string {
	t.Helper()
	var out []string
	err := st.List(context.Background(), "", func(page []s3store.Info) error {
		for _, o := range page {
			if comparable(o.Name) {
				out = append(out, o.Name)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// upload puts the files rels of dir into st, from 8 goroutines.
func upload(t *testing.T, st *s3store.Store, dir string, rels []string) {
	t.Helper()
	var wg sync.WaitGroup
	ch := make(chan string)
	var failed atomic.Value
	for range 8 {
		wg.Go(func() {
			for rel := range ch {
				data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(rel)))
				if err == nil {
					_, err = st.Put(context.Background(), rel, bytes.NewReader(data), int64(len(data)))
				}
				if err != nil {
					failed.Store(err)
				}
			}
		})
	}
	for _, rel := range rels {
		ch <- rel
	}
	close(ch)
	wg.Wait()
	if err, ok := failed.Load().(error); ok {
		t.Fatal(err)
	}
}

// validateBucket returns what makes the cache in st invalid: a narinfo
// whose URL or whose references' narinfos are missing.
func validateBucket(t *testing.T, st *s3store.Store) []string {
	t.Helper()
	all := objects(t, st)
	have := make(map[string]bool, len(all))
	for _, o := range all {
		have[o] = true
	}
	var problems []string
	for _, name := range all {
		if strings.Contains(name, "/") || !strings.HasSuffix(name, ".narinfo") {
			continue
		}
		rc, _, err := st.Get(context.Background(), name, 0, -1)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(rc)
		rc.Close()
		if !strings.HasPrefix(string(data), "StorePath: ") {
			continue // malformed on purpose
		}
		for _, l := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(l, "URL: "); ok && !have[v] {
				problems = append(problems, name+": its URL "+v+" is missing")
			}
			if v, ok := strings.CutPrefix(l, "References: "); ok {
				for _, r := range strings.Fields(v) {
					if len(r) > 32 && !have[r[:32]+".narinfo"] {
						problems = append(problems, name+": its reference "+r+" is missing")
					}
				}
			}
		}
	}
	return problems
}

// bucketTweaks are what a scenario needs on a bucket that its directory
// expresses with the upload directory .tmp/: an upload in progress is a
// NAR that just arrived.
var bucketTweaks = map[string][]string{
	"NARs no narinfo names stay while uploads are under way": {"nar/arriving.nar"},
}

// bucketKeepsAlso are the files a bucket keeps beyond the directory:
// there a NAR younger than the grace is the sign of uploads under way
// (a bucket has no .tmp/ whose time tells), and a real upload of it
// would have touched the directory's .tmp/ too.
var bucketKeepsAlso = map[string][]string{
	"grace keeps recent files": {"nar/old-orphan.nar"},
}

// testBucketLikeDirectory runs the directory pruner's scenarios on a
// directory and on a bucket holding the same files, and checks that the
// same files remain, and that a dry run would delete the same files.
// Ages become generations: the files older than the scenario's default
// hour go up first, those younger last, and the durations of the options
// shrink to fit between them.
func testBucketLikeDirectory(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	scenarios := append(rootScenarios(), fileScenarios()...)
	scenarios = append(scenarios, namedScenario{"stats and dry run", scenario{
		paths:   []pt.Path{p("a", "b"), p("b"), p("g1", "g2"), p("g2")},
		markers: map[string][]string{"m": {"a"}},
	}})
	for _, tc := range scenarios {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := tc.sc.build(t)
			src := tc.sc.build(t)
			st, name := newStore(t)
			var gens [3][]string // older than an hour, an hour, younger
			for _, rel := range dirFiles(t, src) {
				age, ok := tc.sc.ages[rel]
				switch {
				case ok && age > time.Hour:
					gens[0] = append(gens[0], rel)
				case ok && age < time.Hour:
					gens[2] = append(gens[2], rel)
				default:
					gens[1] = append(gens[1], rel)
				}
			}
			for _, rel := range bucketTweaks[tc.name] {
				must(t, pt.WriteFile(src, rel, []byte("arriving")))
				gens[2] = append(gens[2], rel)
			}

			dirOpt := Options{CacheDir: dir, Log: quietLog(), LockWait: time.Second}
			bo := bucketOptions(st, name)
			if tc.sc.opts != nil {
				tc.sc.opts(dir, &dirOpt)
				tc.sc.opts(src, &bo.Options)
			}
			if bo.Grace > 0 {
				bo.Grace = 3 * time.Second
			}
			if bo.MaxRootAge > 0 {
				bo.MaxRootAge = 7 * time.Second
			}
			if len(gens[0]) > 0 {
				upload(t, st, src, gens[0])
				time.Sleep(6 * time.Second)
			}
			upload(t, st, src, gens[1])
			if len(gens[2]) > 0 {
				time.Sleep(bo.Grace + bucketSlack + 2*time.Second)
				upload(t, st, src, gens[2])
			} else {
				time.Sleep(bo.Grace + bucketSlack + time.Second)
			}

			wouldDir, wouldBucket := collect(&dirOpt.Deleted), collect(&bo.Deleted)
			dirOpt.DryRun, bo.DryRun = true, true
			if _, err := Run(context.Background(), dirOpt); err != nil {
				t.Fatal(err)
			}
			if _, err := RunBucket(context.Background(), bo); err != nil {
				t.Fatalf("dry run on the bucket: %v", err)
			}
			d := slices.DeleteFunc(wouldDir(), func(rel string) bool { return slices.Contains(bucketKeepsAlso[tc.name], rel) })
			if b := wouldBucket(); !slices.Equal(d, b) {
				t.Errorf("a dry run would delete\n%v\nfrom the bucket, and\n%v\nfrom the directory", b, d)
			}
			dirOpt.DryRun, bo.DryRun, dirOpt.Deleted, bo.Deleted = false, false, nil, nil
			dst, err := Run(context.Background(), dirOpt)
			if err != nil {
				t.Fatal(err)
			}
			bst, err := RunBucket(context.Background(), bo)
			if err != nil {
				t.Fatalf("prune of the bucket: %v", err)
			}
			want := dirFiles(t, dir)
			want = append(want, bucketTweaks[tc.name]...)
			want = append(want, bucketKeepsAlso[tc.name]...)
			sort.Strings(want)
			if got := objects(t, st); !slices.Equal(got, want) {
				t.Errorf("the bucket keeps\n%v\nthe directory\n%v", got, want)
			}
			if dst.Scanned != bst.Scanned || dst.Kept != bst.Kept || dst.DeletedNarInfos != bst.DeletedNarInfos || dst.Markers != bst.Markers {
				t.Errorf("stats differ: bucket %+v, directory %+v", bst, dst)
			}
			if problems := validateBucket(t, st); len(problems) > 0 && !tc.sc.invalidOK {
				t.Errorf("bucket left invalid:\n%s", strings.Join(problems, "\n"))
			}
		})
	}
}

// collect sets *fn to record the names it is called with, and returns
// them sorted (the directory's .tmp/ files aside).
func collect(fn *func(string, int64)) func() []string {
	var mu sync.Mutex
	var names []string
	*fn = func(rel string, _ int64) {
		mu.Lock()
		defer mu.Unlock()
		if comparable(rel) {
			names = append(names, rel)
		}
	}
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := slices.Clone(names)
		sort.Strings(out)
		return out
	}
}
