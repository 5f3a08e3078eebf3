package serve

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/kiss-onion/kiss-onion/cachelock"
)

// scrape gathers reg into "name{label=value,...}" -> value; a histogram
// gives its sample count under name_count.
func scrape(t testing.TB, reg *prometheus.Registry) map[string]float64 {
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
			sort.Strings(labels)
			name := mf.GetName()
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				out[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				out[key] = m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				out[strings.Replace(key, name, name+"_count", 1)] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return out
}

// metricsCache is a test cache whose metrics are registered.
func metricsCache(t *testing.T) (*testCache, *prometheus.Registry) {
	t.Helper()
	tc := newTestCache(t, nil)
	reg := prometheus.NewRegistry()
	if err := tc.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	waitCounted(t, tc.Cache)
	return tc, reg
}

func waitCounted(t *testing.T, c *Cache) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !c.metrics.counted.Load(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("cache size not counted after 10 s")
		}
	}
}

func TestStatusAndMethodTables(t *testing.T) {
	for _, tt := range []struct {
		code int
		want string
	}{{200, "200"}, {206, "206"}, {404, "404"}, {503, "503"}, {507, "507"}, {418, "other"}, {0, "other"}, {-1, "other"}, {999, "other"}} {
		if got := statusNames[statusOf(tt.code)]; got != tt.want {
			t.Errorf("status %d counted as %q, want %q", tt.code, got, tt.want)
		}
	}
	for _, tt := range []struct{ method, want string }{{"GET", "GET"}, {"HEAD", "HEAD"}, {"PUT", "PUT"}, {"DELETE", "DELETE"}, {"POST", "other"}, {"get", "other"}} {
		if got := methodNames[methodIndex(tt.method)]; got != tt.want {
			t.Errorf("method %s counted as %q, want %q", tt.method, got, tt.want)
		}
	}
}

func TestRequestsAreCountedByRoleMethodAndStatus(t *testing.T) {
	tc, reg := metricsCache(t)
	narURL := tc.upload(t, hashB, "dep") // write: PUT 201 twice
	nar := []byte("nar of " + hashB)
	narinfo := narInfo(hashB, "dep", narURL)

	requests := []struct {
		srv          *testServer
		method, path string
		want         int
	}{
		{tc.read, "GET", "/" + hashB + ".narinfo", 200},
		{tc.read, "GET", "/" + hashB + ".narinfo", 200},
		{tc.read, "HEAD", "/" + hashB + ".narinfo", 200},
		{tc.read, "GET", "/" + narURL, 200},
		{tc.read, "GET", "/" + hashA + ".narinfo", 404},
		{tc.read, "PUT", "/" + hashA + ".narinfo", 405},
		{tc.read, "POST", "/nix-cache-info", 405},
		{tc.write, "GET", "/" + narURL, 200},
		{tc.write, "HEAD", "/" + hashA + ".narinfo", 404},
		{tc.write, "DELETE", "/gcroots/.lock/x", 204},
		{tc.write, "PUT", "/gcroots/web1", 400},
	}
	for _, r := range requests {
		var body []byte
		if r.method == "PUT" {
			body = []byte("not a marker\n")
		}
		if resp, b := do(t, r.srv, r.method, r.path, body); resp.StatusCode != r.want {
			t.Fatalf("%s %s: %d %s, want %d", r.method, r.path, resp.StatusCode, b, r.want)
		}
	}
	got := scrape(t, reg)
	for key, want := range map[string]float64{
		`kiss_onion_http_requests_total{method=GET,role=read,status=200}`:     3,
		`kiss_onion_http_requests_total{method=HEAD,role=read,status=200}`:    1,
		`kiss_onion_http_requests_total{method=GET,role=read,status=404}`:     1,
		`kiss_onion_http_requests_total{method=PUT,role=read,status=405}`:     1,
		`kiss_onion_http_requests_total{method=other,role=read,status=405}`:   1,
		`kiss_onion_http_requests_total{method=PUT,role=write,status=201}`:    2,
		`kiss_onion_http_requests_total{method=GET,role=write,status=200}`:    1,
		`kiss_onion_http_requests_total{method=HEAD,role=write,status=404}`:   1,
		`kiss_onion_http_requests_total{method=DELETE,role=write,status=204}`: 1,
		`kiss_onion_http_requests_total{method=PUT,role=write,status=400}`:    1,
		// Two narinfos and a NAR on the read role, a NAR on the write role,
		// besides the refusals' plain-text bodies.
		`kiss_onion_upload_visible_seconds_count{kind=nar}`:     1,
		`kiss_onion_upload_visible_seconds_count{kind=narinfo}`: 1,
		`kiss_onion_upload_visible_seconds_count{kind=other}`:   0,
		`kiss_onion_durability_queue`:                           0,
		`kiss_onion_upload_locks{state=fresh}`:                  0,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
	if n := len(got); n == 0 {
		t.Fatal("nothing scraped")
	}
	// Bytes: the bodies of the 200s, plus the refusals' messages.
	okRead := float64(2*len(narinfo) + len(nar))
	if s := got[`kiss_onion_http_sent_bytes_total{role=read}`]; s < okRead || s > okRead+200 {
		t.Errorf("read role sent %v bytes, want %v and a few refusal messages", s, okRead)
	}
	if s := got[`kiss_onion_http_sent_bytes_total{role=write}`]; s < float64(len(nar)) || s > float64(len(nar))+200 {
		t.Errorf("write role sent %v bytes, want %d and a refusal message", s, len(nar))
	}
	up := float64(len(nar) + len(narinfo) + len("not a marker\n"))
	if r := got[`kiss_onion_http_received_bytes_total{role=write}`]; r != up {
		t.Errorf("write role received %v bytes, want %v", r, up)
	}
}

func TestLockRefusedWhileAPruneHoldsTheCacheIsCounted(t *testing.T) {
	tc, reg := metricsCache(t)
	if resp, b := do(t, tc.write, "PUT", "/gcroots/.lock/ci", []byte("ci")); resp.StatusCode != 201 {
		t.Fatalf("PUT lock: %d %s", resp.StatusCode, b)
	}
	if got := scrape(t, reg)[`kiss_onion_upload_locks{state=fresh}`]; got != 1 {
		t.Errorf("fresh locks = %v, want 1", got)
	}
	do(t, tc.write, "DELETE", "/gcroots/.lock/ci", nil)
	h, err := cachelock.New(tc.dir).Hold(context.Background(), 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release()
	if resp, b := do(t, tc.write, "PUT", "/gcroots/.lock/ci", []byte("ci")); resp.StatusCode != 503 {
		t.Fatalf("PUT lock during a prune: %d %s", resp.StatusCode, b)
	}
	got := scrape(t, reg)
	if got[`kiss_onion_upload_lock_refusals_total`] != 1 || got[`kiss_onion_upload_locks{state=fresh}`] != 0 {
		t.Errorf("refusals = %v, fresh locks = %v; want 1, 0", got[`kiss_onion_upload_lock_refusals_total`], got[`kiss_onion_upload_locks{state=fresh}`])
	}
}

// dirSize counts the cache as the size metrics should: every regular file
// but those under .tmp/ and gcroots/.lock/.
func dirSize(t *testing.T, dir string) (files, bytes float64) {
	t.Helper()
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		if fi.IsDir() && (rel == ".tmp" || rel == filepath.Join("gcroots", ".lock")) {
			return filepath.SkipDir
		}
		if fi.Mode().IsRegular() {
			files++
			bytes += float64(fi.Size())
		}
		return nil
	})
	return files, bytes
}

func TestCacheSizeFollowsUploadsAndDeletions(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "cache")
	// What a cache already holds at start, and what does not count.
	for rel, content := range map[string]string{
		"nar/old.nar":             "an old NAR",
		"log/x.drv":               "a build log",
		".tmp/partial":            "not counted (and removed: a dead upload)",
		"gcroots/.lock/writer":    "not counted",
		"realisations/a!out.doi":  "{}",
		"debuginfo/0123456789abc": "{}",
	} {
		p := filepath.Join(dir, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tc := newTestCache(t, func(c *Config) { c.Dir = dir })
	reg := prometheus.NewRegistry()
	if err := tc.RegisterMetrics(reg); err != nil {
		t.Fatal(err)
	}
	waitCounted(t, tc.Cache)
	check := func(step string) {
		t.Helper()
		tc.durable.barrier()
		got := scrape(t, reg)
		files, bytes := dirSize(t, dir)
		if got["kiss_onion_cache_files"] != files || got["kiss_onion_cache_bytes"] != bytes {
			t.Errorf("%s: cache_files %v, cache_bytes %v; the directory has %v files, %v bytes",
				step, got["kiss_onion_cache_files"], got["kiss_onion_cache_bytes"], files, bytes)
		}
	}
	check("at start")
	narURL := tc.upload(t, hashB, "dep")
	check("after an upload")
	tc.upload(t, hashB, "dep")
	check("after the same upload again")
	if resp, b := do(t, tc.write, "PUT", "/"+hashB+".ls", []byte(`{"version":1,"root":{"type":"regular"}}`)); resp.StatusCode != 201 {
		t.Fatalf("PUT listing: %d %s", resp.StatusCode, b)
	}
	check("after a listing")
	if resp, b := do(t, tc.write, "PUT", "/"+hashB+".ls", []byte(`{"version":1}`)); resp.StatusCode != 201 {
		t.Fatalf("PUT listing: %d %s", resp.StatusCode, b)
	}
	check("after a smaller listing replaced it")
	if resp, b := do(t, tc.write, "PUT", "/gcroots/web1", []byte("/nix/store/"+hashB+"-dep\n")); resp.StatusCode != 201 {
		t.Fatalf("PUT marker: %d %s", resp.StatusCode, b)
	}
	check("after a marker")
	if resp, b := do(t, tc.write, "PUT", "/gcroots/.lock/ci", []byte("ci")); resp.StatusCode != 201 {
		t.Fatalf("PUT lock: %d %s", resp.StatusCode, b)
	}
	check("after a lock")
	if resp, b := do(t, tc.write, "DELETE", "/gcroots/web1", nil); resp.StatusCode != 204 {
		t.Fatalf("DELETE marker: %d %s", resp.StatusCode, b)
	}
	check("after the marker went")
	// A forget waits for the locks to go.
	for _, name := range []string{"ci", "writer"} {
		if resp, b := do(t, tc.write, "DELETE", "/gcroots/.lock/"+name, nil); resp.StatusCode != 204 {
			t.Fatalf("DELETE lock %s: %d %s", name, resp.StatusCode, b)
		}
	}
	check("after the locks went")
	// A forget keeps a NAR written moments before it (an upload may be
	// about to name it): this one is older.
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(filepath.Join(dir, filepath.FromSlash(narURL)), old, old); err != nil {
		t.Fatal(err)
	}
	if resp, b := do(t, tc.write, "DELETE", "/"+hashB+".narinfo", nil); resp.StatusCode != 200 {
		t.Fatalf("DELETE narinfo: %d %s", resp.StatusCode, b)
	}
	if _, err := os.Stat(filepath.Join(dir, filepath.FromSlash(narURL))); err == nil {
		t.Fatalf("the forget left %s", narURL)
	}
	check("after a forget")
	// What a prune in the process deletes, it tells the cache.
	for _, rel := range []string{"nar/old.nar", "log/x.drv"} {
		p := filepath.Join(dir, filepath.FromSlash(rel))
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(p)
		tc.Removed(rel, fi.Size())
	}
	tc.Removed(".tmp/dead-upload", 1000) // a prune removes those too
	check("after a prune")
}

func TestUploadVisibleLatencyIsObserved(t *testing.T) {
	tc, reg := metricsCache(t)
	tc.upload(t, hashB, "dep")
	tc.upload(t, hashA, "app", hashB+"-dep")
	if resp, b := do(t, tc.write, "PUT", "/gcroots/web1", []byte("/nix/store/"+hashA+"-app\n")); resp.StatusCode != 201 {
		t.Fatalf("PUT marker: %d %s", resp.StatusCode, b)
	}
	got := scrape(t, reg)
	for kind, want := range map[string]float64{"nar": 2, "narinfo": 2, "other": 1} {
		key := fmt.Sprintf("kiss_onion_upload_visible_seconds_count{kind=%s}", kind)
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
}
