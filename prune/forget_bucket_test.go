package prune

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/cachelock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// TestForgetBucket runs the bucket forget's tests against one real
// SeaweedFS, each cache under a prefix of its own.
func TestForgetBucket(t *testing.T) {
	runBucketTests(t, "f", []bucketTest{
		{"DoesWhatTheDirectoryForgetDoes", testForgetBucketLikeDirectory},
		{"WaitsForLocksAndPrunes", testForgetBucketWaits},
		{"SeesReferrersPublishedDuringIt", testForgetBucketSeesLateReferrer},
		{"HoldsUploadsThroughTheSettle", testForgetBucketSettle},
		{"RefusesWhatIsNotACache", testForgetBucketNotACache},
	})
}

// forgetBucketOptions returns the options of a forget on st, named name,
// with the tests' short guard window.
func forgetBucketOptions(st *s3store.Store, name string, o ForgetOptions) ForgetBucketOptions {
	l := bucketlock.New(st, quietLog())
	l.SetGuardWindow(testWindow)
	return ForgetBucketOptions{ForgetOptions: o, Store: st, Name: name, Locks: l}
}

// fillBucket puts the files of the cache directory src into st and waits
// until they are older than a forget begun then takes as new, but those
// with a negative age, which later returns to upload again.
func fillBucket(t *testing.T, st *s3store.Store, src string, ages map[string]time.Duration) (later func()) {
	t.Helper()
	var now, after []string
	for _, rel := range dirFiles(t, src) {
		if ages[rel] < 0 {
			after = append(after, rel)
		}
		now = append(now, rel)
	}
	upload(t, st, src, now)
	time.Sleep(bucketSlack + time.Second)
	return func() { upload(t, st, src, after) }
}

// testForgetBucketLikeDirectory runs the directory forget's scenarios on
// a directory and on a bucket holding the same files, and checks that
// they find the same, delete the same files (or would, in a dry run) and
// leave the bucket a valid cache. A file modified after the forget began
// is, on the bucket, written again once the forget has planned.
func testForgetBucketLikeDirectory(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	for _, tc := range forgetScenarios() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fs := tc.fs
			dir := fs.sc.build(t)
			st, name := newStore(t)
			later := fillBucket(t, st, fs.sc.build(t), fs.sc.ages)

			do := ForgetOptions{CacheDir: dir, Paths: fs.args, Log: quietLog(), LockWait: time.Second}
			bo := forgetBucketOptions(st, name, ForgetOptions{Paths: fs.args, Log: quietLog(), LockWait: time.Second})
			if fs.opts != nil {
				fs.opts(&do)
				fs.opts(&bo.ForgetOptions)
			}
			bo.Planned = func(ForgetResult) { later() }
			dirDeleted, bucketDeleted := collect(&do.Deleted), collect(&bo.Deleted)
			dres, derr := Forget(context.Background(), do)
			bres, berr := ForgetBucket(context.Background(), bo)
			if fs.wantErr == nil && berr != nil || fs.wantErr != nil && !errors.Is(berr, fs.wantErr) {
				t.Fatalf("ForgetBucket: %v, want %v", berr, fs.wantErr)
			}
			if (derr == nil) != (berr == nil) {
				t.Errorf("ForgetBucket: %v, but Forget: %v", berr, derr)
			}
			if fmt.Sprint(bres) != fmt.Sprint(dres) {
				t.Errorf("ForgetBucket found\n%+v\nForget\n%+v", bres, dres)
			}
			if got, want := res2paths(bres.Paths), fs.wantPaths; !slices.Equal(got, want) {
				t.Errorf("Paths = %q, want %q", got, want)
			}
			if d, b := dirDeleted(), bucketDeleted(); !slices.Equal(d, b) {
				t.Errorf("deleted\n%v\nfrom the bucket, and\n%v\nfrom the directory", b, d)
			}
			if got, want := objects(t, st), dirFiles(t, dir); !slices.Equal(got, want) {
				t.Errorf("the bucket keeps\n%v\nthe directory\n%v", got, want)
			}
			fs.sc.check(t, dir)
			if problems := validateBucket(t, st); len(problems) > 0 {
				t.Errorf("bucket left invalid:\n%s", strings.Join(problems, "\n"))
			}
		})
	}
}

// res2paths returns the names of store paths, as the scenarios give them.
func res2paths(paths []string) []string {
	var out []string
	for _, sp := range paths {
		_, name, _ := strings.Cut(filepath.Base(sp), "-")
		out = append(out, name)
	}
	return out
}

// testForgetBucketWaits checks that a forget gives up beside a fresh
// upload lock, deleting nothing, and waits for a prune's hold to end.
func testForgetBucketWaits(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	fillBucket(t, st, scenario{paths: []pt.Path{p("a")}}.build(t), nil)
	bo := forgetBucketOptions(st, name, ForgetOptions{Paths: []string{pt.StorePath("a")}, Log: quietLog(), LockWait: 500 * time.Millisecond})
	must(t, bo.Locks.Acquire("upload", []byte("ci")))
	if _, err := ForgetBucket(context.Background(), bo); !errors.Is(err, cachelock.ErrLocksHeld) {
		t.Fatalf("ForgetBucket beside a fresh lock: %v, want ErrLocksHeld", err)
	}
	if _, err := st.Stat(context.Background(), pt.NarInfoFile("a")); err != nil {
		t.Fatalf("deleted while a lock was held: %v", err)
	}
	must(t, bo.Locks.Release("upload"))

	// A prune's hold, on another lock object as another machine's: the
	// forget waits for it to end.
	other := bucketlock.New(st, quietLog())
	h, err := other.Hold(context.Background(), 0, nil)
	must(t, err)
	released := make(chan struct{})
	go func() { time.Sleep(time.Second); h.Release(); close(released) }()
	bo.LockWait = 20 * time.Second
	if _, err := ForgetBucket(context.Background(), bo); err != nil {
		t.Fatalf("ForgetBucket after a prune: %v", err)
	}
	select {
	case <-released:
	default:
		t.Error("ForgetBucket did not wait for the prune's hold")
	}
	if _, err := st.Stat(context.Background(), pt.NarInfoFile("a")); err == nil {
		t.Error("not forgotten")
	}
}

// testForgetBucketSeesLateReferrer publishes a referrer, as serve does
// under a guard begun before the forget marked the cache, while the
// forget scans and waits to delete: it must see it and refuse.
func testForgetBucketSeesLateReferrer(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	fillBucket(t, st, scenario{paths: []pt.Path{p("lib")}}.build(t), nil)
	bo := forgetBucketOptions(st, name, ForgetOptions{Paths: []string{pt.StorePath("lib")}, Log: quietLog(), LockWait: 5 * time.Second})
	guarded := make(chan struct{})
	published := make(chan error, 1)
	go func() {
		published <- bo.Locks.Guard(context.Background(), func(ctx context.Context) error {
			close(guarded)
			time.Sleep(testWindow / 2) // the forget marks the cache and scans
			ctx2 := context.Background()
			if _, err := st.Put(ctx2, pt.NarURL("app"), strings.NewReader("nar"), 3); err != nil {
				return err
			}
			ni := pt.NarInfo(p("app", "lib"))
			_, err := st.Put(ctx, pt.NarInfoFile("app"), bytes.NewReader(ni), int64(len(ni)))
			return err
		})
	}()
	<-guarded
	_, err := ForgetBucket(context.Background(), bo)
	if perr := <-published; perr != nil {
		t.Fatalf("the referrer's upload: %v", perr)
	}
	if !errors.Is(err, ErrReferenced) {
		t.Fatalf("ForgetBucket: %v, want ErrReferenced", err)
	}
	if problems := validateBucket(t, st); len(problems) > 0 {
		t.Errorf("bucket left invalid: %q", problems)
	}
}

// testForgetBucketSettle publishes, through another front end's
// protocol, right after the forget deleted a narinfo: the publication
// waits until the settle time after the deletion has passed.
func testForgetBucketSettle(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	fillBucket(t, st, scenario{paths: []pt.Path{p("a")}}.build(t), nil)
	const settle = 500 * time.Millisecond
	other := bucketlock.New(st, quietLog())
	other.SetGuardWindow(testWindow)
	var deleted time.Time
	published := make(chan time.Time, 1)
	bo := forgetBucketOptions(st, name, ForgetOptions{Paths: []string{pt.StorePath("a")}, Log: quietLog(), LockWait: 5 * time.Second,
		Deleted: func(rel string, _ int64) {
			if rel != pt.NarInfoFile("a") {
				return
			}
			deleted = time.Now()
			go other.Guard(context.Background(), func(context.Context) error {
				published <- time.Now()
				return nil
			})
		}})
	bo.Settle = settle
	if _, err := ForgetBucket(context.Background(), bo); err != nil {
		t.Fatal(err)
	}
	if at := <-published; at.Before(deleted.Add(settle)) {
		t.Errorf("a publication ran %s after the narinfo went, within the settle time %s", at.Sub(deleted), settle)
	}
}

func testForgetBucketNotACache(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	bo := forgetBucketOptions(st, name, ForgetOptions{Paths: []string{pt.StorePath("a")}, Log: quietLog()})
	if _, err := ForgetBucket(context.Background(), bo); err == nil || !strings.Contains(err.Error(), "nix-cache-info") {
		t.Errorf("ForgetBucket on an empty prefix: %v, want a refusal naming nix-cache-info", err)
	}
	bo.Paths = []string{"not-a-hash"}
	if _, err := ForgetBucket(context.Background(), bo); err == nil {
		t.Error("ForgetBucket accepted a bad path")
	}
}
