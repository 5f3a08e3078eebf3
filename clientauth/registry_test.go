package clientauth

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func newPub(t *testing.T) PublicKey {
	t.Helper()
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestMissingRegistryIsEmpty(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", RegistryFileName)
	r, err := LoadRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Clients()) != 0 || len(r.ReadKeys()) != 0 || len(r.WriteKeys()) != 0 {
		t.Error("missing registry is not empty")
	}
	st, err := StatRegistry(path)
	if err != nil || st != (Stamp{}) || r.Stamp() != (Stamp{}) {
		t.Errorf("stamp of a missing registry: %v, %v", st, err)
	}
}

func TestRegistrySaveLoadAndKeys(t *testing.T) {
	stateDir := filepath.Join(t.TempDir(), "state")
	path := filepath.Join(stateDir, RegistryFileName)
	r, _ := LoadRegistry(path)
	r.now = func() time.Time { return time.Date(2025, 3, 4, 5, 6, 7, 8, time.FixedZone("x", 3600)) }
	reader, writer, gone := newPub(t), newPub(t), newPub(t)
	for _, c := range []struct {
		name string
		role Role
		pub  PublicKey
	}{{"laptop", RoleReader, reader}, {"ci_runner-1.x", RoleWriter, writer}, {"old", RoleWriter, gone}} {
		if _, err := r.Add(c.name, c.role, c.pub); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Revoke("old"); err != nil {
		t.Fatal(err)
	}
	if err := r.Save(); err != nil {
		t.Fatal(err)
	}
	if m := mode(t, stateDir); m != 0o700 {
		t.Errorf("state dir mode %o, want 700", m)
	}
	if m := mode(t, path); m != 0o600 {
		t.Errorf("registry mode %o, want 600", m)
	}

	data, _ := os.ReadFile(path)
	wantTail := "[[client]]\nname = 'old'\nrole = 'writer'\npublic_key = '" + gone.String() + "'\n" +
		"created = 2025-03-04T04:06:07Z\nrevoked = 2025-03-04T04:06:07Z\n"
	if !strings.HasSuffix(string(data), wantTail) {
		t.Errorf("registry file ends:\n%s\nwant:\n%s", data, wantTail)
	}
	r2, err := LoadRegistry(path)
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	want := []Client{
		{Name: "laptop", Role: RoleReader, PublicKey: reader, Created: time.Date(2025, 3, 4, 4, 6, 7, 0, time.UTC)},
		{Name: "ci_runner-1.x", Role: RoleWriter, PublicKey: writer, Created: time.Date(2025, 3, 4, 4, 6, 7, 0, time.UTC)},
		{Name: "old", Role: RoleWriter, PublicKey: gone, Created: time.Date(2025, 3, 4, 4, 6, 7, 0, time.UTC), Revoked: time.Date(2025, 3, 4, 4, 6, 7, 0, time.UTC)},
	}
	got := r2.Clients()
	if len(got) != len(want) {
		t.Fatalf("loaded %d clients, want %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if g.Name != w.Name || g.Role != w.Role || g.PublicKey != w.PublicKey || !g.Created.Equal(w.Created) || !g.Revoked.Equal(w.Revoked) {
			t.Errorf("client %d = %+v, want %+v", i, g, w)
		}
	}
	if got, want := r2.ReadKeys(), [][32]byte{reader.Bytes(), writer.Bytes()}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("ReadKeys = %v, want reader and writer", got)
	}
	if got, want := r2.WriteKeys(), [][32]byte{writer.Bytes()}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("WriteKeys = %v, want writer only", got)
	}
	if st, _ := StatRegistry(path); st != r2.Stamp() || st == (Stamp{}) {
		t.Errorf("StatRegistry = %v, loaded registry's stamp %v", st, r2.Stamp())
	}
}

func TestSaveChangesTheStamp(t *testing.T) {
	path := filepath.Join(t.TempDir(), RegistryFileName)
	r, _ := LoadRegistry(path)
	r.Add("a", RoleReader, newPub(t))
	if err := r.Save(); err != nil {
		t.Fatal(err)
	}
	before, _ := StatRegistry(path)
	r2, _ := LoadRegistry(path)
	if changed, err := r.Changed(); changed || err != nil {
		t.Errorf("Changed() = %v, %v right after Save", changed, err)
	}
	if r2.Stamp() != before {
		t.Fatal("stamp of the loaded registry differs from StatRegistry's")
	}
	if err := r2.Revoke("a"); err != nil {
		t.Fatal(err)
	}
	if err := r2.Save(); err != nil {
		t.Fatal(err)
	}
	after, _ := StatRegistry(path)
	if after == before {
		t.Error("revoking did not change the stamp")
	}
	if changed, err := r.Changed(); !changed || err != nil {
		t.Errorf("Changed() = %v, %v after another registry saved", changed, err)
	}
	if r2.Stamp() != after {
		t.Error("Save did not update the registry's stamp")
	}
	r3, _ := LoadRegistry(path)
	if len(r3.ReadKeys()) != 0 {
		t.Error("revoked key still in ReadKeys")
	}
}

func TestRegistryRefusals(t *testing.T) {
	r, _ := LoadRegistry(filepath.Join(t.TempDir(), RegistryFileName))
	taken, revoked := newPub(t), newPub(t)
	r.Add("taken", RoleReader, taken)
	r.Add("gone", RoleReader, revoked)
	r.Revoke("gone")

	tests := []struct {
		name   string
		add    func() error
		is     error
		substr string
	}{
		{"name in use", func() error { _, err := r.Add("taken", RoleWriter, newPub(t)); return err }, ErrClientExists, `client "taken" already exists`},
		{"name of a revoked client", func() error { _, err := r.Add("gone", RoleReader, newPub(t)); return err }, ErrClientExists, `"gone" already exists`},
		{"key in use", func() error { _, err := r.Add("new", RoleReader, taken); return err }, ErrKeyRegistered, `to client "taken"`},
		{"revoked key", func() error { _, err := r.Add("new", RoleWriter, revoked); return err }, ErrKeyRegistered, `"gone", revoked`},
		{"bad name", func() error { _, err := r.Add("a/b", RoleReader, newPub(t)); return err }, nil, `has '/'`},
		{"bad role", func() error { _, err := r.Add("new", "admin", newPub(t)); return err }, nil, `unknown role "admin"`},
		{"no key", func() error { _, err := r.Add("new", RoleReader, PublicKey{}); return err }, nil, "missing public key"},
		{"revoke unknown", func() error { return r.Revoke("nobody") }, ErrNoClient, `no client named "nobody"`},
		{"revoke twice", func() error { return r.Revoke("gone") }, ErrRevoked, `"gone" already revoked`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.add()
			if err == nil {
				t.Fatal("no error")
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Errorf("error %v does not match %v", err, tt.is)
			}
			if !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q, want it to contain %q", err, tt.substr)
			}
		})
	}
	if n := len(r.Clients()); n != 2 {
		t.Errorf("%d clients after refusals, want 2", n)
	}
}

func TestCorruptRegistryNamesFileAndLine(t *testing.T) {
	k := rfc7748[0].pubBase32
	secret := rfc7748[1].privBase32
	client := func(name, role, key string) string {
		return fmt.Sprintf("[[client]]\nname = %q\nrole = %q\npublic_key = %q\ncreated = 2025-01-01T00:00:00Z\n", name, role, key)
	}
	tests := []struct {
		name, data string
		line       int
		substr     string
	}{
		{"toml syntax", "version = 1\n\n[[client]\nname = \"a\"\n", 3, "expected"},
		{"unknown key", "version = 1\n" + client("a", "reader", k) + "revokd = 2025-01-02T00:00:00Z\n", 7, `unknown key "client.revokd"`},
		{"wrong type", "version = 1\n" + client("a", "reader", k) + "revoked = \"yes\"\n", 7, ""},
		{"missing version", client("a", "reader", k), 0, "missing version = 1"},
		{"future version", "\nversion = 2\n", 2, "unsupported version 2"},
		{"bad role", "version = 1\n\n" + client("a", "admin", k), 5, `unknown role "admin"`},
		{"bad name", "version = 1\n" + client("a b", "reader", k), 3, `client name "a b"`},
		{"bad key, no echo", "version = 1\n" + client("a", "reader", secret[:40]), 5, "malformed x25519 public key"},
		{"duplicate name", "version = 1\n" + client("a", "reader", k) + client("a", "writer", rfc7748[1].pubBase32), 8, `client "a" already exists`},
		{"duplicate key", "version = 1\n" + client("a", "reader", k) + client("b", "writer", k), 10, "public key already registered"},
		{"bad tls_cert", "version = 1\n" + client("a", "reader", k) + "tls_cert = \"md5:00\"\n", 7, "not a certificate fingerprint"},
		{"duplicate tls_cert", "version = 1\n" + client("a", "reader", k) + "tls_cert = \"" + fpA + "\"\n" + client("b", "reader", rfc7748[1].pubBase32) + "tls_cert = \"" + fpA + "\"\n", 13, `already registered to client "a"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), RegistryFileName)
			if err := os.WriteFile(path, []byte(tt.data), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadRegistry(path)
			if err == nil {
				t.Fatal("corrupt registry loaded")
			}
			var fe *FileError
			if !errors.As(err, &fe) || fe.Path != path || fe.Line != tt.line {
				t.Errorf("error %q: want a FileError for %s line %d", err, path, tt.line)
			}
			prefix := path + ":"
			if tt.line > 0 {
				prefix = fmt.Sprintf("%s:%d: ", path, tt.line)
			}
			if !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q, want %q...%q", err, prefix, tt.substr)
			}
			if strings.Contains(err.Error(), secret[:10]) {
				t.Errorf("error %q echoes a key", err)
			}
		})
	}
}

func TestRegistryWritableByOthersIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), RegistryFileName)
	os.WriteFile(path, []byte("version = 1\n"), 0o600)
	os.Chmod(path, 0o666)
	if _, err := LoadRegistry(path); err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Errorf("LoadRegistry of a 0666 file = %v", err)
	}
	os.Chmod(path, 0o644)
	if _, err := LoadRegistry(path); err != nil {
		t.Errorf("LoadRegistry of a 0644 file = %v", err)
	}
}

func TestConcurrentUpdatesKeepEveryChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", RegistryFileName)
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		pub := newPub(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- UpdateRegistry(path, func(r *Registry) error {
				_, err := r.Add(fmt.Sprintf("c%d", i), RoleReader, pub)
				return err
			})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	r, err := LoadRegistry(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(r.Clients()); got != n {
		t.Errorf("%d clients after %d concurrent adds", got, n)
	}
}

func TestUpdateRegistryDoesNotSaveOnError(t *testing.T) {
	path := filepath.Join(t.TempDir(), RegistryFileName)
	err := UpdateRegistry(path, func(r *Registry) error {
		r.Add("a", RoleReader, newPub(t))
		return errors.New("changed my mind")
	})
	if err == nil || err.Error() != "changed my mind" {
		t.Fatalf("UpdateRegistry = %v", err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("registry saved despite the error: %v", err)
	}
}

func TestValidateName(t *testing.T) {
	for _, ok := range []string{"a", "laptop", "ci-runner_2.example", "A.b-C_9", strings.Repeat("x", 64)} {
		if err := ValidateName(ok); err != nil {
			t.Errorf("ValidateName(%q) = %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".hidden", "-flag", "a/b", "..", "a b", "a\x00", "é", "a:b", strings.Repeat("x", 65), "new\nline"} {
		if err := ValidateName(bad); err == nil {
			t.Errorf("ValidateName(%q) accepted it", bad)
		}
	}
}
