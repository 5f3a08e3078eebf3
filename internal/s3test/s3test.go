// Package s3test starts a real SeaweedFS for tests: `weed server` with
// its S3 gateway on 127.0.0.1, on free ports, in a temporary directory,
// with one identity whose keys sign every request and one bucket.
//
// The weed binary comes from scripts/seaweedfs, which builds it once per
// machine into ~/.cache/kiss-onion (or KISS_ONION_WEED names it); that
// first build takes ten minutes or more on two cores, about go test's default
// timeout, so scripts/test runs the script before the tests. The
// package does not talk S3 itself beyond waiting for the gateway and
// creating the bucket; tests use package s3store or any client.
package s3test

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Server is a running SeaweedFS with an S3 gateway and a bucket.
type Server struct {
	// Endpoint is host:port of the S3 API (plain HTTP).
	Endpoint string
	// Region is what the gateway answers for; any region signs.
	Region string
	// AccessKey and SecretKey are the one identity's, allowed everything.
	AccessKey, SecretKey string
	// Bucket exists and is empty when Start returns.
	Bucket string
	// Dir holds the server's data and its log (weed.log).
	Dir string

	cmd       *exec.Cmd
	done      chan struct{}
	grpcPorts map[string]int // by service, for the sockets weed leaves
}

// Volume bounds, so that a server fits beside the other tests: volumes
// of volumeSizeMB (files are sparse, nothing is preallocated), at most
// maxVolumes of them.
const (
	volumeSizeMB = 64
	maxVolumes   = 32
	memLimit     = "192MiB"
)

var (
	weedOnce sync.Once
	weedPath string
	weedErr  error
)

// Weed returns the path of the weed binary: $KISS_ONION_WEED, or what
// scripts/seaweedfs prints (building it the first time on a machine).
func Weed() (string, error) {
	weedOnce.Do(func() {
		if p := os.Getenv("KISS_ONION_WEED"); p != "" {
			weedPath = p
			return
		}
		_, file, _, _ := runtime.Caller(0)
		script := filepath.Join(filepath.Dir(file), "..", "..", "scripts", "seaweedfs")
		var stderr bytes.Buffer
		cmd := exec.Command(script)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			weedErr = fmt.Errorf("%s: %w\n%s", script, err, stderr.Bytes())
			return
		}
		weedPath = strings.TrimSpace(string(out))
	})
	return weedPath, weedErr
}

// Start starts a SeaweedFS for t and stops it when t ends. It fails t when
// weed cannot be had or does not come up.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := Launch(Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Options are how Launch runs weed; zero values are the tests' settings.
type Options struct {
	// Dir holds the server's data and log; it must exist.
	Dir string
	// MemLimit is weed's GOMEMLIMIT (default 192MiB); "off" for none.
	MemLimit string
	// VolumeSizeMB and MaxVolumes bound the volumes (default 64 and 32).
	VolumeSizeMB, MaxVolumes int
	// Bucket is the bucket to create (default kiss-onion).
	Bucket string
}

// Launch starts a SeaweedFS as Options say and waits until its bucket
// takes writes; Stop ends it. Benchmarks use it directly.
func Launch(opt Options) (*Server, error) {
	weed, err := Weed()
	if err != nil {
		return nil, fmt.Errorf("seaweedfs: %w", err)
	}
	opt.MemLimit = cmp.Or(opt.MemLimit, memLimit)
	opt.VolumeSizeMB = cmp.Or(opt.VolumeSizeMB, volumeSizeMB)
	opt.MaxVolumes = cmp.Or(opt.MaxVolumes, maxVolumes)
	dir := opt.Dir
	s := &Server{Region: "us-east-1", AccessKey: "KO" + randHex(9), SecretKey: randHex(20), Bucket: cmp.Or(opt.Bucket, "kiss-onion"), Dir: dir}
	config := filepath.Join(dir, "s3.json")
	if err := os.WriteFile(config, s.identityJSON(), 0o600); err != nil {
		return nil, err
	}
	ports, err := freePorts(8)
	if err != nil {
		return nil, err
	}
	s.grpcPorts = map[string]int{"master": ports[1], "volume": ports[3], "filer": ports[5], "s3": ports[7]}
	s.Endpoint = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[6]))
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		return nil, err
	}
	logf, err := os.Create(filepath.Join(dir, "weed.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	s.cmd = exec.Command(weed, "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir="+data,
		"-master.port="+strconv.Itoa(ports[0]), "-master.port.grpc="+strconv.Itoa(ports[1]),
		"-volume.port="+strconv.Itoa(ports[2]), "-volume.port.grpc="+strconv.Itoa(ports[3]),
		"-filer", "-filer.port="+strconv.Itoa(ports[4]), "-filer.port.grpc="+strconv.Itoa(ports[5]),
		"-filer.localSocket="+filepath.Join(dir, "filer.sock"),
		"-s3", "-s3.port="+strconv.Itoa(ports[6]), "-s3.port.grpc="+strconv.Itoa(ports[7]),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.config="+config,
		"-s3.localSocket="+filepath.Join(dir, "s3.sock"),
		"-master.volumeSizeLimitMB="+strconv.Itoa(opt.VolumeSizeMB), "-volume.max="+strconv.Itoa(opt.MaxVolumes),
		"-master.telemetry=false", "-volume.preStopSeconds=0",
	)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	s.cmd.Env = os.Environ()
	if opt.MemLimit != "off" {
		// A soft heap limit: the Go runtime then collects before the heap
		// doubles, which keeps weed near its live memory.
		s.cmd.Env = append(s.cmd.Env, "GOMEMLIMIT="+opt.MemLimit)
	}
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start weed: %w", err)
	}
	s.done = make(chan struct{})
	go func() { s.cmd.Wait(); close(s.done) }()
	if err := s.waitBucket(90 * time.Second); err != nil {
		s.Stop()
		return nil, fmt.Errorf("seaweedfs did not come up: %w\n%s", err, s.LogTail())
	}
	return s, nil
}

// PID is the weed process's.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// identityJSON is the gateway's -s3.config: one identity allowed all.
func (s *Server) identityJSON() []byte {
	type cred struct {
		AccessKey string `json:"accessKey"`
		SecretKey string `json:"secretKey"`
	}
	type identity struct {
		Name        string   `json:"name"`
		Credentials []cred   `json:"credentials"`
		Actions     []string `json:"actions"`
	}
	b, _ := json.Marshal(map[string][]identity{"identities": {{
		Name:        "kiss-onion",
		Credentials: []cred{{s.AccessKey, s.SecretKey}},
		Actions:     []string{"Admin", "Read", "Write", "List", "Tagging"},
	}}})
	return b
}

// Client returns a minio client signed with the server's identity.
func (s *Server) Client() (*minio.Client, error) {
	return minio.New(s.Endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(s.AccessKey, s.SecretKey, ""),
		Region:       s.Region,
		BucketLookup: minio.BucketLookupPath,
	})
}

// waitBucket waits until the gateway answers a signed request, then
// creates the bucket (which may fail while the volumes are still
// registering, so it is retried too).
func (s *Server) waitBucket(limit time.Duration) error {
	c, err := s.Client()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = c.MakeBucket(ctx, s.Bucket, minio.MakeBucketOptions{Region: s.Region})
		if minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			err = nil // made by an earlier try whose answer was lost
		}
		if err == nil {
			// A write proves the volumes are there, not just the filer.
			_, err = c.PutObject(ctx, s.Bucket, ".ready", strings.NewReader("ok"), 2, minio.PutObjectOptions{})
			if err == nil {
				err = c.RemoveObject(ctx, s.Bucket, ".ready", minio.RemoveObjectOptions{})
			}
		}
		cancel()
		if err == nil && s.listsEmpty(c) {
			return nil
		}
		select {
		case <-s.done:
			return fmt.Errorf("weed exited: %v", s.cmd.ProcessState)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", limit, err)
		}
	}
}

// listsEmpty reports whether the bucket lists no object: a new filer
// may list ".ready" for a moment after its deletion was answered.
func (s *Server) listsEmpty(c *minio.Client) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// An object, or an error, in the listing: not empty as far as known.
	for range c.ListObjects(ctx, s.Bucket, minio.ListObjectsOptions{Recursive: true, MaxKeys: 1}) {
		return false
	}
	return true
}

// Memory returns the weed process's resident memory now and at its
// peak, in bytes.
func (s *Server) Memory() (rss, peak int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		field, v, _ := strings.Cut(line, ":")
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch field {
		case "VmRSS":
			rss = kb << 10
		case "VmHWM":
			peak = kb << 10
		}
	}
	if rss == 0 || peak == 0 {
		return 0, 0, fmt.Errorf("no VmRSS or VmHWM in /proc/%d/status", s.cmd.Process.Pid)
	}
	return rss, peak, nil
}

// LogTail returns the end of the server's log, for a failure message.
func (s *Server) LogTail() string {
	data, _ := os.ReadFile(filepath.Join(s.Dir, "weed.log"))
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// Stop ends the server: SIGTERM, then SIGKILL to its process group.
func (s *Server) Stop() {
	pid := s.cmd.Process.Pid
	syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-pid, syscall.SIGKILL)
		<-s.done
	}
	// weed puts its gRPC sockets in /tmp whatever its flags say, and does
	// not always remove them.
	for name, port := range s.grpcPorts {
		p := fmt.Sprintf("/tmp/seaweedfs-%s-grpc-%d.sock", name, port)
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(p)
		}
	}
}

// freePorts returns n ports that were free a moment ago on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	ports := make([]int, n)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports, nil
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}
