package cachelock

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestAcquireRefreshRelease(t *testing.T) {
	l := New(t.TempDir())
	if err := l.Acquire("ci", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire("ci", []byte("two")); err != nil {
		t.Fatalf("refresh: %v", err)
	}
	got, _ := os.ReadFile(filepath.Join(l.Dir(), "ci"))
	if string(got) != "two" {
		t.Errorf("lock body = %q, want %q", got, "two")
	}
	if err := l.Release("ci"); err != nil {
		t.Fatal(err)
	}
	if err := l.Release("ci"); err != nil {
		t.Errorf("release of an absent lock: %v", err)
	}
}

func TestAcquireRefusesBadInput(t *testing.T) {
	l := New(t.TempDir())
	for _, tc := range []struct {
		name string
		body []byte
	}{
		{"", nil},
		{".prune", nil},
		{"a/b", nil},
		{"big", make([]byte, MaxLockBody+1)},
	} {
		if err := l.Acquire(tc.name, tc.body); err == nil {
			t.Errorf("Acquire(%q, %d bytes) = nil, want an error", tc.name, len(tc.body))
		}
	}
}

func TestHoldMakesAcquireBusy(t *testing.T) {
	l := New(t.TempDir())
	h, err := l.Hold(context.Background(), 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Acquire("late", nil); !errors.Is(err, ErrBusy) {
		t.Errorf("Acquire during a prune = %v, want ErrBusy", err)
	}
	if _, err := l.Hold(context.Background(), 0, nil); !errors.Is(err, ErrPruneRunning) {
		t.Errorf("second prune = %v, want ErrPruneRunning", err)
	}
	h.Release()
	if err := l.Acquire("late", nil); err != nil {
		t.Errorf("Acquire after the prune: %v", err)
	}
}

func TestKilledPruneMarkerHoldsNothing(t *testing.T) {
	l := New(t.TempDir())
	os.MkdirAll(l.Dir(), 0o755)
	// A marker left behind by a killed prune: present, but nobody flocks it.
	os.WriteFile(filepath.Join(l.Dir(), pruneFile), []byte("pid 1\n"), 0o644)
	if err := l.Acquire("ci", nil); err != nil {
		t.Errorf("Acquire beside a dead prune's marker: %v", err)
	}
	l.Release("ci")
	h, err := l.Hold(context.Background(), 0, nil)
	if err != nil {
		t.Fatalf("prune beside a dead prune's marker: %v", err)
	}
	h.Release()
}

func TestHoldWaitsForFreshLocks(t *testing.T) {
	l := New(t.TempDir())
	if err := l.Acquire("uploader", nil); err != nil {
		t.Fatal(err)
	}
	// A stale lock is ignored.
	l.Acquire("dead", nil)
	old := time.Now().Add(-StaleAfter - time.Minute)
	os.Chtimes(filepath.Join(l.Dir(), "dead"), old, old)

	var waited atomic.Bool
	go func() {
		time.Sleep(200 * time.Millisecond)
		// The holder may still refresh its fresh lock while the prune waits.
		if err := l.Acquire("uploader", []byte("refresh")); err != nil {
			t.Errorf("refresh while a prune waits: %v", err)
		}
		waited.Store(true)
		l.Release("uploader")
	}()
	h, err := l.Hold(context.Background(), 10*time.Second, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	if !waited.Load() {
		t.Error("the prune went on while a fresh lock was held")
	}
	// The stale lock cannot come back to life behind the prune.
	if err := l.Acquire("dead", nil); !errors.Is(err, ErrBusy) {
		t.Errorf("refresh of a stale lock during a prune = %v, want ErrBusy", err)
	}
}

func TestHoldGivesUp(t *testing.T) {
	l := New(t.TempDir())
	l.Acquire("ci-7", nil)
	_, err := l.Hold(context.Background(), 300*time.Millisecond, nil)
	if err == nil || !strings.Contains(err.Error(), "ci-7") {
		t.Fatalf("hold = %v, want an error naming ci-7", err)
	}
	// Giving up un-marks the cache.
	if err := l.Acquire("other", nil); err != nil {
		t.Errorf("Acquire after a prune gave up: %v", err)
	}
}

func TestGuardExcludesDeletion(t *testing.T) {
	l := New(t.TempDir())
	var inGuard, overlap atomic.Int32
	start := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Guard(func() error {
			inGuard.Add(1)
			close(start)
			time.Sleep(200 * time.Millisecond)
			inGuard.Add(-1)
			return nil
		})
	}()
	<-start
	// Guards share.
	if err := l.Guard(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	l.Exclusive(func() error {
		if inGuard.Load() != 0 {
			overlap.Add(1)
		}
		return nil
	})
	<-done
	if overlap.Load() != 0 {
		t.Error("the deletion phase ran while a Guard was running")
	}
	want := errors.New("fn failed")
	if err := l.Guard(func() error { return want }); err != want {
		t.Errorf("Guard returned %v, want fn's error", err)
	}
}
