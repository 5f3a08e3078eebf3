package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// cacheOrigin is a small cache: nix-cache-info, one narinfo, one NAR and
// a marker.
func cacheOrigin() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/nix-cache-info":
			io.WriteString(w, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n")
		case "/" + testHash + ".narinfo":
			io.WriteString(w, "StorePath: /nix/store/"+testHash+"-x\n")
		case "/nar/x.nar":
			io.WriteString(w, "nar")
		case "/gcroots/web1":
			io.WriteString(w, "/nix/store/"+testHash+"-x\n")
		default:
			http.NotFound(w, r)
		}
	})
}

const testHash = "0123456789abcdfghijklmnpqrsvwxyz"

// warmedUp waits until the Forwarder is reachable and its first probes
// are done and recorded.
func warmedUp(t *testing.T, f *Forwarder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.WaitReachable(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the warm-up's end", func() bool { return f.Health().InFlight == 0 })
	time.Sleep(50 * time.Millisecond)
}

// health returns the Forwarder's health as served.
func health(t *testing.T, gw string) (int, Health) {
	t.Helper()
	status, body := get(t, gw+HealthPath)
	var h Health
	if err := json.Unmarshal([]byte(body), &h); err != nil {
		t.Fatalf("health: %d %q: %v", status, body, err)
	}
	return status, h
}

// TestForwarderAnswersWhileUnreachable: once tor refused the onion, every
// request is answered at once by the gateway, in the way that lets Nix
// carry on.
func TestForwarderAnswersWhileUnreachable(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, time.Hour))
	f, socks, gw := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1, CacheInfoFile: filepath.Join(t.TempDir(), "cache-info")})
	warmedUp(t, f)
	waitFor(t, "the circuits warmed up", func() bool {
		h := f.Health()
		return h.CacheInfo && h.InFlight == 0 && socks.userCount() == DefaultCircuits
	})
	time.Sleep(50 * time.Millisecond) // the last probe records its outcome

	socks.refuse.Store(0xF2) // introduction failed: the appliance is off
	f.down(&SocksError{Code: 0xF2}, time.Now())
	if status, h := health(t, gw.URL); status != 503 || h.State != StateUnreachable || h.Forwarding || !strings.Contains(h.LastError, "introduction failed") {
		t.Fatalf("health: %d %+v, want 503, unreachable, not forwarding", status, h)
	}
	for _, tc := range []struct {
		name, method, path string
		status             int
		says               string
	}{
		{"nix-cache-info is the remembered copy", "GET", "/nix-cache-info", 200, "Priority: 30"},
		{"and HEAD of it too", "HEAD", "/nix-cache-info", 200, ""},
		{"a narinfo is not there: Nix builds it or asks another substituter", "GET", "/" + testHash + ".narinfo", 404, "introduction failed"},
		{"HEAD of a narinfo likewise", "HEAD", "/" + testHash + ".narinfo", 404, ""},
		{"a NAR is gone: Nix builds the path, even without --fallback", "GET", "/nar/x.nar", 404, "is unreachable"},
		{"a listing", "GET", "/" + testHash + ".ls", 404, ""},
		{"a build log", "GET", "/log/" + testHash + "-x.drv", 404, ""},
		{"a realisation", "GET", "/realisations/sha256:00!out.doi", 404, ""},
		{"a marker is not a missing marker", "GET", "/gcroots/web1", 502, "is unreachable"},
		{"an unknown path", "GET", "/robots.txt", 502, ""},
		{"an upload fails at once with a 4xx", "PUT", "/nar/y.nar", 421, "introduction failed"},
		{"a lock too", "PUT", "/gcroots/.lock/web1", 421, ""},
		{"and a DELETE", "DELETE", "/gcroots/.lock/web1", 421, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			began := time.Now()
			req, _ := http.NewRequest(tc.method, gw.URL+tc.path, strings.NewReader(""))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.says) {
				t.Errorf("%d %q, want %d saying %q", resp.StatusCode, b, tc.status, tc.says)
			}
			if resp.Header.Get(ErrorHeader) != "unreachable" || resp.Header.Get("Cache-Control") != "no-store" {
				t.Errorf("headers %v, want %s: unreachable and Cache-Control: no-store", resp.Header, ErrorHeader)
			}
			if d := time.Since(began); d > time.Second {
				t.Errorf("answered in %v, want at once", d)
			}
		})
	}
	if n := socks.userCount(); n > DefaultCircuits {
		t.Errorf("%d circuits used: requests went into tor while unreachable", n)
	}
}

// TestForwarderStates walks the states: a dial that hangs (tor with no
// network) is cut at DialTimeout and the gateway answers from then on;
// tor's refusal says unreachable; the prober brings it back.
func TestForwarderStates(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, 50*time.Millisecond))
	t.Cleanup(shorten(&probeTimeout, 500*time.Millisecond))
	t.Cleanup(shorten(&DialTimeout, 200*time.Millisecond))
	f, socks, gw := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1})
	warmedUp(t, f)
	// No circuit is open: the next request dials.
	for _, c := range f.circuits {
		c.tr.CloseIdleConnections()
	}
	socks.hang.Store(true)

	steps := []struct {
		name   string
		do     func()
		status int // of GET narinfo
		state  State
		fwd    bool
		within time.Duration
	}{
		{"a request waits at most DialTimeout for tor, then gets 404", func() {}, 404, "", false, 2 * time.Second},
		{"the next ones are answered at once", func() {}, 404, "", false, 100 * time.Millisecond},
		{"the prober gives up: unreachable", func() {
			waitFor(t, "unreachable", func() bool { return f.Health().State == StateUnreachable })
		}, 404, StateUnreachable, false, 100 * time.Millisecond},
		{"tor's refusal keeps it unreachable", func() {
			socks.hang.Store(false)
			socks.refuse.Store(0xF0)
			time.Sleep(200 * time.Millisecond)
		}, 404, StateUnreachable, false, 100 * time.Millisecond},
		{"back: the prober reaches it and requests go through", func() {
			socks.refuse.Store(0)
			waitFor(t, "reachable", func() bool { return f.Health().Reachable })
		}, 200, StateReachable, true, time.Second},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) {
			s.do()
			began := time.Now()
			status, body := get(t, gw.URL+"/"+testHash+".narinfo")
			took := time.Since(began)
			if status != s.status {
				t.Errorf("GET narinfo: %d %q, want %d", status, body, s.status)
			}
			if took > s.within {
				t.Errorf("GET narinfo took %v, want within %v", took, s.within)
			}
			h := f.Health()
			if (s.state != "" && h.State != s.state) || h.Forwarding != s.fwd {
				t.Errorf("health %+v, want state %q, forwarding %v", h, s.state, s.fwd)
			}
		})
	}
}

// TestForwarderSlowIsNotDead: a request that waits too long hands over to
// the prober, which gives a slow onion (a descriptor fetch after the cache
// restarted) its own, longer time: the state is "probing", not
// "unreachable", and the onion is back as soon as it answers.
func TestForwarderSlowIsNotDead(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, 50*time.Millisecond))
	t.Cleanup(shorten(&DialTimeout, 100*time.Millisecond))
	f, socks, gw := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1})
	warmedUp(t, f)
	for _, c := range f.circuits {
		c.tr.CloseIdleConnections()
	}
	socks.hang.Store(true)
	if status, _ := get(t, gw.URL+"/"+testHash+".narinfo"); status != 404 {
		t.Errorf("GET narinfo while slow: %d, want 404", status)
	}
	time.Sleep(300 * time.Millisecond) // the prober's dial is still waiting
	if h := f.Health(); h.State != StateProbing || h.Forwarding {
		t.Errorf("health while slow: %+v, want probing and not forwarding", h)
	}
	socks.hang.Store(false) // the descriptor arrives: new dials go through
	waitFor(t, "reachable", func() bool { return f.Health().Reachable })
}

// TestForwarderBrokenDownload: a connection that breaks in the middle of a
// NAR marks the onion unreachable at once, so that Nix's retry gets 404
// instead of waiting for tor.
func TestForwarderBrokenDownload(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, time.Hour))
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/nar/big.nar" {
			cacheOrigin().ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", "1000000")
		w.WriteHeader(200)
		io.WriteString(w, strings.Repeat("x", 1000))
		w.(http.Flusher).Flush()
		conn, buf, _ := w.(http.Hijacker).Hijack()
		buf.Flush()
		conn.Close()
	})
	f, socks, gw := newTestForwarder(t, origin, ForwarderConfig{KeepWarm: -1})
	warmedUp(t, f)
	socks.hang.Store(true) // and tor cannot reach it any more
	// The client sees an error: no answer, or a body cut short.
	if resp, err := http.Get(gw.URL + "/nar/big.nar"); err == nil {
		n, err := io.Copy(io.Discard, bufio.NewReader(resp.Body))
		resp.Body.Close()
		if err == nil || n >= 1000000 {
			t.Errorf("the broken download read %d bytes, err %v: want it cut short", n, err)
		}
	}
	waitFor(t, "unreachable", func() bool { return f.Health().State == StateUnreachable })
	began := time.Now()
	if status, _ := get(t, gw.URL+"/nar/big.nar"); status != 404 {
		t.Errorf("the retry got %d, want 404", status)
	}
	if d := time.Since(began); d > time.Second {
		t.Errorf("the retry took %v, want at once", d)
	}
}

// TestForwarderRemembersCacheInfo: the nix-cache-info a probe fetched is
// kept in CacheInfoFile, and a new Forwarder that cannot reach the onion
// answers it from there.
func TestForwarderRemembersCacheInfo(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, time.Hour))
	file := filepath.Join(t.TempDir(), "cache-info")
	f, _, _ := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1, CacheInfoFile: file})
	waitFor(t, "nix-cache-info remembered", func() bool { return f.Health().CacheInfo })
	b, err := os.ReadFile(file)
	if err != nil || !strings.HasPrefix(string(b), "StoreDir: /nix/store\n") {
		t.Fatalf("remembered file: %q %v", b, err)
	}
	f.Close()

	g, socks, gw := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1, CacheInfoFile: file})
	if !g.Health().CacheInfo {
		t.Error("a new Forwarder does not remember nix-cache-info")
	}
	socks.refuse.Store(0xF0)
	g.down(&SocksError{Code: 0xF0}, time.Now())
	status, body := get(t, gw.URL+"/nix-cache-info")
	if status != 200 || body != string(b) {
		t.Errorf("GET nix-cache-info while unreachable: %d %q, want the remembered copy", status, body)
	}

	os.WriteFile(file, []byte("<html>a captive portal</html>"), 0o600)
	h, _, _ := newTestForwarder(t, cacheOrigin(), ForwarderConfig{KeepWarm: -1, CacheInfoFile: file})
	if h.Health().CacheInfo {
		t.Error("a file that is no nix-cache-info was taken for one")
	}
}

// TestForwarderGivesUpSilentConnections: a kept connection whose circuit
// died (the cache restarted) swallows a request without an answer; a
// read waits staleAfter for its answer, then is tried once on a new
// connection, and the gateway answers it itself if that fails too.
func TestForwarderGivesUpSilentConnections(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, time.Hour))
	t.Cleanup(shorten(&staleAfter, 100*time.Millisecond))
	var silent atomic.Bool
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if silent.Load() {
			select { // the fake SOCKS server does not pass a close on
			case <-r.Context().Done():
			case <-time.After(time.Second):
			}
			return
		}
		cacheOrigin().ServeHTTP(w, r)
	})
	f, _, gw := newTestForwarder(t, origin, ForwarderConfig{KeepWarm: -1})
	warmedUp(t, f)
	silent.Store(true)
	began := time.Now()
	status, body := get(t, gw.URL+"/"+testHash+".narinfo")
	if took := time.Since(began); status != 404 || took > 2*time.Second {
		t.Errorf("GET narinfo on silent connections: %d %q after %v, want 404 within two tries of %v", status, body, took, staleAfter)
	}
	if h := f.Health(); h.Forwarding || !strings.Contains(h.LastError, "no answer on the connection") {
		t.Errorf("health %+v, want answering itself after silent connections", h)
	}
	silent.Store(false)
	f.kick <- struct{}{}
	waitFor(t, "reachable", func() bool { return f.Health().Reachable && f.Health().Forwarding })
}

// TestPickPrefersReadyCircuits: after the onion comes back, requests go to
// the circuits it answered on, not to one tor is still building.
func TestPickPrefersReadyCircuits(t *testing.T) {
	f := &Forwarder{}
	for i := range 4 {
		f.circuits = append(f.circuits, &circuit{f: f, n: i})
	}
	f.downAt.Store(100)
	f.circuits[2].lastOK.Store(200) // answered since
	f.circuits[0].lastOK.Store(50)  // only before
	f.circuits[2].inflight.Store(3)
	for range 8 {
		if c := f.pick(nil); c.n != 2 {
			t.Fatalf("picked circuit %d, want the ready one (2) even though it is busier", c.n)
		}
	}
	if c := f.pick(f.circuits[2]); c.n == 2 {
		t.Error("picked the circuit to avoid")
	}
	f.circuits[3].lastOK.Store(300)
	if c := f.pick(nil); c.n != 3 {
		t.Errorf("picked circuit %d, want the idle ready one (3)", c.n)
	}
}
