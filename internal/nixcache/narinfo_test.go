package nixcache

import (
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

const (
	goodHash = "0a1zq2ax9h7dsnd3kkbxh3d9mvlkfx2d"
	refHash  = "1b9jydsiygi6jhlz2dxbrxi6b4m1rn2i"
)

// goodNarInfo is what Nix 2.8 writes for a path with one reference.
func goodNarInfo() string {
	return strings.Join([]string{
		"StorePath: /nix/store/" + goodHash + "-hello-1.0",
		"URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst",
		"Compression: zstd",
		"FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3",
		"FileSize: 120",
		"NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
		"NarSize: 568",
		"References: " + refHash + "-dep " + goodHash + "-hello-1.0",
		"Deriver: 3cs6rh2ja7a5hyg9rqyrxksc6jg0rxfw-hello-1.0.drv",
		"Sig: test-1:3TBWeHIxxPbnbNrF5TOnHNJ3P2RxVqLAwQh2DZwcj+JI8T/DIWKm8WLd8j4wU8DWvYpsaX1hXX9ObYxx7kVPAg==",
		"",
	}, "\n")
}

func TestNarInfoValidation(t *testing.T) {
	tests := []struct {
		name      string
		edit      func(string) string
		field     string // "" means valid
		hashPart  string
		wantInErr string
	}{
		{name: "valid", edit: func(s string) string { return s }},
		{name: "unknown keys are ignored like Nix does", edit: func(s string) string { return s + "System: x86_64-linux\nFutureKey: 1\n" }},
		{name: "unknown-deriver means none", edit: func(s string) string {
			return strings.Replace(s, "Deriver: 3cs6rh2ja7a5hyg9rqyrxksc6jg0rxfw-hello-1.0.drv", "Deriver: unknown-deriver", 1)
		}},
		{name: "missing StorePath", field: "StorePath", edit: func(s string) string { return dropLine(s, "StorePath") }},
		{name: "missing URL", field: "URL", edit: func(s string) string { return dropLine(s, "URL") }},
		{name: "missing NarHash", field: "NarHash", edit: func(s string) string { return dropLine(s, "NarHash") }},
		{name: "missing NarSize", field: "NarSize", edit: func(s string) string { return dropLine(s, "NarSize") }},
		{name: "zero NarSize", field: "NarSize", wantInErr: "greater than 0", edit: func(s string) string { return setLine(s, "NarSize", "0") }},
		{name: "NarSize not a number", field: "NarSize", edit: func(s string) string { return setLine(s, "NarSize", "12x") }},
		{name: "StorePath hash is not the file name", field: "StorePath", hashPart: refHash, wantInErr: "does not match"},
		{name: "StorePath outside the store", field: "StorePath", edit: func(s string) string { return setLine(s, "StorePath", "/tmp/"+goodHash+"-hello-1.0") }},
		{name: "StorePath below a store path", field: "StorePath", edit: func(s string) string { return setLine(s, "StorePath", "/nix/store/"+goodHash+"-hello-1.0/bin") }},
		{name: "StorePath with a bad hash", field: "StorePath", edit: func(s string) string {
			return setLine(s, "StorePath", "/nix/store/"+strings.Repeat("e", 32)+"-hello-1.0")
		}},
		{name: "reference not a base name", field: "References", edit: func(s string) string { return setLine(s, "References", "/nix/store/"+refHash+"-dep") }},
		{name: "reference with traversal", field: "References", edit: func(s string) string { return setLine(s, "References", "../../etc") }},
		{name: "deriver not a drv", field: "Deriver", edit: func(s string) string { return setLine(s, "Deriver", refHash+"-dep") }},
		{name: "URL absolute", field: "URL", edit: func(s string) string { return setLine(s, "URL", "/etc/passwd") }},
		{name: "URL traversal", field: "URL", edit: func(s string) string { return setLine(s, "URL", "nar/../../etc/passwd") }},
		{name: "URL remote", field: "URL", edit: func(s string) string { return setLine(s, "URL", "http://evil/nar/x.nar") }},
		{name: "URL nested", field: "URL", edit: func(s string) string { return setLine(s, "URL", "nar/a/b.nar") }},
		{name: "bad NarHash", field: "NarHash", edit: func(s string) string { return setLine(s, "NarHash", "sha256:nothash") }},
		{name: "bad FileHash", field: "FileHash", edit: func(s string) string { return setLine(s, "FileHash", "md5:zz") }},
		{name: "FileHash not the hash the URL names", field: "FileHash", wantInErr: "does not match URL", edit: func(s string) string {
			return setLine(s, "FileHash", "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73")
		}},
		{name: "FileHash in base16", edit: func(s string) string {
			d, _ := nixbase32.DecodeString("1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3")
			return setLine(s, "FileHash", "sha256:"+hex.EncodeToString(d))
		}},
		{name: "FileHash with a URL not named after a hash", edit: func(s string) string { return setLine(s, "URL", "nar/hello.nar.zst") }},
		{name: "FileHash of another algorithm is not compared", edit: func(s string) string {
			return setLine(s, "FileHash", "sha1:"+strings.Repeat("0", 40))
		}},
		{name: "bad compression", field: "Compression", edit: func(s string) string { return setLine(s, "Compression", "z std") }},
		{name: "bad signature", field: "Sig", edit: func(s string) string { return setLine(s, "Sig", "test-1:bm90IGEgc2lnbmF0dXJl") }},
		{name: "repeated StorePath", field: "StorePath", wantInErr: "repeated", edit: func(s string) string { return s + "StorePath: /nix/store/" + goodHash + "-x\n" }},
		{name: "line without colon", field: "line", edit: func(s string) string { return s + "garbage\n" }},
		{name: "NUL byte", field: "CA", edit: func(s string) string { return s + "CA: a\x00b\n" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := goodNarInfo()
			if tt.edit != nil {
				text = tt.edit(text)
			}
			hp := goodHash
			if tt.hashPart != "" {
				hp = tt.hashPart
			}
			ni, err := ParseNarInfo([]byte(text))
			if err == nil {
				err = ni.Validate("/nix/store", hp)
			}
			if tt.field == "" {
				if err != nil {
					t.Fatalf("valid narinfo refused: %v", err)
				}
				return
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("got %v, want a FieldError for %s", err, tt.field)
			}
			if fe.Field != tt.field {
				t.Errorf("error names field %q, want %q (%v)", fe.Field, tt.field, err)
			}
			if !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %q does not name the field %s", err, tt.field)
			}
			if tt.wantInErr != "" && !strings.Contains(err.Error(), tt.wantInErr) {
				t.Errorf("error %q does not say %q", err, tt.wantInErr)
			}
		})
	}
}

func TestNarURLHash(t *testing.T) {
	const h = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3"
	for _, tt := range []struct{ url, want string }{
		{"nar/" + h + ".nar", h},
		{"nar/" + h + ".nar.xz", h},
		{"nar/" + h + ".nar.zst", h},
		{"nar/" + h, ""},
		{"nar/" + h + ".ls", ""},
		{"nar/" + h[1:] + ".nar", ""},
		{"nar/" + strings.ToUpper(h) + ".nar", ""},
		{h + ".nar", ""},
		{"nar/custom.nar", ""},
	} {
		if got := NarURLHash(tt.url); got != tt.want {
			t.Errorf("NarURLHash(%q) = %q, want %q", tt.url, got, tt.want)
		}
	}
}

func TestParseNarInfoReadsWhatNixWrites(t *testing.T) {
	ni, err := ParseNarInfo([]byte(goodNarInfo()))
	if err != nil {
		t.Fatal(err)
	}
	if ni.NarSize != 568 || ni.FileSize != 120 || ni.Compression != "zstd" || len(ni.References) != 2 || len(ni.Sigs) != 1 {
		t.Errorf("parsed %+v", ni)
	}
	ni, err = ParseNarInfo([]byte(dropLine(goodNarInfo(), "Compression")))
	if err != nil {
		t.Fatal(err)
	}
	if ni.Compression != "bzip2" {
		t.Errorf("omitted Compression read as %q, Nix reads bzip2", ni.Compression)
	}
	// An error names the line it found the problem on.
	_, err = ParseNarInfo([]byte(setLine(goodNarInfo(), "NarSize", "-1")))
	if err == nil || !strings.Contains(err.Error(), "line 7") {
		t.Errorf("error %v does not name line 7", err)
	}
}

func TestSignatures(t *testing.T) {
	// A key pair as nix-store --generate-binary-cache-key writes it.
	sk, err := ParseSecretKey("test-1:RqDnNxL4OTWHkM8/F4h+NyEzq70mFZrggon5qLYJW+8Wj+tANHJmCfYwvdNFGfVx2PWORQavP+EzvlYKvkwDTA==")
	if err != nil {
		t.Fatal(err)
	}
	pk := sk.PublicKey()
	if pk.String() != "test-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w=" {
		t.Errorf("public key %s is not the one nix-store printed", pk)
	}
	other, _ := ParseSecretKey("other:RqDnNxL4OTWHkM8/F4h+NyEzq70mFZrggon5qLYJW+8Wj+tANHJmCfYwvdNFGfVx2PWORQavP+EzvlYKvkwDTA==")
	ni, err := ParseNarInfo([]byte(dropLine(goodNarInfo(), "Sig")))
	if err != nil {
		t.Fatal(err)
	}
	fp, err := ni.Fingerprint("/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	// References are signed as full paths in sorted order.
	wantFP := "1;/nix/store/" + goodHash + "-hello-1.0;sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;568;/nix/store/" + goodHash + "-hello-1.0,/nix/store/" + refHash + "-dep"
	if fp != wantFP {
		t.Errorf("fingerprint\n got %s\nwant %s", fp, wantFP)
	}
	if ni.VerifiedBy("/nix/store", []PublicKey{pk}) {
		t.Error("unsigned narinfo verified")
	}
	ni.Sigs = []string{other.Sign(fp)}
	if ni.VerifiedBy("/nix/store", []PublicKey{pk}) {
		t.Error("signature by another key verified")
	}
	ni.Sigs = append(ni.Sigs, sk.Sign(fp))
	if !ni.VerifiedBy("/nix/store", []PublicKey{pk}) {
		t.Error("good signature not verified")
	}
	ni.NarSize++
	if ni.VerifiedBy("/nix/store", []PublicKey{pk}) {
		t.Error("signature verified after NarSize changed")
	}
	if _, err := ParseSecretKey("test-1:c2VjcmV0"); err == nil || strings.Contains(err.Error(), "c2VjcmV0") {
		t.Errorf("bad secret key: error %v echoes the key or is nil", err)
	}
}

func TestParseMarker(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		roots   int
		errLine string
	}{
		{"one path", "/nix/store/" + goodHash + "-system\n", 1, ""},
		{"no final newline", "/nix/store/" + goodHash + "-system", 1, ""},
		{"several paths, blank lines and comments", "# web1\n/nix/store/" + goodHash + "-a\n\n/nix/store/" + refHash + "-b\r\n", 2, ""},
		{"empty", "", 0, ""},
		{"relative path", "nix/store/" + goodHash + "-a\n", 0, "line 1"},
		{"path below a store path", "/nix/store/" + goodHash + "-a\n/nix/store/" + refHash + "-b/bin/sh\n", 0, "line 2"},
		{"other store", "/gnu/store/" + goodHash + "-a\n", 0, "line 1"},
		{"traversal", "/nix/store/../../etc/passwd\n", 0, "line 1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			roots, err := ParseMarker([]byte(tt.in), "/nix/store")
			if tt.errLine != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errLine) {
					t.Fatalf("got %v, want an error naming %s", err, tt.errLine)
				}
				return
			}
			if err != nil || len(roots) != tt.roots {
				t.Fatalf("got %v, %v; want %d roots", roots, err, tt.roots)
			}
		})
	}
}

func TestCheckBaseName(t *testing.T) {
	for _, s := range []string{goodHash + "-a", goodHash + "-hello-2.12.1", goodHash + "-a+b_c?d=e.f", goodHash + "-x.drv"} {
		if err := CheckBaseName(s); err != nil {
			t.Errorf("%q refused: %v", s, err)
		}
	}
	for _, s := range []string{"", goodHash, goodHash + "-", goodHash + "-.hidden", goodHash + "-a/b", goodHash + "-a b", strings.ToUpper(goodHash) + "-a", goodHash[:31] + "-a", goodHash + "-" + strings.Repeat("a", 212), "../" + goodHash[3:] + "-a"} {
		if err := CheckBaseName(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

func dropLine(s, key string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if !strings.HasPrefix(l, key+": ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func setLine(s, key, val string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, key+": ") {
			l = key + ": " + val
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}
