package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/s3store"
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

// TestForgetStore runs 'kiss-onion forget --store s3://…' against a real
// SeaweedFS: a referenced path is refused with its referrers and
// markers listed, a dry run deletes nothing, a leaf goes with its NAR.
func TestForgetStore(t *testing.T) {
	srv := s3test.Start(t)
	t.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket, Prefix: "cache",
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey})
	must(t, err)
	ctx := context.Background()
	put := func(name string, body []byte) {
		_, err := st.Put(ctx, name, bytes.NewReader(body), int64(len(body)))
		must(t, err)
	}
	put("nix-cache-info", []byte("StoreDir: /nix/store\n"))
	for _, p := range []pt.Path{{Name: "lib"}, {Name: "app", Refs: []string{"lib"}}, {Name: "other"}} {
		put(pt.NarURL(p.Name), []byte("nar of "+p.Name))
		put(pt.NarInfoFile(p.Name), pt.NarInfo(p))
	}
	put("gcroots/web1", []byte(pt.StorePath("app")+"\n"))
	time.Sleep(3 * time.Second) // older than a forget takes for new
	exists := func(name string) bool {
		_, err := st.Stat(ctx, name)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		return err == nil
	}
	store := "s3://" + srv.Bucket + "/cache?" + url.Values{"endpoint": {"http://" + srv.Endpoint}, "region": {srv.Region}}.Encode()
	sp := pt.StorePath

	code, stdout, stderr := forgetRun(t, "--store", store, "--state-dir", "", sp("lib"))
	if code != 1 || !strings.Contains(stdout, "referrer "+sp("app")+"\n") || !strings.Contains(stdout, "marker gcroots/web1 names "+sp("app")+"\n") ||
		!strings.Contains(stderr, "still referenced by paths in the cache: 1 referrer(s), rooted by 1 marker(s)") {
		t.Errorf("refused forget: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	code, stdout, stderr = forgetRun(t, "--store", store, "--state-dir", "", "--dry-run", "--with-referrers", sp("lib"))
	if code != 0 || !strings.Contains(stdout, "would forget "+sp("app")+"\nwould forget "+sp("lib")+"\n") ||
		!strings.Contains(stdout, "would delete "+pt.NarURL("lib")) || !strings.Contains(stdout, "dry run: 2 paths would be forgotten: 4 files") {
		t.Errorf("dry run: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	for _, n := range []string{"lib", "app", "other"} {
		if !exists(pt.NarInfoFile(n)) || !exists(pt.NarURL(n)) {
			t.Fatalf("%s is gone after a refusal and a dry run", n)
		}
	}

	code, stdout, stderr = forgetRun(t, "--store", store, "--state-dir", "", "--lock-wait", "10s", pt.BaseName("app"))
	if code != 0 || !strings.Contains(stdout, "forgetting "+sp("app")+"\n") || !strings.Contains(stdout, "kiss-onion: forgot 1 path: 2 files") ||
		!strings.Contains(stderr, "warning: marker gcroots/web1 names "+sp("app")+", which is no longer in the cache") {
		t.Errorf("forget: exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	if exists(pt.NarInfoFile("app")) || exists(pt.NarURL("app")) {
		t.Error("app is still in the bucket")
	}
	for _, n := range []string{"lib", "other"} {
		if !exists(pt.NarInfoFile(n)) || !exists(pt.NarURL(n)) {
			t.Errorf("%s is gone", n)
		}
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--store", store, "--cache-dir", t.TempDir()}, "give --store, or --cache-dir, --cache or --bundle"},
		{[]string{"--store", store, "--cache", "http://127.0.0.1:1"}, "give --store, or --cache-dir, --cache or --bundle"},
		{[]string{"--store", store, "--bundle", t.TempDir()}, "give --store, or --cache-dir, --cache or --bundle"},
		{[]string{"--store", "/srv/cache"}, "want s3://BUCKET/PREFIX"},
		{[]string{"--s3-region", "eu-west-1"}, "are for --store"},
		{[]string{"--single-pruner"}, "are for --store"},
		{[]string{"--store", "s3://b/p?colour=red"}, "unknown parameter"},
	} {
		code, _, stderr := forgetRun(t, append(append([]string{"--state-dir", ""}, tc.args...), sp("other"))...)
		if code != 2 || !strings.Contains(stderr, tc.want) {
			t.Errorf("forget %q: exit %d, want 2 and an error saying %q:\n%s", tc.args, code, tc.want, stderr)
		}
	}
	if !exists(pt.NarInfoFile("other")) {
		t.Error("a usage error deleted something")
	}
}
