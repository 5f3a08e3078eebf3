package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/prune"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/serve"
)

// statusFixture is a state and a cache directory with what status reads:
// two clients (one revoked), the onions' addresses, a prune's record, a
// held upload lock and three narinfos.
func statusFixture(t *testing.T) (stateDir, cacheDir string, clients map[string]clientauth.PublicKey) {
	t.Helper()
	root := t.TempDir()
	stateDir, cacheDir = filepath.Join(root, "state"), filepath.Join(root, "cache")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(pt.Init(cacheDir))
	for _, p := range []pt.Path{{Name: "a", Refs: []string{"b"}}, {Name: "b"}, {Name: "c"}} {
		must(pt.Write(cacheDir, p))
	}
	must(pt.WriteMarker(cacheDir, "web1", "a"))
	// Old enough for the prune to judge them.
	old := time.Now().Add(-time.Hour)
	filepath.WalkDir(cacheDir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			os.Chtimes(p, old, old)
		}
		return nil
	})
	clients = map[string]clientauth.PublicKey{}
	must(clientauth.UpdateRegistry(filepath.Join(stateDir, clientauth.RegistryFileName), func(r *clientauth.Registry) error {
		for _, c := range []struct {
			name string
			role clientauth.Role
		}{{"laptop", clientauth.RoleReader}, {"ci", clientauth.RoleWriter}, {"stolen", clientauth.RoleReader}} {
			k, err := clientauth.GeneratePrivateKey()
			if err != nil {
				return err
			}
			if _, err := r.Add(c.name, c.role, k.PublicKey()); err != nil {
				return err
			}
			clients[c.name] = k.PublicKey()
		}
		return r.Revoke("stolen")
	}))
	for _, role := range []string{"read", "write"} {
		must(os.WriteFile(filepath.Join(stateDir, role+".onion"), []byte(strings.Repeat(role[:1], 56)+".onion\n"), 0o644))
	}
	if _, err := prune.Run(context.Background(), prune.Options{CacheDir: cacheDir, StateDir: stateDir, Log: quietLog()}); err != nil {
		t.Fatal(err)
	}
	must(cachelock.New(cacheDir).Acquire("ci-job-7", []byte("x")))
	return stateDir, cacheDir, clients
}

// statusJSON runs kiss-onion status ARGS... --json and decodes its report.
func statusJSON(t *testing.T, args ...string) statusReport {
	t.Helper()
	var out bytes.Buffer
	old := statusOut
	statusOut = &out
	defer func() { statusOut = old }()
	code, stderr, _ := runInProcess(t, append([]string{"status", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, stderr)
	}
	var rep statusReport
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out.String())
	}
	return rep
}

// checkFilesPart checks what status reads from the fixture's files.
func checkFilesPart(t *testing.T, rep statusReport, clients map[string]clientauth.PublicKey) {
	t.Helper()
	if len(rep.Onions) != 2 || rep.Onions[0].Role != "read" || rep.Onions[0].Address != strings.Repeat("r", 56)+".onion" {
		t.Errorf("onions: %+v", rep.Onions)
	}
	if len(rep.Clients) != 3 {
		t.Fatalf("clients: %+v", rep.Clients)
	}
	for _, c := range rep.Clients {
		if c.Door != "onion" || c.Fingerprint != clients[c.Name].Fingerprint() || c.Added == nil || (c.Revoked != nil) != (c.Name == "stolen") {
			t.Errorf("client %+v", c)
		}
	}
	if rep.LastPrune == nil || rep.LastPrune.Error != "" || rep.LastPrune.Kept != 2 || rep.LastPrune.DeletedNarInfos != 1 {
		t.Errorf("last prune: %+v", rep.LastPrune)
	}
	if len(rep.Locks) != 1 || rep.Locks[0].Name != "ci-job-7" || !rep.Locks[0].Fresh {
		t.Errorf("locks: %+v", rep.Locks)
	}
	if rep.Cache.DiskSize <= 0 || rep.Cache.DiskFree <= 0 {
		t.Errorf("disk: %+v", rep.Cache)
	}
	if len(rep.Problems) > 0 {
		t.Errorf("problems: %q", rep.Problems)
	}
}

func TestStatusWithoutServe(t *testing.T) {
	stateDir, cacheDir, clients := statusFixture(t)
	rep := statusJSON(t, "--state-dir", stateDir, "--cache-dir", cacheDir)
	if rep.Serve.Running || !strings.Contains(rep.Serve.Why, "not running") {
		t.Errorf("serve: %+v", rep.Serve)
	}
	checkFilesPart(t, rep, clients)
	// The prune left a and b; status counted them itself.
	if rep.Cache.NarInfos != 2 || rep.Cache.CountedAt == nil || rep.Cache.Bytes == 0 {
		t.Errorf("cache: %+v", rep.Cache)
	}
}

func TestStatusAsksServe(t *testing.T) {
	stateDir, cacheDir, clients := statusFixture(t)
	f := serveFlags{stateDir: stateDir, cacheDir: cacheDir, torMode: "off", pruneEvery: time.Hour}
	cache, err := serve.New(serve.Config{Dir: cacheDir, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	s := newStatusServer(f, cache)
	s.listening(serve.Read, "http://127.0.0.1:8080")
	if err := s.start(quietLog()); err != nil {
		t.Fatal(err)
	}
	defer s.stop()
	fi, err := os.Stat(statusSocket(stateDir))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("status socket: %v, mode %v", err, fi.Mode())
	}
	var rep statusReport
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		rep = statusJSON(t, "--state-dir", stateDir, "--cache-dir", "/nowhere")
		if !rep.Cache.Counting || time.Now().After(end) {
			break
		}
	}
	if !rep.Serve.Running || rep.Serve.PID != os.Getpid() || rep.Serve.Since == nil || rep.Serve.PruneInterval != "1h0m0s" {
		t.Errorf("serve: %+v", rep.Serve)
	}
	if rep.CacheDir != cacheDir {
		t.Errorf("cache_dir %q, want serve's %q", rep.CacheDir, cacheDir)
	}
	// serve's own figures: no walk of the directory, the cache's count.
	size, _ := cache.Size()
	if rep.Cache.NarInfos != 2 || rep.Cache.CountedAt == nil || !rep.Cache.Live || rep.Cache.Files != size.Files || rep.Cache.Bytes != size.Bytes || size.Files == 0 {
		t.Errorf("cache: %+v, want serve's %+v", rep.Cache, size)
	}
	if len(rep.Listeners) != 1 || rep.Listeners[0].URL != "http://127.0.0.1:8080" {
		t.Errorf("listeners: %+v", rep.Listeners)
	}
	rep.Onions = []onionStatus{{Role: "read", Address: strings.Repeat("r", 56) + ".onion"}, {Role: "write", Address: strings.Repeat("w", 56) + ".onion"}}
	checkFilesPart(t, rep, clients)

	// A hold on the cache shows.
	must(t, cachelock.New(cacheDir).Release("ci-job-7"))
	h, err := cachelock.New(cacheDir).Hold(context.Background(), 0, nil)
	must(t, err)
	defer h.Release()
	if rep := statusJSON(t, "--state-dir", stateDir); !strings.HasPrefix(rep.HeldBy, "pid ") || len(rep.Locks) != 0 {
		t.Errorf("held by %q, locks %+v", rep.HeldBy, rep.Locks)
	}
}

func TestPrintStatus(t *testing.T) {
	now := time.Date(2025, 5, 1, 12, 0, 0, 0, time.UTC)
	ago := func(d time.Duration) *time.Time { t := now.Add(-d); return &t }
	running := statusReport{
		CacheDir: "/srv/cache", StateDir: "/var/lib/kiss-onion",
		Serve: serveStatus{Running: true, PID: 42, Since: ago(3 * time.Hour), Tor: "public", TorPID: 43},
		Onions: []onionStatus{{Role: "read", Address: "r.onion", Published: true, Since: ago(time.Hour), Keys: 3},
			{Role: "write", Address: "w.onion", Since: ago(time.Minute)}},
		Clients: []clientStatus{{Name: "ci", Role: "writer", Door: "onion", Fingerprint: "abcdefgh12345678", Added: ago(48 * time.Hour)},
			{Name: "laptop", Role: "reader", Door: "onion", Fingerprint: "12345678abcdefgh", Added: ago(24 * time.Hour), Revoked: ago(time.Hour)}},
		Cache:     cacheStatus{NarInfos: 1200, Files: 2500, Bytes: 3 << 30, CountedAt: ago(time.Minute), DiskFree: 10 << 30, DiskSize: 100 << 30},
		LastPrune: &prune.Record{Finished: now.Add(-2 * time.Hour), Summary: "10 narinfos scanned"},
		Locks:     []lockStatus{{Name: "ci-job-7", Refreshed: now.Add(-10 * time.Second), Fresh: true}},
	}
	stopped := statusReport{CacheDir: "/srv/cache", StateDir: "/var/lib/kiss-onion",
		Serve:     serveStatus{Why: "not running (nothing answers on /var/lib/kiss-onion/sock/status.sock)"},
		Onions:    []onionStatus{{Role: "read", Address: "r.onion"}},
		LastPrune: &prune.Record{Finished: now.Add(-2 * time.Hour), Error: "upload locks still held"},
		HeldBy:    "pid 7 on box since 2025-05-01T11:59:00Z"}
	for _, tc := range []struct {
		name string
		rep  statusReport
		want []string
	}{
		{"a running serve", running, []string{
			"running, pid 42, since 2025-05-01 09:00:00 UTC (3h0m0s ago); tor public, pid 43",
			"read   r.onion  published since 2025-05-01 11:00:00 UTC (1h0m0s ago), 3 client keys",
			"write  w.onion  not published since",
			"/srv/cache: 1200 narinfos, 2500 files, 3.0 GiB (counted 1m0s ago)",
			"disk: 10.0 GiB free of 100.0 GiB",
			"last prune  2025-05-01 10:00:00 UTC (2h0m0s ago): 10 narinfos scanned",
			"upload lock ci-job-7, refreshed",
			"CLIENT", "laptop  reader  onion  12345678abcdefgh",
			"ci      writer  onion  abcdefgh12345678",
		}},
		{"serve's figures", func() statusReport {
			r := running
			r.Cache.Live = true
			return r
		}(), []string{
			"/srv/cache: 1200 narinfos, 2500 files, 3.0 GiB (serve's figures, as in its metrics: counted at its start, kept up to date since)",
		}},
		{"serve not running", stopped, []string{
			"serve       not running (nothing answers on",
			"read   r.onion  serve did not answer",
			"failed: upload locks still held",
			"held by a prune or forget: pid 7 on box",
			"clients: none",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b bytes.Buffer
			printStatus(&b, tc.rep, now)
			for _, w := range tc.want {
				if !strings.Contains(b.String(), w) {
					t.Errorf("no %q in:\n%s", w, b.String())
				}
			}
			if n := strings.Count(b.String(), "\n"); n > 24 {
				t.Errorf("%d lines: more than a screen", n)
			}
		})
	}
}
