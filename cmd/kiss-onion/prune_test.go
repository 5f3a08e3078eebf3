package main

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/s3test"
	"github.com/kiss-onion/kiss-onion/prune"
	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// TestPruneBucket runs 'kiss-onion prune s3://…' against a real
// SeaweedFS: a dry run deletes nothing, a prune keeps exactly the rooted
// closure and records its outcome under the bucket's URL.
func TestPruneBucket(t *testing.T) {
	srv := s3test.Start(t)
	t.Setenv("AWS_ACCESS_KEY_ID", srv.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", srv.SecretKey)
	st, err := s3store.New(s3store.Config{Endpoint: srv.Endpoint, Region: srv.Region, Bucket: srv.Bucket, Prefix: "cache",
		AccessKey: srv.AccessKey, SecretKey: srv.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	put := func(name string, body []byte) {
		if _, err := st.Put(ctx, name, bytes.NewReader(body), int64(len(body))); err != nil {
			t.Fatal(err)
		}
	}
	put("nix-cache-info", []byte("StoreDir: /nix/store\n"))
	for _, p := range []pt.Path{{Name: "lib"}, {Name: "app", Refs: []string{"lib"}}, {Name: "old", Refs: []string{"lib"}}} {
		put(pt.NarURL(p.Name), []byte("nar"))
		put(pt.NarInfoFile(p.Name), pt.NarInfo(p))
	}
	put("gcroots/web", []byte(pt.StorePath("app")+"\n"))
	time.Sleep(3 * time.Second) // older than the LastModified slack

	store := "s3://" + srv.Bucket + "/cache?" + url.Values{"endpoint": {"http://" + srv.Endpoint}, "region": {srv.Region}}.Encode()
	exists := func(name string) bool {
		_, err := st.Stat(ctx, name)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		return err == nil
	}
	state := t.TempDir()
	if code, out, _ := runInProcess(t, "prune", "--dry-run", "--state-dir", state, store); code != 0 {
		t.Fatalf("prune --dry-run %s: exit %d\n%s", store, code, out)
	}
	if !exists(pt.NarInfoFile("old")) {
		t.Fatal("a dry run deleted a narinfo")
	}
	if code, out, _ := runInProcess(t, "prune", store, "--state-dir", state); code != 0 {
		t.Fatalf("prune %s: exit %d\n%s", store, code, out)
	}
	for _, n := range []string{"app", "lib"} {
		if !exists(pt.NarInfoFile(n)) || !exists(pt.NarURL(n)) {
			t.Errorf("%s was deleted, want kept", n)
		}
	}
	if exists(pt.NarInfoFile("old")) || exists(pt.NarURL("old")) {
		t.Error("old was kept, want deleted")
	}
	cfg, _ := s3store.ParseURL(store)
	r, ok, err := prune.LastRun(state, cfg.String())
	if err != nil || !ok || r.Error != "" || r.DeletedNarInfos != 1 || r.Kept != 2 {
		t.Errorf("the prune's record: %+v, %v, %v", r, ok, err)
	}
	if m, _ := filepath.Glob(filepath.Join(state, "prune-*.meta")); len(m) != 1 {
		t.Errorf("metadata caches in the state directory: %v, want one", m)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"s3://"}, "no bucket"},
		{[]string{"s3://b/p?colour=red"}, "unknown parameter"},
		{[]string{"--s3-endpoint", "ftp://x", store}, "--s3-endpoint"},
		{[]string{"--single-pruner", t.TempDir()}, "--single-pruner is for an s3:// store"},
	} {
		code, out, _ := runInProcess(t, append([]string{"prune", "--state-dir", ""}, tc.args...)...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("prune %q: exit %d, want a failure saying %q:\n%s", tc.args, code, tc.want, out)
		}
	}
}
