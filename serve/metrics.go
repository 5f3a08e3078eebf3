package serve

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
)

// The cache's metrics, for Prometheus (see RegisterMetrics). They are
// counted always, whether anyone scrapes them or not: an atomic add per
// request, into a table whose every cell (role, method, status) exists
// from the start, so that the read role's hot path does no map look-up
// and no allocation to count. Labels are drawn from fixed sets: no metric
// carries a path, a key or a client's address.

// Methods as the request counters know them.
const (
	methodGet = iota
	methodHead
	methodPut
	methodDelete
	methodOther
	numMethods
)

var methodNames = [numMethods]string{"GET", "HEAD", "PUT", "DELETE", "other"}

// methodIndex returns the counters' index of an HTTP method.
func methodIndex(m string) int {
	switch m {
	case http.MethodGet:
		return methodGet
	case http.MethodHead:
		return methodHead
	case http.MethodPut:
		return methodPut
	case http.MethodDelete:
		return methodDelete
	}
	return methodOther
}

// countedStatuses are the statuses counted by their code; any other is
// counted as "other". They are those the cache answers.
var countedStatuses = [...]int{200, 201, 204, 206, 304, 400, 401, 404, 405, 409, 412, 413, 415, 416, 422, 500, 503, 505, 507}

const numStatuses = len(countedStatuses) + 1 // index 0 is "other"

// statusIndex maps a status code to its counters' index.
var statusIndex = func() (idx [600]uint8) {
	for i, code := range countedStatuses {
		idx[code] = uint8(i + 1)
	}
	return idx
}()

var statusNames = func() (names [numStatuses]string) {
	names[0] = "other"
	for i, code := range countedStatuses {
		names[i+1] = strconv.Itoa(code)
	}
	return names
}()

func statusOf(code int) int {
	if code < 0 || code >= len(statusIndex) {
		return 0
	}
	return int(statusIndex[code])
}

// Kinds of upload for the upload-to-visible latency.
const (
	uploadNar = iota
	uploadNarInfo
	uploadOther
	numUploadKinds
)

var uploadKindNames = [numUploadKinds]string{"nar", "narinfo", "other"}

// metrics are the counters of one Cache.
type metrics struct {
	requests [2][numMethods][numStatuses]atomic.Uint64 // by Role
	sent     [2]atomic.Uint64                          // body bytes answered, by Role
	received atomic.Uint64                             // upload body bytes, as sent (before decoding)
	busy     atomic.Uint64                             // lock PUTs refused while a prune held the cache
	// refusedConns counts connections refused past a listener's cap, by Role.
	refusedConns [2]atomic.Uint64

	visibleVec *prometheus.HistogramVec
	visible    [numUploadKinds]prometheus.Observer

	// The cache's size: counted once (countSize), then kept up to date
	// from what the cache makes visible and deletes, and what Removed is
	// told. counted is set once the count is done, at countedAt.
	files, bytes, narinfos atomic.Int64
	counted                atomic.Bool
	countedAt              atomic.Int64 // unix nanoseconds
	countOnce              sync.Once
}

func newMetrics() *metrics {
	m := &metrics{
		visibleVec: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "kiss_onion_upload_visible_seconds",
			Help: "Time from the start of an upload's PUT to its file being visible under its final name, by kind (nar, narinfo, other); a narinfo waits for its NAR and references to be durable.",
			// 1 ms to about 4 minutes.
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 10),
		}, []string{"kind"}),
	}
	for k := range m.visible {
		m.visible[k] = m.visibleVec.WithLabelValues(uploadKindNames[k])
	}
	return m
}

// count records one answered request.
func (m *metrics) count(role Role, method, status int) {
	m.requests[role][method][statusOf(status)].Add(1)
}

// stored records an upload of size bytes made visible at path, replacing
// a file of old bytes (old < 0: none), begun at start.
func (m *metrics) stored(kind int, start time.Time, old, size int64) {
	m.visible[kind].Observe(time.Since(start).Seconds())
	m.resized(old, size)
	if kind == uploadNarInfo && old < 0 {
		m.narinfos.Add(1)
	}
}

// resized records that a file of old bytes (old < 0: none) is now one of
// size bytes (size < 0: gone).
func (m *metrics) resized(old, size int64) {
	switch {
	case old < 0 && size >= 0:
		m.files.Add(1)
		m.bytes.Add(size)
	case old >= 0 && size < 0:
		m.files.Add(-1)
		m.bytes.Add(-old)
	case old >= 0:
		m.bytes.Add(size - old)
	}
}

// sizeOf returns the size of the regular file at path, or -1 when there
// is none: what a rename to path is about to replace.
func sizeOf(path string) int64 {
	fi, err := os.Lstat(path)
	if err != nil || !fi.Mode().IsRegular() {
		return -1
	}
	return fi.Size()
}

// Removed tells the cache that the file rel (relative to the cache
// directory) of size bytes was deleted by someone else, such as a prune
// run by this process: its size metrics take it off. Files under .tmp/
// and gcroots/.lock/ are not counted in the first place.
func (c *Cache) Removed(rel string, size int64) {
	if !countedFile(rel) {
		return
	}
	c.metrics.resized(size, -1)
	if topNarInfo(rel) {
		c.metrics.narinfos.Add(-1)
	}
}

// topNarInfo reports whether rel, slash-separated and relative to the
// cache directory, is a store path's narinfo.
func topNarInfo(rel string) bool {
	return !strings.Contains(rel, "/") && strings.HasSuffix(rel, ".narinfo")
}

// countedFile reports whether a file, by its slash-separated path
// relative to the cache directory, counts in the cache's size: all do but
// partial uploads and lock files.
func countedFile(rel string) bool {
	return !strings.HasPrefix(rel, ".tmp/") && !strings.HasPrefix(rel, "gcroots/.lock/")
}

// countSize counts the cache's files and bytes once, adding them to what
// uploads and deletions have counted meanwhile. It reads directories a
// chunk at a time: nar/ of a large cache holds millions of names.
func (c *Cache) countSize() {
	start := time.Now()
	var files, bytes, narinfos int64
	var walk func(dir, rel string)
	walk = func(dir, rel string) {
		d, err := os.Open(dir)
		if err != nil {
			return
		}
		defer d.Close()
		for {
			ents, err := d.ReadDir(1024)
			for _, e := range ents {
				r := e.Name()
				if rel != "" {
					r = rel + "/" + r
				}
				switch {
				case e.IsDir():
					if countedFile(r + "/") {
						walk(filepath.Join(dir, e.Name()), r)
					}
				case e.Type().IsRegular():
					if fi, err := e.Info(); err == nil {
						files++
						bytes += fi.Size()
						if topNarInfo(r) {
							narinfos++
						}
					}
				}
			}
			if err != nil {
				return
			}
		}
	}
	walk(c.cfg.Dir, "")
	c.metrics.counts(files, bytes, narinfos)
	c.log.WithFields(logrus.Fields{"files": files, "bytes": bytes, "narinfos": narinfos, "elapsed": time.Since(start).Round(time.Millisecond)}).
		Debug("cache size counted")
}

// counts adds the count made at the start to what uploads and deletions
// counted meanwhile, and marks the size as known.
func (m *metrics) counts(files, bytes, narinfos int64) {
	m.files.Add(files)
	m.bytes.Add(bytes)
	m.narinfos.Add(narinfos)
	m.countedAt.Store(time.Now().UnixNano())
	m.counted.Store(true)
}

// CountSize starts counting the cache's files and bytes in the
// background, once per Cache (RegisterMetrics starts it too); from then
// on they are kept up to date as the metrics describe, and Size reports
// them.
func (c *Cache) CountSize() {
	c.metrics.countOnce.Do(func() {
		if c.bucket != nil {
			go c.countSizeBucket()
			return
		}
		go c.countSize()
	})
}

// Size is the cache's size as a Cache keeps it: its narinfos (store
// paths), and its files and their bytes, partial uploads and lock files
// aside.
type Size struct {
	NarInfos, Files, Bytes int64
	// Counted is when the count at the start ended; the figures are kept
	// up to date since.
	Counted time.Time
}

// Size returns the cache's size, and false while the count that
// CountSize started is not done.
func (c *Cache) Size() (Size, bool) {
	m := c.metrics
	if !m.counted.Load() {
		return Size{}, false
	}
	return Size{NarInfos: m.narinfos.Load(), Files: m.files.Load(), Bytes: m.bytes.Load(), Counted: time.Unix(0, m.countedAt.Load())}, true
}

// RegisterMetrics registers the cache's metrics with reg and starts
// counting the cache's files and bytes in the background: the size
// metrics appear once that is done. From then on the size is kept up to
// date from the uploads this process makes visible, the markers and the
// store paths it deletes (DELETE of a narinfo), and what Removed is told
// (a prune in this process); never by reading the directory again. What
// another process writes into or deletes from the directory (a
// `kiss-onion prune` or `forget` run on the directory beside serve, a
// cache filled by hand) makes it drift until the next start.
func (c *Cache) RegisterMetrics(reg prometheus.Registerer) error {
	if err := reg.Register(&cacheCollector{c: c}); err != nil {
		return err
	}
	c.CountSize()
	return nil
}

// cacheCollector is the prometheus.Collector of a Cache's metrics.
type cacheCollector struct{ c *Cache }

var (
	requestsDesc = prometheus.NewDesc("kiss_onion_http_requests_total",
		"HTTP requests answered, by role (read, write), method (GET, HEAD, PUT, DELETE, other) and status.",
		[]string{"role", "method", "status"}, nil)
	sentDesc = prometheus.NewDesc("kiss_onion_http_sent_bytes_total",
		"Bytes of response bodies sent, by role.", []string{"role"}, nil)
	receivedDesc = prometheus.NewDesc("kiss_onion_http_received_bytes_total",
		"Bytes of request bodies received (uploads, as sent: before decoding), by role.", []string{"role"}, nil)
	refusedConnsDesc = prometheus.NewDesc("kiss_onion_connections_refused_total",
		"Connections refused because the listener (of this role) held its cap of connections, none idle to close: they never became requests.", []string{"role"}, nil)
	busyDesc = prometheus.NewDesc("kiss_onion_upload_lock_refusals_total",
		"Upload locks refused (503) because a prune held the cache.", nil, nil)
	queueDesc = prometheus.NewDesc("kiss_onion_durability_queue",
		"Uploads acknowledged and not yet durable and visible.", nil, nil)
	filesDesc = prometheus.NewDesc("kiss_onion_cache_files",
		"Files in the cache directory (partial uploads and lock files aside), counted at start and kept up to date from this process's uploads and prunes.", nil, nil)
	bytesDesc = prometheus.NewDesc("kiss_onion_cache_bytes",
		"Bytes of the files counted by kiss_onion_cache_files.", nil, nil)
	locksDesc = prometheus.NewDesc("kiss_onion_upload_locks",
		"Upload locks in gcroots/.lock, by state: fresh (held) or stale (past their age, ignored).", []string{"state"}, nil)
)

func (cc *cacheCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{requestsDesc, sentDesc, receivedDesc, refusedConnsDesc, busyDesc, queueDesc, filesDesc, bytesDesc, locksDesc} {
		ch <- d
	}
	cc.c.metrics.visibleVec.Describe(ch)
}

func (cc *cacheCollector) Collect(ch chan<- prometheus.Metric) {
	c, m := cc.c, cc.c.metrics
	for role := range m.requests {
		rn := Role(role).String()
		for method := range m.requests[role] {
			for status := range m.requests[role][method] {
				if n := m.requests[role][method][status].Load(); n > 0 {
					ch <- prometheus.MustNewConstMetric(requestsDesc, prometheus.CounterValue, float64(n), rn, methodNames[method], statusNames[status])
				}
			}
		}
		ch <- prometheus.MustNewConstMetric(sentDesc, prometheus.CounterValue, float64(m.sent[role].Load()), rn)
		ch <- prometheus.MustNewConstMetric(refusedConnsDesc, prometheus.CounterValue, float64(m.refusedConns[role].Load()), rn)
	}
	ch <- prometheus.MustNewConstMetric(receivedDesc, prometheus.CounterValue, float64(m.received.Load()), Write.String())
	ch <- prometheus.MustNewConstMetric(busyDesc, prometheus.CounterValue, float64(m.busy.Load()))
	ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(c.durable.queued.Load()))
	if m.counted.Load() {
		ch <- prometheus.MustNewConstMetric(filesDesc, prometheus.GaugeValue, float64(m.files.Load()))
		ch <- prometheus.MustNewConstMetric(bytesDesc, prometheus.GaugeValue, float64(m.bytes.Load()))
	}
	// A directory read of gcroots/.lock: a handful of names.
	if locks, err := c.locks.List(); err == nil {
		var fresh, stale int
		for _, l := range locks {
			if l.Fresh {
				fresh++
			} else {
				stale++
			}
		}
		ch <- prometheus.MustNewConstMetric(locksDesc, prometheus.GaugeValue, float64(fresh), "fresh")
		ch <- prometheus.MustNewConstMetric(locksDesc, prometheus.GaugeValue, float64(stale), "stale")
	}
	m.visibleVec.Collect(ch)
}

// countHTTP counts the requests h answers for role, their body bytes and
// those of the responses: the write role's net/http side. (The read
// role's fasthttp side counts in handleRead.)
func (c *Cache) countHTTP(role Role, h http.Handler) http.Handler {
	m := c.metrics
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cw := &countingWriter{ResponseWriter: w, sent: &m.sent[role], head: r.Method == http.MethodHead}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = &countingBody{ReadCloser: r.Body, n: &m.received}
		}
		h.ServeHTTP(cw, r)
		if cw.status == 0 {
			cw.status = http.StatusOK
		}
		m.count(role, methodIndex(r.Method), cw.status)
	})
}

// countingWriter is a ResponseWriter that records the status and counts
// the body's bytes. It passes ReadFrom on (sendfile) and unwraps for
// http.ResponseController.
type countingWriter struct {
	http.ResponseWriter
	sent   *atomic.Uint64
	head   bool
	status int
}

func (w *countingWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *countingWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	if !w.head {
		w.sent.Add(uint64(n))
	}
	return n, err
}

func (w *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	var n int64
	var err error
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(r)
	} else {
		n, err = io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
	}
	if !w.head {
		w.sent.Add(uint64(n))
	}
	return n, err
}

func (w *countingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countingBody counts the bytes read from a request body.
type countingBody struct {
	io.ReadCloser
	n *atomic.Uint64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(uint64(n))
	return n, err
}
