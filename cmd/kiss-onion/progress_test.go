package main

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/prune"
)

func TestParsePathInfo(t *testing.T) {
	for _, tt := range []struct{ name, json string }{
		{"a list (Nix 2.8 to 2.18)", `[{"path":"/nix/store/aaa-lib","narSize":120,"references":[]},{"path":"/nix/store/bbb-app","narSize":160}]`},
		{"an object by path (later Nix)", `{"/nix/store/aaa-lib":{"narSize":120},"/nix/store/bbb-app":{"narSize":160,"references":["/nix/store/aaa-lib"]}}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sizes, err := parsePathInfo([]byte(tt.json))
			if err != nil {
				t.Fatal(err)
			}
			if len(sizes) != 2 || sizes["/nix/store/aaa-lib"] != 120 || sizes["/nix/store/bbb-app"] != 160 {
				t.Errorf("sizes = %v", sizes)
			}
		})
	}
	if _, err := parsePathInfo([]byte("error: nope")); err == nil {
		t.Error("parsePathInfo of garbage: no error")
	}
}

// cliLog returns a logger in the house style on a buffer.
func cliLog(t *testing.T, format string) (*logrus.Entry, *bytes.Buffer) {
	t.Helper()
	var buf bytes.Buffer
	log, err := logFlags{format, "info"}.cli(&buf)
	if err != nil {
		t.Fatal(err)
	}
	return log, &buf
}

// TestPushProgressWithoutATerminal: nix copy's output passes as it is, and
// a line at the end counts the paths pushed and their NAR sizes.
func TestPushProgressWithoutATerminal(t *testing.T) {
	log, logged := cliLog(t, "text")
	var nixOut bytes.Buffer
	p := &pushProgress{out: &nixOut, log: log, sizes: map[string]int64{
		"/nix/store/aaa-lib": 1 << 20, "/nix/store/bbb-app": 2 << 20, "/nix/store/ccc-glibc": 30 << 20,
	}, total: 3}
	out := "copying 2 paths...\ncopying path '/nix/store/aaa-lib' to 'http://127.0.0.1:8081'...\nwarn"
	// In pieces, as a pipe delivers it.
	for _, piece := range []string{out[:10], out[10:40], out[40:]} {
		p.Write([]byte(piece))
	}
	p.Write([]byte("ing: something\ncopying path '/nix/store/bbb-app' from 'local' to 'http://127.0.0.1:8081'...\n"))
	p.end(nil)
	if got, want := nixOut.String(), out+"ing: something\ncopying path '/nix/store/bbb-app' from 'local' to 'http://127.0.0.1:8081'...\n"; got != want {
		t.Errorf("nix's output became\n%q\nwant\n%q", got, want)
	}
	want := "kiss-onion: pushed 2 paths (3.0 MiB of NARs, uncompressed); 1 of the closure's 3 were in the cache already (bytes=3145728, paths=2)\n"
	if logged.String() != want {
		t.Errorf("logged\n%q\nwant\n%q", logged.String(), want)
	}
}

func TestPushProgressSaysNothingOfAFailedPush(t *testing.T) {
	log, logged := cliLog(t, "text")
	p := &pushProgress{out: &bytes.Buffer{}, log: log}
	p.Write([]byte("copying 1 paths...\ncopying path '/nix/store/aaa-lib' to 'http://x'...\nerror: refused"))
	p.end(errTest)
	if logged.Len() != 0 {
		t.Errorf("a failed push logged %q", logged.String())
	}
}

var errTest = errors.New("nix copy failed")

// TestPruneProgressWithoutATerminal: a line at each change of phase, not
// one for every report.
func TestPruneProgressWithoutATerminal(t *testing.T) {
	log, logged := cliLog(t, "text")
	progress := pruneProgress(nil, log)
	for _, st := range []prune.Stats{
		{Phase: prune.PhaseWaiting},
		{Phase: prune.PhaseScanning, Scanned: 10},
		{Phase: prune.PhaseScanning, Scanned: 20},
		{Phase: prune.PhaseDeleting, Scanned: 30, Kept: 20, Deleted: 2, BytesFreed: 2048},
		{Phase: prune.PhaseDone, Scanned: 30, Kept: 20, Deleted: 4, BytesFreed: 4096, Elapsed: time.Second},
	} {
		progress(st)
	}
	want := "kiss-onion: prune: waiting for upload locks (deleted=0, freed=0 B, kept=0, scanned=0)\n" +
		"kiss-onion: prune: scanning (deleted=0, freed=0 B, kept=0, scanned=10)\n" +
		"kiss-onion: prune: deleting (deleted=2, freed=2.0 KiB, kept=20, scanned=30)\n"
	if logged.String() != want {
		t.Errorf("logged\n%s\nwant\n%s", logged, want)
	}
}
