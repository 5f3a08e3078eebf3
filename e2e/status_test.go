package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// statusReport is the part of 'kiss-onion status --json' the tests read.
type statusReport struct {
	CacheDir string `json:"cache_dir"`
	Serve    struct {
		Running bool   `json:"running"`
		Why     string `json:"why_not"`
		PID     int    `json:"pid"`
		Tor     string `json:"tor"`
		TorPID  int    `json:"tor_pid"`
	} `json:"serve"`
	Onions []struct {
		Role      string     `json:"role"`
		Address   string     `json:"address"`
		Published bool       `json:"published"`
		Since     *time.Time `json:"since"`
		Keys      int        `json:"client_keys"`
	} `json:"onions"`
	Listeners []struct {
		Role, URL string
	} `json:"listeners"`
	Clients []struct {
		Name        string     `json:"name"`
		Role        string     `json:"role"`
		Door        string     `json:"door"`
		Fingerprint string     `json:"fingerprint"`
		Added       *time.Time `json:"added"`
	} `json:"clients"`
	Cache struct {
		NarInfos  int64      `json:"narinfos"`
		Files     int64      `json:"files"`
		Bytes     int64      `json:"bytes"`
		Live      bool       `json:"live"`
		CountedAt *time.Time `json:"counted_at"`
		DiskFree  int64      `json:"disk_free"`
	} `json:"cache"`
	LastPrune *struct {
		Finished time.Time `json:"finished"`
		Error    string    `json:"error"`
		Kept     int64     `json:"kept"`
	} `json:"last_prune"`
	Locks []struct {
		Name  string `json:"name"`
		Fresh bool   `json:"fresh"`
	} `json:"locks"`
	HeldBy string `json:"held_by"`
}

// status runs kiss-onion status --json ARGS... and decodes its stdout.
func status(t *testing.T, args ...string) statusReport {
	t.Helper()
	cmd := exec.Command(binary, append([]string{"status", "--json"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("status: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	var rep statusReport
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		t.Fatalf("status --json: %v\n%s", err, stdout.String())
	}
	return rep
}

// TestStatusOfServe asks a running serve --tor off for its status, then
// the files once it stopped.
func TestStatusOfServe(t *testing.T) {
	srv := startServer(t, "", "--prune-interval", "1h")
	addKey(t, srv.stateDir, "laptop", "reader")
	addKey(t, srv.stateDir, "ci", "writer")
	key := newSigningKey(t, "e2e-1")
	src := newNix(t)
	top, closure := src.buildClosure(16)
	src.must("nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, top)
	if _, err := visibleFile(t, srv.cacheDir, hashOf(top)+".narinfo"); err != nil {
		t.Fatal(err)
	}
	if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(top+"\n")); code != 201 {
		t.Fatalf("PUT marker: %d %s", code, body)
	}
	if out, code := runKissOnion(t, "prune", "--state-dir", srv.stateDir, srv.cacheDir); code != 0 {
		t.Fatalf("prune: exit %d\n%s", code, out)
	}
	if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/.lock/ci-job-7", strings.NewReader("x")); code != 201 {
		t.Fatalf("PUT lock: %d %s", code, body)
	}

	// The count follows the upload within seconds.
	var rep statusReport
	for end := time.Now().Add(time.Minute); ; time.Sleep(500 * time.Millisecond) {
		rep = status(t, "--state-dir", srv.stateDir)
		if rep.Cache.NarInfos == int64(len(closure)) || time.Now().After(end) {
			break
		}
	}
	if rep.Cache.NarInfos != int64(len(closure)) || rep.Cache.Bytes == 0 || rep.Cache.DiskFree == 0 {
		t.Errorf("cache: %+v, want %d narinfos", rep.Cache, len(closure))
	}
	if !rep.Serve.Running || rep.Serve.PID != srv.cmd.Process.Pid || rep.Serve.Tor != "off" || rep.CacheDir != srv.cacheDir {
		t.Errorf("serve: %+v (cache %s)", rep.Serve, rep.CacheDir)
	}
	if len(rep.Listeners) != 2 || rep.Listeners[0].URL != srv.readURL || rep.Listeners[1].URL != srv.writeURL {
		t.Errorf("listeners: %+v", rep.Listeners)
	}
	checkClients := func(rep statusReport) {
		t.Helper()
		if len(rep.Clients) != 2 {
			t.Fatalf("clients: %+v", rep.Clients)
		}
		for i, want := range [][2]string{{"laptop", "reader"}, {"ci", "writer"}} {
			c := rep.Clients[i]
			if c.Name != want[0] || c.Role != want[1] || c.Door != "onion" || len(c.Fingerprint) != 16 || c.Added == nil {
				t.Errorf("client %d: %+v", i, c)
			}
		}
	}
	checkClients(rep)
	if rep.LastPrune == nil || rep.LastPrune.Error != "" || rep.LastPrune.Kept != int64(len(closure)) || time.Since(rep.LastPrune.Finished) > time.Minute {
		t.Errorf("last prune: %+v", rep.LastPrune)
	}
	if len(rep.Locks) != 1 || rep.Locks[0].Name != "ci-job-7" || !rep.Locks[0].Fresh {
		t.Errorf("locks: %+v", rep.Locks)
	}
	out, code := runKissOnion(t, "status", "--state-dir", srv.stateDir)
	for _, want := range []string{"running, pid", "tor off; prunes every 1h0m0s", srv.readURL, "3 narinfos", "upload lock ci-job-7", "laptop  reader  onion"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("status: exit %d, no %q in:\n%s", code, want, out)
		}
	}

	// Without serve, what the files say.
	srv.stop()
	rep = status(t, "--state-dir", srv.stateDir, "--cache-dir", srv.cacheDir)
	if rep.Serve.Running || !strings.Contains(rep.Serve.Why, "not running") {
		t.Errorf("serve stopped: %+v", rep.Serve)
	}
	checkClients(rep)
	if rep.Cache.NarInfos != int64(len(closure)) || rep.LastPrune == nil || len(rep.Locks) != 1 {
		t.Errorf("without serve: cache %+v, last prune %+v, locks %+v", rep.Cache, rep.LastPrune, rep.Locks)
	}
	out, _ = runKissOnion(t, "status", "--state-dir", srv.stateDir, "--cache-dir", srv.cacheDir)
	if !strings.Contains(out, "not running (nothing answers on "+filepath.Join(srv.stateDir, "sock", "status.sock")+")") {
		t.Errorf("status without serve:\n%s", out)
	}
}

// TestStatusOfOnions asks a serve on the private Tor network whether its
// onions are published, then forgets a path through a gateway to the
// write onion (forget --bundle).
func TestStatusOfOnions(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	writer := addKey(t, stateDir, "ci", "writer")
	addKey(t, stateDir, "laptop", "reader")
	srv := startOnionServer(t, stateDir, cacheDir)

	rep := status(t, "--state-dir", stateDir)
	if !rep.Serve.Running || rep.Serve.Tor != "public" || rep.Serve.TorPID == 0 {
		t.Errorf("serve: %+v", rep.Serve)
	}
	want := map[string]struct {
		addr string
		keys int
	}{"read": {srv.readAddr, 2}, "write": {srv.writeAddr, 1}}
	if len(rep.Onions) != 2 {
		t.Fatalf("onions: %+v", rep.Onions)
	}
	for _, o := range rep.Onions {
		w := want[o.Role]
		if o.Address != w.addr || !o.Published || o.Since == nil || o.Keys != w.keys {
			t.Errorf("%s onion: %+v, want %s published with %d keys", o.Role, o, w.addr, w.keys)
		}
	}

	// A path in the cache (a file:// copy: no upload through the onion
	// needed), forgotten through the write onion.
	src := newNix(t)
	top, _ := src.buildClosure(16)
	src.must("nix", "copy", "--to", "file://"+cacheDir+"?compression=zstd", top)
	began := time.Now()
	out, code := runKissOnion(t, "forget", "--bundle", writer, "--tor-config", torNetConf, "--state-dir", t.TempDir(), "--wait", "4m", top)
	if code != 0 || !strings.Contains(out, "kiss-onion: forgot "+top) {
		t.Fatalf("forget --bundle: exit %d\n%s", code, out)
	}
	t.Logf("forget through the write onion took %v", time.Since(began).Round(time.Millisecond))
	if _, err := os.Stat(filepath.Join(cacheDir, hashOf(top)+".narinfo")); err == nil {
		t.Errorf("%s still in the cache", top)
	}
}

// TestStatusAgreesWithMetrics: with serve running, status reports the
// cache's size from serve's own counter, the one its metrics export: after
// a real nix copy both say the same, and what the directory holds.
func TestStatusAgreesWithMetrics(t *testing.T) {
	metricsAddr := freeAddr(t)
	srv := startServer(t, "", "--metrics-listen", metricsAddr)
	metricsURL := "http://" + metricsAddr + "/metrics"
	src := newNix(t)
	key := newSigningKey(t, "e2e-1")
	var paths int
	var top string
	for range 2 {
		var closure []string
		top, closure = src.buildClosure(64)
		src.must("nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, top)
		paths += len(closure)
	}
	if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(top+"\n")); code != 201 {
		t.Fatalf("PUT marker: %d %s", code, body)
	}
	var rep statusReport
	var m metricValues
	for end := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		m = scrapeMetrics(t, metricsURL)
		rep = status(t, "--state-dir", srv.stateDir)
		if rep.Cache.NarInfos == int64(paths) && m.get("kiss_onion_durability_queue") == 0 {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("status says %+v a minute after the uploads of %d paths (durability queue %v)", rep.Cache, paths, m.get("kiss_onion_durability_queue"))
		}
	}
	files, bytes := cacheSize(t, srv.cacheDir)
	if !rep.Cache.Live || float64(rep.Cache.Files) != m.get("kiss_onion_cache_files") || float64(rep.Cache.Bytes) != m.get("kiss_onion_cache_bytes") {
		t.Errorf("status: %+v; metrics: %v files, %v bytes: they differ", rep.Cache, m.get("kiss_onion_cache_files"), m.get("kiss_onion_cache_bytes"))
	}
	if float64(rep.Cache.Files) != files || float64(rep.Cache.Bytes) != bytes {
		t.Errorf("status: %d files, %d bytes; the directory holds %v files, %v bytes", rep.Cache.Files, rep.Cache.Bytes, files, bytes)
	}
	out, code := runKissOnion(t, "status", "--state-dir", srv.stateDir)
	if want := fmt.Sprintf("%d narinfos, %d files", paths, rep.Cache.Files); code != 0 || !strings.Contains(out, want) || !strings.Contains(out, "serve's figures") {
		t.Errorf("status: exit %d, want %q, serve's figures:\n%s", code, want, out)
	}
}
