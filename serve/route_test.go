package serve

import (
	"net/url"
	"strings"
	"testing"
)

func TestRoute(t *testing.T) {
	const h = "0a1zq2ax9h7dsnd3kkbxh3d9mvlkfx2d"
	tests := []struct {
		raw    string // request target as sent
		kind   kind
		rel    string
		status int // 0: routes
	}{
		{raw: "/nix-cache-info", kind: kindCacheInfo, rel: "nix-cache-info"},
		{raw: "/" + h + ".narinfo", kind: kindNarInfo, rel: h + ".narinfo"},
		{raw: "/" + h + ".ls", kind: kindListing, rel: h + ".ls"},
		{raw: "/nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst", kind: kindNar, rel: "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst"},
		{raw: "/log/" + h + "-hello.drv", kind: kindLog, rel: "log/" + h + "-hello.drv"},
		{raw: "/realisations/sha256:1a2b!out.doi", kind: kindRealisation, rel: "realisations/sha256:1a2b!out.doi"},
		{raw: "/realisations/sha256:1a2b%21out.doi", kind: kindRealisation, rel: "realisations/sha256:1a2b!out.doi"},
		{raw: "/build-trace-v2/" + h + "-hello.drv/out.doi", kind: kindBuildTrace, rel: "build-trace-v2/" + h + "-hello.drv/out.doi"},
		{raw: "/debuginfo/0123abcd", kind: kindDebugInfo, rel: "debuginfo/0123abcd"},
		{raw: "/gcroots/web1", kind: kindRoot, rel: "gcroots/web1"},
		{raw: "/gcroots/hosts/web1", kind: kindRoot, rel: "gcroots/hosts/web1"},
		{raw: "/gcroots/.lock/web1", kind: kindLock, rel: "gcroots/.lock/web1"},

		{raw: "/", status: 404},
		{raw: "/index.html", status: 404},
		{raw: "/etc/passwd", status: 404},
		{raw: "/../etc/passwd", status: 400},
		{raw: "/nar/../nix-cache-info", status: 400},
		{raw: "/nar/" + strings.Repeat("0", 256) + ".nar", status: 400},
		{raw: "/log/" + strings.Repeat("a", 256), status: 400},
		{raw: "/%2e%2e/etc/passwd", status: 400},
		{raw: "/nar%2f..%2f..%2fetc%2fpasswd", status: 400},
		{raw: "/nar/..%2Fx", status: 400},
		{raw: "/nar/x%00.nar", status: 400},
		{raw: "/nar/x%5c..%5cy", status: 400},
		{raw: "//etc/passwd", status: 400},
		{raw: "/nar/", status: 400},
		{raw: "/nar/.hidden", status: 400},
		{raw: "/nar/a/b.nar", status: 400},
		{raw: "/NOTAHASH.narinfo", status: 400},
		{raw: "/" + h + "x.narinfo", status: 400},
		{raw: "/log/hello.drv", status: 400},
		{raw: "/realisations/x.json", status: 400},
		{raw: "/realisations/a/b.doi", status: 400},
		{raw: "/build-trace-v2/x/out.doi", status: 400},
		{raw: "/gcroots/.hidden", status: 400},
		{raw: "/gcroots/.lock/.prune", status: 400},
		{raw: "/gcroots/.lock/a/b", status: 400},
		{raw: "/gcroots/a/b/c/d/e/f/g/h/i", status: 400},
		{raw: "/gcroots/a%20b", status: 400},
		{raw: "/debuginfo/../../x", status: 400},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			u, err := url.ParseRequestURI(tt.raw)
			if err != nil {
				t.Fatal(err)
			}
			got, err := route(u)
			if tt.status != 0 {
				re, ok := err.(*routeError)
				if !ok || re.status != tt.status {
					t.Fatalf("route(%q) = %+v, %v; want status %d", tt.raw, got, err, tt.status)
				}
				return
			}
			if err != nil || got.kind != tt.kind || got.rel != tt.rel {
				t.Fatalf("route(%q) = %+v, %v; want kind %d rel %q", tt.raw, got, err, tt.kind, tt.rel)
			}
		})
	}
}

// FuzzRoute checks that whatever path routes stays inside the cache
// directory: no traversal segment, no absolute or empty path, no NUL.
func FuzzRoute(f *testing.F) {
	for _, s := range []string{"/nix-cache-info", "/nar/x.nar", "/gcroots/a/b", "/%2e%2e/x", "/nar/..%2f", "/realisations/a!b.doi", "/gcroots/.lock/x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		u, err := url.ParseRequestURI(raw)
		if err != nil {
			return
		}
		tg, err := route(u)
		if err != nil {
			return
		}
		if tg.rel == "" || tg.rel[0] == '/' {
			t.Fatalf("%q routed to %q", raw, tg.rel)
		}
		for _, seg := range splitSlash(tg.rel) {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("%q routed to %q with segment %q", raw, tg.rel, seg)
			}
		}
		for i := 0; i < len(tg.rel); i++ {
			if tg.rel[i] == 0 || tg.rel[i] == '\\' {
				t.Fatalf("%q routed to %q", raw, tg.rel)
			}
		}
	})
}

func splitSlash(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == '/' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return out
}
