package prune

import (
	"context"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

func TestLastRunRecordsEachPrune(t *testing.T) {
	dir := scenario{paths: []pt.Path{p("a"), p("g")}, markers: map[string][]string{"m": {"a"}}}.build(t)
	state := t.TempDir()
	if _, ok, err := LastRun(state, dir); ok || err != nil {
		t.Fatalf("LastRun before any prune: %v, %v", ok, err)
	}
	run := func(o Options) {
		o.CacheDir, o.StateDir, o.Log = dir, state, quietLog()
		Run(context.Background(), o)
	}

	run(Options{DryRun: true})
	if _, ok, _ := LastRun(state, dir); ok {
		t.Error("a dry run left a record")
	}

	before := time.Now().Add(-time.Second)
	run(Options{})
	r, ok, err := LastRun(state, dir)
	if !ok || err != nil {
		t.Fatalf("LastRun after a prune: %v, %v", ok, err)
	}
	if r.Error != "" || r.DeletedNarInfos != 1 || r.Kept != 1 || r.Finished.Before(before) || r.Finished.Before(r.Started) || r.Summary == "" {
		t.Errorf("record of a prune that deleted one narinfo: %+v", r)
	}

	// A failed prune is recorded with its error.
	locks := cachelock.New(dir)
	must(t, locks.Acquire("upload", nil))
	run(Options{LockWait: 0})
	r, _, _ = LastRun(state, dir)
	if r.Error == "" {
		t.Errorf("record of a prune that found a lock held: %+v", r)
	}
	if other, ok, _ := LastRun(state, t.TempDir()); ok {
		t.Errorf("another cache's record: %+v", other)
	}
}
