package s3test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"testing"

	"github.com/minio/minio-go/v7"
)

// TestStart starts a server and checks what Start promises: an empty
// bucket that the identity can write, requests that are really signed,
// and nothing left behind.
func TestStart(t *testing.T) {
	var socket string
	t.Run("server", func(t *testing.T) {
		s := Start(t)
		socket = fmt.Sprintf("/tmp/seaweedfs-master-grpc-%d.sock", s.grpcPorts["master"])
		c, err := s.Client()
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		for o := range c.ListObjects(ctx, s.Bucket, minio.ListObjectsOptions{Recursive: true}) {
			t.Errorf("the new bucket holds %q (%v)", o.Key, o.Err)
		}
		if _, err := c.PutObject(ctx, s.Bucket, "x", http.NoBody, 0, minio.PutObjectOptions{}); err != nil {
			t.Errorf("put with the identity's keys: %v", err)
		}
		tests := []struct {
			name   string
			method string
			path   string
		}{
			{"anonymous list", http.MethodGet, "/" + s.Bucket + "/"},
			{"anonymous get", http.MethodGet, "/" + s.Bucket + "/x"},
			{"anonymous put", http.MethodPut, "/" + s.Bucket + "/y"},
		}
		for _, tc := range tests {
			req, _ := http.NewRequest(tc.method, "http://"+s.Endpoint+tc.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("%s: status %d, want 403", tc.name, resp.StatusCode)
			}
		}
		if rss, peak, err := s.Memory(); err != nil || rss == 0 || peak < rss {
			t.Errorf("Memory: %d, %d, %v", rss, peak, err)
		} else {
			t.Logf("seaweedfs resident memory when idle: %d MiB", rss>>20)
		}
	})
	if _, err := os.Lstat(socket); !os.IsNotExist(err) {
		t.Errorf("%s is left after the server stopped (%v)", socket, err)
	}
}
