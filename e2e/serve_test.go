package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNixRoundTrip pushes a signed closure with the real `nix copy --to`
// through the write listener and substitutes it into a fresh store through
// the read listener, for each compression Nix offers.
func TestNixRoundTrip(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	srv := startServer(t, "")
	for _, tt := range []struct {
		compression string
		params      string
	}{
		{"zstd", "compression=zstd&write-nar-listing=true"},
		{"none", "compression=none"},
		{"xz", "compression=xz&write-nar-listing=true&ls-compression=br&narinfo-compression=gzip"},
	} {
		t.Run(tt.compression, func(t *testing.T) {
			src := newNix(t)
			top, closure := src.buildClosure(256)
			src.must("nix", "copy", "--to", srv.writeURL+"?"+tt.params+"&secret-key="+key.secretFile, top)

			for _, p := range closure {
				hash := strings.TrimPrefix(p, "/nix/store/")[:32]
				b, err := visibleFile(t, srv.cacheDir, hash+".narinfo")
				if err != nil {
					t.Fatalf("no narinfo for %s after nix copy: %v", p, err)
				}
				if !strings.Contains(string(b), "Compression: "+tt.compression+"\n") || !strings.Contains(string(b), "Sig: e2e-1:") {
					t.Errorf("narinfo of %s:\n%s", p, b)
				}
				if strings.Contains(tt.params, "write-nar-listing") {
					ls, err := os.ReadFile(filepath.Join(srv.cacheDir, hash+".ls"))
					if err != nil || !strings.HasPrefix(string(ls), "{") {
						t.Errorf("listing of %s not stored decoded: %v %q", p, err, ls)
					}
				}
			}

			dst := newNix(t, "trusted-public-keys = "+key.public)
			dst.must("nix", "copy", "--from", srv.readURL, top)
			for _, p := range closure {
				sameTree(t, src, dst, p)
			}
			// And as a substituter, the way a machine uses a cache.
			sub := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
			sub.must("nix-store", "--realise", top)
			for _, p := range closure {
				sameTree(t, src, sub, p)
			}
		})
	}
}

// TestNixRefusesWhatIsWrong covers what the real client sees when the cache
// or the upload is wrong: a tampered NAR, an unsigned upload to a cache with
// an upload policy, a write to the read listener.
func TestNixRefusesWhatIsWrong(t *testing.T) {
	key := newSigningKey(t, "e2e-1")
	other := newSigningKey(t, "other-1")

	t.Run("tampered NAR is rejected by nix", func(t *testing.T) {
		srv := startServer(t, "")
		src := newNix(t)
		top, _ := src.buildClosure(64)
		src.must("nix", "copy", "--to", srv.writeURL+"?compression=none&secret-key="+key.secretFile, top)
		hash := strings.TrimPrefix(top, "/nix/store/")[:32]
		ni, _ := visibleFile(t, srv.cacheDir, hash+".narinfo")
		url := ""
		for _, l := range strings.Split(string(ni), "\n") {
			if u, ok := strings.CutPrefix(l, "URL: "); ok {
				url = u
			}
		}
		nar := filepath.Join(srv.cacheDir, url)
		b, err := os.ReadFile(nar)
		if err != nil {
			t.Fatal(err)
		}
		i := strings.Index(string(b), "hello")
		b[i] = 'j' // same size, other content
		if err := os.WriteFile(nar, b, 0o644); err != nil {
			t.Fatal(err)
		}
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		out, err := dst.run(nil, "nix-store", "--realise", top)
		if err == nil || dst.hasPath(top) {
			t.Fatalf("nix accepted a tampered NAR:\n%s", out)
		}
		if !strings.Contains(out, "hash mismatch") {
			t.Errorf("nix failed without naming the hash mismatch:\n%s", out)
		}
	})

	t.Run("upload policy refuses an unsigned or foreign narinfo", func(t *testing.T) {
		srv := startServer(t, "", "--trusted-writer-key", key.public)
		src := newNix(t)
		top, _ := src.buildClosure(16)
		for _, url := range []string{srv.writeURL + "?compression=zstd", srv.writeURL + "?compression=zstd&secret-key=" + other.secretFile} {
			out, err := src.run(nil, "nix", "copy", "--to", url, top)
			if err == nil {
				t.Fatalf("nix copy to %s succeeded without a trusted signature", url)
			}
			if !strings.Contains(out, "422") && !strings.Contains(out, "signature") {
				t.Errorf("nix copy failed without saying why:\n%s", out)
			}
		}
		matches, _ := filepath.Glob(filepath.Join(srv.cacheDir, "*.narinfo"))
		if len(matches) != 0 {
			t.Errorf("unsigned narinfos stored: %v", matches)
		}
		src.must("nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, top)
	})

	t.Run("read listener refuses nix copy --to", func(t *testing.T) {
		srv := startServer(t, "")
		src := newNix(t)
		top, _ := src.buildClosure(16)
		out, err := src.run(nil, "nix", "copy", "--to", srv.readURL+"?compression=zstd&secret-key="+key.secretFile, top)
		if err == nil {
			t.Fatal("nix copy to the read listener succeeded")
		}
		if !strings.Contains(out, "405") {
			t.Errorf("nix copy failed without the 405:\n%s", out)
		}
		if code, _ := httpDo(t, "PUT", srv.readURL+"/gcroots/x", strings.NewReader("")); code != 405 {
			t.Errorf("PUT marker on the read listener: %d, want 405", code)
		}
	})
}

// TestBuildLogs uploads a build log with nix store copy-log and reads it back.
func TestBuildLogs(t *testing.T) {
	srv := startServer(t, "")
	src := newNix(t)
	top, _ := src.buildClosure(16)
	drv := strings.TrimSpace(src.must("nix-store", "--query", "--deriver", top))
	src.must("nix", "store", "copy-log", "--to", srv.writeURL, drv)
	code, body := httpDo(t, "GET", srv.readURL+"/log/"+filepath.Base(drv), nil)
	if code != 200 || !strings.Contains(body, "building app") {
		t.Fatalf("GET log: %d %q", code, body)
	}
	// nix log reads it back from the cache once the local copy is gone.
	if err := os.RemoveAll(filepath.Join(src.root, "nix/var/log/nix/drvs")); err != nil {
		t.Fatal(err)
	}
	if out, err := src.run(nil, "nix", "log", drv); err == nil {
		t.Fatalf("nix log found a log with no local copy and no substituter: %q", out)
	}
	out := src.must("nix", "log", "--substituters", srv.readURL, drv)
	if !strings.Contains(out, "building app") {
		t.Errorf("nix log: %q", out)
	}
}

// TestKillDuringLargeUpload kills the server in the middle of a large PUT:
// nothing partial may appear under a final name, then or after a restart.
func TestKillDuringLargeUpload(t *testing.T) {
	srv := startServer(t, "")
	name := "nar/" + strings.Repeat("0", 52) + ".nar"
	cut := slowPut(t, srv.writeURL+"/"+name, 32)
	srv.kill()
	cut()
	if _, err := os.Stat(filepath.Join(srv.cacheDir, name)); err == nil {
		t.Fatal("partial NAR under its final name after kill -9")
	}
	tmp, _ := os.ReadDir(filepath.Join(srv.cacheDir, ".tmp"))
	if len(tmp) != 1 || tmp[0].Name()[0] != '.' {
		t.Logf(".tmp after the kill: %v", tmp)
	}
	again := startServer(t, srv.cacheDir)
	if code, _ := httpDo(t, "GET", again.readURL+"/"+name, nil); code != 404 {
		t.Errorf("GET of the killed upload after restart: %d, want 404", code)
	}
}

// TestDiskFull fills a small tmpfs (in a private mount namespace, so no
// root is needed where user namespaces are allowed): the upload is refused
// with 507, nothing half-written stays, and the cache still takes uploads
// that fit.
func TestDiskFull(t *testing.T) {
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Fatal("unshare (util-linux) is needed for the disk-full test")
	}
	mnt := t.TempDir()
	r, w := freeAddr(t), freeAddr(t)
	script := `mount -t tmpfs -o size=4m tmpfs "$1" && exec "$2" serve --tor off --cache-dir "$1/cache" --state-dir "$1/state" --listen "$3" --listen-write "$4"`
	args := []string{"-r", "-m", "sh", "-c", script, "sh", mnt, binary, r, w}
	if os.Geteuid() == 0 {
		args = args[1:] // root needs no user namespace
	}
	p := &proc{cmd: exec.Command("unshare", args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(p.stop)
	waitHTTP(t, p, "http://"+w+"/nix-cache-info")

	big := strings.Repeat("x", 6<<20)
	code, body := httpDo(t, "PUT", "http://"+w+"/nar/big.nar", strings.NewReader(big))
	if code != 507 {
		t.Fatalf("upload bigger than the disk: %d %q, want 507", code, body)
	}
	if code, _ := httpDo(t, "GET", "http://"+r+"/nar/big.nar", nil); code != 404 {
		t.Errorf("refused upload is served: %d", code)
	}
	// Nix 2.8-2.32 retry with the same Content-Length and no body: the
	// answer comes at once, before any body, and the connection closes.
	start := time.Now()
	conn, err := net.Dial("tcp", w)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(conn, "PUT /nar/big.nar HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", len(big))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil || resp.StatusCode != 507 || !resp.Close {
		t.Fatalf("bodiless retry after 507: %v %v, want 507 and the connection closed", resp, err)
	}
	t.Logf("bodiless retry answered 507 in %v", time.Since(start).Round(time.Millisecond))
	// The partial file is gone: a small upload fits again.
	code, body = httpDo(t, "PUT", "http://"+w+"/nar/small.nar", strings.NewReader(strings.Repeat("y", 1<<20)))
	if code != 201 {
		t.Errorf("small upload after a full disk: %d %q", code, body)
	}
}

// TestScheduledPrune runs serve with --prune-interval: a closure a marker
// names stays and substitutes, one no marker names goes.
func TestScheduledPrune(t *testing.T) {
	srv := startServer(t, "", "--prune-interval", "1s", "--prune-grace", "0s")
	src := newNix(t)
	kept, keptClosure := src.buildClosure(16)
	gone, goneClosure := src.buildClosure(16)
	key := newSigningKey(t, "e2e-1")
	// The marker is written under a lock, so that no prune runs between the
	// upload and the marker.
	for _, top := range []string{kept, gone} {
		// While a prune holds the cache the lock is refused with 503: a
		// writer retries, as with-lock does.
		for end := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
			code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/.lock/upload", strings.NewReader("e2e"))
			if code == 201 {
				break
			}
			if code != 503 || time.Now().After(end) {
				t.Fatalf("take lock: %d %s", code, body)
			}
		}
		src.must("nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, top)
		if top == kept {
			if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(kept+"\n")); code != 201 {
				t.Fatalf("PUT marker: %d %s", code, body)
			}
		}
		if code, body := httpDo(t, "DELETE", srv.writeURL+"/gcroots/.lock/upload", nil); code != 204 {
			t.Fatalf("drop lock: %d %s", code, body)
		}
	}
	narinfo := func(p string) string {
		return filepath.Join(srv.cacheDir, strings.TrimPrefix(p, "/nix/store/")[:32]+".narinfo")
	}
	deadline := time.Now().Add(time.Minute)
	for {
		left := 0
		for _, p := range goneClosure {
			if _, err := os.Stat(narinfo(p)); err == nil {
				left++
			}
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d narinfos of the unrooted closure still there a minute later:\n%s", left, srv.out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, p := range keptClosure {
		if _, err := os.Stat(narinfo(p)); err != nil {
			t.Fatalf("rooted %s pruned: %v", p, err)
		}
	}
	dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	dst.must("nix-store", "--realise", kept)
	if !strings.Contains(srv.out.String(), "component=prune") {
		t.Errorf("serve logged no prune summary:\n%s", srv.out)
	}
}
