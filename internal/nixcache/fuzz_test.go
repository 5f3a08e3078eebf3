package nixcache

import (
	"strings"
	"testing"
)

// FuzzNarInfo checks that no input crashes the parser, that whatever
// validates has the fields Nix requires, and that a valid narinfo's URL
// stays under nar/.
func FuzzNarInfo(f *testing.F) {
	f.Add([]byte(goodNarInfo()))
	f.Add([]byte("StorePath: /nix/store/" + goodHash + "-a\nURL: nar/x.nar\nNarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\nNarSize: 1\n"))
	f.Add([]byte("References: \nDeriver: unknown-deriver\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ni, err := ParseNarInfo(data)
		if err != nil {
			return
		}
		if err := ni.Validate("/nix/store", goodHash); err != nil {
			return
		}
		if ni.NarSize == 0 || !strings.HasPrefix(ni.URL, "nar/") || strings.Contains(ni.URL, "..") || strings.Count(ni.URL, "/") != 1 {
			t.Fatalf("validated a narinfo Nix or the cache cannot use: %+v", ni)
		}
		for _, r := range ni.References {
			if strings.Contains(r, "/") {
				t.Fatalf("reference %q has a slash", r)
			}
		}
		if _, err := ni.Fingerprint("/nix/store"); err != nil {
			t.Fatalf("valid narinfo has no fingerprint: %v", err)
		}
	})
}
