package onion

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var onionAddress = regexp.MustCompile(`^[a-z2-7]{56}\.onion$`)

func TestLoadOrCreateIdentity(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state", "onion", "read.key")

	first, err := LoadOrCreateIdentity(path)
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	if !onionAddress.MatchString(first.Address()) {
		t.Errorf("address %q is not a v3 onion address", first.Address())
	}
	if first.Address() != first.ServiceID()+".onion" {
		t.Errorf("address %q is not service id %q plus .onion", first.Address(), first.ServiceID())
	}
	for _, p := range []struct {
		path string
		mode os.FileMode
	}{{path, 0o600}, {filepath.Dir(path), 0o700}, {filepath.Dir(filepath.Dir(path)), 0o700}} {
		st, err := os.Stat(p.path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != p.mode {
			t.Errorf("%s has mode %#o, want %#o", p.path, st.Mode().Perm(), p.mode)
		}
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the key (no temporary file left)", len(entries))
	}

	again, err := LoadOrCreateIdentity(path)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	if again.Address() != first.Address() {
		t.Errorf("reloaded address %s, want %s", again.Address(), first.Address())
	}

	other, err := LoadOrCreateIdentity(filepath.Join(dir, "state", "onion", "write.key"))
	if err != nil {
		t.Fatal(err)
	}
	if other.Address() == first.Address() {
		t.Errorf("two new identities share the address %s", first.Address())
	}
	if s := first.String(); s != first.Address() {
		t.Errorf("String() = %q, want the address", s)
	}
}

// TestIdentityAddressVector checks the address derivation against a fixed
// vector: the seed of RFC 8032's first test key, whose onion address tor
// derived (ADD_ONION's ServiceID; TestIdentityMatchesTor re-checks it live).
func TestIdentityAddressVector(t *testing.T) {
	seed := mustHex(t, "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
	id := identityFromSeed([ed25519.SeedSize]byte(seed))
	const want = "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenl5sid.onion"
	if id.Address() != want {
		t.Errorf("address %s, want %s", id.Address(), want)
	}
}

func TestParseIdentityErrors(t *testing.T) {
	seed := make([]byte, ed25519.SeedSize)
	for i := range seed {
		seed[i] = byte(i + 1)
	}
	good := base64.StdEncoding.EncodeToString(seed)
	cases := []struct {
		name, content, wantErr string
	}{
		{"empty file", "", "no \"ed25519-seed:\" line"},
		{"only comments", "# nothing\n\n", "no \"ed25519-seed:\" line"},
		{"unknown line", "# c\nhello " + good + "\n", "line 2: malformed line"},
		{"bad base64", "ed25519-seed:" + good[:10] + "!!" + good[12:] + "\n", "line 1: malformed key"},
		{"short key", "ed25519-seed:" + base64.StdEncoding.EncodeToString(seed[:31]) + "\n", "line 1: malformed key"},
		{"two keys", "ed25519-seed:" + good + "\ned25519-seed:" + good + "\n", "line 2: a second key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.key")
			if err := os.WriteFile(path, []byte(c.content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadOrCreateIdentity(path)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if !strings.Contains(msg, c.wantErr) {
				t.Errorf("error %q does not say %q", msg, c.wantErr)
			}
			if !strings.Contains(msg, path) {
				t.Errorf("error %q does not name the file", msg)
			}
			if strings.Contains(msg, good[:8]) || strings.Contains(msg, good[12:20]) {
				t.Errorf("error %q quotes the secret", msg)
			}
			if got, _ := os.ReadFile(path); string(got) != c.content {
				t.Errorf("a malformed file was rewritten")
			}
		})
	}
}

func TestLoadIdentityRefusesLooseMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "loose.key")
	if _, err := LoadOrCreateIdentity(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadOrCreateIdentity(path)
	if err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("error %v, want a refusal naming the mode", err)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
