package serve

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The cache serves what is in it, never what a symlink in it points at,
// and under gcroots/ only what can be a marker.
func TestReadsNeverFollowSymlinks(t *testing.T) {
	tc := newTestCache(t, nil)
	outside := filepath.Join(tc.root, "outside")
	secret := filepath.Join(outside, "secret")
	narinfo := "StorePath: /nix/store/" + hashA + "-a\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:" + strings.Repeat("0", 52) + "\nNarSize: 1\n"
	if err := os.WriteFile(filepath.Join(outside, "a.narinfo"), []byte(narinfo), 0o644); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(tc.dir, "log"), 0o755)
	for _, l := range [][2]string{
		{secret, "nar/planted.nar"},
		{filepath.Join(outside, "a.narinfo"), hashA + ".narinfo"},
		{secret, "log/" + hashB + "-planted.drv"},
		{outside, "debuginfo"}, // a symlinked directory on the way
		{"../nix-cache-info", "nar/inside.nar"},
	} {
		if err := os.Symlink(l[0], filepath.Join(tc.dir, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(outside, "0123"), []byte("{}"), 0o644)
	for _, srv := range []*testServer{tc.read, tc.write} {
		for _, path := range []string{"/nar/planted.nar", "/" + hashA + ".narinfo", "/log/" + hashB + "-planted.drv", "/debuginfo/0123", "/nar/inside.nar"} {
			resp, body := do(t, srv, "GET", path, nil)
			if resp.StatusCode != 404 || strings.Contains(body, "secret") || strings.Contains(body, "StorePath") || strings.Contains(body, "StoreDir") {
				t.Errorf("GET %s through a symlink: %d %q, want 404", path, resp.StatusCode, body)
			}
		}
	}
}

func TestGCRootsServeOnlyMarkers(t *testing.T) {
	tc := newTestCache(t, nil)
	// A state directory misplaced under gcroots/ (through a symlink that
	// the operator's checks did not see through): its keys stay unread.
	st := filepath.Join(tc.dir, "gcroots", "st", "onion")
	os.MkdirAll(st, 0o700)
	os.WriteFile(filepath.Join(st, "read.key"), []byte("== ed25519v1-secret: type0 ==\nAAAA\n"), 0o600)
	os.WriteFile(filepath.Join(tc.dir, "gcroots", "st", "clients.toml"), []byte("[clients.a]\nkey = \"x\"\n"), 0o600)
	marker := "# a comment\n/nix/store/" + hashA + "-a\n"
	os.WriteFile(filepath.Join(tc.dir, "gcroots", "web1"), []byte(marker), 0o644)
	for _, srv := range []*testServer{tc.read, tc.write} {
		for _, tt := range []struct {
			path   string
			status int
			body   string
		}{
			{"/gcroots/st/onion/read.key", 404, ""},
			{"/gcroots/st/clients.toml", 404, ""},
			{"/gcroots/web1", 200, marker},
		} {
			resp, body := do(t, srv, "GET", tt.path, nil)
			if resp.StatusCode != tt.status || (tt.status == 200 && body != tt.body) || (tt.status != 200 && strings.Contains(body, "AAAA")) {
				t.Errorf("GET %s: %d %q, want %d", tt.path, resp.StatusCode, body, tt.status)
			}
		}
	}
}

func TestStartingServeRemovesWhatKilledUploadsLeft(t *testing.T) {
	tc := newTestCache(t, nil)
	tmp := filepath.Join(tc.dir, ".tmp")
	dead := filepath.Join(tmp, ".x.nar.123")
	live := filepath.Join(tmp, ".y.nar.456")
	os.WriteFile(dead, []byte("partial"), 0o644)
	os.WriteFile(live, []byte("arriving"), 0o644)
	// A live upload of another process holds its file.
	f, err := os.Open(live)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Fatal(err)
	}
	cfg := tc.cfg
	if _, err := New(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dead); err == nil {
		t.Error("a dead upload's file stayed in .tmp/")
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a live upload's file was removed: %v", err)
	}

	// An upload in flight in this process is held too: a second serve
	// starting on the cache meanwhile leaves its file, and it completes.
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("PUT", tc.write.URL+"/log/"+hashB+"-held.drv", pr)
	req.ContentLength = 8
	done := make(chan int, 1)
	go func() {
		resp, err := tc.write.Client().Do(req)
		if err != nil {
			done <- 0
			return
		}
		resp.Body.Close()
		done <- resp.StatusCode
	}()
	pw.Write([]byte("half"))
	var inFlight []string
	for i := 0; i < 500 && len(inFlight) == 0; i++ {
		time.Sleep(10 * time.Millisecond)
		inFlight = listTree(t, tmp)
		inFlight = slices.DeleteFunc(inFlight, func(n string) bool { return n == "." || strings.HasPrefix(n, ".y.nar") })
	}
	if len(inFlight) == 0 {
		t.Fatal("the upload made no file in .tmp/")
	}
	if _, err := New(cfg); err != nil {
		t.Fatal(err)
	}
	pw.Write([]byte("done"))
	pw.Close()
	if status := <-done; status != 201 {
		t.Errorf("upload in flight while a serve started: %d, want 201", status)
	}
	if got, err := os.ReadFile(filepath.Join(tc.dir, "log", hashB+"-held.drv")); err != nil || string(got) != "halfdone" {
		t.Errorf("uploaded log = %q, %v", got, err)
	}
}
