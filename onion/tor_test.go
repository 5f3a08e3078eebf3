package onion

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestIdentityMatchesTor publishes identities and checks that tor derives
// the same addresses (Publish compares ADD_ONION's ServiceID with
// Identity.ServiceID), among them the fixed vector of
// TestIdentityAddressVector.
func TestIdentityMatchesTor(t *testing.T) {
	needNet(t)
	tr := startTor(t, false)
	vector := identityFromSeed([ed25519.SeedSize]byte(mustHex(t, "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")))
	cases := []struct {
		name string
		id   *Identity
	}{
		{"fixed vector", vector},
		{"new identity", loadTestIdentity(t)},
		{"another new identity", loadTestIdentity(t)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := tr.Publish(context.Background(), Service{Name: c.name, Identity: c.id, Target: "127.0.0.1:9"})
			if err != nil {
				t.Fatalf("publish %s: %v", c.id.Address(), err)
			}
		})
	}
}

func loadTestIdentity(t *testing.T) *Identity {
	t.Helper()
	id, err := LoadOrCreateIdentity(filepath.Join(t.TempDir(), "onion.key"))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// TestAuthorizedClientFetchesKeylessIsRefused publishes an onion with a
// unix socket target and one client key: a client tor holding the key
// (given over the control port, ONION_CLIENT_AUTH_ADD) fetches from it; a
// client tor with no key is refused with SOCKS reply 0xF4.
func TestAuthorizedClientFetchesKeylessIsRefused(t *testing.T) {
	needNet(t)
	sock := serveHTTP(t, "hello through tor")
	key := newClientKey(t)
	id := loadTestIdentity(t)

	began := time.Now()
	svc := startTor(t, false)
	if err := svc.Publish(context.Background(), Service{Name: "read", Identity: id, Target: "unix:" + sock, ClientKeys: [][32]byte{pub(key)}}); err != nil {
		t.Fatal(err)
	}
	t.Logf("service tor bootstrapped and onion published in %v", time.Since(began).Round(time.Millisecond))

	client := startTor(t, true)
	if client.SocksAddr() == "" {
		t.Fatal("client tor has no socks address")
	}
	if err := client.AddClientAuth(context.Background(), id.Address(), [32]byte(key.Bytes())); err != nil {
		t.Fatal(err)
	}
	body, err := pollGet(t, client.SocksAddr(), id.Address(), 3*time.Minute, reachable)
	if err != nil {
		t.Fatalf("authorized client: %v", err)
	}
	if body != "hello through tor" {
		t.Errorf("authorized client got %q", body)
	}
	t.Logf("onion reachable %v after the service tor's Start", time.Since(began).Round(time.Millisecond))

	keyless := startClient(t, id.Address())
	_, err = pollGet(t, keyless.SocksAddr(), id.Address(), 2*time.Minute, refused(replyMissingAuth))
	if !errors.Is(err, replyMissingAuth) {
		t.Fatalf("keyless client: got %v, want %v (client authorization missing)", err, replyMissingAuth)
	}
}

// TestPublishWithoutClientKeys publishes an open onion (no client
// authorization): any client reaches it.
func TestPublishWithoutClientKeys(t *testing.T) {
	needNet(t)
	sock := serveHTTP(t, "open")
	id := loadTestIdentity(t)
	svc := startTor(t, false)
	if err := svc.Publish(context.Background(), Service{Name: "open", Identity: id, Target: "unix:" + sock}); err != nil {
		t.Fatal(err)
	}
	client := startClient(t, id.Address())
	if body, err := pollGet(t, client.SocksAddr(), id.Address(), 3*time.Minute, reachable); err != nil || body != "open" {
		t.Fatalf("keyless client on an open onion: %q, %v", body, err)
	}
}

// TestReplacingClientKeysRevokesWithoutRestart replaces an onion's keys
// {A, B} with {B}: tor keeps running, a fresh client holding only A is
// refused, one holding B still fetches (its key in a ClientOnionAuthDir
// file, the format of SPEC section 5).
func TestReplacingClientKeysRevokesWithoutRestart(t *testing.T) {
	needNet(t)
	sock := serveHTTP(t, "still here")
	a, b := newClientKey(t), newClientKey(t)
	id := loadTestIdentity(t)
	svc := startTor(t, false)
	s := Service{Name: "write", Identity: id, Target: "unix:" + sock, ClientKeys: [][32]byte{pub(a), pub(b)}}
	if err := svc.Publish(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	clientA := startClient(t, id.Address(), a)
	if _, err := pollGet(t, clientA.SocksAddr(), id.Address(), 3*time.Minute, reachable); err != nil {
		t.Fatalf("client A before revocation: %v", err)
	}
	clientA.Close()

	pid := svc.PID()
	s.ClientKeys = [][32]byte{pub(b)}
	replaced := time.Now()
	if err := svc.Publish(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if svc.PID() != pid {
		t.Errorf("tor restarted (pid %d, then %d): revocation must not restart it", pid, svc.PID())
	}

	freshA := startClient(t, id.Address(), a)
	_, err := pollGet(t, freshA.SocksAddr(), id.Address(), 3*time.Minute, refused(replyBadAuth))
	if !errors.Is(err, replyBadAuth) {
		t.Fatalf("fresh client holding only the revoked key: got %v, want %v (wrong client authorization)", err, replyBadAuth)
	}
	freshB := startClient(t, id.Address(), b)
	if body, err := pollGet(t, freshB.SocksAddr(), id.Address(), 3*time.Minute, reachable); err != nil || body != "still here" {
		t.Fatalf("client holding the kept key: %q, %v", body, err)
	}
	t.Logf("revocation checked in %v after the replacing Publish", time.Since(replaced).Round(time.Millisecond))
}

// TestSupervisorRestartsTor makes the service tor die, then hang: each
// time the supervisor starts a new tor, which republishes the onion at the
// same address, where a new client reaches it. (A client that used the
// onion before the restart holds a descriptor naming the dead tor's
// introduction points: on this small network it took from 6 s to 3 min to
// get through again, so the test uses a fresh client each time.)
func TestSupervisorRestartsTor(t *testing.T) {
	needNet(t)
	health, timeout := healthEvery, controlTimeout
	healthEvery, controlTimeout = time.Second, 3*time.Second
	t.Cleanup(func() { healthEvery, controlTimeout = health, timeout })

	sock := serveHTTP(t, "back again")
	key := newClientKey(t)
	id := loadTestIdentity(t)
	svc := startTor(t, false)
	if err := svc.Publish(context.Background(), Service{Name: "read", Identity: id, Target: "unix:" + sock, ClientKeys: [][32]byte{pub(key)}}); err != nil {
		t.Fatal(err)
	}
	client := startClient(t, id.Address(), key)
	if _, err := pollGet(t, client.SocksAddr(), id.Address(), 3*time.Minute, reachable); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		signal syscall.Signal
	}{
		{"killed", syscall.SIGKILL},
		{"hung", syscall.SIGSTOP}, // alive, but its control port no longer answers
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			old := svc.PID()
			if err := syscall.Kill(old, c.signal); err != nil {
				t.Fatal(err)
			}
			hit := time.Now()
			deadline := hit.Add(2 * time.Minute)
			for svc.PID() == 0 || svc.PID() == old {
				if time.Now().After(deadline) {
					syscall.Kill(old, syscall.SIGKILL)
					t.Fatalf("no new tor %v after pid %d was %s", time.Since(hit), old, c.name)
				}
				time.Sleep(100 * time.Millisecond) // polling PID, bounded by deadline
			}
			t.Logf("new tor pid %d after %v", svc.PID(), time.Since(hit).Round(time.Millisecond))
			if syscall.Kill(old, 0) == nil {
				t.Errorf("old tor pid %d still running", old)
			}
			fresh := startClient(t, id.Address(), key)
			body, err := pollGet(t, fresh.SocksAddr(), id.Address(), 3*time.Minute, reachable)
			if err != nil || body != "back again" {
				t.Fatalf("after the restart: %q, %v", body, err)
			}
			t.Logf("onion reachable again %v after tor was %s", time.Since(hit).Round(time.Millisecond), c.name)
			if n, at := svc.Restarts(); n != i+1 || at.Before(hit) {
				t.Errorf("Restarts() = %d, %v; want %d, after %v", n, at, i+1, hit)
			}
		})
	}
}

// TestTorDiesWithItsOwner runs a helper process that starts a tor, kills
// the helper with SIGKILL, and checks that its tor exits (TAKEOWNERSHIP):
// no orphan even when the Go process dies without cleaning up.
func TestTorDiesWithItsOwner(t *testing.T) {
	if os.Getenv(helperEnv) != "" {
		helperStartTor()
		return
	}
	needNet(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestTorDiesWithItsOwner$")
	cmd.Env = append(os.Environ(),
		helperEnv+"="+t.TempDir(),
		"KISS_ONION_HELPER_TORRC="+strings.Join(testNet.TorrcLines(), "\n"))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	pid := 0
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "TOR PID "); ok {
			pid, _ = strconv.Atoi(v)
			break
		}
	}
	if pid == 0 {
		t.Fatal("the helper printed no tor pid")
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for syscall.Kill(pid, 0) == nil {
		if time.Since(killed) > time.Minute {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("tor pid %d still running a minute after its owner was killed", pid)
		}
		time.Sleep(50 * time.Millisecond) // polling, bounded above
	}
	t.Logf("tor exited %v after its owner was killed", time.Since(killed).Round(time.Millisecond))
}

// helperStartTor is the helper process of TestTorDiesWithItsOwner: it
// starts a tor, prints its pid, and waits to be killed.
func helperStartTor() {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tr, err := Start(ctx, Config{
		DataDir:    filepath.Join(os.Getenv(helperEnv), "tor"),
		TorrcLines: strings.Split(os.Getenv("KISS_ONION_HELPER_TORRC"), "\n"),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("TOR PID %d\n", tr.PID())
	time.Sleep(5 * time.Minute) // killed long before: the test's subject is this process dying
	os.Exit(1)
}

// TestStartFailsCleanly gives tor a bad configuration line: Start fails
// with tor's complaint and leaves no process behind.
func TestStartFailsCleanly(t *testing.T) {
	dir := t.TempDir()
	_, err := Start(context.Background(), Config{DataDir: filepath.Join(dir, "tor"), TorrcLines: []string{"NoSuchOption 1"}, Log: testLog(t)})
	if err == nil {
		t.Fatal("Start accepted a bad torrc")
	}
	if !strings.Contains(err.Error(), "NoSuchOption") {
		t.Errorf("error %q does not quote tor's complaint", err)
	}
	out, _ := exec.Command("pgrep", "-f", dir).Output()
	if len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("tor left running: pids %s", out)
	}
}

// TestServiceCheck refuses malformed services before they reach tor.
func TestServiceCheck(t *testing.T) {
	id := identityFromSeed([ed25519.SeedSize]byte{1})
	cases := []struct {
		name    string
		s       Service
		wantErr string
	}{
		{"unix socket", Service{Identity: id, Target: "unix:/run/kiss-onion/read.sock"}, ""},
		{"loopback port", Service{Identity: id, Target: "127.0.0.1:8080"}, ""},
		{"ipv6 loopback", Service{Identity: id, Target: "[::1]:8080"}, ""},
		{"no identity", Service{Target: "127.0.0.1:8080"}, "no identity"},
		{"relative socket", Service{Identity: id, Target: "unix:read.sock"}, "absolute path"},
		{"space in socket path", Service{Identity: id, Target: "unix:/tmp/a b"}, "absolute path"},
		{"host name", Service{Identity: id, Target: "localhost:8080"}, "IP address"},
		{"no port", Service{Identity: id, Target: "127.0.0.1"}, "want"},
		{"bad port", Service{Identity: id, Target: "127.0.0.1:0"}, "bad port"},
		{"flags smuggled after the port", Service{Identity: id, Target: "127.0.0.1:80 Flags=Detach"}, "bad port"},
		{"flags smuggled after the socket", Service{Identity: id, Target: "unix:/tmp/s Flags=Detach"}, "absolute path"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.s.check()
			if c.wantErr == "" {
				if err != nil {
					t.Errorf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) {
				t.Errorf("error %v, want one saying %q", err, c.wantErr)
			}
		})
	}
}

// TestUnpublish takes an onion down: a fresh client holding a valid key no
// longer gets through, and a tor restart does not bring the onion back.
func TestUnpublish(t *testing.T) {
	needNet(t)
	sock := serveHTTP(t, "gone soon")
	a := newClientKey(t)
	id := loadTestIdentity(t)
	svc := startTor(t, false)
	if err := svc.Publish(context.Background(), Service{Name: "write", Identity: id, Target: "unix:" + sock, ClientKeys: [][32]byte{pub(a)}}); err != nil {
		t.Fatal(err)
	}
	client := startClient(t, id.Address(), a)
	if _, err := pollGet(t, client.SocksAddr(), id.Address(), 3*time.Minute, reachable); err != nil {
		t.Fatalf("client before Unpublish: %v", err)
	}
	client.Close()
	if err := svc.Unpublish(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if err := svc.Unpublish(context.Background(), id); err != nil {
		t.Errorf("second Unpublish: %v", err)
	}
	fresh := startClient(t, id.Address(), a)
	if _, err := pollGet(t, fresh.SocksAddr(), id.Address(), 3*time.Minute, func(_ string, err error) bool { return err != nil }); err == nil {
		t.Fatal("a fresh client still reaches the onion 3 minutes after Unpublish")
	}
}
