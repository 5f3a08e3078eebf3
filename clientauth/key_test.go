package clientauth

import (
	"encoding/hex"
	"strings"
	"testing"
)

// RFC 7748, section 6.1: Alice's and Bob's x25519 key pairs, with their
// base32 computed independently (Python's base64.b32encode, "=" stripped).
var rfc7748 = []struct {
	name                  string
	privHex, pubHex       string
	privBase32, pubBase32 string
}{
	{
		name:       "alice",
		privHex:    "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
		pubHex:     "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
		privBase32: "O4DW2CTTDCSX2PAWYFZFDMTGIXPUYL4H5PAJSKVRO752KHNZFQVA",
		pubBase32:  "QUQPACMJGCTVI5ELPXOLIPXXLIG36OQNEY4BV5HLUSUY5KU3JZVA",
	},
	{
		name:       "bob",
		privHex:    "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
		pubHex:     "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
		privBase32: "LWVQQ7TCJKFEW6PBP6FYHAAO4ZXTXMJJEYMLN7I4F6FSP74I4DVQ",
		pubBase32:  "32PNW7L3PXA3JU23MHBOZZBVG47YGQ6ILN4GOTNN7R7BI34IFNHQ",
	},
}

func TestKnownVectorsDerivePublicKeyAndBase32(t *testing.T) {
	for _, v := range rfc7748 {
		t.Run(v.name, func(t *testing.T) {
			for _, in := range []string{v.privBase32, strings.ToLower(v.privBase32), " " + v.privBase32 + "\n"} {
				k, err := ParsePrivateKey(in)
				if err != nil {
					t.Fatalf("ParsePrivateKey: %v", err)
				}
				if got := hex.EncodeToString(k.k.Bytes()); got != v.privHex {
					t.Errorf("private bytes = %s, want %s", got, v.privHex)
				}
				if got := k.String(); got != v.privBase32 {
					t.Errorf("String() = %s, want %s", got, v.privBase32)
				}
				pub := k.PublicKey()
				b := pub.Bytes()
				if got := hex.EncodeToString(b[:]); got != v.pubHex {
					t.Errorf("public key = %s, want %s (RFC 7748)", got, v.pubHex)
				}
				if got := pub.String(); got != v.pubBase32 {
					t.Errorf("public String() = %s, want %s", got, v.pubBase32)
				}
			}
			for _, in := range []string{v.pubBase32, strings.ToLower(v.pubBase32)} {
				p, err := ParsePublicKey(in)
				if err != nil {
					t.Fatalf("ParsePublicKey: %v", err)
				}
				if p.String() != v.pubBase32 {
					t.Errorf("public key round trip: %s", p)
				}
			}
		})
	}
}

func TestGeneratedKeysRoundTrip(t *testing.T) {
	k, err := GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	k2, err := ParsePrivateKey(k.String())
	if err != nil {
		t.Fatal(err)
	}
	if k2.String() != k.String() || k2.PublicKey() != k.PublicKey() {
		t.Error("private key does not round-trip")
	}
	p, err := ParsePublicKey(k.PublicKey().String())
	if err != nil || p != k.PublicKey() {
		t.Errorf("public key does not round-trip: %v", err)
	}
	if s := k.String(); len(s) != 52 || strings.ToUpper(s) != s || strings.Contains(s, "=") {
		t.Errorf("String() = %d chars %q..., want 52 uppercase, no padding", len(s), s[:4])
	}
	if f := p.Fingerprint(); len(f) != 16 || !strings.HasPrefix(p.String(), f) {
		t.Errorf("Fingerprint() = %q", f)
	}
	k3, _ := GeneratePrivateKey()
	if k3.String() == k.String() {
		t.Error("two generated keys are equal")
	}
}

func TestMalformedKeysAreRefusedWithoutEcho(t *testing.T) {
	secret := rfc7748[0].privBase32
	tests := []struct {
		name, in, want string
	}{
		{"empty", "", "0 characters, want 52"},
		{"short", secret[:51], "51 characters, want 52"},
		{"long", secret + "A", "53 characters, want 52"},
		{"padded", secret + "====", "padding is not allowed"},
		{"not base32", secret[:50] + "1" + secret[51:], "not RFC 4648 base32"},
		{"base64", "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo", "43 characters"},
		{"all zero public key", strings.Repeat("A", 52), "all zero"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, perr := ParsePublicKey(tt.in)
			_, kerr := ParsePrivateKey(tt.in)
			if tt.name == "all zero public key" {
				kerr = perr // a zero private key is a valid scalar
			}
			for _, err := range []error{perr, kerr} {
				if err == nil {
					t.Fatalf("parsed %q", tt.in)
				}
				if !strings.Contains(err.Error(), tt.want) {
					t.Errorf("error %q, want it to contain %q", err, tt.want)
				}
				if len(tt.in) > 8 && strings.Contains(strings.ToUpper(err.Error()), strings.ToUpper(tt.in[:8])) {
					t.Errorf("error %q echoes the key", err)
				}
			}
		})
	}
}
