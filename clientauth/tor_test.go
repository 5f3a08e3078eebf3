package clientauth

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Two real v3 onion addresses (torproject.org's and DuckDuckGo's), which Tor
// accepts.
const (
	onionA = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid"
	onionB = "duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad"
)

func TestParseOnionAddress(t *testing.T) {
	tests := []struct {
		name, in, want, err string
	}{
		{"bare", onionA, onionA, ""},
		{"with .onion", onionA + ".onion", onionA, ""},
		{"uppercase", strings.ToUpper(onionB + ".onion"), onionB, ""},
		{"typo", onionA[:10] + "a" + onionA[11:], "", "bad checksum"},
		{"not version 3", onionA[:50] + "aaaaaa", "", "version 0"},
		{"short", onionA[:55], "", "want 56"},
		{"v2 address", "expyuzz4wqqyqhjn.onion", "", "want 56"},
		{"not base32", onionA[:55] + "1", "", "not base32"},
		{"url", "http://" + onionA + ".onion", "", "want 56"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseOnionAddress(tt.in)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("ParseOnionAddress(%q) = %q, %v; want error with %q", tt.in, got, err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseOnionAddress(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestTorLinesRoundTrip(t *testing.T) {
	v := rfc7748[0]
	k, _ := ParsePrivateKey(v.privBase32)

	if got, want := ServiceAuthLine(k.PublicKey()), "descriptor:x25519:"+v.pubBase32; got != want {
		t.Errorf("ServiceAuthLine = %q, want %q", got, want)
	}
	p, err := ParseServiceAuthLine("descriptor:x25519:" + strings.ToLower(v.pubBase32) + "\n")
	if err != nil || p != k.PublicKey() {
		t.Errorf("ParseServiceAuthLine: %v, %v", p, err)
	}

	line, err := ClientAuthLine(onionA+".onion", k)
	if err != nil {
		t.Fatal(err)
	}
	if want := onionA + ":descriptor:x25519:" + v.privBase32; line != want {
		t.Errorf("ClientAuthLine = %q, want %q", line, want)
	}
	onion, k2, err := ParseClientAuthLine(line + "\n")
	if err != nil || onion != onionA || k2.String() != k.String() {
		t.Errorf("ParseClientAuthLine = %q, %v, %v", onion, k2, err)
	}
	name, err := AuthPrivateFileName(onionA + ".onion")
	if err != nil || name != onionA+".auth_private" {
		t.Errorf("AuthPrivateFileName = %q, %v", name, err)
	}
}

func TestMalformedTorLinesAreRefusedWithoutEcho(t *testing.T) {
	secret := rfc7748[0].privBase32
	for _, line := range []string{
		secret,
		"x25519:" + secret,
		secret + ":descriptor:x25519:" + secret,
		onionA + ":descriptor:x25519:" + secret[:40],
		onionA + ":x25519:" + secret,
	} {
		if _, _, err := ParseClientAuthLine(line); err == nil {
			t.Errorf("ParseClientAuthLine parsed a malformed line")
		} else if strings.Contains(err.Error(), secret[:10]) {
			t.Errorf("error %q echoes the key", err)
		}
	}
	if _, err := ParseServiceAuthLine("x25519:" + secret); err == nil || strings.Contains(err.Error(), secret[:10]) {
		t.Errorf("ParseServiceAuthLine: %v", err)
	}
}

// TestTorAcceptsTheKeyForms starts the system's tor, with no network, and
// checks that it loads the .auth_private files this package writes and
// takes its public keys in ADD_ONION's ClientAuthV3.
func TestTorAcceptsTheKeyForms(t *testing.T) {
	torPath, err := exec.LookPath("tor")
	if err != nil {
		t.Fatalf("this test needs tor (apt-get install tor): %v", err)
	}
	dir := t.TempDir()
	authDir := filepath.Join(dir, "auth")
	k, _ := GeneratePrivateKey()
	if err := WriteBundle(authDir, Bundle{Name: "t", Role: RoleWriter, Key: k, ReadOnion: onionA, WriteOnion: onionB}); err != nil {
		t.Fatal(err)
	}
	portFile := filepath.Join(dir, "control-port")
	torrc := fmt.Sprintf(`DataDirectory %s/data
DisableNetwork 1
SocksPort 0
ControlPort auto
ControlPortWriteToFile %s
CookieAuthentication 0
ClientOnionAuthDir %s
GeoIPFile /dev/null
GeoIPv6File /dev/null
Log warn stderr
`, dir, portFile, authDir)
	if err := os.WriteFile(filepath.Join(dir, "torrc"), []byte(torrc), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, torPath, "-f", filepath.Join(dir, "torrc"))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("tor output:\n%s", out.String())
		}
	}()

	var addr string
	for deadline := time.Now().Add(30 * time.Second); ; {
		b, err := os.ReadFile(portFile)
		if a, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "PORT="); err == nil && ok {
			addr = a
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("tor wrote no control port")
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(conn)
	send := func(c string) []string {
		fmt.Fprintf(conn, "%s\r\n", c)
		var lines []string
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("%s: %v", strings.Fields(c)[0], err)
			}
			l = strings.TrimRight(l, "\r\n")
			lines = append(lines, l)
			if len(l) > 3 && l[3] == ' ' {
				return lines
			}
		}
	}
	send("AUTHENTICATE")

	view := strings.Join(send("ONION_CLIENT_AUTH_VIEW"), "\n")
	b64 := base64.StdEncoding.EncodeToString(k.k.Bytes())
	for _, onion := range []string{onionA, onionB} {
		if want := "CLIENT " + onion + " x25519:" + b64; !strings.Contains(view, want) {
			t.Errorf("tor did not load the .auth_private file for %s:\n%s", onion, view)
		}
	}

	reply := send("ADD_ONION NEW:ED25519-V3 Flags=V3Auth,DiscardPK Port=80,127.0.0.1:9 ClientAuthV3=" + k.PublicKey().String())
	if last := reply[len(reply)-1]; last != "250 OK" {
		t.Errorf("ADD_ONION with ClientAuthV3=<PublicKey.String()>: %s", last)
	}
}
