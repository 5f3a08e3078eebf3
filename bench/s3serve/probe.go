package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/s3store"
)

// probe is one line of the second table: what the store alone takes for
// the requests serve makes of it, through package s3store (serve's own
// client), with no serve and no HTTP front in between.
type probe struct {
	what, value string
}

// probeStore measures weed through s3store on the uncompressed prefix:
// the latency of a Stat (a narinfo revalidation, a NAR GET's first
// request, an upload's checks) and of a small PUT (a narinfo), and the
// throughput of one stream each way for the biggest NAR.
func (b *bench) probeStore(cacheDir string) ([]probe, error) {
	st, err := s3store.New(s3store.Config{
		Endpoint: b.w.Endpoint, Region: b.w.Region, AccessKey: b.w.AccessKey, SecretKey: b.w.SecretKey,
		Bucket: b.w.Bucket, Prefix: "none",
	})
	if err != nil {
		return nil, err
	}
	narinfos, nars, sizes, err := cacheFiles(cacheDir)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	var out []probe
	lat := func(what string, n int, f func(i int) error) error {
		ds := make([]time.Duration, 0, n)
		for i := 0; i < n; i++ {
			t0 := time.Now()
			if err := f(i); err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			ds = append(ds, time.Since(t0))
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		v := fmt.Sprintf("median %.2f ms, 90th percentile %.2f ms", ms(ds[n/2]), ms(ds[n*9/10]))
		out = append(out, probe{fmt.Sprintf("%s (%d in a row)", what, n), v})
		fmt.Fprintf(os.Stderr, "%-60s %s\n", what, v)
		return nil
	}
	if err := lat("Stat of a narinfo", len(narinfos), func(i int) error {
		_, err := st.Stat(ctx, strings.TrimPrefix(narinfos[i], "/"))
		return err
	}); err != nil {
		return nil, err
	}
	small, err := os.ReadFile(filepath.Join(cacheDir, narinfos[0]))
	if err != nil {
		return nil, err
	}
	if err := lat("PUT of a narinfo-sized object", 100, func(i int) error {
		_, err := st.Put(ctx, fmt.Sprintf("probe/%d.narinfo", i), strings.NewReader(string(small)), int64(len(small)))
		return err
	}); err != nil {
		return nil, err
	}

	biggest := nars[0]
	size := sizes[biggest]
	var putBest, getBest, putCPU, getCPU float64
	for i := 0; i < *rounds; i++ {
		f, err := os.Open(filepath.Join(cacheDir, biggest))
		if err != nil {
			return nil, err
		}
		c0, t0 := cpuSeconds(b.w.pid()), time.Now()
		_, err = st.Put(ctx, "probe/big.nar", f, size)
		d := time.Since(t0).Seconds()
		c1 := cpuSeconds(b.w.pid())
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("put the biggest NAR: %w", err)
		}
		if v := float64(size) / 1e6 / d; v > putBest {
			putBest, putCPU = v, c1-c0
		}
		c0, t0 = cpuSeconds(b.w.pid()), time.Now()
		rc, _, err := st.Get(ctx, strings.TrimPrefix(biggest, "/"), 0, -1)
		if err != nil {
			return nil, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		d = time.Since(t0).Seconds()
		c1 = cpuSeconds(b.w.pid())
		if err != nil || n != size {
			return nil, fmt.Errorf("get the biggest NAR: %d of %d bytes: %v", n, size, err)
		}
		if v := float64(size) / 1e6 / d; v > getBest {
			getBest, getCPU = v, c1-c0
		}
	}
	mb := size >> 20
	out = append(out,
		probe{fmt.Sprintf("PUT of the %d MB NAR, 16 MiB parts one after another (best of %d)", mb, *rounds), fmt.Sprintf("%.0f MB/s, weed used %.2f s of CPU", putBest, putCPU)},
		probe{fmt.Sprintf("GET of the %d MB NAR, one stream (best of %d)", mb, *rounds), fmt.Sprintf("%.0f MB/s, weed used %.2f s of CPU", getBest, getCPU)})
	fmt.Fprintf(os.Stderr, "%-60s put %.0f MB/s, get %.0f MB/s\n", "the biggest NAR", putBest, getBest)
	var names []string
	for i := 0; i < 100; i++ {
		names = append(names, fmt.Sprintf("probe/%d.narinfo", i))
	}
	return out, st.Delete(ctx, append(names, "probe/big.nar"))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// cpuSeconds is a process's user and system CPU time so far, see proc(5).
func cpuSeconds(pid int) float64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	s := string(b)
	// Fields after the command, which is in parentheses and may hold spaces.
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	k, _ := strconv.ParseFloat(f[12], 64)
	return (u + k) / 100 // USER_HZ
}
