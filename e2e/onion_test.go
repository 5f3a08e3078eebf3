package e2e

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// onionServer is `kiss-onion serve --tor public` on the private network.
type onionServer struct {
	*proc
	cacheDir, stateDir  string
	readAddr, writeAddr string // <56 chars>.onion
	readURL, writeURL   string
}

// startOnionServer starts serve over stateDir and cacheDir and waits until
// it has published its onions (it writes their addresses last).
func startOnionServer(t testing.TB, stateDir, cacheDir string, extra ...string) *onionServer {
	t.Helper()
	for _, role := range []string{"read", "write"} {
		os.Remove(filepath.Join(stateDir, role+".onion"))
	}
	args := append([]string{"serve", "--tor", "public", "--tor-config", torNetConf, "--cache-dir", cacheDir, "--state-dir", stateDir}, extra...)
	s := &onionServer{proc: start(t, args...), cacheDir: cacheDir, stateDir: stateDir}
	waitReady(t, s.proc, "serve published its onions", 3*time.Minute, onionsWritten(stateDir))
	s.readAddr, s.writeAddr = readAddr(t, stateDir, "read"), readAddr(t, stateDir, "write")
	s.readURL, s.writeURL = "http://"+s.readAddr, "http://"+s.writeAddr
	return s
}

// onionsWritten reports, when called, whether serve has written its
// onions' addresses into stateDir (the write onion's last).
func onionsWritten(stateDir string) func() bool {
	return func() bool {
		_, err := os.Stat(filepath.Join(stateDir, "write.onion"))
		return err == nil
	}
}

// addKey runs `kiss-onion keys add` and returns the bundle directory.
func addKey(t testing.TB, stateDir, name, role string) string {
	t.Helper()
	bundle := filepath.Join(t.TempDir(), name+".bundle")
	if out, code := runKissOnion(t, "keys", "add", name, "--role", role, "--state-dir", stateDir, "--out", bundle); code != 0 {
		t.Fatalf("keys add %s: exit %d\n%s", name, code, out)
	}
	return bundle
}

// torPIDs returns the pids of the tor processes that p started.
func torPIDs(p *proc) []int {
	var pids []int
	tasks, _ := os.ReadDir("/proc/" + strconv.Itoa(p.cmd.Process.Pid) + "/task")
	for _, task := range tasks {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(p.cmd.Process.Pid) + "/task/" + task.Name() + "/children")
		for _, f := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(f)
			comm, _ := os.ReadFile("/proc/" + f + "/comm")
			if strings.TrimSpace(string(comm)) == "tor" {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// TestOnion runs the cache behind its two onions on the private network:
// who gets in with which key, nix through the onions, revocation, and
// recovery from a dead tor and a restart. The steps share one serve.
func TestOnion(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	writerBundle := addKey(t, stateDir, "ci", "writer")
	readerBundle := addKey(t, stateDir, "laptop", "reader")
	doomedBundle := addKey(t, stateDir, "stolen", "reader")
	began := time.Now()
	srv := startOnionServer(t, stateDir, cacheDir)

	writer := torClient(t, writerBundle)
	reader := torClient(t, readerBundle)
	waitOnion(t, reader.SocksAddr(), srv.readURL)
	waitOnion(t, writer.SocksAddr(), srv.writeURL)
	t.Logf("read and write onions reachable %v after serve started", time.Since(began).Round(time.Millisecond))

	key := newSigningKey(t, "onion-1")
	src := newNix(t)
	top, closure := src.buildClosure(128)

	t.Run("writer pushes with nix copy through the write onion", func(t *testing.T) {
		env := []string{"ALL_PROXY=socks5h://" + writer.SocksAddr()}
		if out, err := src.run(env, "nix", "copy", "--to", srv.writeURL+"?compression=zstd&secret-key="+key.secretFile, top); err != nil {
			t.Fatalf("nix copy --to the write onion: %v\n%s", err, out)
		}
		code, body, err := onionHTTP(writer.SocksAddr(), "PUT", srv.writeURL+"/gcroots/laptop", strings.NewReader(top+"\n"))
		if err != nil || code != 201 {
			t.Fatalf("PUT marker through the write onion: %d %q %v", code, body, err)
		}
		if b, _ := os.ReadFile(filepath.Join(cacheDir, "gcroots/laptop")); string(b) != top+"\n" {
			t.Errorf("marker holds %q", b)
		}
	})

	t.Run("reader substitutes through the read onion", func(t *testing.T) {
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		env := []string{"ALL_PROXY=socks5h://" + reader.SocksAddr()}
		if out, err := dst.run(env, "nix-store", "--realise", top); err != nil {
			t.Fatalf("nix-store --realise through the read onion: %v\n%s", err, out)
		}
		for _, p := range closure {
			sameTree(t, src, dst, p)
		}
	})

	t.Run("who may not, cannot", func(t *testing.T) {
		keyless := torClient(t, "")
		for _, addr := range []string{srv.readAddr, srv.writeAddr} {
			if code := refusedCode(t, keyless.SocksAddr(), addr); code != 0xF4 {
				t.Errorf("keyless client refused by %s with %#x, want 0xf4 (client authorization missing)", addr, code)
			}
		}
		if code := refusedCode(t, reader.SocksAddr(), srv.writeAddr); code != 0xF4 && code != 0xF5 {
			t.Errorf("reader refused by the write onion with %#x, want 0xf4 or 0xf5", code)
		}
		code, _, err := onionHTTP(reader.SocksAddr(), "PUT", srv.readURL+"/gcroots/evil", strings.NewReader(top+"\n"))
		if err != nil || code != 405 {
			t.Errorf("PUT through the read onion: %d %v, want 405", code, err)
		}
		code, _, err = onionHTTP(writer.SocksAddr(), "GET", srv.readURL+"/nix-cache-info", nil)
		if err != nil || code != 200 {
			t.Errorf("writer on the read onion: %d %v, want 200", code, err)
		}
	})

	t.Run("revoking a key takes effect without a restart", func(t *testing.T) {
		before := torClient(t, doomedBundle)
		waitOnion(t, before.SocksAddr(), srv.readURL)
		if out, code := runKissOnion(t, "keys", "revoke", "stolen", "--state-dir", stateDir); code != 0 {
			t.Fatalf("keys revoke: %d\n%s", code, out)
		}
		// serve notices within seconds and republishes the descriptor; a
		// fresh client tor then fetches the new one, which it cannot read.
		revoked := time.Now()
		deadline := revoked.Add(3 * time.Minute)
		for {
			fresh := torClient(t, doomedBundle)
			tried := time.Now()
			c, err := socksConnect(fresh.SocksAddr(), srv.readAddr, 2*time.Minute)
			fresh.Close()
			var se *socksError
			if errors.As(err, &se) && (se.code == 0xF4 || se.code == 0xF5) {
				t.Logf("revoked key refused with %#x %v after the revocation", se.code, time.Since(revoked).Round(time.Millisecond))
				break
			}
			t.Logf("fresh client with the revoked key, %v after the revocation: %v (in %v)", tried.Sub(revoked).Round(time.Millisecond), err, time.Since(tried).Round(time.Millisecond))
			if c != nil {
				c.Close()
			}
			if time.Now().After(deadline) {
				t.Fatal("a fresh client with the revoked key is not refused 3 minutes after the revocation")
			}
			time.Sleep(2 * time.Second)
		}
		other := torClient(t, readerBundle)
		waitOnion(t, other.SocksAddr(), srv.readURL)
		if pids := torPIDs(srv.proc); len(pids) != 1 {
			t.Errorf("serve runs %d tors after the revocation, want 1: it must not restart", len(pids))
		}
	})

	t.Run("a killed tor is restarted and the onions come back", func(t *testing.T) {
		pids := torPIDs(srv.proc)
		if len(pids) != 1 {
			t.Fatalf("serve runs tors %v, want one", pids)
		}
		syscall.Kill(pids[0], syscall.SIGKILL)
		deadline := time.Now().Add(2 * time.Minute)
		for {
			if now := torPIDs(srv.proc); len(now) == 1 && now[0] != pids[0] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no new tor 2 minutes after the kill:\n%s", srv.out)
			}
			time.Sleep(200 * time.Millisecond)
		}
		killed := time.Now()
		fresh := waitOnionFresh(t, readerBundle, srv.readURL)
		t.Logf("read onion back %v after its tor was killed", time.Since(killed).Round(time.Millisecond))
		dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
		if out, err := dst.run([]string{"ALL_PROXY=socks5h://" + fresh.SocksAddr()}, "nix-store", "--realise", top); err != nil {
			t.Fatalf("substitute after tor came back: %v\n%s", err, out)
		}
	})

	t.Run("a restarted serve keeps its addresses and keys", func(t *testing.T) {
		srv.stop()
		if pids := torPIDs(srv.proc); len(pids) != 0 {
			t.Errorf("tor still running after serve stopped: %v", pids)
		}
		again := startOnionServer(t, stateDir, cacheDir)
		if again.readAddr != srv.readAddr || again.writeAddr != srv.writeAddr {
			t.Fatalf("addresses changed across a restart: %s %s, were %s %s", again.readAddr, again.writeAddr, srv.readAddr, srv.writeAddr)
		}
		waitOnionFresh(t, readerBundle, again.readURL)
	})
}

// TestServeTorLocal runs the offline appliance of the README's demo:
// `serve --tor local` starts its own private Tor network, and a client tor
// joining it with the torrc lines serve wrote reaches the read onion with
// a reader's bundle, and no other way.
func TestServeTorLocal(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	reader := addKey(t, stateDir, "demo-reader", "reader")
	p := start(t, "serve", "--tor", "local", "--cache-dir", filepath.Join(t.TempDir(), "cache"), "--state-dir", stateDir)
	deadline := time.Now().Add(5 * time.Minute)
	for {
		if _, err := os.Stat(filepath.Join(stateDir, "read.onion")); err == nil {
			break
		}
		select {
		case <-p.done:
			t.Fatalf("serve --tor local exited: %v\n%s", p.err, p.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve --tor local did not publish in 5 minutes:\n%s", p.out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	addr := readAddr(t, stateDir, "read")
	lines, err := os.ReadFile(filepath.Join(stateDir, "testnet.torrc"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		authDir string
	}{{"with the reader's bundle", reader}, {"without a key", ""}} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			socks := freeAddr(t)
			conf := string(lines) + "DataDirectory " + filepath.Join(dir, "data") + "\nSocksPort " + socks + " ExtendedErrors\nLog notice file " + filepath.Join(dir, "log") + "\n"
			if tt.authDir != "" {
				conf += "ClientOnionAuthDir " + tt.authDir + "\n"
			}
			os.WriteFile(filepath.Join(dir, "torrc"), []byte(conf), 0o600)
			client := exec.Command("tor", "-f", filepath.Join(dir, "torrc"))
			client.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			if err := client.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { client.Process.Kill(); client.Wait() })
			for start := time.Now(); ; time.Sleep(100 * time.Millisecond) {
				if c, err := net.Dial("tcp", socks); err == nil {
					c.Close()
					break
				}
				if time.Since(start) > time.Minute {
					t.Fatal("client tor opened no SOCKS port in a minute")
				}
			}
			if tt.authDir != "" {
				waitOnion(t, socks, "http://"+addr)
				return
			}
			if code := refusedCode(t, socks, addr); code != 0xF4 {
				t.Errorf("keyless client refused with %#x, want 0xf4", code)
			}
		})
	}
	p.stop()
	if err := exec.Command("pgrep", "-f", filepath.Join(stateDir, "testnet")).Run(); err == nil {
		t.Error("tors of the private network still run after serve stopped")
	}
}

// TestPublicRead: with no client keys, serve refuses to start unless
// --public-read opens the read onion to anyone; the write onion is never
// published without a writer key.
func TestPublicRead(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	cacheDir := filepath.Join(t.TempDir(), "cache")
	out, code := runKissOnion(t, "serve", "--tor", "public", "--tor-config", torNetConf, "--cache-dir", cacheDir, "--state-dir", stateDir)
	if code != 1 || !strings.Contains(out, "no client keys") || !strings.Contains(out, "kiss-onion: hint:") {
		t.Fatalf("serve with no keys: exit %d\n%s", code, out)
	}
	srv := startOnionServer(t, stateDir, cacheDir, "--public-read")
	keyless := torClient(t, "")
	waitOnion(t, keyless.SocksAddr(), srv.readURL)
	if !strings.Contains(srv.out.String(), "no client keys: onion not published") {
		t.Errorf("serve did not say the write onion is not published:\n%s", srv.out)
	}
	c, err := socksConnect(keyless.SocksAddr(), srv.writeAddr, 2*time.Minute)
	if err == nil {
		c.Close()
		t.Fatal("a keyless client reached the write onion")
	}
}
