package bucketlock

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// window is the guard window of the tests: short, so that each Hold
// waits a fraction of a second rather than half a minute.
const window = 300 * time.Millisecond

// TestLocks runs every test below against one real SeaweedFS, each on a
// cache of its own (a prefix of the bucket).
func TestLocks(t *testing.T) {
	srv := s3test.Start(t)
	tests := []struct {
		name string
		fn   func(t *testing.T, newLocks func() *Locks)
	}{
		{"RacingHoldsOneWins", testRacingHolds},
		{"AcquireRefusedWhileHeld", testAcquireWhileHeld},
		{"GuardWaitsWhileAPruneDeletesAndItsDeadline", testGuard},
		{"DeletingWaitsForGuardsBegunBefore", testDeletingWaitsForGuardsBegunBefore},
		{"HoldWaitsForLocksThenGivesUp", testHoldWaitsForLocksThenGivesUp},
		{"StaleMarkerTakenOverByOne", testStaleTakeover},
		{"ListAndHolder", testListAndHolder},
		{"RefreshKeepsTheMarkerUntilTakenOver", testRefresh},
		{"BadNamesRefused", testBadNames},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := s3store.New(s3store.Config{
				Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket, Prefix: tc.name,
				AccessKey: srv.AccessKey, SecretKey: srv.SecretKey,
			})
			if err != nil {
				t.Fatal(err)
			}
			tc.fn(t, func() *Locks {
				l := New(st, quietLog())
				l.SetGuardWindow(window)
				return l
			})
		})
	}
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

func hold(t *testing.T, l *Locks) *Hold {
	t.Helper()
	h, err := l.Hold(context.Background(), time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func testRacingHolds(t *testing.T, newLocks func() *Locks) {
	for round := range 2 {
		const n = 4
		var wg sync.WaitGroup
		holds := make([]*Hold, n)
		errs := make([]error, n)
		for i := range n {
			l := newLocks() // one per prune process
			wg.Go(func() { holds[i], errs[i] = l.Hold(context.Background(), time.Second, nil) })
		}
		wg.Wait()
		won := 0
		for i := range n {
			switch {
			case errs[i] == nil:
				won++
				defer holds[i].Release()
			case !errors.Is(errs[i], cachelock.ErrPruneRunning):
				t.Errorf("round %d: prune %d: %v, want ErrPruneRunning", round, i, errs[i])
			case !strings.Contains(errs[i].Error(), "pid "):
				t.Errorf("round %d: %q does not say who holds the cache", round, errs[i])
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d of %d racing prunes hold the cache, want 1", round, won, n)
		}
		for i := range n {
			if holds[i] != nil {
				holds[i].Release()
			}
		}
	}
}

func testAcquireWhileHeld(t *testing.T, newLocks func() *Locks) {
	l := newLocks()
	if err := l.Acquire("old", []byte("ci 1")); err != nil {
		t.Fatal(err)
	}
	// The prune waits for "old" to go, which is released below.
	type result struct {
		h   *Hold
		err error
	}
	res := make(chan result, 1)
	waiting := make(chan []string, 100)
	go func() {
		h, err := newLocks().Hold(context.Background(), time.Minute, func(names []string) {
			select {
			case waiting <- names:
			default:
			}
		})
		res <- result{h, err}
	}()
	got := <-waiting
	if strings.Join(got, ",") != "old" {
		t.Errorf("the prune waits for %v, want [old]", got)
	}
	err := l.Acquire("new", []byte("ci 2"))
	if !errors.Is(err, cachelock.ErrBusy) {
		t.Errorf("a new lock while a prune holds the cache: %v, want ErrBusy", err)
	}
	if err := l.Acquire("old", []byte("ci 1, refreshed")); err != nil {
		t.Errorf("refreshing a fresh lock while the prune waits: %v", err)
	}
	if err := l.Release("old"); err != nil {
		t.Fatal(err)
	}
	r := <-res
	if r.err != nil {
		t.Fatalf("the prune after the lock was released: %v", r.err)
	}
	if err := l.Acquire("old", []byte("ci 1")); !errors.Is(err, cachelock.ErrBusy) {
		t.Errorf("re-taking a released lock while held: %v, want ErrBusy", err)
	}
	r.h.Release()
	r.h.Release() // twice is harmless
	if err := l.Acquire("new", []byte("ci 2")); err != nil {
		t.Errorf("a new lock after the prune: %v", err)
	}
	if err := l.Release("never-taken"); err != nil {
		t.Errorf("releasing a lock that is not there: %v", err)
	}
}

func testGuard(t *testing.T, newLocks func() *Locks) {
	l := newLocks()
	before := time.Now()
	ran := false
	err := l.Guard(context.Background(), func(ctx context.Context) error {
		ran = true
		dl, ok := ctx.Deadline()
		if !ok || dl.Before(before.Add(window)) || dl.After(time.Now().Add(window)) {
			t.Errorf("guard deadline %v (set %v), want %s after the check", dl, ok, window)
		}
		return nil
	})
	if err != nil || !ran {
		t.Fatalf("guard with no prune: ran %v, %v", ran, err)
	}
	want := errors.New("fn's own error")
	if err := l.Guard(context.Background(), func(context.Context) error { return want }); err != want {
		t.Errorf("guard returned %v, want fn's error", err)
	}
	// While a prune scans, uploads go on.
	h := hold(t, newLocks())
	if err := l.Guard(context.Background(), func(context.Context) error { return nil }); err != nil {
		t.Errorf("guard while a prune scans: %v", err)
	}
	// While it deletes, a guard waits, and gives up after guardWait.
	if err := h.Deleting(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer func(w time.Duration) { guardWait = w }(guardWait)
	guardWait = 2 * window
	err = l.Guard(context.Background(), func(context.Context) error {
		t.Error("guard ran while a prune deletes")
		return nil
	})
	if !errors.Is(err, cachelock.ErrBusy) {
		t.Errorf("guard while a prune deletes: %v, want ErrBusy", err)
	}
	// A guard that waits runs once the prune is done.
	guardWait = time.Minute
	ran = false
	released := make(chan time.Time, 1)
	go func() {
		time.Sleep(window)
		released <- time.Now()
		h.Release()
	}()
	if err := l.Guard(context.Background(), func(context.Context) error { ran = true; return nil }); err != nil || !ran {
		t.Errorf("guard waiting for the deletion to end: ran %v, %v", ran, err)
	}
	if at := <-released; time.Now().Before(at) {
		t.Error("the guard ran before the prune released the cache")
	}
}

// testDeletingWaitsForGuardsBegunBefore: a guard that began before the
// prune marked the cache as deleting has reached its deadline by the time
// Deleting returns.
func testDeletingWaitsForGuardsBegunBefore(t *testing.T, newLocks func() *Locks) {
	l := newLocks()
	h := hold(t, newLocks())
	defer h.Release()
	inside := make(chan context.Context)
	finished := make(chan struct{})
	go func() {
		l.Guard(context.Background(), func(ctx context.Context) error {
			inside <- ctx
			<-ctx.Done()
			return nil
		})
		close(finished)
	}()
	gctx := <-inside
	if err := h.Deleting(context.Background()); err != nil {
		t.Fatal(err)
	}
	if gctx.Err() == nil {
		t.Error("Deleting returned while a guard begun before it could still publish")
	}
	<-finished
}

func testHoldWaitsForLocksThenGivesUp(t *testing.T, newLocks func() *Locks) {
	l := newLocks()
	if err := l.Acquire("stuck", []byte("upload")); err != nil {
		t.Fatal(err)
	}
	var calls int
	_, err := newLocks().Hold(context.Background(), 500*time.Millisecond, func([]string) { calls++ })
	if !errors.Is(err, cachelock.ErrLocksHeld) || !strings.Contains(err.Error(), "stuck") {
		t.Fatalf("hold with a lock never released: %v, want ErrLocksHeld naming it", err)
	}
	if calls == 0 {
		t.Error("waiting was never called")
	}
	// Giving up removed the marker: uploads go on.
	if err := l.Acquire("other", nil); err != nil {
		t.Errorf("a new lock after the prune gave up: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := newLocks().Hold(ctx, time.Minute, nil); err == nil {
		t.Error("hold with a cancelled context succeeded")
	}
}

func testStaleTakeover(t *testing.T, newLocks func() *Locks) {
	defer func(old time.Duration) { staleAfter = old }(staleAfter)
	staleAfter = 2 * time.Second
	dead := hold(t, newLocks())
	dead.close() // killed: it neither refreshes nor removes its marker
	if _, err := newLocks().Hold(context.Background(), time.Second, nil); !errors.Is(err, cachelock.ErrPruneRunning) {
		t.Fatalf("hold beside a fresh marker: %v, want ErrPruneRunning", err)
	}
	time.Sleep(staleAfter + 100*time.Millisecond)
	if _, held, err := newLocks().Holder(); err != nil || held {
		t.Errorf("Holder of a stale marker: held %v, %v", held, err)
	}
	const n = 4
	var wg sync.WaitGroup
	errs := make([]error, n)
	holds := make([]*Hold, n)
	for i := range n {
		l := newLocks()
		wg.Go(func() { holds[i], errs[i] = l.Hold(context.Background(), time.Second, nil) })
	}
	wg.Wait()
	won := 0
	for i := range n {
		if errs[i] == nil {
			won++
			defer holds[i].Release()
		} else if !errors.Is(errs[i], cachelock.ErrPruneRunning) {
			t.Errorf("prune %d: %v, want ErrPruneRunning", i, errs[i])
		}
	}
	if won != 1 {
		t.Errorf("%d of %d prunes took over a dead marker, want 1", won, n)
	}
}

func testListAndHolder(t *testing.T, newLocks func() *Locks) {
	defer func(old time.Duration) { staleAfter = old }(staleAfter)
	l := newLocks()
	if ls, err := l.List(); err != nil || len(ls) != 0 {
		t.Errorf("locks of an empty cache: %v, %v", ls, err)
	}
	for _, n := range []string{"b", "a"} {
		if err := l.Acquire(n, []byte(n)); err != nil {
			t.Fatal(err)
		}
	}
	if who, held, err := l.Holder(); err != nil || held || who != "" {
		t.Errorf("Holder with no prune: %q, %v, %v", who, held, err)
	}
	// While the prune waits for a and b, it holds the cache.
	waiting := make(chan struct{}, 100)
	res := make(chan error, 1)
	var h *Hold
	go func() {
		var err error
		h, err = newLocks().Hold(context.Background(), time.Minute, func([]string) { waiting <- struct{}{} })
		res <- err
	}()
	<-waiting
	who, held, err := l.Holder()
	if err != nil || !held || !strings.HasPrefix(who, "pid ") {
		t.Errorf("Holder while held: %q, %v, %v", who, held, err)
	}
	ls, err := l.List()
	if err != nil || len(ls) != 2 || ls[0].Name != "a" || ls[1].Name != "b" || !ls[0].Fresh {
		t.Errorf("List = %+v, %v; want a and b, fresh, without the marker", ls, err)
	}
	staleAfter = 0
	if ls, _ := l.List(); len(ls) != 2 || ls[0].Fresh {
		t.Errorf("List with every lock stale = %+v", ls)
	}
	if err := <-res; err != nil {
		t.Fatalf("the prune once the locks are stale: %v", err)
	}
	h.Release()
	if _, held, err := l.Holder(); err != nil || held {
		t.Errorf("Holder after the release: held %v, %v", held, err)
	}
}

func testBadNames(t *testing.T, newLocks func() *Locks) {
	l := newLocks()
	for _, name := range []string{"", ".prune", ".guard", "a/b", strings.Repeat("x", 256)} {
		if err := l.Acquire(name, nil); err == nil {
			t.Errorf("Acquire(%q) succeeded", name)
		}
		if err := l.Release(name); err == nil {
			t.Errorf("Release(%q) succeeded", name)
		}
	}
	if err := l.Acquire("big", make([]byte, cachelock.MaxLockBody+1)); err == nil {
		t.Error("a lock body over MaxLockBody was accepted")
	}
	if _, held, _ := l.Holder(); held {
		t.Error("a refused name left a marker")
	}
}

// close stops h as a kill would: no more refreshes, the marker left.
func (h *Hold) close() {
	h.closed = true
	close(h.stop)
	<-h.done
	h.lost()
}

func testRefresh(t *testing.T, newLocks func() *Locks) {
	defer func(old time.Duration) { markerRefresh = old }(markerRefresh)
	markerRefresh = 100 * time.Millisecond
	l := newLocks()
	h := hold(t, l)
	if s := h.Skew(); s > time.Minute || s < -time.Minute {
		t.Errorf("skew %s between two clocks of one machine", s)
	}
	first, err := l.st.Stat(context.Background(), markerName)
	if err != nil {
		t.Fatal(err)
	}
	for range 50 {
		time.Sleep(markerRefresh)
		info, err := l.st.Stat(context.Background(), markerName)
		if err != nil {
			t.Fatal(err)
		}
		if info.ModTime.After(first.ModTime) {
			break
		}
	}
	if info, _ := l.st.Stat(context.Background(), markerName); !info.ModTime.After(first.ModTime) {
		t.Fatalf("the marker was not refreshed: modified %v, as when taken", info.ModTime)
	}
	if h.Context().Err() != nil {
		t.Fatal("the hold was lost while refreshing its own marker")
	}
	// Another prune overwrites the marker (it judged it stale): this one
	// notices at its next refresh and stops.
	if _, err := l.st.Put(context.Background(), markerName, strings.NewReader("pid 2 elsewhere"), 15); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.Context().Done():
	case <-time.After(100 * markerRefresh):
		t.Fatal("the hold did not notice that its marker was taken over")
	}
	h.Release()
	if who, held, _ := l.Holder(); !held || who != "pid 2 elsewhere" {
		t.Errorf("a lost hold's release touched the other prune's marker: %q, %v", who, held)
	}
}
