package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	kogateway "github.com/kiss-onion/kiss-onion/gateway"
)

// TestMetrics runs serve with --metrics-listen and a scheduled prune, and
// reads /metrics back after real uploads (nix copy), a prune that deletes
// an unrooted closure, a substitution and a key revoked: the counts are
// those of what happened, and no metric names a store path or a key.
func TestMetrics(t *testing.T) {
	metricsAddr := freeAddr(t)
	srv := startServer(t, "", "--metrics-listen", metricsAddr, "--prune-interval", "1s", "--prune-grace", "0s")
	metricsURL := "http://" + metricsAddr + "/metrics"

	// Clients: a reader and a writer, then the reader revoked.
	bundles := t.TempDir()
	for _, c := range []struct{ name, role string }{{"laptop", "reader"}, {"ci", "writer"}} {
		if out, code := runKissOnion(t, "keys", "add", c.name, "--role", c.role, "--state-dir", srv.stateDir, "--out", filepath.Join(bundles, c.name)); code != 0 {
			t.Fatalf("keys add %s: %s", c.name, out)
		}
	}
	if out, code := runKissOnion(t, "keys", "revoke", "laptop", "--state-dir", srv.stateDir); code != 0 {
		t.Fatalf("keys revoke: %s", out)
	}

	src := newNix(t)
	key := newSigningKey(t, "e2e-1")
	kept, keptClosure := src.buildClosure(64)
	gone, goneClosure := src.buildClosure(64)
	// The NARs (by URL, with their size) each closure names, and the
	// bytes of the narinfos of the one that goes. Two closures may share a
	// NAR (the same content): nix uploads it once, and the prune keeps it.
	nars := map[string]map[string]int64{kept: {}, gone: {}}
	var goneNarInfoBytes int64
	// Each closure goes up under a lock, as with-lock does, so that no
	// prune runs between its upload and its marker.
	for _, top := range []string{kept, gone} {
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
		closure := keptClosure
		if top == gone {
			closure = goneClosure
		}
		for _, p := range closure {
			rel := strings.TrimPrefix(p, "/nix/store/")[:32] + ".narinfo"
			info, err := visibleFile(t, srv.cacheDir, rel)
			if err != nil {
				t.Fatal(err)
			}
			nars[top][narinfoField(t, info, "URL")] = narinfoNumber(t, info, "FileSize")
			if top == gone {
				goneNarInfoBytes += int64(len(info))
			}
		}
		if top == kept {
			if code, body := httpDo(t, "PUT", srv.writeURL+"/gcroots/web1", strings.NewReader(kept+"\n")); code != 201 {
				t.Fatalf("PUT marker: %d %s", code, body)
			}
		}
		if code, body := httpDo(t, "DELETE", srv.writeURL+"/gcroots/.lock/upload", nil); code != 204 {
			t.Fatalf("drop lock: %d %s", code, body)
		}
	}

	// The scheduled prune deletes the unrooted closure.
	var m metricValues
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		m = scrapeMetrics(t, metricsURL)
		if m.get("kiss_onion_prune_deleted_narinfos_total") >= 3 && m.get("kiss_onion_prune_running") == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the unrooted closure not pruned a minute later:\n%s", srv.out)
		}
	}
	dst := newNix(t, "substituters = "+srv.readURL, "trusted-public-keys = "+key.public)
	dst.must("nix-store", "--realise", kept)
	m = scrapeMetrics(t, metricsURL)

	files, bytes := cacheSize(t, srv.cacheDir)
	uploaded := len(nars[kept]) // NARs
	var keptBytes, narBytes int64
	for _, size := range nars[kept] {
		keptBytes += size
	}
	goneFiles, goneBytes := 3, goneNarInfoBytes
	for url, size := range nars[gone] {
		if _, shared := nars[kept][url]; !shared {
			uploaded++
			goneFiles++
			goneBytes += size
		}
	}
	narBytes = keptBytes + goneBytes - goneNarInfoBytes
	for name, want := range map[string]float64{
		// The NARs and 3 narinfos a closure, the two locks and the marker.
		`kiss_onion_http_requests_total{method="PUT",role="write",status="201"}`:    float64(uploaded + 6 + 3),
		`kiss_onion_http_requests_total{method="DELETE",role="write",status="204"}`: 2,
		`kiss_onion_upload_visible_seconds_count{kind="nar"}`:                       float64(uploaded),
		`kiss_onion_upload_visible_seconds_count{kind="narinfo"}`:                   6,
		`kiss_onion_upload_visible_seconds_count{kind="other"}`:                     1,
		`kiss_onion_durability_queue`:                                               0,
		`kiss_onion_prune_deleted_narinfos_total`:                                   3,
		`kiss_onion_prune_deleted_files_total`:                                      float64(goneFiles),
		`kiss_onion_prune_freed_bytes_total`:                                        float64(goneBytes),
		`kiss_onion_prune_kept_narinfos`:                                            3,
		`kiss_onion_prune_runs_total{result="failed"}`:                              0,
		`kiss_onion_upload_locks{state="fresh"}`:                                    0,
		`kiss_onion_cache_files`:                                                    files,
		`kiss_onion_cache_bytes`:                                                    bytes,
		`kiss_onion_clients{door="onion",role="reader",state="active"}`:             0,
		`kiss_onion_clients{door="onion",role="reader",state="revoked"}`:            1,
		`kiss_onion_clients{door="onion",role="writer",state="active"}`:             1,
		`kiss_onion_clients{door="onion",role="writer",state="revoked"}`:            0,
	} {
		if got := m.get(name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	for name, atLeast := range map[string]float64{
		`kiss_onion_prune_runs_total{result="ok"}`: 1,
		// nix-cache-info, 3 narinfos and 3 NARs to substitute.
		`kiss_onion_http_requests_total{method="GET",role="read",status="200"}`: 7,
		`kiss_onion_http_sent_bytes_total{role="read"}`:                         float64(keptBytes),
		`kiss_onion_http_received_bytes_total{role="write"}`:                    float64(narBytes),
		`kiss_onion_prune_duration_seconds_count`:                               1,
	} {
		if got := m.get(name); got < atLeast {
			t.Errorf("%s = %v, want at least %v", name, got, atLeast)
		}
	}
	if m.get(`kiss_onion_prune_last_success_timestamp_seconds`) < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last successful prune at %v, want within the last minute", m.get(`kiss_onion_prune_last_success_timestamp_seconds`))
	}
	// Nothing that names a path or a key.
	secrets := append(append([]string{"/nix/store/"}, keptClosure...), goneClosure...)
	filepath.WalkDir(bundles, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			b, _ := os.ReadFile(p)
			for _, line := range strings.Split(string(b), "\n") {
				for _, f := range strings.FieldsFunc(line, func(r rune) bool { return strings.ContainsRune(" =\":", r) }) {
					if len(f) >= 32 {
						secrets = append(secrets, f)
					}
				}
			}
		}
		return nil
	})
	for _, s := range secrets {
		if base := strings.TrimPrefix(s, "/nix/store/"); base != "" && strings.Contains(m.text, base[:min(32, len(base))]) {
			t.Errorf("the metrics name %q", s)
		}
	}
	metricsDocumented(t, m, func(name string) bool { return !strings.HasPrefix(name, "kiss_onion_gateway_") })
}

// metricsDocumented checks docs/operating.md and docs/grafana-dashboard.json
// against a scrape: every kiss_onion_ metric is documented, and the
// dashboard asks only for metrics that exist (those of the onions and tor
// are not there with --tor off), among those that ours says the scrape's
// process exports (serve's or the gateway's).
func metricsDocumented(t *testing.T, m metricValues, ours func(name string) bool) {
	t.Helper()
	name := regexp.MustCompile(`kiss_onion_[a-z_]+`)
	scraped := map[string]bool{}
	for _, line := range strings.Split(m.text, "\n") {
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			family, typ, _ := strings.Cut(f, " ")
			scraped[family] = true
			if typ == "histogram" {
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					scraped[family+suffix] = true
				}
			}
		}
	}
	for _, torOnly := range []string{"kiss_onion_onion_published", "kiss_onion_onion_published_since_timestamp_seconds", "kiss_onion_tor_restarts_total"} {
		scraped[torOnly] = true
	}
	doc, err := os.ReadFile(filepath.Join("..", "docs", "operating.md"))
	if err != nil {
		t.Fatal(err)
	}
	for family := range scraped {
		if strings.HasPrefix(family, "kiss_onion_") && !strings.HasSuffix(family, "_bucket") && !strings.HasSuffix(family, "_sum") &&
			!strings.HasSuffix(family, "_count") && !strings.Contains(string(doc), "`"+family+"`") {
			t.Errorf("docs/operating.md does not document %s", family)
		}
	}
	dash, err := os.ReadFile(filepath.Join("..", "docs", "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var parsed map[string]any
	if err := json.Unmarshal(dash, &parsed); err != nil {
		t.Fatalf("docs/grafana-dashboard.json: %v", err)
	}
	for _, n := range name.FindAllString(string(dash), -1) {
		if ours(n) && !scraped[n] {
			t.Errorf("docs/grafana-dashboard.json asks for %s, which is not exported", n)
		}
	}
}

// TestMetricsListenIsLoopback: --metrics-listen refuses another address
// without --allow-remote.
func TestMetricsListenIsLoopback(t *testing.T) {
	dir := t.TempDir()
	out, code := runKissOnion(t, "serve", "--tor", "off", "--cache-dir", filepath.Join(dir, "cache"), "--state-dir", filepath.Join(dir, "state"),
		"--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:9437")
	if code != 2 || !strings.Contains(out, `--metrics-listen "0.0.0.0:9437" is not a loopback address`) {
		t.Errorf("exit %d, want 2 and a refusal of the address:\n%s", code, out)
	}
}

// metricValues is one scrape: the exposition text and each sample's value
// by its name and labels as printed.
type metricValues struct {
	text   string
	values map[string]float64
}

func (m metricValues) get(name string) float64 { return m.values[name] }

func scrapeMetrics(t *testing.T, url string) metricValues {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %v\n%s", url, resp.StatusCode, err, b)
	}
	m := metricValues{text: string(b), values: map[string]float64{}}
	sc := bufio.NewScanner(strings.NewReader(m.text))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		m.values[line[:i]] = v
	}
	return m
}

// narinfoField returns a narinfo's field.
func narinfoField(t *testing.T, info []byte, field string) string {
	t.Helper()
	for _, line := range strings.Split(string(info), "\n") {
		if v, ok := strings.CutPrefix(line, field+": "); ok {
			return v
		}
	}
	t.Fatalf("no %s in the narinfo:\n%s", field, info)
	return ""
}

// narinfoNumber returns a narinfo's numeric field.
func narinfoNumber(t *testing.T, info []byte, field string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(narinfoField(t, info, field), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// cacheSize counts a cache directory as serve's size metrics do: the
// regular files outside .tmp/ and gcroots/.lock/.
func cacheSize(t *testing.T, dir string) (files, bytes float64) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() && (rel == ".tmp" || rel == filepath.Join("gcroots", ".lock")) {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			files++
			bytes += float64(fi.Size())
		}
		return nil
	})
	if err != nil {
		t.Fatal(fmt.Errorf("count the cache: %w", err))
	}
	return files, bytes
}

// TestGatewayMetrics runs a writer's and a reader's `kiss-onion proxy
// --metrics-listen` to a real onion server: a nix copy through the one
// and a substitution through the other show in their metrics (requests,
// bytes at least the NARs', circuits, the onion reachable); once the
// server stops, a request through the reader's gateway fails and the
// gateway reports the onion unreachable. No metric names an onion
// address, a key or a store path.
func TestGatewayMetrics(t *testing.T) {
	stateDir, cacheDir := filepath.Join(t.TempDir(), "state"), filepath.Join(t.TempDir(), "cache")
	writerBundle, readerBundle := addKey(t, stateDir, "ci", "writer"), addKey(t, stateDir, "laptop", "reader")
	srv := startOnionServer(t, stateDir, cacheDir)
	writerMetrics, readerMetrics := freeAddr(t), freeAddr(t)
	writer := startGateway(t, writerBundle, "--write", "--metrics-listen", writerMetrics)
	reader := startGateway(t, readerBundle, "--metrics-listen", readerMetrics)
	// The metrics are there as soon as the gateway listens, whether its
	// onion answers yet or not.
	if m := scrapeMetrics(t, "http://"+readerMetrics+"/metrics"); m.get(`kiss_onion_gateway_circuits{role="read"}`) != kogateway.DefaultCircuits {
		t.Errorf("no circuits in the metrics of a gateway that listens:\n%s", m.text)
	}
	writer.waitReachable(t)
	reader.waitReachable(t)

	src := newNix(t)
	key := newSigningKey(t, "e2e-gw-1")
	top, closure := src.buildClosure(256)
	src.must("nix", "copy", "--to", writer.url+"?compression=zstd&secret-key="+key.secretFile, top)
	var narBytes int64
	nars := map[string]bool{}
	for _, p := range closure {
		info, err := visibleFile(t, cacheDir, hashOf(p)+".narinfo")
		if err != nil {
			t.Fatal(err)
		}
		if url := narinfoField(t, info, "URL"); !nars[url] {
			nars[url] = true
			narBytes += narinfoNumber(t, info, "FileSize")
		}
	}
	dst := newNix(t, "substituters = "+reader.url, "trusted-public-keys = "+key.public)
	dst.must("nix-store", "--realise", top)

	w := scrapeMetrics(t, "http://"+writerMetrics+"/metrics")
	var r metricValues
	// A request is counted once its handler returns, a moment after Nix
	// has its answer.
	waitReady(t, reader.proc, "the reader's requests counted", time.Minute, func() bool {
		r = scrapeMetrics(t, "http://"+readerMetrics+"/metrics")
		return r.get(`kiss_onion_gateway_requests_in_flight{role="read"}`) == 0
	})
	sum := func(m metricValues, prefix string, contains ...string) (n float64) {
	sample:
		for name, v := range m.values {
			if !strings.HasPrefix(name, prefix) {
				continue
			}
			for _, c := range contains {
				if !strings.Contains(name, c) {
					continue sample
				}
			}
			n += v
		}
		return n
	}
	for _, c := range []struct {
		what         string
		got, atLeast float64
	}{
		// A NAR and a narinfo a path.
		{"writer: PUTs the onion answered 2xx", sum(w, "kiss_onion_gateway_requests_total{", `method="PUT"`, `role="write"`, `source="onion"`, `status="2`), float64(len(nars) + len(closure))},
		{"writer: bytes sent to the onion", w.get(`kiss_onion_gateway_onion_sent_bytes_total{role="write"}`), float64(narBytes)},
		// nix-cache-info, a narinfo and a NAR a path.
		// nix-cache-info, a narinfo and a NAR a path: forwarded, or
		// answered from the closure answer and the NARs fetched ahead.
		{"reader: GETs answered 200", sum(r, "kiss_onion_gateway_requests_total{", `method="GET"`, `role="read"`, `status="200"`), float64(1 + len(closure) + len(nars))},
		{"reader: NARs from its store", sum(r, "kiss_onion_gateway_cache_nar_requests_total{", `role="read"`), float64(len(nars))},
		{"reader: NARs in its store", r.get(`kiss_onion_gateway_cache_files{role="read"}`), float64(len(nars))},
		{"reader: bytes in its store", r.get(`kiss_onion_gateway_cache_bytes{role="read"}`), float64(narBytes)},
		{"reader: bytes received from the onion", r.get(`kiss_onion_gateway_onion_received_bytes_total{role="read"}`), float64(narBytes)},
	} {
		if c.got < c.atLeast {
			t.Errorf("%s: %v, want at least %v", c.what, c.got, c.atLeast)
		}
	}
	for name, want := range map[string]float64{
		`kiss_onion_gateway_onion_reachable{role="read"}`:                       1,
		`kiss_onion_gateway_onion_state{role="read",state="reachable"}`:         1,
		`kiss_onion_gateway_onion_state{role="read",state="unreachable"}`:       0,
		`kiss_onion_gateway_forwarding{role="read"}`:                            1,
		`kiss_onion_gateway_circuits{role="read"}`:                              kogateway.DefaultCircuits,
		`kiss_onion_gateway_requests_in_flight{role="read"}`:                    0,
		`kiss_onion_gateway_onion_sent_bytes_total{role="read"}`:                0,
		`kiss_onion_gateway_dial_failures_total{reason="refused",role="read"}`:  0,
		`kiss_onion_gateway_onion_reachable{role="write"}`:                      1,
		`kiss_onion_gateway_circuits{role="write"}`:                             kogateway.DefaultCircuits,
		`kiss_onion_gateway_requests_in_flight{role="write"}`:                   0,
		`kiss_onion_gateway_dial_failures_total{reason="refused",role="write"}`: 0,
	} {
		if got := map[bool]metricValues{true: r, false: w}[strings.Contains(name, `role="read"`)].get(name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if n := sum(r, "kiss_onion_gateway_requests_total{", `source="gateway"`); n != 0 {
		t.Errorf("the reader's gateway answered %v requests itself while the onion was reachable", n)
	}

	// Nothing names an onion, a key or a path.
	secrets := []string{srv.readAddr[:16], srv.writeAddr[:16], "/nix/store/", top[len("/nix/store/"):][:32]}
	for _, bundle := range []string{writerBundle, readerBundle} {
		b, err := os.ReadFile(filepath.Join(bundle, "client.key"))
		if err != nil {
			t.Fatal(err)
		}
		secrets = append(secrets, strings.TrimSpace(string(b)))
	}
	for _, s := range secrets {
		for _, m := range []metricValues{w, r} {
			if s != "" && strings.Contains(m.text, s) {
				t.Errorf("the gateway's metrics name %q", s)
			}
		}
	}
	gatewayMetricsDocumented(t, w, r)

	// The cache goes away: the next request fails, the gateway answers
	// itself and says the onion is unreachable.
	srv.stop()
	// A path the gateway never heard of: it asks the cache.
	code, body := httpDo(t, "GET", reader.url+"/"+strings.Repeat("1", 32)+".narinfo", nil)
	if code != 404 || !strings.Contains(body, "is unreachable") {
		t.Errorf("GET a narinfo once the server stopped: %d %q, want the gateway's 404", code, body)
	}
	waitReady(t, reader.proc, "the reader's gateway reports the onion unreachable", 4*time.Minute, func() bool {
		m := scrapeMetrics(t, "http://"+readerMetrics+"/metrics")
		return m.get(`kiss_onion_gateway_onion_state{role="read",state="unreachable"}`) == 1
	})
	r = scrapeMetrics(t, "http://"+readerMetrics+"/metrics")
	if got := r.get(`kiss_onion_gateway_onion_reachable{role="read"}`); got != 0 {
		t.Errorf("reachable = %v once unreachable", got)
	}
	if got := r.get(`kiss_onion_gateway_forwarding{role="read"}`); got != 0 {
		t.Errorf("forwarding = %v once unreachable", got)
	}
	if got := sum(r, "kiss_onion_gateway_requests_total{", `method="GET"`, `source="gateway"`, `status="404"`); got < 1 {
		t.Errorf("the gateway's own 404s: %v, want at least 1", got)
	}
	since := r.get(`kiss_onion_gateway_onion_state_since_timestamp_seconds{role="read"}`)
	if since < float64(time.Now().Add(-5*time.Minute).Unix()) || since > float64(time.Now().Unix()+1) {
		t.Errorf("unreachable since %v, want within the last minutes", since)
	}
}

// gatewayMetricsDocumented checks docs/operating.md and
// docs/grafana-dashboard.json against the gateways' scrapes: every
// kiss_onion_gateway_ metric is documented, and the dashboard's gateway
// panels ask only for metrics that exist.
func gatewayMetricsDocumented(t *testing.T, scrapes ...metricValues) {
	t.Helper()
	var all metricValues
	for _, m := range scrapes {
		all.text += m.text
	}
	metricsDocumented(t, all, func(name string) bool { return strings.HasPrefix(name, "kiss_onion_gateway_") })
}

// TestGatewayMetricsThroughTheTLSDoor: a writer's proxy on the TLS door
// (--via tls) exports the same metrics: a nix copy through it shows.
func TestGatewayMetricsThroughTheTLSDoor(t *testing.T) {
	key := newSigningKey(t, "tls-e2e-1")
	d := startTLSDoor(t, "--trusted-writer-key", key.public)
	writer := d.addTLSClient(t, "builder", "writer")
	metricsAddr := freeAddr(t)
	gw := startTLSGateway(t, writer, "--write", "--metrics-listen", metricsAddr)
	src := newNix(t)
	top, closure := src.buildClosure(128)
	src.must("nix", "copy", "--to", gw.url+"?compression=zstd&secret-key="+key.secretFile, top)
	var narBytes int64
	nars := map[string]bool{}
	for _, p := range closure {
		info, err := visibleFile(t, d.cacheDir, hashOf(p)+".narinfo")
		if err != nil {
			t.Fatal(err)
		}
		if url := narinfoField(t, info, "URL"); !nars[url] {
			nars[url] = true
			narBytes += narinfoNumber(t, info, "FileSize")
		}
	}
	m := scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
	for name, atLeast := range map[string]float64{
		`kiss_onion_gateway_onion_reachable{role="write"}`:                                         1,
		`kiss_onion_gateway_requests_total{method="PUT",role="write",source="onion",status="201"}`: float64(len(nars) + len(closure)),
		`kiss_onion_gateway_onion_sent_bytes_total{role="write"}`:                                  float64(narBytes),
	} {
		if got := m.get(name); got < atLeast {
			t.Errorf("%s = %v, want at least %v", name, got, atLeast)
		}
	}
	if got := m.get(`kiss_onion_gateway_dial_failures_total{reason="other",role="write"}`); got != 0 {
		t.Errorf("%v failed dials to a door that answers", got)
	}
}
