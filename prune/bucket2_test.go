package prune

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// putPath uploads a path's NAR, then its narinfo, as serve would.
func putPath(t *testing.T, st *s3store.Store, p pt.Path) {
	t.Helper()
	nar := bytes.Repeat([]byte("n"), 64)
	if _, err := st.Put(context.Background(), pt.NarURL(p.Name), bytes.NewReader(nar), int64(len(nar))); err != nil {
		t.Fatal(err)
	}
	ni := pt.NarInfo(p)
	if _, err := st.Put(context.Background(), pt.NarInfoFile(p.Name), bytes.NewReader(ni), int64(len(ni))); err != nil {
		t.Fatal(err)
	}
}

func putObject(t *testing.T, st *s3store.Store, name, body string) {
	t.Helper()
	if _, err := st.Put(context.Background(), name, strings.NewReader(body), int64(len(body))); err != nil {
		t.Fatal(err)
	}
}

// chain returns n paths, each referring to the next: n tiers of garbage
// when nothing roots them.
func chain(prefix string, n int) []pt.Path {
	var ps []pt.Path
	for i := range n {
		pa := pt.Path{Name: fmt.Sprintf("%s%d", prefix, i)}
		if i+1 < n {
			pa.Refs = []string{fmt.Sprintf("%s%d", prefix, i+1)}
		}
		ps = append(ps, pa)
	}
	return ps
}

func initBucket(t *testing.T, st *s3store.Store) {
	t.Helper()
	putObject(t, st, "nix-cache-info", "StoreDir: /nix/store\n")
}

// testBucketWarm: a second prune of an unchanged bucket answers every
// narinfo and realisation from the metadata cache; a changed narinfo is
// read again.
func testBucketWarm(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	initBucket(t, st)
	kept := chain("k", 30)
	for _, pa := range append(kept, chain("g", 5)...) {
		putPath(t, st, pa)
	}
	rel, relJSON := pt.RealisationFile("k0.drv", "out", "k0")
	putObject(t, st, rel, string(relJSON))
	putObject(t, st, "gcroots/m", pt.StorePath("k0")+"\n")
	time.Sleep(bucketSlack + time.Second)

	o := bucketOptions(st, name)
	o.StateDir = t.TempDir()
	cold, err := RunBucket(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if cold.Read != 35 || cold.DeletedNarInfos != 5 || cold.Kept != 30 {
		t.Fatalf("cold prune: %+v; want 35 read, 30 kept, 5 deleted", cold)
	}
	warm, err := RunBucket(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if warm.Read != 0 || warm.Scanned != 30 || warm.Kept != 30 || warm.Deleted != 0 {
		t.Errorf("warm prune: %+v; want 30 scanned, none read or deleted", warm)
	}
	// Rewritten: another ETag, read again; its new reference is kept.
	changed := pt.Path{Name: "k29", Refs: []string{"extra"}}
	putPath(t, st, pt.Path{Name: "extra"})
	putPath(t, st, changed)
	time.Sleep(bucketSlack + time.Second)
	again, err := RunBucket(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	if again.Read != 2 || again.Kept != 31 || again.DeletedNarInfos != 0 {
		t.Errorf("prune after a change: %+v; want 2 read, 31 kept", again)
	}
}

// testBucketKilled stops prunes after each few deletions: the bucket is
// a valid cache after every one, and the last prune finishes the job.
func testBucketKilled(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	initBucket(t, st)
	for _, pa := range append(chain("a", 3), chain("g", 12)...) {
		putPath(t, st, pa)
	}
	putObject(t, st, "gcroots/m", pt.StorePath("a0")+"\n")
	time.Sleep(bucketSlack + time.Second)
	for round := 0; ; round++ {
		ctx, cancel := context.WithCancel(context.Background())
		o := bucketOptions(st, name)
		deleted := 0
		o.Deleted = func(string, int64) {
			if deleted++; deleted == 3 {
				cancel()
			}
		}
		_, err := RunBucket(ctx, o)
		cancel()
		if problems := validateBucket(t, st); len(problems) > 0 {
			t.Fatalf("round %d left the bucket invalid:\n%s", round, strings.Join(problems, "\n"))
		}
		if err == nil {
			break
		}
		if !errors.Is(err, context.Canceled) || round > 30 {
			t.Fatalf("round %d: %v", round, err)
		}
	}
	for _, n := range []string{"a0", "a1", "a2"} {
		if _, err := st.Stat(context.Background(), pt.NarInfoFile(n)); err != nil {
			t.Errorf("%s: %v", n, err)
		}
	}
	if got := objects(t, st); len(got) != 1+1+2*3 {
		t.Errorf("left %d objects, want nix-cache-info, the marker and 3 paths: %v", len(got), got)
	}
}

// testBucketRacingUploader: an upload that holds a lock while the prune
// starts finishes its closure and its marker; the prune, which waited
// for the lock, deletes none of it.
func testBucketRacingUploader(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	initBucket(t, st)
	putPath(t, st, pt.Path{Name: "old"})
	time.Sleep(bucketSlack + time.Second)

	up := bucketlock.New(st, quietLog())
	up.SetGuardWindow(testWindow)
	if err := up.Acquire("ci", []byte("job 1")); err != nil {
		t.Fatal(err)
	}
	o := bucketOptions(st, name)
	o.LockWait = time.Minute
	waiting := make(chan struct{}, 1)
	o.Progress = func(s Stats) {
		if s.Phase == PhaseWaiting {
			select {
			case waiting <- struct{}{}:
			default:
			}
		}
	}
	type result struct {
		st  Stats
		err error
	}
	res := make(chan result, 1)
	go func() {
		s, err := RunBucket(context.Background(), o)
		res <- result{s, err}
	}()
	<-waiting
	// While the prune waits: NARs go up, the narinfos wait for the
	// guard, which refuses while the prune holds the cache; the uploader
	// keeps its lock fresh. It publishes once the prune is done with the
	// lock... which is only when it releases it: so it publishes with
	// the narinfos first and the lock after, as with-lock does.
	if err := up.Acquire("ci", []byte("job 1, refreshed")); err != nil {
		t.Fatalf("refreshing the lock while the prune waits: %v", err)
	}
	for _, pa := range []pt.Path{{Name: "dep"}, {Name: "app", Refs: []string{"dep"}}} {
		putPath(t, st, pa)
	}
	putObject(t, st, "gcroots/ci", pt.StorePath("app")+"\n")
	if err := up.Release("ci"); err != nil {
		t.Fatal(err)
	}
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	for _, n := range []string{"app", "dep"} {
		for _, obj := range []string{pt.NarInfoFile(n), pt.NarURL(n)} {
			if _, err := st.Stat(context.Background(), obj); err != nil {
				t.Errorf("the uploader's %s (%s): %v", obj, n, err)
			}
		}
	}
	if _, err := st.Stat(context.Background(), pt.NarInfoFile("old")); err == nil {
		t.Error("the garbage narinfo stayed")
	}
	if r.st.Waited == 0 {
		t.Error("the prune did not wait for the upload lock")
	}
}

func testBucketNotACache(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	putPath(t, st, pt.Path{Name: "x"})
	if _, err := RunBucket(context.Background(), bucketOptions(st, name)); err == nil || !strings.Contains(err.Error(), "nix-cache-info") {
		t.Errorf("prune of a bucket without nix-cache-info: %v", err)
	}
	if _, err := st.Stat(context.Background(), pt.NarInfoFile("x")); err != nil {
		t.Errorf("a refused prune deleted something: %v", err)
	}
}

// testBucketSettle publishes, through another front end's protocol,
// right after the prune deleted a narinfo: the publication waits until
// the settle time after the deletion has passed, as a front end may trust
// the narinfo it checked until then.
func testBucketSettle(t *testing.T, newStore func(t *testing.T) (*s3store.Store, string)) {
	st, name := newStore(t)
	initBucket(t, st)
	putPath(t, st, pt.Path{Name: "garbage"})
	time.Sleep(bucketSlack + time.Second)
	const settle = 500 * time.Millisecond
	other := bucketlock.New(st, quietLog())
	other.SetGuardWindow(testWindow)
	var deleted time.Time
	published := make(chan time.Time, 1)
	o := bucketOptions(st, name)
	o.Settle = settle
	o.Deleted = func(rel string, _ int64) {
		if rel != pt.NarInfoFile("garbage") {
			return
		}
		deleted = time.Now()
		go other.Guard(context.Background(), func(context.Context) error {
			published <- time.Now()
			return nil
		})
	}
	if _, err := RunBucket(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if deleted.IsZero() {
		t.Fatal("the prune did not delete the garbage narinfo")
	}
	if at := <-published; at.Before(deleted.Add(settle)) {
		t.Errorf("a publication ran %s after the narinfo went, within the settle time %s", at.Sub(deleted), settle)
	}
}
