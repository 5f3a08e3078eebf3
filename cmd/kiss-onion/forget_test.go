package main

import (
	"bytes"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/serve"
)

// forgetCache is a cache of app -> lib, app -> data -> lib, and other,
// with the marker web1 naming app.
func forgetCache(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	must(t, pt.Init(dir))
	for _, p := range []pt.Path{{Name: "lib"}, {Name: "data", Refs: []string{"lib"}}, {Name: "app", Refs: []string{"lib", "data"}}, {Name: "other"}} {
		must(t, pt.Write(dir, p))
	}
	must(t, pt.WriteMarker(dir, "web1", "app"))
	old := time.Now().Add(-time.Hour)
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			os.Chtimes(p, old, old)
		}
		return nil
	})
	return dir
}

// forgetRun runs kiss-onion forget ARGS... and returns its exit code,
// stdout and stderr.
func forgetRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out bytes.Buffer
	old := forgetOut
	forgetOut = &out
	defer func() { forgetOut = old }()
	code, stderr, _ := runInProcess(t, append([]string{"forget"}, args...)...)
	return code, out.String(), stderr
}

func TestForgetCommand(t *testing.T) {
	sp := pt.StorePath
	for _, tc := range []struct {
		name       string
		args       []string // after --cache-dir DIR --state-dir ""
		code       int
		stdout     []string
		stderr     []string
		gone, kept []string
	}{
		{name: "a leaf", args: []string{sp("app")}, code: 0,
			stdout: []string{"forgetting " + sp("app") + "\n", "kiss-onion: forgot 1 path: 2 files"},
			stderr: []string{"kiss-onion: warning: marker gcroots/web1 names " + sp("app") + ", which is no longer in the cache"},
			gone:   []string{"app"}, kept: []string{"lib", "data", "other"}},
		{name: "a referenced path is refused", args: []string{sp("lib")}, code: 1,
			stdout: []string{"referrer " + sp("app") + "\n", "referrer " + sp("data") + "\n", "marker gcroots/web1 names " + sp("app") + "\n"},
			stderr: []string{"kiss-onion: error: forget: " + sp("lib") + ": still referenced by paths in the cache: 2 referrer(s), rooted by 1 marker(s)",
				"kiss-onion: hint: add --with-referrers"},
			kept: []string{"app", "lib", "data", "other"}},
		{name: "with referrers, after saying what", args: []string{"--with-referrers", sp("lib")}, code: 0,
			stdout: []string{"forgetting " + sp("app") + "\nforgetting " + sp("data") + "\nforgetting " + sp("lib") + "\n", "forgot 3 paths: 6 files"},
			gone:   []string{"app", "data", "lib"}, kept: []string{"other"}},
		{name: "a dry run", args: []string{"--dry-run", sp("other")}, code: 0,
			stdout: []string{"would forget " + sp("other"), "would delete " + pt.NarInfoFile("other"), "would delete " + pt.NarURL("other"), "dry run: 1 path would be forgotten: 2 files"},
			kept:   []string{"app", "lib", "data", "other"}},
		{name: "a path not in the cache", args: []string{pt.BaseName("nowhere")}, code: 1,
			stderr: []string{"warning: " + pt.BaseName("nowhere") + " is not in the cache", "error: forget: none of the paths is in the cache"}},
		{name: "one path there, one not", args: []string{pt.HashPart("other"), sp("nowhere")}, code: 0,
			stderr: []string{"warning: " + sp("nowhere") + " is not in the cache"},
			gone:   []string{"other"}},
		{name: "no path", code: 2, stderr: []string{"forget needs at least one STORE_PATH"}},
		{name: "not a store path", args: []string{"/etc/passwd"}, code: 2, stderr: []string{"is not a store path under /nix/store"}},
		{name: "--dry-run through the write role", args: []string{"--cache", "http://127.0.0.1:1", "--dry-run", sp("lib")}, code: 2},
		{name: "--cache and --cache-dir", args: []string{"--cache", "http://127.0.0.1:1", sp("lib")}, code: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := forgetCache(t)
			code, stdout, stderr := forgetRun(t, append([]string{"--cache-dir", dir, "--state-dir", ""}, tc.args...)...)
			if code != tc.code {
				t.Fatalf("exit %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, stdout, stderr)
			}
			for _, w := range tc.stdout {
				if !strings.Contains(stdout, w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout)
				}
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
			for _, n := range tc.gone {
				if _, err := os.Stat(filepath.Join(dir, pt.NarInfoFile(n))); err == nil {
					t.Errorf("%s is still there", n)
				}
			}
			for _, n := range tc.kept {
				if _, err := os.Stat(filepath.Join(dir, pt.NarInfoFile(n))); err != nil {
					t.Errorf("%s is gone", n)
				}
			}
		})
	}
}

func TestForgetThroughTheWriteRole(t *testing.T) {
	dir := forgetCache(t)
	cache, err := serve.New(serve.Config{Dir: dir, Log: quietLog()})
	must(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	srv := cache.NewServer(serve.Write, quietLog())
	go srv.Serve(ln)
	defer srv.Shutdown(t.Context())
	url := "http://" + ln.Addr().String()
	sp := pt.StorePath

	code, stdout, stderr := forgetRun(t, "--cache", url, sp("lib"))
	if code != 1 || !strings.Contains(stdout, "referrer "+sp("app")+"\n") || !strings.Contains(stdout, "marker gcroots/web1 names "+sp("app")) ||
		!strings.Contains(stderr, "still referenced") {
		t.Errorf("refused forget: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	// Given together, in any order, a path and its referrers all go.
	code, stdout, stderr = forgetRun(t, "--cache", url, sp("lib"), pt.BaseName("data"), pt.HashPart("app"), sp("nowhere"))
	if code != 0 || !strings.Contains(stdout, "kiss-onion: forgot "+sp("lib")) || !strings.Contains(stderr, sp("nowhere")+" is not in the cache") {
		t.Errorf("forget: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	for _, n := range []string{"lib", "data", "app"} {
		if _, err := os.Stat(filepath.Join(dir, pt.NarInfoFile(n))); err == nil {
			t.Errorf("%s is still there", n)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, pt.NarInfoFile("other"))); err != nil {
		t.Error("other is gone")
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}
