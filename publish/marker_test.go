package publish

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// newKey returns a Nix signing key named name.
func newKey(t *testing.T, name string) nixcache.SecretKey {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := nixcache.ParseSecretKey(name + ":" + base64.StdEncoding.EncodeToString(priv))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

const (
	sysA = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web1"
	sysB = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-nixos-system-web1"
)

func TestSignedMarkers(t *testing.T) {
	key, other := newKey(t, "fleet-1"), newKey(t, "evil-1")
	signed := FormatMarker("web1", 42, []string{sysA}, &key)

	// Plain readers (serve, prune) see the store path and nothing else.
	roots, err := nixcache.ParseMarker(signed, "/nix/store")
	if err != nil || len(roots) != 1 || !strings.HasPrefix(sysA, "/nix/store/"+roots[0]) {
		t.Fatalf("nixcache.ParseMarker of a signed marker = %v, %v", roots, err)
	}
	if !strings.HasPrefix(string(signed), sysA+"\n# kiss-onion-statement: kiss-onion-marker-1;web1;42;"+sysA+"\n# kiss-onion-signature: fleet-1:") {
		t.Errorf("signed marker:\n%s", signed)
	}

	for _, tc := range []struct {
		name    string
		marker  string
		as      string // marker name it is read as
		wantErr error
		wantGen uint64
	}{
		{name: "signed by the key verifies", marker: string(signed), as: "web1", wantGen: 42},
		{name: "signed by another key is refused", marker: string(FormatMarker("web1", 43, []string{sysA}, &other)), as: "web1", wantErr: ErrBadSignature},
		{name: "a plain marker is unsigned", marker: sysA + "\n", as: "web1", wantErr: ErrUnsigned},
		{name: "another marker's statement is refused", marker: string(FormatMarker("web2", 44, []string{sysA}, &key)), as: "web1", wantErr: ErrMismatch},
		{name: "a path swapped under the statement is refused", marker: strings.Replace(string(signed), sysA+"\n", sysB+"\n", 1), as: "web1", wantErr: ErrMismatch},
		{name: "a changed generation breaks the signature", marker: strings.Replace(string(signed), ";42;", ";99;", 1), as: "web1", wantErr: ErrBadSignature},
		{name: "a second signature line may verify", marker: strings.Replace(string(signed), "# kiss-onion-signature:", "# kiss-onion-signature: evil-1:"+base64.StdEncoding.EncodeToString(make([]byte, 64))+"\n# kiss-onion-signature:", 1), as: "web1", wantGen: 42},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := ParseMarker([]byte(tc.marker), "/nix/store")
			if err != nil {
				t.Fatal(err)
			}
			st, err := m.Verify(tc.as, key.PublicKey())
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("Verify: %v, want %v", err, tc.wantErr)
			}
			if err == nil && st.Generation != tc.wantGen {
				t.Errorf("generation %d, want %d", st.Generation, tc.wantGen)
			}
		})
	}
}

func TestParseMarkerRefuses(t *testing.T) {
	for _, bad := range []string{
		"",
		"# only a comment\n",
		"/tmp/not-a-store-path\n",
		sysA + "\n# kiss-onion-statement: kiss-onion-marker-1;web1;x;" + sysA + "\n",
		sysA + "\n# kiss-onion-statement: kiss-onion-marker-9;web1;1;" + sysA + "\n",
		sysA + "\n# kiss-onion-statement: kiss-onion-marker-1;web1;1;" + sysA + "\n# kiss-onion-statement: kiss-onion-marker-1;web1;2;" + sysA + "\n",
	} {
		if _, err := ParseMarker([]byte(bad), "/nix/store"); err == nil {
			t.Errorf("ParseMarker(%q) accepted it", bad)
		}
	}
	// Comments and CRLF are fine.
	m, err := ParseMarker([]byte("# made by hand\r\n"+sysA+"\r\n"), "/nix/store")
	if err != nil || len(m.Paths) != 1 || m.Paths[0] != sysA || m.Statement != nil {
		t.Errorf("ParseMarker of a plain marker = %+v, %v", m, err)
	}
}
