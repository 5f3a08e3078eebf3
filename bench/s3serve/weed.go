package main

import (
	"context"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/minio/minio-go/v7"
)

// weed is a running SeaweedFS (`weed server -filer -s3`) on 127.0.0.1,
// started by internal/s3test with larger volumes: the benchmark puts a
// few GB in it.
type weed struct {
	*s3test.Server
	client *minio.Client
	stop   func()
}

// Volumes are sparse files; the bound keeps a runaway from filling the disk.
const (
	weedVolumeMB   = 128
	weedMaxVolumes = 64
)

func startWeed(bin, dir string) (*weed, error) {
	os.RemoveAll(dir) // a fresh store each run
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	os.Setenv("KISS_ONION_WEED", bin)
	srv, err := s3test.Launch(s3test.Options{Dir: dir, MemLimit: *memLimit, VolumeSizeMB: weedVolumeMB, MaxVolumes: weedMaxVolumes, Bucket: "bench"})
	if err != nil {
		return nil, err
	}
	w := &weed{Server: srv, stop: track(srv.PID(), srv.Stop)}
	if w.client, err = srv.Client(); err != nil {
		w.stop()
		return nil, err
	}
	return w, nil
}

func (w *weed) pid() int { return w.PID() }

// storeURL is serve's --store for a prefix of the bucket.
func (w *weed) storeURL(prefix string) string {
	return "s3://" + w.Bucket + "/" + prefix + "?endpoint=" + url.QueryEscape("http://"+w.Endpoint) + "&region=" + w.Region
}

// writeCredentials writes an AWS credentials file with the identity's keys.
func (w *weed) writeCredentials(path string) error {
	return os.WriteFile(path, []byte("[default]\naws_access_key_id = "+w.AccessKey+"\naws_secret_access_key = "+w.SecretKey+"\n"), 0o600)
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
	if _, err := w.client.PutObject(ctx, w.Bucket, key, f, fi.Size(), minio.PutObjectOptions{}); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}
