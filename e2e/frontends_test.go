package e2e

import (
	"errors"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
)

// TestFrontends runs one cache behind two front ends on the private Tor
// network: two `kiss-onion serve` over one bucket of a real SeaweedFS
// (--store), each with its own onions, the second admitting the first's registry (--clients-file),
// and a bundle listing both. A closure pushed through the first's write
// onion is substituted through the gateway by the real nix 2.8; a key
// revoked on the first is refused by both; and a substitution through
// the gateway completes, byte for byte, though the front end it began on
// is frozen (stopped, with its tor) or killed in the middle.
func TestFrontends(t *testing.T) {
	stateA, stateB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	cache := filepath.Join(t.TempDir(), "unused") // the cache is the bucket
	store := newBucketStore(t, s3test.Start(t), "frontends")
	writerA := addKey(t, stateA, "ci", "writer") // front end A's onions only
	readerA := addKey(t, stateA, "lan", "reader")
	stolenA := addKey(t, stateA, "stolen", "reader")
	key := newSigningKey(t, "e2e-frontends-1")
	a := startOnionServer(t, stateA, cache, append([]string{"--trusted-writer-key", key.public}, store.args()...)...)
	b := startOnionServer(t, stateB, cache, append([]string{"--trusted-writer-key", key.public, "--clients-file", filepath.Join(stateA, "clients.toml")}, store.args()...)...)

	// The bundles of both front ends, from the keys A holds.
	both := func(name, bundleA string) string {
		out := filepath.Join(t.TempDir(), name+".bundle")
		if msg, code := runKissOnion(t, "keys", "export", name, "--key", filepath.Join(bundleA, "client.key"), "--frontend", stateB, "--state-dir", stateA, "--out", out); code != 0 {
			t.Fatalf("keys export --frontend: exit %d\n%s", code, msg)
		}
		return out
	}
	reader, stolen := both("lan", readerA), both("stolen", stolenA)

	src := newNix(t)
	small, smallClosure := src.buildClosure(64)
	var big, bigClosure, frozen, frozenClosure []string
	for range 3 {
		top, closure := src.buildClosure(6 << 10)
		big, bigClosure = append(big, top), append(bigClosure, closure...)
		top, closure = src.buildClosure(6 << 10)
		frozen, frozenClosure = append(frozen, top), append(frozenClosure, closure...)
	}
	push := startGateway(t, writerA, "--write")
	push.waitReachable(t)
	src.must("nix", append(append([]string{"copy", "--to", push.url + "?compression=none&secret-key=" + key.secretFile, small}, big...), frozen...)...)
	store.checkWhole(t)

	metricsAddr := freeAddr(t)
	gw := startGateway(t, reader, "--metrics-listen", metricsAddr)
	gw.waitReachable(t)
	waitReady(t, gw.proc, "both front ends reachable through the gateway", 4*time.Minute, func() bool {
		m := scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
		return m.get(`kiss_onion_gateway_frontend_reachable{frontend="0",role="read"}`) == 1 && m.get(`kiss_onion_gateway_frontend_reachable{frontend="1",role="read"}`) == 1
	})
	substituter := func() *nixClient {
		return newNix(t, "substituters = "+gw.url, "trusted-public-keys = "+key.public, "require-sigs = true")
	}

	t.Run("a closure pushed through one front end comes through the gateway", func(t *testing.T) {
		dst := substituter()
		dst.must("nix-store", "--realise", small)
		for _, p := range smallClosure {
			sameTree(t, src, dst, p)
		}
	})

	t.Run("a revoked key is refused by both front ends", func(t *testing.T) {
		before := torClient(t, stolen)
		waitOnion(t, before.SocksAddr(), b.readURL) // B admits A's registry
		before.Close()
		if out, code := runKissOnion(t, "keys", "revoke", "stolen", "--state-dir", stateA); code != 0 {
			t.Fatalf("keys revoke: %d\n%s", code, out)
		}
		revoked := time.Now()
		for _, addr := range []string{a.readAddr, b.readAddr} {
			deadline := revoked.Add(3 * time.Minute)
			for {
				fresh := torClient(t, stolen)
				c, err := socksConnect(fresh.SocksAddr(), addr, 2*time.Minute)
				fresh.Close()
				var se *socksError
				if errors.As(err, &se) && (se.code == 0xF4 || se.code == 0xF5) {
					t.Logf("%s refuses the revoked key (%#x) %v after the revocation", addr, se.code, time.Since(revoked).Round(time.Millisecond))
					break
				}
				if c != nil {
					c.Close()
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s still admits the revoked key 3 minutes after the revocation: %v", addr, err)
				}
				time.Sleep(2 * time.Second)
			}
		}
	})

	t.Run("a front end frozen in the middle of a substitution", func(t *testing.T) {
		// serve and its tor stopped, as a machine or a network cut off:
		// nothing is closed, the circuits stay, nothing comes.
		dst := substituter()
		received := func() float64 {
			return scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get(`kiss_onion_gateway_onion_received_bytes_total{role="read"}`)
		}
		before := received()
		cmd := startNixCmd(t, dst, "nix-store", append([]string{"--realise"}, frozen...)...)
		waitReady(t, gw.proc, "the substitution under way", 4*time.Minute, func() bool { return received()-before > 2<<20 })
		pids := append([]int{a.cmd.Process.Pid}, torPIDs(a.proc)...)
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGSTOP)
		}
		frozeAt := received() - before
		thawed := false
		thaw := func() {
			if !thawed {
				for _, pid := range pids {
					syscall.Kill(pid, syscall.SIGCONT)
				}
				thawed = true
			}
		}
		defer thaw()
		out, err, took := cmd.wait()
		thaw()
		if err != nil {
			t.Fatalf("nix-store --realise with front end A frozen after %.0f bytes: %v\n%s\ngateway:\n%s", frozeAt, err, out, gw.out)
		}
		t.Logf("substituted %d paths in %v; front end A frozen after %.1f MiB had arrived", len(frozenClosure), took.Round(100*time.Millisecond), frozeAt/(1<<20))
		for _, p := range frozenClosure {
			sameTree(t, src, dst, p)
		}
		// A is back for the next step.
		waitReady(t, gw.proc, "front end A reachable again", 4*time.Minute, func() bool {
			return scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get(`kiss_onion_gateway_frontend_reachable{frontend="0",role="read"}`) == 1
		})
	})

	t.Run("a front end killed in the middle of a substitution", func(t *testing.T) {
		dst := substituter()
		before := scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get(`kiss_onion_gateway_onion_received_bytes_total{role="read"}`)
		cmd := startNixCmd(t, dst, "nix-store", append([]string{"--realise"}, big...)...)
		// Kill A once some of the closure's 18 MiB arrived, not all.
		waitReady(t, gw.proc, "the substitution under way", 4*time.Minute, func() bool {
			got := scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get(`kiss_onion_gateway_onion_received_bytes_total{role="read"}`)
			return got-before > 2<<20
		})
		a.kill()
		killedAt := scrapeMetrics(t, "http://"+metricsAddr+"/metrics").get(`kiss_onion_gateway_onion_received_bytes_total{role="read"}`) - before
		out, err, took := cmd.wait()
		if err != nil {
			t.Fatalf("nix-store --realise with front end A killed after %.0f bytes: %v\n%s\ngateway:\n%s", killedAt, err, out, gw.out)
		}
		t.Logf("substituted %d paths in %v; front end A killed after %.1f MiB had arrived", len(bigClosure), took.Round(100*time.Millisecond), killedAt/(1<<20))
		for _, p := range bigClosure {
			sameTree(t, src, dst, p)
		}
		m := scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
		t.Logf("downloads resumed on the other front end: %v", m.get(`kiss_onion_gateway_frontend_resumes_total{role="read"}`))
		if strings.Contains(m.text, `kiss_onion_gateway_frontend_reachable{frontend="1",role="read"} 0`) {
			t.Error("the gateway gave up on front end B, which stayed up")
		}
	})
}
