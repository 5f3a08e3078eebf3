package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// weed is a running SeaweedFS (`weed server -filer -s3`) on 127.0.0.1,
// started as internal/s3test starts it, with larger volumes: the
// benchmark puts a few GB in it.
type weed struct {
	endpoint, region, access, secret, bucket string
	dir                                      string
	cmd                                      *exec.Cmd
	done                                     chan struct{}
	grpcPorts                                map[string]int
	client                                   *minio.Client
	stop                                     func()
}

// Volumes are sparse files; the bound keeps a runaway from filling the disk.
const (
	weedVolumeMB   = 128
	weedMaxVolumes = 64
)

func startWeed(bin, dir string) (*weed, error) {
	os.RemoveAll(dir) // a fresh store each run
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o700); err != nil {
		return nil, err
	}
	w := &weed{region: "us-east-1", access: "KO" + randHex(9), secret: randHex(20), bucket: "bench", dir: dir}
	config := filepath.Join(dir, "s3.json")
	if err := os.WriteFile(config, w.identityJSON(), 0o600); err != nil {
		return nil, err
	}
	ports, err := freePorts(8)
	if err != nil {
		return nil, err
	}
	w.grpcPorts = map[string]int{"master": ports[1], "volume": ports[3], "filer": ports[5], "s3": ports[7]}
	w.endpoint = net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[6]))
	logf, err := os.Create(filepath.Join(dir, "weed.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	p := func(i int) string { return strconv.Itoa(ports[i]) }
	w.cmd = exec.Command(bin, "server",
		"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-dir="+filepath.Join(dir, "data"),
		"-master.port="+p(0), "-master.port.grpc="+p(1),
		"-volume.port="+p(2), "-volume.port.grpc="+p(3),
		"-filer", "-filer.port="+p(4), "-filer.port.grpc="+p(5),
		"-filer.localSocket="+filepath.Join(dir, "filer.sock"),
		"-s3", "-s3.port="+p(6), "-s3.port.grpc="+p(7),
		"-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.config="+config,
		"-s3.localSocket="+filepath.Join(dir, "s3.sock"),
		"-master.volumeSizeLimitMB="+strconv.Itoa(weedVolumeMB), "-volume.max="+strconv.Itoa(weedMaxVolumes),
		"-master.telemetry=false", "-volume.preStopSeconds=0",
	)
	w.cmd.Stdout, w.cmd.Stderr = logf, logf
	w.cmd.Env = os.Environ()
	if *memLimit != "off" {
		// A soft heap limit, as internal/s3test sets: the Go runtime
		// collects before the heap doubles.
		w.cmd.Env = append(w.cmd.Env, "GOMEMLIMIT="+*memLimit)
	}
	w.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := w.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start weed: %w", err)
	}
	w.done = make(chan struct{})
	go func() { w.cmd.Wait(); close(w.done) }()
	w.stop = track(w.cmd.Process.Pid, w.kill)
	w.client, err = minio.New(w.endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(w.access, w.secret, ""),
		Region:       w.region,
		BucketLookup: minio.BucketLookupPath,
	})
	if err == nil {
		err = w.waitBucket(120 * time.Second)
	}
	if err != nil {
		w.stop()
		return nil, fmt.Errorf("seaweedfs: %w (log: %s)", err, filepath.Join(dir, "weed.log"))
	}
	return w, nil
}

func (w *weed) pid() int { return w.cmd.Process.Pid }

func (w *weed) identityJSON() []byte {
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
		Name:        "bench",
		Credentials: []cred{{w.access, w.secret}},
		Actions:     []string{"Admin", "Read", "Write", "List", "Tagging"},
	}}})
	return b
}

// waitBucket creates the bucket once the gateway takes a signed request,
// then writes an object, which proves the volumes are there.
func (w *weed) waitBucket(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := w.client.MakeBucket(ctx, w.bucket, minio.MakeBucketOptions{Region: w.region})
		if minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			err = nil
		}
		if err == nil {
			_, err = w.client.PutObject(ctx, w.bucket, ".ready", strings.NewReader("ok"), 2, minio.PutObjectOptions{})
			if err == nil {
				err = w.client.RemoveObject(ctx, w.bucket, ".ready", minio.RemoveObjectOptions{})
			}
		}
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-w.done:
			return fmt.Errorf("weed exited: %v", w.cmd.ProcessState)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", limit, err)
		}
	}
}

// storeURL is serve's --store for a prefix of the bucket.
func (w *weed) storeURL(prefix string) string {
	return "s3://" + w.bucket + "/" + prefix + "?endpoint=" + url.QueryEscape("http://"+w.endpoint) + "&region=" + w.region
}

// writeCredentials writes an AWS credentials file with the identity's keys.
func (w *weed) writeCredentials(path string) error {
	return os.WriteFile(path, []byte("[default]\naws_access_key_id = "+w.access+"\naws_secret_access_key = "+w.secret+"\n"), 0o600)
}

// fill copies a flat cache directory into the bucket under prefix, every
// other file first and the narinfos last, as a migration would.
func (w *weed) fill(dir, prefix string) error {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && d.Name() == ".tmp" {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			rel, _ := filepath.Rel(dir, p)
			files = append(files, rel)
		}
		return nil
	})
	if err != nil {
		return err
	}
	sort.SliceStable(files, func(i, j int) bool {
		return !strings.HasSuffix(files[i], ".narinfo") && strings.HasSuffix(files[j], ".narinfo")
	})
	for _, rel := range files {
		if err := w.put(filepath.Join(dir, rel), prefix+"/"+filepath.ToSlash(rel)); err != nil {
			return err
		}
	}
	return nil
}

func (w *weed) put(file, key string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := w.client.PutObject(ctx, w.bucket, key, f, fi.Size(), minio.PutObjectOptions{}); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

func (w *weed) kill() {
	pid := w.cmd.Process.Pid
	syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-w.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-pid, syscall.SIGKILL)
		<-w.done
	}
	// weed leaves its gRPC sockets in /tmp whatever its flags say.
	for name, port := range w.grpcPorts {
		p := fmt.Sprintf("/tmp/seaweedfs-%s-grpc-%d.sock", name, port)
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(p)
		}
	}
}

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
