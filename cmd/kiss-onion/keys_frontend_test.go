package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/clientauth"
)

// keysFrontendDir makes a front end's state directory as serve leaves it:
// read.onion and (unless readOnly) write.onion, from the identities of
// another state directory.
func keysFrontendDir(t *testing.T, dir string, readOnly bool) (read, write string) {
	t.Helper()
	other := filepath.Join(t.TempDir(), "state")
	read, write = keysOnionAddress(t, other, "read"), keysOnionAddress(t, other, "write")
	os.MkdirAll(dir, 0o700)
	os.WriteFile(filepath.Join(dir, "read.onion"), []byte(read+"\n"), 0o644)
	if !readOnly {
		os.WriteFile(filepath.Join(dir, "write.onion"), []byte(write+"\n"), 0o644)
	}
	return read, write
}

func TestKeysFrontends(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	bRead, bWrite := keysFrontendDir(t, filepath.Join(dir, "b"), false)
	cRead, _ := keysFrontendDir(t, filepath.Join(dir, "c"), true)
	keysMust(t, dir, "add", "early", "--role", "writer", "--state-dir", state, "--out", "early.bundle")
	aRead, aWrite := keysOnionAddress(t, state, "read"), keysOnionAddress(t, state, "write")

	tests := []struct {
		name          string
		args          []string
		reads, writes []string
	}{
		{"writer of two front ends", []string{"add", "ci", "--role", "writer", "--frontend", "b", "--out", "ci.bundle"}, []string{aRead, bRead}, []string{aWrite, bWrite}},
		{"reader of three", []string{"add", "laptop", "--role", "reader", "--frontend", "b", "--frontend", "c", "--out", "laptop.bundle"}, []string{aRead, bRead, cRead}, nil},
		{"export adds a front end", []string{"export", "early", "--key", "early.bundle/client.key", "--frontend", "b", "--out", "early.bundle"}, []string{aRead, bRead}, []string{aWrite, bWrite}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keysMust(t, dir, append(tt.args, "--state-dir", state)...)
			out := tt.args[len(tt.args)-1]
			b, err := clientauth.LoadBundle(filepath.Join(dir, out))
			if err != nil {
				t.Fatal(err)
			}
			url := func(onions []string) []string {
				var u []string
				for _, o := range onions {
					u = append(u, "http://"+o)
				}
				return u
			}
			if !slices.Equal(b.ReadURLs(), url(tt.reads)) || !slices.Equal(b.WriteURLs(), url(tt.writes)) {
				t.Errorf("read %v write %v, want %v %v", b.ReadURLs(), b.WriteURLs(), url(tt.reads), url(tt.writes))
			}
			for _, o := range b.Onions() {
				if _, err := os.Stat(filepath.Join(dir, out, strings.TrimSuffix(o, ".onion")+clientauth.AuthPrivateSuffix)); err != nil {
					t.Errorf("no .auth_private for %s: %v", o, err)
				}
			}
		})
	}

	// As serve leaves its own state directory.
	os.WriteFile(filepath.Join(state, "read.onion"), []byte(aRead+"\n"), 0o644)
	keysFrontendDir(t, filepath.Join(dir, "bad"), false)
	os.WriteFile(filepath.Join(dir, "bad", "read.onion"), []byte("example.onion\n"), 0o644)
	refusals := []struct {
		name   string
		args   []string
		substr string
	}{
		{"no such front end", []string{"add", "x", "--role", "reader", "--frontend", "nowhere"}, "--frontend nowhere: no read.onion"},
		{"a writer needs the write onion", []string{"add", "x", "--role", "writer", "--frontend", "c"}, "--frontend c: no write.onion"},
		{"a bad address", []string{"add", "x", "--role", "reader", "--frontend", "bad"}, "bad/read.onion: malformed onion address"},
		{"this front end again", []string{"add", "x", "--role", "reader", "--frontend", "state"}, "listed twice"},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			r := keysRun(t, dir, append(tt.args, "--state-dir", state)...)
			if r.code != 1 || !strings.Contains(r.stderr, tt.substr) {
				t.Errorf("exit %d, stderr %q; want 1 and %q", r.code, r.stderr, tt.substr)
			}
			if _, err := os.Stat(filepath.Join(dir, "x.bundle")); err == nil {
				t.Error("a refused add wrote a bundle")
			}
		})
	}
	reg, err := clientauth.LoadRegistry(filepath.Join(state, clientauth.RegistryFileName))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.Client("x"); ok {
		t.Error("a refused add registered its key")
	}
}
