package gateway

import (
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// TestForwarderMetrics counts requests through a Forwarder, the onion's
// answers and the gateway's own apart, the bytes both ways, the dials tor
// refused, and the state.
func TestForwarderMetrics(t *testing.T) {
	t.Cleanup(shorten(&probeEvery, time.Hour))
	nar := strings.Repeat("x", 100000)
	origin := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/nix-cache-info":
			io.WriteString(w, "StoreDir: /nix/store\n")
		case "/nar/x.nar":
			io.WriteString(w, nar)
		case "/up.nar":
			io.Copy(io.Discard, r.Body)
			w.WriteHeader(http.StatusCreated)
		default:
			http.NotFound(w, r)
		}
	})
	f, socks, gw := newTestForwarder(t, origin, ForwarderConfig{KeepWarm: -1, Circuits: 3})
	reg := prometheus.NewRegistry()
	if err := f.RegisterMetrics(reg, "write"); err != nil {
		t.Fatal(err)
	}
	warmedUp(t, f)
	value := func(name string, labels ...string) float64 {
		t.Helper()
		want := map[string]string{}
		for i := 0; i+1 < len(labels); i += 2 {
			want[labels[i]] = labels[i+1]
		}
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
		metric:
			for _, m := range mf.GetMetric() {
				for _, lp := range m.GetLabel() {
					if v, ok := want[lp.GetName()]; ok && v != lp.GetValue() {
						continue metric
					}
				}
				if m.Counter != nil {
					return m.Counter.GetValue()
				}
				return m.Gauge.GetValue()
			}
		}
		return -1
	}
	do := func(method, path, body string) int {
		t.Helper()
		req, _ := http.NewRequest(method, gw.URL+path, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}

	received := value("kiss_onion_gateway_onion_received_bytes_total")
	for range 2 {
		if code := do("GET", "/nar/x.nar", ""); code != 200 {
			t.Fatalf("GET the NAR: %d", code)
		}
	}
	do("GET", "/missing.narinfo", "")
	if code := do("PUT", "/up.nar", strings.Repeat("y", 5000)); code != 201 {
		t.Fatalf("PUT: %d", code)
	}
	// A request is counted once its handler returns, a moment after the
	// client has the whole answer.
	settled := func() bool {
		return value("kiss_onion_gateway_requests_in_flight") == 0 && value("kiss_onion_gateway_circuits_in_use") == 0
	}
	waitFor(t, "the requests' end", settled)
	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"kiss_onion_gateway_onion_reachable", []string{"role", "write"}, 1},
		{"kiss_onion_gateway_onion_state", []string{"state", "reachable"}, 1},
		{"kiss_onion_gateway_onion_state", []string{"state", "unreachable"}, 0},
		{"kiss_onion_gateway_forwarding", nil, 1},
		{"kiss_onion_gateway_circuits", nil, 3},
		{"kiss_onion_gateway_circuits_in_use", nil, 0},
		{"kiss_onion_gateway_requests_in_flight", nil, 0},
		{"kiss_onion_gateway_requests_total", []string{"method", "GET", "status", "200", "source", "onion"}, 2},
		{"kiss_onion_gateway_requests_total", []string{"method", "GET", "status", "404", "source", "onion"}, 1},
		{"kiss_onion_gateway_requests_total", []string{"method", "PUT", "status", "201", "source", "onion"}, 1},
		{"kiss_onion_gateway_onion_sent_bytes_total", nil, 5000},
		{"kiss_onion_gateway_dial_failures_total", []string{"reason", "refused"}, 0},
	} {
		if got := value(tc.name, tc.labels...); got != tc.want {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	// The two NARs and the 404's body at least; probes come on top.
	if got := value("kiss_onion_gateway_onion_received_bytes_total") - received; got < float64(2*len(nar)) {
		t.Errorf("received %v bytes from the onion, want at least %d", got, 2*len(nar))
	}

	// tor refuses the onion: the request that finds out and those after
	// it are the gateway's answers.
	socks.refuse.Store(0xF2)
	f.closeIdle()
	for range 3 {
		if code := do("GET", "/nar/x.nar", ""); code != 404 {
			t.Fatalf("GET while refused: %d, want the gateway's 404", code)
		}
	}
	waitFor(t, "the requests' end", settled)
	if got := value("kiss_onion_gateway_requests_total", "method", "GET", "status", "404", "source", "gateway"); got != 3 {
		t.Errorf("gateway's 404s = %v, want 3", got)
	}
	if got := value("kiss_onion_gateway_dial_failures_total", "reason", "refused"); got < 1 {
		t.Errorf("refused dials = %v, want at least 1", got)
	}
	for state, want := range map[string]float64{"reachable": 0, "unreachable": 1, "probing": 0} {
		if got := value("kiss_onion_gateway_onion_state", "state", state); got != want {
			t.Errorf("state %s = %v, want %v", state, got, want)
		}
	}
	if got := value("kiss_onion_gateway_onion_state_since_timestamp_seconds"); got < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("state since %v, want within the last minute", got)
	}
	if got := value("kiss_onion_gateway_forwarding"); got != 0 {
		t.Errorf("forwarding = %v while unreachable", got)
	}
}

// TestPrefetcherMetrics counts what a Prefetcher in front of the
// Forwarder answers from what it holds (source cache), the NARs it had
// stored already (fetched ahead: hits) and not (misses), and the store's
// size; a request the Prefetcher hands on counts as the onion's.
func TestPrefetcherMetrics(t *testing.T) {
	o, relay := newOrigin(t)
	paths := o.push(t, 'm', 3, 32<<10)
	f, _, _ := newTestForwarder(t, relay, ForwarderConfig{Circuits: 2, KeepWarm: -1})
	warmedUp(t, f)
	p, err := NewPrefetcher(f, PrefetchConfig{Dir: filepath.Join(t.TempDir(), "store"), Ahead: true, Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	g := &Gateway{Forwarder: f, prefetch: p}
	reg := prometheus.NewRegistry()
	if err := g.registerMetrics(Config{Metrics: reg}); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(f.metrics.handler(p))
	t.Cleanup(srv.Close)
	scrape := func() map[string]float64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			for _, m := range mf.GetMetric() {
				var labels []string
				for _, lp := range m.GetLabel() {
					labels = append(labels, lp.GetName()+"="+lp.GetValue())
				}
				key := mf.GetName() + "{" + strings.Join(labels, ",") + "}"
				if m.Counter != nil {
					out[key] = m.Counter.GetValue()
				} else {
					out[key] = m.Gauge.GetValue()
				}
			}
		}
		return out
	}

	for _, tp := range paths {
		if status, _ := get(t, srv.URL+"/"+tp.hash+".narinfo"); status != 200 {
			t.Fatalf("narinfo of %s: %d", tp.name, status)
		}
	}
	// Fetched ahead: every NAR is a hit. The first one again, a hit too.
	for _, tp := range paths {
		waitFor(t, "the NARs fetched ahead", func() bool { return o.count("/"+tp.nar) == 1 })
	}
	waitFor(t, "the NARs stored", func() bool { return scrape()["kiss_onion_gateway_cache_files{role=read}"] == 3 })
	for _, tp := range append(paths, paths[0]) {
		if status, body := get(t, srv.URL+"/"+tp.nar); status != 200 || body != string(tp.content) {
			t.Fatalf("NAR of %s: %d", tp.name, status)
		}
	}
	// Not a NAR or a narinfo: the Forwarder's.
	if status, _ := get(t, srv.URL+"/nix-cache-info"); status != 200 {
		t.Fatalf("nix-cache-info: %d", status)
	}
	waitFor(t, "the requests' end", func() bool { return scrape()["kiss_onion_gateway_requests_in_flight{role=read}"] == 0 })
	m := scrape()
	for name, want := range map[string]float64{
		"kiss_onion_gateway_requests_total{method=GET,role=read,source=cache,status=200}": 3 + 4,
		"kiss_onion_gateway_requests_total{method=GET,role=read,source=onion,status=200}": 1,
		"kiss_onion_gateway_cache_nar_requests_total{result=hit,role=read}":               4,
		"kiss_onion_gateway_cache_nar_requests_total{result=miss,role=read}":              0,
		"kiss_onion_gateway_cache_files{role=read}":                                       3,
		"kiss_onion_gateway_cache_bytes{role=read}":                                       3 * 32 << 10,
	} {
		if got := m[name]; got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
}
