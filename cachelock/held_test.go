package cachelock

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestHolder(t *testing.T) {
	l := New(t.TempDir())
	if who, held, err := l.Holder(); held || err != nil || who != "" {
		t.Fatalf("Holder of a fresh cache: %q, %v, %v", who, held, err)
	}
	h, err := l.Hold(context.Background(), 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	who, held, err := l.Holder()
	if !held || err != nil || !strings.HasPrefix(who, "pid ") {
		t.Errorf("Holder while held: %q, %v, %v", who, held, err)
	}
	h.Release()
	if _, held, _ := l.Holder(); held {
		t.Error("Holder after Release: still held")
	}
	// A marker a killed prune left, flocked by nobody, holds nothing.
	if err := os.WriteFile(filepath.Join(l.Dir(), pruneFile), []byte("pid 1 on x since y\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, held, _ := l.Holder(); held {
		t.Error("Holder of a dead prune's marker: held")
	}
}
