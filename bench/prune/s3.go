package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// withSeaweedFS runs fn with a SeaweedFS started as the tests start it
// (internal/s3test: memory bounded by GOMEMLIMIT, small volumes), and
// stops it after.
func withSeaweedFS(fn func(srv *s3test.Server) error) error {
	dir, err := os.MkdirTemp("", "kiss-onion-prune-weed-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	srv, err := s3test.Launch(s3test.Options{Dir: dir})
	if err != nil {
		return err
	}
	defer srv.Stop()
	err = fn(srv)
	if rss, peak, merr := srv.Memory(); merr == nil {
		fmt.Printf("seaweedfs resident memory at the end: %d MiB, at its peak %d MiB\n", rss>>20, peak>>20)
	}
	return err
}

// bucketOf returns the store over srv's bucket under prefix, and its URL.
func bucketOf(srv *s3test.Server, prefix string) (*s3store.Store, string, error) {
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket,
		Prefix: prefix, AccessKey: srv.AccessKey, SecretKey: srv.SecretKey})
	u := "s3://" + srv.Bucket + "/" + prefix + "?" +
		url.Values{"endpoint": {"http://" + srv.Endpoint}, "region": {srv.Region}}.Encode()
	return st, u, err
}

// uploadCache puts every regular file of the cache directory into st, on
// 32 goroutines: narinfos last, so the bucket is a valid cache throughout,
// as a migration would copy it.
func uploadCache(cache string, st *s3store.Store) error {
	var first, last []string
	err := filepath.WalkDir(cache, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(cache, p)
		rel = filepath.ToSlash(rel)
		if strings.HasSuffix(rel, ".narinfo") && !strings.Contains(rel, "/") {
			last = append(last, rel)
		} else {
			first = append(first, rel)
		}
		return nil
	})
	if err != nil {
		return err
	}
	start := time.Now()
	var done atomic.Int64
	total := len(first) + len(last)
	for _, batch := range [][]string{first, last} {
		var wg sync.WaitGroup
		var failed atomic.Value
		var next atomic.Int64
		for range 32 {
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= len(batch) || failed.Load() != nil {
						return
					}
					data, err := os.ReadFile(filepath.Join(cache, filepath.FromSlash(batch[i])))
					if err == nil {
						_, err = st.Put(context.Background(), batch[i], bytes.NewReader(data), int64(len(data)))
					}
					if err != nil {
						failed.Store(err)
						return
					}
					if d := done.Add(1); d%20000 == 0 {
						fmt.Fprintf(os.Stderr, "\ruploaded %d/%d objects (%.0f/s)", d, total, float64(d)/time.Since(start).Seconds())
					}
				}
			})
		}
		wg.Wait()
		if err, ok := failed.Load().(error); ok {
			return err
		}
	}
	fmt.Fprintln(os.Stderr)
	fmt.Printf("uploaded %d objects to the bucket in %s (%.0f PUTs/s)\n", total, time.Since(start).Round(time.Second),
		float64(total)/time.Since(start).Seconds())
	return nil
}

// countBucketNarInfos counts the narinfos at the top of st.
func countBucketNarInfos(st *s3store.Store) (int, error) {
	n := 0
	err := st.ListDir(context.Background(), "", func(page []s3store.Info) error {
		for _, o := range page {
			if strings.HasSuffix(o.Name, ".narinfo") {
				n++
			}
		}
		return nil
	})
	return n, err
}

// phased is a prune of the binary timed by the phases it logs: the hold
// (lock protocol: for a bucket the guard window), the scan, the deletions.
type phased struct {
	wall, hold, scan time.Duration
	maxRSS           int64
	cpu              time.Duration
	summary          string
}

// measurePhases runs `bin prune --state-dir state target` with env added,
// timing its phases by the log lines it writes to stderr at each change
// (every 250 ms at most, so a phase's start is late by up to that).
func measurePhases(bin, target, state string, env []string) (phased, error) {
	cmd := exec.Command(bin, "prune", "--state-dir", state, target)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return phased{}, err
	}
	errPipe, err := cmd.StderrPipe()
	if err != nil {
		return phased{}, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return phased{}, err
	}
	var scanAt, deleteAt time.Duration
	logs := make(chan struct{})
	go func() {
		defer close(logs)
		sc := bufio.NewScanner(errPipe)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case scanAt == 0 && strings.Contains(line, "prune: "+"scanning"):
				scanAt = time.Since(start)
			case deleteAt == 0 && strings.Contains(line, "prune: "+"deleting"):
				deleteAt = time.Since(start)
			case strings.Contains(line, "level=warn") || strings.Contains(line, "level=error"):
				fmt.Fprintln(os.Stderr, line)
			}
		}
	}()
	var summary string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		summary = strings.TrimPrefix(sc.Text(), "kiss-onion: ")
	}
	io.Copy(io.Discard, out)
	<-logs
	err = cmd.Wait()
	wall := time.Since(start)
	if deleteAt == 0 { // too quick for a log line
		deleteAt = wall
	}
	m := phased{wall: wall, hold: scanAt, scan: deleteAt - scanAt, summary: summary}
	if err != nil {
		return m, fmt.Errorf("prune %s: %w", target, err)
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		m.maxRSS = ru.Maxrss << 10
		m.cpu = time.Duration(syscall.TimevalToNsec(ru.Utime) + syscall.TimevalToNsec(ru.Stime))
	}
	return m, nil
}

// runS3 runs the side-by-side benchmark: the generated cache is uploaded
// to a bucket of a fresh SeaweedFS, then pruned cold and warm on the
// directory and on the bucket, by the same binary.
func runS3(bin, cache, state string, keep int) error {
	return withSeaweedFS(func(srv *s3test.Server) error {
		st, target, err := bucketOf(srv, "bench")
		if err != nil {
			return err
		}
		if err := uploadCache(cache, st); err != nil {
			return err
		}
		env := []string{"AWS_ACCESS_KEY_ID=" + srv.AccessKey, "AWS_SECRET_ACCESS_KEY=" + srv.SecretKey}
		// Objects modified within two seconds of a bucket prune's start
		// count as new: let the last narinfos age past that.
		time.Sleep(3 * time.Second)
		type row struct {
			what string
			m    phased
		}
		var rows []row
		for _, r := range []struct{ what, target, state string }{
			{"directory, cold", cache, state + "-dir"},
			{"directory, warm", cache, state + "-dir"},
			{"bucket, cold", target, state + "-s3"},
			{"bucket, warm", target, state + "-s3"},
		} {
			if strings.HasSuffix(r.what, "cold") {
				os.RemoveAll(r.state)
			}
			m, err := measurePhases(bin, r.target, r.state, env)
			if err != nil {
				return err
			}
			rows = append(rows, row{r.what, m})
			fmt.Fprintf(os.Stderr, "%s: %s\n", r.what, m.summary)
		}
		left, err := countBucketNarInfos(st)
		if err != nil {
			return err
		}
		fmt.Println()
		fmt.Printf("command: %s prune --state-dir STATE %s (keys in AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)\n", bin, target)
		fmt.Printf("%-16s %9s %9s %9s %9s %8s %10s  %s\n", "prune", "wall", "hold", "scan", "delete", "CPU", "peak RSS", "summary")
		for _, r := range rows {
			fmt.Printf("%-16s %8.2fs %8.2fs %8.2fs %8.2fs %7.1fs %6d MiB  %s\n", r.what, r.m.wall.Seconds(), r.m.hold.Seconds(),
				r.m.scan.Seconds(), (r.m.wall - r.m.hold - r.m.scan).Seconds(), r.m.cpu.Seconds(), r.m.maxRSS>>20, r.m.summary)
		}
		fmt.Printf("narinfos left in the bucket: %d (expected %d)\n", left, keep)
		if left != keep {
			return fmt.Errorf("the bucket prune left %d narinfos, the graph keeps %d", left, keep)
		}
		return nil
	})
}
