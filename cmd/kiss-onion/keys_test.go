package main

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
)

// keysTestAsCLI makes the test binary run as kiss-onion when the keys tests
// re-run it, as litestream's tests do. Test files initialize after the
// package's own files, so every subcommand is registered by now.
const keysTestAsCLI = "KISS_ONION_KEYS_TEST_AS_CLI"

func init() {
	if os.Getenv(keysTestAsCLI) == "1" {
		os.Exit(run(os.Args[1:]))
	}
}

type keysResult struct {
	code           int
	stdout, stderr string
}

// keysRun runs the real command: kiss-onion keys ARGS... in dir.
func keysRun(t *testing.T, dir string, args ...string) keysResult {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, append([]string{"keys"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), keysTestAsCLI+"=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return keysResult{cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()}
}

// keysMust runs kiss-onion keys ARGS... and fails the test unless it
// exits 0.
func keysMust(t *testing.T, dir string, args ...string) keysResult {
	t.Helper()
	r := keysRun(t, dir, args...)
	if r.code != 0 {
		t.Fatalf("keys %s: exit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

func keysMode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

// keysOnionAddress returns the address of the state directory's onion.
func keysOnionAddress(t *testing.T, state, which string) string {
	t.Helper()
	id, err := onion.LoadOrCreateIdentity(filepath.Join(state, "onion", which+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return id.Address()
}

func TestKeysAddWritesABundleAndKeepsOnlyThePublicHalf(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")

	for _, tt := range []struct {
		name, role string
		onions     []string
	}{
		{"laptop", "reader", []string{"read"}},
		{"ci", "writer", []string{"read", "write"}},
	} {
		t.Run(tt.role, func(t *testing.T) {
			r := keysMust(t, dir, "add", tt.name, "--role", tt.role, "--state-dir", state)
			bundleDir := filepath.Join(dir, tt.name+".bundle")
			if !strings.Contains(r.stdout, "wrote "+tt.name+".bundle") {
				t.Errorf("stdout does not say where the bundle is:\n%s", r.stdout)
			}
			if !strings.HasPrefix(r.stderr, "kiss-onion: hint: ") || !strings.Contains(r.stderr, "kiss-onion proxy --bundle "+tt.name+".bundle") {
				t.Errorf("stderr has no hint of what to do with the bundle:\n%s", r.stderr)
			}

			b, err := clientauth.LoadBundle(bundleDir)
			if err != nil {
				t.Fatal(err)
			}
			if b.Name != tt.name || string(b.Role) != tt.role || b.Key == nil {
				t.Fatalf("bundle = %+v", b)
			}
			wantFiles := []string{clientauth.BundleKeyFile, clientauth.BundleConfigFile}
			for _, o := range tt.onions {
				addr := keysOnionAddress(t, state, o)
				wantFiles = append(wantFiles, strings.TrimSuffix(addr, ".onion")+".auth_private")
				url := map[string]string{"read": b.ReadURL(), "write": b.WriteURL()}[o]
				if url != "http://"+addr {
					t.Errorf("%s URL = %q, want http://%s", o, url, addr)
				}
			}
			if entries, _ := os.ReadDir(bundleDir); len(entries) != len(wantFiles) {
				t.Errorf("bundle has %d files, want %v", len(entries), wantFiles)
			}
			if m := keysMode(t, bundleDir); m != 0o700 {
				t.Errorf("bundle directory mode %o, want 700", m)
			}
			for _, f := range wantFiles {
				if m := keysMode(t, filepath.Join(bundleDir, f)); m != 0o600 {
					t.Errorf("%s mode %o, want 600", f, m)
				}
			}

			reg, err := clientauth.LoadRegistry(filepath.Join(state, clientauth.RegistryFileName))
			if err != nil {
				t.Fatal(err)
			}
			if c, ok := reg.Client(tt.name); !ok || c.PublicKey != b.Key.PublicKey() {
				t.Errorf("registry entry %+v, want the bundle's public key", c)
			}

			// The private key is nowhere in the state directory.
			secret := b.Key.String()
			filepath.WalkDir(state, func(p string, d fs.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				data, _ := os.ReadFile(p)
				if bytes.Contains(bytes.ToUpper(data), []byte(secret)) {
					t.Errorf("%s holds the private key", p)
				}
				return nil
			})
		})
	}
	if m := keysMode(t, state); m != 0o700 {
		t.Errorf("state directory mode %o, want 700", m)
	}
	if m := keysMode(t, filepath.Join(state, clientauth.RegistryFileName)); m != 0o600 {
		t.Errorf("registry mode %o, want 600", m)
	}
}

func TestKeysAddRefusals(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	keysMust(t, dir, "add", "taken", "--role", "reader", "--state-dir", state)
	os.MkdirAll(filepath.Join(dir, "full.bundle"), 0o700)
	os.WriteFile(filepath.Join(dir, "full.bundle", "client.key"), []byte("someone's key\n"), 0o600)

	tests := []struct {
		name   string
		args   []string
		code   int
		substr string
	}{
		{"name in use", []string{"add", "taken", "--role", "writer", "--out", "other.bundle"}, 1, `client "taken" already exists`},
		{"bundle in the way", []string{"add", "new", "--role", "reader", "--out", "full.bundle"}, 1, "full.bundle/client.key: file already exists"},
		{"no name", []string{"add", "--role", "reader"}, 2, "missing NAME"},
		{"two names", []string{"add", "a", "b", "--role", "reader"}, 2, "one NAME only"},
		{"bad name", []string{"add", "../etc", "--role", "reader"}, 2, `client name "../etc" starts with '.'`},
		{"no role", []string{"add", "new"}, 2, "missing --role"},
		{"bad role", []string{"add", "new", "--role", "admin"}, 2, `unknown role "admin"`},
		{"bad public key", []string{"add", "new", "--role", "reader", "--public-key", "AAAA"}, 2, "--public-key: malformed x25519 public key"},
		{"unknown flag", []string{"add", "new", "--role", "reader", "--force"}, 2, "flag provided but not defined: -force"},
		{"bundle in the state directory", []string{"add", "new", "--role", "reader", "--out", "state/new.bundle"}, 2, "inside the state directory"},
		{"no subcommand", []string{}, 2, "missing subcommand"},
		{"unknown subcommand", []string{"remove", "taken"}, 2, `unknown subcommand "remove"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := keysRun(t, dir, append(tt.args, "--state-dir", state)...)
			if r.code != tt.code {
				t.Errorf("exit %d, want %d\nstderr:\n%s", r.code, tt.code, r.stderr)
			}
			if !strings.HasPrefix(r.stderr, "kiss-onion: error: ") || !strings.Contains(r.stderr, tt.substr) {
				t.Errorf("stderr %q, want kiss-onion: error: ...%s", r.stderr, tt.substr)
			}
		})
	}

	// Nothing refused was registered, and the other bundle is untouched.
	reg, err := clientauth.LoadRegistry(filepath.Join(state, clientauth.RegistryFileName))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(reg.Clients()); n != 1 {
		t.Errorf("%d clients registered, want 1", n)
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "full.bundle", "client.key")); string(data) != "someone's key\n" {
		t.Error("an existing client.key was overwritten")
	}
	if _, err := os.Stat(filepath.Join(dir, "full.bundle", "kiss-onion.toml")); err == nil {
		t.Error("a refused add left files in the bundle directory")
	}
}

func TestKeysAddPublicKeyWritesNoPrivateFile(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	k, _ := clientauth.GeneratePrivateKey()
	pub := k.PublicKey().String()

	r := keysMust(t, dir, "add", "own", "--role", "writer", "--public-key", strings.ToLower(pub), "--state-dir", state)
	if !strings.Contains(r.stdout, "read_url = http://"+keysOnionAddress(t, state, "read")) ||
		!strings.Contains(r.stdout, "write_url = http://"+keysOnionAddress(t, state, "write")) {
		t.Errorf("stdout does not give the onion URLs:\n%s", r.stdout)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("add --public-key wrote files next to the state directory: %v", entries)
	}

	keysMust(t, dir, "add", "own2", "--role", "reader", "--public-key", "descriptor:x25519:"+k2pub(t), "--out", "own2.bundle", "--state-dir", state)
	entries, _ := os.ReadDir(filepath.Join(dir, "own2.bundle"))
	if len(entries) != 1 || entries[0].Name() != "kiss-onion.toml" {
		t.Errorf("add --public-key --out wrote %v, want kiss-onion.toml only", entries)
	}

	r = keysRun(t, dir, "add", "again", "--role", "reader", "--public-key", pub, "--state-dir", state)
	if r.code != 1 || !strings.Contains(r.stderr, `public key already registered to client "own"`) {
		t.Errorf("registering a key twice: exit %d, %s", r.code, r.stderr)
	}
}

func k2pub(t *testing.T) string {
	k, err := clientauth.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey().String()
}

func TestKeysExport(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	keysMust(t, dir, "add", "ci", "--role", "writer", "--state-dir", state)
	keysMust(t, dir, "add", "other", "--role", "reader", "--state-dir", state)
	orig, err := clientauth.LoadBundle(filepath.Join(dir, "ci.bundle"))
	if err != nil {
		t.Fatal(err)
	}

	// From the private key file, into a new directory and over the old one.
	for _, out := range []string{"copy.bundle", "ci.bundle"} {
		keysMust(t, dir, "export", "ci", "--key", "ci.bundle/client.key", "--out", out, "--state-dir", state)
		b, err := clientauth.LoadBundle(filepath.Join(dir, out))
		if err != nil {
			t.Fatal(err)
		}
		if b.Key == nil || b.Key.String() != orig.Key.String() || b.WriteURL() != orig.WriteURL() || b.ReadURL() != orig.ReadURL() {
			t.Errorf("exported bundle %+v differs from the original %+v", b, orig)
		}
		if entries, _ := os.ReadDir(filepath.Join(dir, out)); len(entries) != 4 {
			t.Errorf("%s has %d files, want 4", out, len(entries))
		}
	}

	// Without --key: kiss-onion.toml only, and it says so.
	r := keysMust(t, dir, "export", "ci", "--out", "nokey", "--state-dir", state)
	if !strings.Contains(r.stdout, "no --key given") {
		t.Errorf("export without --key does not say what it left out:\n%s", r.stdout)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "nokey")); len(entries) != 1 {
		t.Errorf("export without --key wrote %d files", len(entries))
	}

	tests := []struct {
		name   string
		args   []string
		code   int
		substr string
	}{
		{"another client's key", []string{"export", "ci", "--key", "other.bundle/client.key", "--out", "x"}, 1, `but client "ci" is registered with key`},
		{"over another client's bundle", []string{"export", "ci", "--key", "ci.bundle/client.key", "--out", "other.bundle"}, 1, "holds another key"},
		{"unknown client", []string{"export", "nobody"}, 1, `no client named "nobody"`},
		{"missing key file", []string{"export", "ci", "--key", "nope.key"}, 1, "no such file"},
		{"no name", []string{"export"}, 2, "missing NAME"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := keysRun(t, dir, append(tt.args, "--state-dir", state)...)
			if r.code != tt.code || !strings.HasPrefix(r.stderr, "kiss-onion: error: ") || !strings.Contains(r.stderr, tt.substr) {
				t.Errorf("exit %d, stderr %q; want exit %d, kiss-onion: error: ...%s", r.code, r.stderr, tt.code, tt.substr)
			}
		})
	}
	if b, err := clientauth.LoadBundle(filepath.Join(dir, "other.bundle")); err != nil || b.Name != "other" {
		t.Errorf("other.bundle was changed: %+v, %v", b, err)
	}

	keysMust(t, dir, "revoke", "ci", "--state-dir", state)
	r = keysRun(t, dir, "export", "ci", "--key", "ci.bundle/client.key", "--state-dir", state)
	if r.code != 1 || !strings.Contains(r.stderr, "was revoked") {
		t.Errorf("exporting a revoked key: exit %d, %s", r.code, r.stderr)
	}
}

func TestKeysListAndRevoke(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")

	r := keysMust(t, dir, "list", "--state-dir", state)
	if r.stdout != "" || !strings.Contains(r.stderr, "kiss-onion: hint: no clients") {
		t.Errorf("list of nothing: stdout %q, stderr %q", r.stdout, r.stderr)
	}

	keysMust(t, dir, "add", "laptop", "--role", "reader", "--state-dir", state)
	keysMust(t, dir, "add", "a-much-longer-name", "--role", "writer", "--state-dir", state)
	r = keysMust(t, dir, "revoke", "laptop", "--state-dir", state)
	if !strings.Contains(r.stdout, `revoked "laptop"`) || !strings.Contains(r.stdout, "without a restart") {
		t.Errorf("revoke says %q", r.stdout)
	}

	r = keysMust(t, dir, "list", "--state-dir", state)
	lines := strings.Split(strings.TrimSuffix(r.stdout, "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("list printed %d lines, want 3:\n%s", len(lines), r.stdout)
	}
	header := regexp.MustCompile(`^NAME +ROLE +CREATED +FINGERPRINT +REVOKED +TLS CERTIFICATE$`)
	if !header.MatchString(lines[0]) {
		t.Errorf("header %q", lines[0])
	}
	ts := `\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ`
	row := regexp.MustCompile(`^(\S+) +(reader|writer) +` + ts + ` +[A-Z2-7]{16} +(-|` + ts + `) +-$`)
	col := strings.Index(lines[0], "ROLE")
	for _, l := range lines[1:] {
		if !row.MatchString(l) {
			t.Errorf("row %q", l)
		}
		if strings.Index(l, "reader")+strings.Index(l, "writer")+1 != col {
			t.Errorf("row %q is not aligned with the header", l)
		}
	}
	if m := row.FindStringSubmatch(lines[1]); m == nil || m[1] != "laptop" || m[3] == "-" {
		t.Errorf("laptop's row %q does not show the revocation", lines[1])
	}
	if m := row.FindStringSubmatch(lines[2]); m == nil || m[3] != "-" {
		t.Errorf("a-much-longer-name's row %q shows a revocation", lines[2])
	}

	r = keysRun(t, dir, "revoke", "laptop", "--state-dir", state)
	if r.code != 0 || !strings.HasPrefix(r.stderr, "kiss-onion: warning: ") || !strings.Contains(r.stderr, "already revoked") {
		t.Errorf("revoking twice: exit %d, stderr %q", r.code, r.stderr)
	}
	r = keysRun(t, dir, "revoke", "nobody", "--state-dir", state)
	if r.code != 1 || !strings.HasPrefix(r.stderr, `kiss-onion: error: no client named "nobody"`) {
		t.Errorf("revoking an unknown client: exit %d, stderr %q", r.code, r.stderr)
	}
	r = keysRun(t, dir, "revoke", "--state-dir", state)
	if r.code != 2 {
		t.Errorf("revoke without NAME: exit %d", r.code)
	}
	r = keysRun(t, dir, "list", "extra", "--state-dir", state)
	if r.code != 2 {
		t.Errorf("list with an argument: exit %d", r.code)
	}

	reg, err := clientauth.LoadRegistry(filepath.Join(state, clientauth.RegistryFileName))
	if err != nil {
		t.Fatal(err)
	}
	if got := len(reg.ReadKeys()); got != 1 {
		t.Errorf("%d read keys after revoking laptop, want 1", got)
	}
}

func TestKeysCorruptRegistryNamesFileAndLine(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	os.MkdirAll(state, 0o700)
	path := filepath.Join(state, clientauth.RegistryFileName)
	os.WriteFile(path, []byte("version = 1\n\n[[client]]\nname = \"x\"\nrole = \"root\"\n"), 0o600)
	for _, args := range [][]string{{"list"}, {"revoke", "x"}, {"add", "y", "--role", "reader"}} {
		r := keysRun(t, dir, append(args, "--state-dir", state)...)
		want := "kiss-onion: error: " + path + ":5: "
		if r.code != 1 || !strings.HasPrefix(r.stderr, want) {
			t.Errorf("keys %s: exit %d, stderr %q; want exit 1, %q...", args[0], r.code, r.stderr, want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "y.bundle", "client.key")); err == nil {
		t.Error("add wrote a bundle although the registry is corrupt")
	}
}

func TestKeysHelp(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"add", "-h"}, {"list", "--help"}} {
		r := keysRun(t, t.TempDir(), args...)
		if r.code != 0 || !strings.Contains(r.stderr, "Arguments:") || !strings.Contains(r.stderr, "kiss-onion keys add NAME") {
			t.Errorf("keys %v: exit %d, stderr:\n%s", args, r.code, r.stderr)
		}
	}
}
