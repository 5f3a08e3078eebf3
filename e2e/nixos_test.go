package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// The NixOS modules and the flake, checked with Debian's Nix 2.8: every .nix
// file parses, flake.nix's vendorHash matches go.mod and go.sum, and the
// modules evaluate with lib.evalModules, over nixpkgs' lib (the copy in
// ../shared/nixpkgs-lib beside the repository, or NIXPKGS_LIB), into the
// systemd units and assertions they promise.

// nixosRepoRoot returns the repository's root directory.
func nixosRepoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// nixosRepoFiles lists the repository's files (relative paths) that match
// one of patterns: an extension (".nix") or a file name ("go.mod"). It lists
// the files git tracks or would track, so that nothing ignored (build
// output, benchmark data) is read; outside a git checkout it walks the tree,
// skipping dot directories.
func nixosRepoFiles(t testing.TB, root string, patterns ...string) []string {
	t.Helper()
	match := func(name string) bool {
		base := filepath.Base(name)
		for _, p := range patterns {
			if base == p || strings.HasPrefix(p, ".") && strings.HasSuffix(base, p) {
				return true
			}
		}
		return false
	}
	var files []string
	cmd := exec.Command("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
	cmd.Dir = root
	if out, err := cmd.Output(); err == nil {
		for _, f := range strings.Split(string(out), "\x00") {
			if f == "" || !match(f) {
				continue
			}
			if _, err := os.Lstat(filepath.Join(root, f)); err == nil { // not deleted in the work tree
				files = append(files, f)
			}
		}
	} else {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && p != root && strings.HasPrefix(d.Name(), ".") {
				return filepath.SkipDir
			}
			if d.Type().IsRegular() && match(d.Name()) {
				rel, _ := filepath.Rel(root, p)
				files = append(files, rel)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	sort.Strings(files)
	return files
}

// nixosNoStore is the store that parsing and evaluating use: none. Nix
// 2.8 would otherwise open the machine's /nix store, which a user other
// than root cannot ("could not set permissions on
// '/nix/var/nix/profiles/per-user'") without a daemon.
const nixosNoStore = "dummy://"

func TestNixFilesParse(t *testing.T) {
	root := nixosRepoRoot(t)
	files := nixosRepoFiles(t, root, ".nix")
	for _, want := range []string{"flake.nix", "nixos/default.nix", "nixos/server.nix", "nixos/proxy.nix", "nixos/update.nix", "nixos/publish.nix"} {
		found := false
		for _, f := range files {
			found = found || f == want
		}
		if !found {
			t.Errorf("%s is missing", want)
		}
	}
	for _, f := range files {
		out, err := exec.Command("nix-instantiate", "--store", nixosNoStore, "--parse", filepath.Join(root, f)).CombinedOutput()
		if err != nil {
			t.Errorf("%s does not parse: %v\n%s", f, err, out)
		}
	}
}

var nixosVendorHashLine = regexp.MustCompile(`vendorHash = ("sha256-[A-Za-z0-9+/]{43}="|null);`)

// TestFlakeVendorHash recomputes what buildGoModule's vendorHash must be:
// the NAR hash, as SRI sha256, of the vendor directory `go mod vendor`
// leaves in a copy of the module's go.mod, go.sum and Go sources.
func TestFlakeVendorHash(t *testing.T) {
	root := nixosRepoRoot(t)
	flake, err := os.ReadFile(filepath.Join(root, "flake.nix"))
	if err != nil {
		t.Fatal(err)
	}
	m := nixosVendorHashLine.FindSubmatch(flake)
	if m == nil {
		t.Fatalf("flake.nix has no line like vendorHash = \"sha256-...\";")
	}
	have := strings.Trim(string(m[1]), `"`)

	dir := t.TempDir()
	// Nested modules' go.mod files come along, so that go leaves them out
	// as it does in the flake's full source.
	for _, f := range nixosRepoFiles(t, root, ".go", "go.mod", "go.sum") {
		data, err := os.ReadFile(filepath.Join(root, f))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	vendor := exec.CommandContext(ctx, "go", "mod", "vendor")
	vendor.Dir = dir
	vendor.Env = append(os.Environ(), "GOFLAGS=", "GOWORK=off")
	if out, err := vendor.CombinedOutput(); err != nil {
		t.Fatalf("go mod vendor in a copy of the module: %v (is go.sum complete? run 'go mod tidy')\n%s", err, out)
	}

	want := "null"
	if entries, err := os.ReadDir(filepath.Join(dir, "vendor")); err == nil && len(entries) > 0 {
		out, err := exec.Command("nix", "--extra-experimental-features", "nix-command",
			"hash", "path", "--type", "sha256", filepath.Join(dir, "vendor")).CombinedOutput()
		if err != nil {
			t.Fatalf("nix hash path: %v\n%s", err, out)
		}
		want = strings.TrimSpace(string(out))
	}
	if have != want {
		if want != "null" {
			want = `"` + want + `"`
		}
		t.Errorf("flake.nix's vendorHash is stale: go.mod and go.sum now need\n\tvendorHash = %s;\nin flake.nix (it has %s)", want, m[1])
	}
}

// nixpkgsLib returns the lib directory of nixpkgs that the modules are
// evaluated with: NIXPKGS_LIB's when it is set (a nixpkgs.lib checkout, its
// root or its lib directory; a relative path is from the repository's
// root), else that of shared/nixpkgs-lib beside the repository (see its
// SOURCE.md). Without one the test fails: it is not optional.
func nixpkgsLib(t *testing.T) string {
	t.Helper()
	root := nixosRepoRoot(t)
	dir, from := os.Getenv("NIXPKGS_LIB"), "NIXPKGS_LIB"
	if dir == "" {
		dir, from = filepath.Join("..", "shared", "nixpkgs-lib"), "the default"
	}
	if !filepath.IsAbs(dir) {
		dir = filepath.Join(root, dir)
	}
	for _, d := range []string{filepath.Join(dir, "lib"), dir} {
		if _, err := os.Stat(filepath.Join(d, "modules.nix")); err == nil {
			return d
		}
	}
	t.Fatalf("no nixpkgs lib to evaluate the NixOS modules with: %s (%s) holds neither lib/modules.nix nor modules.nix; "+
		"put a copy of nixpkgs' lib tree (github.com/nix-community/nixpkgs.lib) in shared/nixpkgs-lib beside the repository, "+
		"or set NIXPKGS_LIB to one", dir, from)
	return ""
}

// nixosEval is what e2e/testdata/nixos/eval.nix returns.
type nixosEval struct {
	FailedAssertions []string `json:"failedAssertions"`
	Warnings         []string `json:"warnings"`
	Systemd          struct {
		Services map[string]nixosService `json:"services"`
		Timers   map[string]struct {
			WantedBy    []string       `json:"wantedBy"`
			TimerConfig map[string]any `json:"timerConfig"`
		} `json:"timers"`
		Tmpfiles []string `json:"tmpfiles"`
	} `json:"systemd"`
	Etc map[string]any `json:"etc"`
	Nix struct {
		Substituters      []string `json:"substituters"`
		TrustedPublicKeys []string `json:"trusted-public-keys"`
	} `json:"nix"`
	Users    []string `json:"users"`
	Overlays int      `json:"overlays"`
	Packages []string `json:"packages"`
	Flake    struct {
		Systems []string `json:"systems"`
		Modules []string `json:"modules"`
		Package struct {
			Pname       string   `json:"pname"`
			VendorHash  string   `json:"vendorHash"`
			SubPackages []string `json:"subPackages"`
			DoCheck     bool     `json:"doCheck"`
		} `json:"package"`
		OverlayAdds []string `json:"overlayAdds"`
	} `json:"flake"`
}

type nixosService struct {
	WantedBy         []string          `json:"wantedBy"`
	After            []string          `json:"after"`
	Path             []string          `json:"path"`
	Script           string            `json:"script"`
	RestartIfChanged *bool             `json:"restartIfChanged"`
	ReloadTriggers   []string          `json:"reloadTriggers"`
	Environment      map[string]string `json:"environment"`
	ServiceConfig    map[string]any    `json:"serviceConfig"`
	UnitConfig       map[string]any    `json:"unitConfig"`
}

// evalNixOS evaluates the flake's nixosModules named in modules (a
// comma-separated list, or "nixos-dir")
// with the configuration module config, and returns the result, or the
// evaluation's error output.
func evalNixOS(t *testing.T, lib, modules, config string) (*nixosEval, string) {
	t.Helper()
	root := nixosRepoRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nix-instantiate", "--store", nixosNoStore, "--eval", "--strict", "--json",
		filepath.Join(root, "e2e", "testdata", "nixos", "eval.nix"),
		"--argstr", "libPath", lib, "--argstr", "repo", root,
		"--argstr", "modules", modules, "--arg", "module", config)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Sprintf("%v\n%s", err, stderr.String())
	}
	var res nixosEval
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		t.Fatalf("decode the evaluation: %v\n%s", err, stdout.String())
	}
	return &res, ""
}

// Keys and paths the cases use.
const (
	nixosReaderKey    = "PLPUWH4M5DIRWB2EQH4B2ANJTBNLMCBL3V6P4OI2B5KQHDR2PQXA"
	nixosWriterKey    = "D5JEPTBFBA3VHB7YW4HWRXNCWC2IQRZNYGAG3P7UPNGB2YO5BYUA"
	nixosSignerKey    = "fleet-1:Fo/rQDRyZgn2ML3TRRn1cdj1jkUGrz/hM75WCr5MA0w="
	nixosPkgOut       = "/nix/store/00000000000000000000000000000000-kiss-onion-0-unstable-20260102"
	nixosReaderBundle = "/var/lib/kiss-onion-secrets/laptop.bundle"
	nixosWriterBundle = "/var/lib/kiss-onion-secrets/ci.bundle"
)

// TestNixOSModules evaluates the modules with lib.evalModules over the real
// nixpkgs lib and checks the units, files and assertions they produce, the
// flags they pass against the binary's, and the documentation's examples.
func TestNixOSModules(t *testing.T) {
	lib := nixpkgsLib(t)
	t.Run("the flags match the binary", func(t *testing.T) { nixosMatchTheBinary(t, lib) })
	t.Run("the examples of docs/nixos.md", func(t *testing.T) { nixosDocExamples(t, lib) })
	for _, cases := range [][]nixosCase{nixosFlakeCases, nixosServerCases, nixosProxyCases, nixosUpdateCases, nixosPublishCases} {
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				t.Parallel()
				c.run(t, lib)
			})
		}
	}
}

// nixosCase is one evaluation of the modules and what it must give.
type nixosCase struct {
	name    string
	modules string // the flake's nixosModules, comma-separated, or "nixos-dir"
	config  string // a NixOS module
	wantErr string // the evaluation must fail with this in its output
	check   func(t *testing.T, r *nixosEval)
}

// run evaluates the case's modules and configuration and checks the result,
// or that the evaluation fails as it must.
func (c nixosCase) run(t *testing.T, lib string) {
	r, errOut := evalNixOS(t, lib, c.modules, c.config)
	switch {
	case c.wantErr != "":
		if r != nil {
			t.Fatalf("evaluation succeeded, want an error with %q", c.wantErr)
		}
		nixosContains(t, "evaluation error", errOut, c.wantErr)
	case r == nil:
		t.Fatalf("evaluation failed:\n%s", errOut)
	default:
		c.check(t, r)
	}
}

// nixosFlakeCases check what the flake gives and how its modules import.
var nixosFlakeCases = []nixosCase{
	{
		name:    "flake gives a package per system, the modules and the overlay",
		modules: "default",
		config:  `{ }`,
		check: func(t *testing.T, r *nixosEval) {
			f := r.Flake
			nixosEq(t, "systems", f.Systems, []string{"aarch64-linux", "x86_64-linux"})
			nixosEq(t, "nixosModules", f.Modules, []string{"default", "proxy", "publish", "server", "update"})
			nixosEq(t, "overlay adds", f.OverlayAdds, []string{"kiss-onion"})
			nixosEq(t, "pname", f.Package.Pname, "kiss-onion")
			nixosEq(t, "subPackages", f.Package.SubPackages, []string{"cmd/kiss-onion"})
			if !strings.HasPrefix(f.Package.VendorHash, "sha256-") {
				t.Errorf("vendorHash = %q, want an SRI sha256", f.Package.VendorHash)
			}
			nixosEq(t, "services when nothing is enabled", len(r.Systemd.Services), 0)
			nixosAssertions(t, r)
		},
	},
	{
		name:    "all roles together through nixosModules.default",
		modules: "default",
		config: `{
			networking.hostName = "cache1";
			services.kiss-onion = {
				enable = true;
				writers.ci.publicKey = "` + nixosWriterKey + `";
				proxy = { enable = true; bundle = "` + nixosWriterBundle + `"; trustedPublicKeys = [ "` + nixosSignerKey + `" ]; };
				update = { enable = true; bundle = "` + nixosWriterBundle + `"; publisherKey = "` + nixosSignerKey + `"; };
				publish = { enable = true; bundle = "` + nixosWriterBundle + `"; signingKeyFile = "/var/lib/kiss-onion-secrets/fleet-1.sec";
					systems.cache1 = "/etc/fleet#nixosConfigurations.cache1.config.system.build.toplevel"; };
			};
		}`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			for _, name := range []string{"kiss-onion", "kiss-onion-proxy", "kiss-onion-update", "kiss-onion-publish"} {
				nixosUnit(t, r, name)
			}
			nixosEq(t, "systemPackages", r.Packages, []string{nixosPkgOut, nixosPkgOut, nixosPkgOut, nixosPkgOut})
		},
	},
	{
		name:    "role modules imported together bring the overlay once",
		modules: "server,proxy,update",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			proxy = { enable = true; bundle = "` + nixosWriterBundle + `"; trustedPublicKeys = [ "` + nixosSignerKey + `" ]; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosEq(t, "overlays", r.Overlays, 1)
			nixosContains(t, "ExecStart", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]), nixosPkgOut+"/bin/kiss-onion proxy")
		},
	},
	{
		name:    "nixos directory without the overlay asks for the package",
		modules: "nixos-dir",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; }; }`,
		wantErr: "services.kiss-onion.package: pkgs has no kiss-onion",
	},
	{
		name:    "nixos directory with the package set",
		modules: "nixos-dir",
		config: `{ pkgs, ... }: { services.kiss-onion.package = pkgs.callPackage ({ buildGoModule }: buildGoModule { pname = "ko"; version = "1"; }) { };
			services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosContains(t, "ExecStart", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]),
				"/nix/store/00000000000000000000000000000000-ko-1/bin/kiss-onion proxy")
		},
	},
}

// nixosServerCases check services.kiss-onion, the cache's server.
var nixosServerCases = []nixosCase{
	{
		name:    "server runs serve with its config file, keys and hardening",
		modules: "server",
		config: `{
			services.kiss-onion = {
				enable = true;
				readers.laptop.publicKey = "` + nixosReaderKey + `";
				writers.ci.publicKey = "` + nixosWriterKey + `";
				trustedWriterKeys = [ "` + nixosSignerKey + `" ];
				priority = 20;
				listen = "127.0.0.1:8080";
				prune = { enable = true; interval = "6h"; maxRootAge = "720h"; };
				tor.extraConfig = "UseBridges 1";
				settings.max-upload-size = "16G";
			};
		}`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			s := nixosUnit(t, r, "kiss-onion")
			nixosEq(t, "ExecStart", s.ServiceConfig["ExecStart"], nixosPkgOut+"/bin/kiss-onion serve --config /etc/kiss-onion/kiss-onion.toml")
			nixosEq(t, "wantedBy", s.WantedBy, []string{"multi-user.target"})
			nixosEq(t, "path", s.Path, []string{"/nix/store/00000000000000000000000000000000-tor"})
			for k, v := range map[string]string{
				"User": "kiss-onion", "StateDirectory": "kiss-onion", "StateDirectoryMode": "0700",
				"CacheDirectory":  "kiss-onion",
				"ReadWritePaths":  "[/var/cache/kiss-onion /var/lib/kiss-onion]",
				"NoNewPrivileges": "true", "PrivateTmp": "true", "ProtectSystem": "strict", "ProtectHome": "true",
				"RestrictAddressFamilies": "[AF_UNIX AF_INET AF_INET6]",
				"SystemCallFilter":        "[@system-service ~@privileged]",
				"CapabilityBoundingSet":   "",
			} {
				nixosEq(t, "serviceConfig."+k, fmt.Sprint(s.ServiceConfig[k]), v)
			}
			nixosEq(t, "kiss-onion.toml", r.Etc["kiss-onion/kiss-onion.toml"], map[string]any{
				"cache-dir":          "/var/cache/kiss-onion",
				"state-dir":          "/var/lib/kiss-onion",
				"clients-file":       "/etc/kiss-onion/clients.toml",
				"tor":                "public",
				"public-read":        false,
				"priority":           20.0,
				"trusted-writer-key": []any{nixosSignerKey},
				"listen":             "127.0.0.1:8080",
				"tor-config":         "/etc/kiss-onion/torrc",
				"prune-interval":     "6h",
				"max-root-age":       "720h",
				"max-upload-size":    "16G",
			})
			clients, _ := r.Etc["kiss-onion/clients.toml"].(string)
			nixosContains(t, "clients.toml", clients, "version = 1\n")
			nixosContains(t, "clients.toml", clients, "[[client]]\nname = \"laptop\"\nrole = \"reader\"\npublic_key = \""+nixosReaderKey+"\"\n")
			nixosContains(t, "clients.toml", clients, "[[client]]\nname = \"ci\"\nrole = \"writer\"\npublic_key = \""+nixosWriterKey+"\"\n")
			nixosEq(t, "reloadTriggers", s.ReloadTriggers, []string{clients})
			nixosContains(t, "ExecReload", fmt.Sprint(s.ServiceConfig["ExecReload"]), "kill -HUP $MAINPID")
			nixosEq(t, "torrc", r.Etc["kiss-onion/torrc"], "UseBridges 1")
			nixosEq(t, "users", r.Users, []string{"kiss-onion"})
			nixosEq(t, "tmpfiles", r.Systemd.Tmpfiles, []string{})
		},
	},
	{
		name:    "server directories outside /var/lib and /var/cache come from tmpfiles",
		modules: "server",
		config: `{
			services.kiss-onion = {
				enable = true;
				cacheDir = "/srv/nix-cache";
				stateDir = "/srv/kiss-onion-state";
				writers.ci.publicKey = "` + nixosWriterKey + `";
			};
		}`,
		check: func(t *testing.T, r *nixosEval) {
			s := nixosUnit(t, r, "kiss-onion")
			nixosEq(t, "StateDirectory", s.ServiceConfig["StateDirectory"], nil)
			nixosEq(t, "CacheDirectory", s.ServiceConfig["CacheDirectory"], nil)
			nixosEq(t, "ReadWritePaths", fmt.Sprint(s.ServiceConfig["ReadWritePaths"]), "[/srv/nix-cache /srv/kiss-onion-state]")
			nixosEq(t, "tmpfiles", r.Systemd.Tmpfiles, []string{
				"d /srv/kiss-onion-state 0700 kiss-onion kiss-onion - -",
				"d /srv/nix-cache 0755 kiss-onion kiss-onion - -",
			})
		},
	},
	{
		name:    "server refuses a write onion without a writer",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; readers.laptop.publicKey = "` + nixosReaderKey + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "the write onion needs at least one writer")
		},
	},
	{
		name:    "server without onions needs no writer",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; settings.tor = "off";
			settings.listen-write = "127.0.0.1:8081"; readers.laptop.publicKey = "` + nixosReaderKey + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
		},
	},
	{
		name:    "server refuses clients in both roles, bad names, shared keys, state in the cache and a remote listener",
		modules: "server",
		config: `{
			services.kiss-onion = {
				enable = true;
				cacheDir = "/srv/cache";
				stateDir = "/srv/cache/state";
				listen = "0.0.0.0:8080";
				readers = { ci.publicKey = "` + nixosReaderKey + `"; ".hidden".publicKey = "` + nixosWriterKey + `"; };
				writers.ci.publicKey = "` + nixosWriterKey + `";
			};
		}`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r,
				"client names are 1 to 64 letters, digits, '-', '_' and '.', not starting with '.' or '-': .hidden",
				"ci listed in both readers and writers",
				"one public key is listed for several clients",
				"stateDir (/srv/cache/state) must not be inside cacheDir (/srv/cache)",
				`listen = "0.0.0.0:8080" is not a loopback address`)
		},
	},
	{
		name:    "server serves its metrics on loopback when asked",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `"; metrics.enable = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosEq(t, "metrics-listen", r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)["metrics-listen"], "127.0.0.1:37512")
		},
	},
	{
		name:    "server has no metrics by default",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `"; metrics.listen = "0.0.0.0:9437"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			if v, ok := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)["metrics-listen"]; ok {
				t.Errorf("metrics-listen = %v without metrics.enable", v)
			}
		},
	},
	{
		name:    "server refuses remote metrics without allow-remote",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			metrics = { enable = true; listen = "0.0.0.0:9437"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, `metrics.listen = "0.0.0.0:9437" is not a loopback address`)
		},
	},
	{
		name:    "server serves remote metrics with allow-remote",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			metrics = { enable = true; listen = "10.0.0.1:9437"; }; settings.allow-remote = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosEq(t, "metrics-listen", r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)["metrics-listen"], "10.0.0.1:9437")
		},
	},
	{
		name:    "server takes OIDC tokens on loopback when asked",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; settings.tor = "off";
			oidc = { enable = true; issuer = "https://token.actions.githubusercontent.com"; audience = "https://cache.example.org";
				writers = [ "repository=org/infra,ref=refs/heads/main" ]; readers = [ "repository_owner=org" "repository=friend/tools" ]; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			settings := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			nixosEq(t, "listen-oidc", settings["listen-oidc"], "127.0.0.1:37513")
			nixosEq(t, "oidc-issuer", settings["oidc-issuer"], "https://token.actions.githubusercontent.com")
			nixosEq(t, "oidc-audience", settings["oidc-audience"], "https://cache.example.org")
			nixosEq(t, "oidc-writer", settings["oidc-writer"], []any{"repository=org/infra,ref=refs/heads/main"})
			nixosEq(t, "oidc-reader", settings["oidc-reader"], []any{"repository_owner=org", "repository=friend/tools"})
		},
	},
	{
		name:    "server has no OIDC door by default",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `"; oidc.issuer = "https://token.actions.githubusercontent.com"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			for _, k := range []string{"listen-oidc", "oidc-issuer", "oidc-audience", "oidc-writer", "oidc-reader"} {
				if v, ok := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)[k]; ok {
					t.Errorf("%s = %v without oidc.enable", k, v)
				}
			}
		},
	},
	{
		name:    "server refuses an OIDC door with no rule, no audience, an http issuer or a remote address",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; settings.tor = "off";
			oidc = { enable = true; issuer = "http://issuer.example"; listen = "0.0.0.0:8443"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r,
				`oidc needs issuer (an https URL, http only on loopback) and audience, not issuer = "http://issuer.example", audience = ""`,
				"oidc needs at least one rule in oidc.writers or oidc.readers",
				`oidc.listen = "0.0.0.0:8443" is not a loopback address`)
		},
	},
	{
		name:    "server refuses an OIDC rule that is not claim=value",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; settings.tor = "off";
			oidc = { enable = true; issuer = "https://token.actions.githubusercontent.com"; audience = "a"; writers = [ "repository" ]; }; }; }`,
		wantErr: "services.kiss-onion.oidc.writers",
	},
	{
		name:    "server opens the TLS door with its own certificate",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			tls = { enable = true; listen = "0.0.0.0:8443"; names = [ "cache.lan" "192.168.1.5" ]; }; settings.allow-remote = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			conf := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			nixosEq(t, "listen-tls", conf["listen-tls"], "0.0.0.0:8443")
			nixosEq(t, "tls-name", conf["tls-name"], []string{"cache.lan", "192.168.1.5"})
			if _, ok := conf["tls-cert"]; ok {
				t.Error("tls-cert set without tls.certFile")
			}
			if _, ok := nixosUnit(t, r, "kiss-onion").ServiceConfig["LoadCredential"]; ok {
				t.Error("LoadCredential without tls.certFile")
			}
		},
	},
	{
		name:    "server serves the user's certificate, read at run time as credentials",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			tls = { enable = true; certFile = "/var/lib/kiss-onion-secrets/cache.crt"; keyFile = "/var/lib/kiss-onion-secrets/cache.key"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			conf := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			nixosEq(t, "listen-tls", conf["listen-tls"], "127.0.0.1:8443")
			nixosEq(t, "tls-cert", conf["tls-cert"], "/run/credentials/kiss-onion.service/tls-cert")
			nixosEq(t, "tls-key", conf["tls-key"], "/run/credentials/kiss-onion.service/tls-key")
			nixosEq(t, "LoadCredential", nixosUnit(t, r, "kiss-onion").ServiceConfig["LoadCredential"],
				[]string{"tls-cert:/var/lib/kiss-onion-secrets/cache.crt", "tls-key:/var/lib/kiss-onion-secrets/cache.key"})
		},
	},
	{
		name:    "server keeps the cache in a bucket, its keys read at run time as credentials",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			store = { url = "s3://nix-cache/main?endpoint=http://10.0.0.5:8333&region=us-east-1"; credentialsFile = "/run/secrets/s3"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			conf := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			nixosEq(t, "store", conf["store"], "s3://nix-cache/main?endpoint=http://10.0.0.5:8333&region=us-east-1")
			nixosEq(t, "s3-credentials", conf["s3-credentials"], "/run/credentials/kiss-onion.service/s3-credentials")
			nixosEq(t, "LoadCredential", nixosUnit(t, r, "kiss-onion").ServiceConfig["LoadCredential"], []string{"s3-credentials:/run/secrets/s3"})
		},
	},
	{
		name:    "server fetches from upstream into a bucket, and keeps what it fetched",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			store.url = "s3://nix-cache"; upstream = { urls = [ "https://cache.nixos.org" ]; keys = [ "` + nixosSignerKey + `" ]; keep = "168h"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			conf := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			nixosEq(t, "store", conf["store"], "s3://nix-cache")
			nixosEq(t, "upstream", conf["upstream"], []string{"https://cache.nixos.org"})
			nixosEq(t, "upstream-keep", conf["upstream-keep"], "168h")
		},
	},
	{
		name:    "server refuses a store URL that is not s3://",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			store.url = "/srv/cache"; }; }`,
		wantErr: "services.kiss-onion.store.url",
	},
	{
		name:    "server refuses a remote TLS door without allow-remote, and half a certificate",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			tls = { enable = true; listen = "0.0.0.0:8443"; names = [ "cache.lan" ]; certFile = "/var/lib/kiss-onion-secrets/cache.crt"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, `tls.listen = "0.0.0.0:8443" is not a loopback address`, "set certFile and keyFile together", "with tls.certFile, your certificate names them")
		},
	},
	{
		name:    "server refuses a certificate in the Nix store",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			tls = { enable = true; certFile = "/nix/store/00000000000000000000000000000000-cert"; keyFile = "/nix/store/00000000000000000000000000000000-key"; }; }; }`,
		wantErr: "absolute path outside the Nix store",
	},
	{
		name:    "server warns about a public read onion",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; publicRead = true; writers.ci.publicKey = "` + nixosWriterKey + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosEq(t, "public-read", r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)["public-read"], true)
			nixosContains(t, "warnings", strings.Join(r.Warnings, "\n"), "publicRead is on")
		},
	},
	{
		name:    "server passes the upstream options",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			upstream = { urls = [ "https://cache.nixos.org" ]; keys = [ "` + nixosSignerKey + `" ]; viaTor = true;
				timeout = "10s"; closureTimeout = "3m"; downloadTimeout = "4h"; keep = "168h"; maxSize = "50G"; maxNarSize = "2G"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			toml := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
			for k, v := range map[string]any{
				"upstream": []any{"https://cache.nixos.org"}, "upstream-key": []any{nixosSignerKey}, "upstream-via-tor": true,
				"upstream-timeout": "10s", "upstream-closure-timeout": "3m", "upstream-download-timeout": "4h",
				"upstream-keep": "168h", "upstream-max-size": "50G", "upstream-max-nar-size": "2G",
			} {
				nixosEq(t, k, toml[k], v)
			}
		},
	},
	{
		name:    "server without upstream URLs passes no upstream option",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			upstream = { keep = "168h"; maxSize = "50G"; maxNarSize = "2G"; closureTimeout = "3m"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			for k := range r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any) {
				if strings.HasPrefix(k, "upstream") {
					t.Errorf("%s set without upstream.urls", k)
				}
			}
		},
	},
	{
		name:    "server refuses upstream URLs without keys",
		modules: "server",
		config: `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `";
			upstream.urls = [ "https://cache.nixos.org" ]; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "upstream.urls is set but upstream.keys is empty")
		},
	},
	{
		name:    "server option and the same key in settings conflict",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "` + nixosWriterKey + `"; priority = 10; settings.priority = 20; }; }`,
		wantErr: "services.kiss-onion.settings.priority' has conflicting definition values",
	},
	{
		name:    "server refuses a malformed public key",
		modules: "server",
		config:  `{ services.kiss-onion = { enable = true; writers.ci.publicKey = "not-a-key"; }; }`,
		wantErr: "services.kiss-onion.writers.ci.publicKey' is not of type",
	},
}

// nixosProxyCases check services.kiss-onion.proxy, the gateway on a client.
var nixosProxyCases = []nixosCase{
	{
		name:    "proxy runs the gateway and makes it a substituter",
		modules: "proxy",
		config: `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosWriterBundle + `"; port = 9000; write = true;
			trustedPublicKeys = [ "` + nixosSignerKey + `" ]; extraArgs = [ "--tor-config" "/etc/kiss onion/100%.torrc" ]; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			s := nixosUnit(t, r, "kiss-onion-proxy")
			nixosEq(t, "ExecStart", s.ServiceConfig["ExecStart"], nixosPkgOut+"/bin/kiss-onion proxy --bundle "+nixosWriterBundle+
				` --listen 127.0.0.1:9000 --state-dir /var/lib/kiss-onion-proxy --write --tor-config "/etc/kiss onion/100%%.torrc"`)
			nixosEq(t, "path", s.Path, []string{"/nix/store/00000000000000000000000000000000-tor"})
			nixosEq(t, "ProtectSystem", s.ServiceConfig["ProtectSystem"], "strict")
			nixosEq(t, "substituters", r.Nix.Substituters, []string{"http://127.0.0.1:9000"})
			nixosEq(t, "trusted-public-keys", r.Nix.TrustedPublicKeys, []string{nixosSignerKey})
			nixosEq(t, "warnings", r.Warnings, []string{})
		},
	},
	{
		name:    "proxy warns without trusted keys",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			s := nixosUnit(t, r, "kiss-onion-proxy")
			nixosContains(t, "ExecStart", fmt.Sprint(s.ServiceConfig["ExecStart"]), "--listen 127.0.0.1:37510")
			nixosEq(t, "substituters", r.Nix.Substituters, []string{"http://127.0.0.1:37510"})
			nixosContains(t, "warnings", strings.Join(r.Warnings, "\n"), "trustedPublicKeys is empty")
		},
	},
	{
		name:    "proxy serves its metrics on loopback when asked",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; metrics.enable = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosContains(t, "ExecStart", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]), "--metrics-listen 127.0.0.1:37513")
		},
	},
	{
		name:    "proxy has no metrics by default",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; metrics.listen = "0.0.0.0:9438"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			if line := fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]); strings.Contains(line, "--metrics-listen") {
				t.Errorf("ExecStart %s has --metrics-listen without metrics.enable", line)
			}
		},
	},
	{
		name:    "proxy refuses remote metrics without --allow-remote",
		modules: "proxy",
		config: `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `";
			metrics = { enable = true; listen = "0.0.0.0:9438"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, `proxy.metrics.listen = "0.0.0.0:9438" is not a loopback address`)
		},
	},
	{
		name:    "proxy serves remote metrics with --allow-remote",
		modules: "proxy",
		config: `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `";
			metrics = { enable = true; listen = "10.0.0.2:9438"; }; extraArgs = [ "--allow-remote" ]; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosContains(t, "ExecStart", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]), "--metrics-listen 10.0.0.2:9438 --allow-remote")
		},
	},
	{
		name:    "proxy prefetches by default",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			s := nixosUnit(t, r, "kiss-onion-proxy")
			for _, no := range []string{"--prefetch", "--cache-dir", "--allow-remote"} {
				if line := fmt.Sprint(s.ServiceConfig["ExecStart"]); strings.Contains(line, no) {
					t.Errorf("ExecStart %s has %s by default", line, no)
				}
			}
			if _, ok := s.ServiceConfig["CacheDirectory"]; ok {
				t.Errorf("a CacheDirectory without lanCache: %v", s.ServiceConfig["CacheDirectory"])
			}
		},
	},
	{
		name:    "proxy without prefetch",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; prefetch = false; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosContains(t, "ExecStart", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]), "--prefetch=false")
		},
	},
	{
		name:    "proxy as a LAN cache",
		modules: "proxy",
		config: `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; trustedPublicKeys = [ "` + nixosSignerKey + `" ];
			lanCache = { enable = true; size = "50G"; listenAddress = "192.168.1.2"; }; metrics.enable = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			s := nixosUnit(t, r, "kiss-onion-proxy")
			nixosEq(t, "ExecStart", s.ServiceConfig["ExecStart"], nixosPkgOut+"/bin/kiss-onion proxy --bundle "+nixosReaderBundle+
				" --listen 192.168.1.2:37510 --state-dir /var/lib/kiss-onion-proxy --cache-dir /var/cache/kiss-onion-proxy --cache-size 50G --allow-remote --metrics-listen 127.0.0.1:37513")
			nixosEq(t, "CacheDirectory", s.ServiceConfig["CacheDirectory"], "kiss-onion-proxy")
			nixosEq(t, "CacheDirectoryMode", s.ServiceConfig["CacheDirectoryMode"], "0700")
			nixosEq(t, "substituters", r.Nix.Substituters, []string{"http://192.168.1.2:37510"})
		},
	},
	{
		name:    "proxy refuses a LAN cache size that is not one",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosReaderBundle + `"; lanCache = { enable = true; size = "lots"; }; }; }`,
		wantErr: "lanCache.size' is not of type",
	},
	{
		name:    "proxy refuses a LAN cache on the write onion",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "` + nixosWriterBundle + `"; write = true; lanCache.enable = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "lanCache is for reading")
		},
	},
	{
		name:    "proxy refuses a bundle in the Nix store",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "/nix/store/00000000000000000000000000000000-laptop.bundle"; }; }`,
		wantErr: "absolute path outside the Nix store",
	},
	{
		name:    "proxy refuses a bundle given as a Nix path",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = /var/lib/kiss-onion-secrets/laptop.bundle; }; }`,
		wantErr: "absolute path outside the Nix store",
	},
	{
		name:    "proxy refuses a bundle its sandbox hides",
		modules: "proxy",
		config:  `{ services.kiss-onion.proxy = { enable = true; bundle = "/root/laptop.bundle"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "the gateway cannot read /root, /home or /run/user")
		},
	},
}

// nixosUpdateCases check services.kiss-onion.update, a host following its marker.
var nixosUpdateCases = []nixosCase{
	{
		name:    "update runs on a timer with the host's marker and the publisher key",
		modules: "update",
		config: `{ networking.hostName = "web1"; services.kiss-onion.update = { enable = true;
			bundle = "` + nixosReaderBundle + `"; publisherKey = "` + nixosSignerKey + `"; interval = "1h"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			s := nixosUnit(t, r, "kiss-onion-update")
			nixosEq(t, "ExecStart", s.ServiceConfig["ExecStart"], nixosPkgOut+"/bin/kiss-onion update switch --bundle "+nixosReaderBundle+
				" --marker web1 --state-dir /var/lib/kiss-onion-update --publisher-key "+nixosSignerKey)
			nixosEq(t, "Type", s.ServiceConfig["Type"], "oneshot")
			nixosEq(t, "restartIfChanged", s.RestartIfChanged != nil && !*s.RestartIfChanged, true)
			nixosEq(t, "X-StopOnRemoval", s.UnitConfig["X-StopOnRemoval"], false)
			nixosEq(t, "wantedBy", s.WantedBy, []string(nil))
			tm, ok := r.Systemd.Timers["kiss-onion-update"]
			if !ok {
				t.Fatalf("no kiss-onion-update timer: %v", r.Systemd.Timers)
			}
			nixosEq(t, "timer wantedBy", tm.WantedBy, []string{"timers.target"})
			nixosEq(t, "OnUnitActiveSec", tm.TimerConfig["OnUnitActiveSec"], "1h")
			nixosEq(t, "OnBootSec", tm.TimerConfig["OnBootSec"], "5min")
		},
	},
	{
		name:    "update with allowUnsigned and boot",
		modules: "update",
		config: `{ services.kiss-onion.update = { enable = true; action = "boot"; marker = "db-2";
			bundle = "` + nixosReaderBundle + `"; allowUnsigned = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosEq(t, "ExecStart", nixosUnit(t, r, "kiss-onion-update").ServiceConfig["ExecStart"], nixosPkgOut+"/bin/kiss-onion update boot --bundle "+nixosReaderBundle+
				" --marker db-2 --state-dir /var/lib/kiss-onion-update --allow-unsigned")
		},
	},
	{
		name:    "update refuses to run without a publisher key or allowUnsigned",
		modules: "update",
		config:  `{ services.kiss-onion.update = { enable = true; bundle = "` + nixosReaderBundle + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "services.kiss-onion.update: set publisherKey to the public key that signs the markers")
		},
	},
	{
		name:    "update refuses both a publisher key and allowUnsigned, and an empty marker",
		modules: "update",
		config: `{ networking.hostName = ""; services.kiss-onion.update = { enable = true; bundle = "` + nixosReaderBundle + `";
			publisherKey = "` + nixosSignerKey + `"; allowUnsigned = true; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "publisherKey and allowUnsigned = true contradict each other", `marker = "" is not a marker name`)
		},
	},
}

// nixosPublishCases check services.kiss-onion.publish, the publisher of the systems.
var nixosPublishCases = []nixosCase{
	{
		name:    "publish builds each system and publishes it on a timer",
		modules: "publish",
		config: `{ services.kiss-onion.publish = { enable = true; bundle = "` + nixosWriterBundle + `";
			signingKeyFile = "/var/lib/kiss-onion-secrets/fleet-1.sec"; schedule = "*:0/15";
			systems = { web1 = "/etc/fleet#nixosConfigurations.web1.config.system.build.toplevel";
			            db = "/nix/store/00000000000000000000000000000000-nixos-system-db"; }; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r)
			nixosEq(t, "warnings", r.Warnings, []string{})
			s := nixosUnit(t, r, "kiss-onion-publish")
			nixosEq(t, "Type", s.ServiceConfig["Type"], "oneshot")
			nixosContains(t, "script", s.Script, `kiss-onion publish --bundle `+nixosWriterBundle+` --state-dir /var/lib/kiss-onion-publish --signing-key /var/lib/kiss-onion-secrets/fleet-1.sec "$name" $path`)
			nixosContains(t, "script", s.Script, "nix --extra-experimental-features 'nix-command flakes' build --no-link --print-out-paths \"$target\"")
			nixosContains(t, "script", s.Script, "publish db /nix/store/00000000000000000000000000000000-nixos-system-db\n")
			nixosContains(t, "script", s.Script, "publish web1 '/etc/fleet#nixosConfigurations.web1.config.system.build.toplevel'\n")
			nixosContains(t, "path", strings.Join(s.Path, " "), nixosPkgOut)
			tm := r.Systemd.Timers["kiss-onion-publish"]
			nixosEq(t, "timer wantedBy", tm.WantedBy, []string{"timers.target"})
			nixosEq(t, "OnCalendar", tm.TimerConfig["OnCalendar"], "*:0/15")
			nixosEq(t, "Persistent", tm.TimerConfig["Persistent"], true)
		},
	},
	{
		name:    "publish refuses an empty system list and warns about unsigned markers",
		modules: "publish",
		config:  `{ services.kiss-onion.publish = { enable = true; bundle = "` + nixosWriterBundle + `"; }; }`,
		check: func(t *testing.T, r *nixosEval) {
			nixosAssertions(t, r, "services.kiss-onion.publish.systems is empty")
			nixosContains(t, "warnings", strings.Join(r.Warnings, "\n"), "signingKeyFile is not set")
		},
	},
}

func nixosUnit(t *testing.T, r *nixosEval, name string) nixosService {
	t.Helper()
	s, ok := r.Systemd.Services[name]
	if !ok {
		names := make([]string, 0, len(r.Systemd.Services))
		for n := range r.Systemd.Services {
			names = append(names, n)
		}
		t.Fatalf("no systemd service %s (have %v)", name, names)
	}
	return s
}

// nixosAssertions checks that the failed assertions are exactly those whose
// messages contain wants, in order.
func nixosAssertions(t *testing.T, r *nixosEval, wants ...string) {
	t.Helper()
	if len(r.FailedAssertions) != len(wants) {
		t.Fatalf("failed assertions:\n%s\nwant %d: %q", strings.Join(r.FailedAssertions, "\n---\n"), len(wants), wants)
	}
	for i, want := range wants {
		nixosContains(t, fmt.Sprintf("failed assertion %d", i), r.FailedAssertions[i], want)
	}
}

func nixosEq(t *testing.T, what string, got, want any) {
	t.Helper()
	g, _ := json.Marshal(got)
	w, _ := json.Marshal(want)
	if !bytes.Equal(g, w) {
		t.Errorf("%s = %s, want %s", what, g, w)
	}
}

func nixosContains(t *testing.T, what, got, want string) {
	t.Helper()
	if !strings.Contains(got, want) {
		t.Errorf("%s does not contain %q:\n%s", what, want, got)
	}
}

// nixosEverything enables every module with every option that reaches the
// command line or the config file.
const nixosEverything = `{
	networking.hostName = "cache1";
	services.kiss-onion = {
		enable = true;
		readers.laptop.publicKey = "` + nixosReaderKey + `";
		writers.ci.publicKey = "` + nixosWriterKey + `";
		publicRead = true;
		trustedWriterKeys = [ "` + nixosSignerKey + `" ];
		listen = "127.0.0.1:8080";
		prune = { enable = true; maxRootAge = "720h"; };
		metrics.enable = true;
		oidc = { enable = true; issuer = "https://token.actions.githubusercontent.com"; audience = "https://cache.example.org";
			writers = [ "repository=org/infra,ref=refs/heads/main" ]; readers = [ "repository_owner=org" ]; };
		tls = { enable = true; names = [ "cache1.lan" ]; };
		tor.extraConfig = "UseBridges 1";
		proxy = { enable = true; bundle = "` + nixosWriterBundle + `"; write = true; trustedPublicKeys = [ "` + nixosSignerKey + `" ]; metrics.enable = true; };
		update = { enable = true; bundle = "` + nixosReaderBundle + `"; publisherKey = "` + nixosSignerKey + `"; };
		publish = { enable = true; bundle = "` + nixosWriterBundle + `"; signingKeyFile = "/var/lib/kiss-onion-secrets/fleet-1.sec";
			systems.cache1 = "/etc/fleet#nixosConfigurations.cache1.config.system.build.toplevel"; };
	};
}`

// nixosMatchTheBinary checks the modules against the binary that TestMain
// built: every setting they write for serve is a serve flag, the clients
// file is a registry that `kiss-onion keys` reads, and every flag that the
// gateway, update and publish units pass is one of that command's.
func nixosMatchTheBinary(t *testing.T, lib string) {
	r, errOut := evalNixOS(t, lib, "default", nixosEverything)
	if r == nil {
		t.Fatalf("evaluation failed:\n%s", errOut)
	}

	serveFlags, ok := nixosCommandFlags(t, "serve")
	if !ok {
		t.Fatal("kiss-onion serve -h lists no flags")
	}
	settings, _ := r.Etc["kiss-onion/kiss-onion.toml"].(map[string]any)
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !serveFlags[k] {
			t.Errorf("services.kiss-onion writes %s = %v into kiss-onion.toml, but kiss-onion serve has no --%s", k, settings[k], k)
		}
	}

	state := t.TempDir()
	clients, _ := r.Etc["kiss-onion/clients.toml"].(string)
	if err := os.WriteFile(filepath.Join(state, "clients.toml"), []byte(clients), 0o600); err != nil {
		t.Fatal(err)
	}
	out, code := runKissOnion(t, "keys", "list", "--state-dir", state)
	if code != 0 || !strings.Contains(out, "laptop") || !strings.Contains(out, "ci") {
		t.Errorf("kiss-onion keys list does not read the clients file the module writes (exit %d):\n%s\nthe file:\n%s", code, out, clients)
	}

	for _, u := range []struct {
		unit, command, line string
		help                []string // what lists the command's flags
	}{
		{"kiss-onion-proxy", "proxy", fmt.Sprint(nixosUnit(t, r, "kiss-onion-proxy").ServiceConfig["ExecStart"]), []string{"proxy"}},
		{"kiss-onion-update", "update", fmt.Sprint(nixosUnit(t, r, "kiss-onion-update").ServiceConfig["ExecStart"]), []string{"update", "switch"}},
		{"kiss-onion-publish", "publish", nixosUnit(t, r, "kiss-onion-publish").Script, []string{"publish"}},
	} {
		flags, ok := nixosCommandFlags(t, u.help...)
		if !ok {
			t.Logf("kiss-onion has no %s command yet: the flags of %s are not checked", u.command, u.unit)
			continue
		}
		_, args, found := strings.Cut(u.line, "kiss-onion "+u.command+" ")
		if !found {
			t.Errorf("%s does not run kiss-onion %s: %s", u.unit, u.command, u.line)
			continue
		}
		args, _, _ = strings.Cut(args, "\n")
		for _, a := range strings.Fields(args) {
			if name, ok := strings.CutPrefix(a, "--"); ok && !flags[name] {
				t.Errorf("%s passes --%s, but kiss-onion %s has no such flag", u.unit, name, u.command)
			}
		}
	}
}

var nixosFlagLine = regexp.MustCompile(`(?m)^  -([a-z0-9][a-z0-9-]*)`)

// nixosCommandFlags returns the flags `kiss-onion COMMAND... -h` lists, and
// whether it lists any.
func nixosCommandFlags(t *testing.T, command ...string) (map[string]bool, bool) {
	t.Helper()
	out, _ := runKissOnion(t, append(command, "-h")...)
	_, list, ok := strings.Cut(out, "\nFlags:\n")
	if !ok || !nixosFlagLine.MatchString(list) {
		return nil, false
	}
	flags := map[string]bool{}
	for _, m := range nixosFlagLine.FindAllStringSubmatch(list, -1) {
		flags[m[1]] = true
	}
	return flags, true
}

// nixosDocExample finds the examples of docs/nixos.md that are machine
// configurations: nix code blocks whose first line names the file
// ("# cache1.nix ...").
var nixosDocExample = regexp.MustCompile("(?s)```nix\n# ([a-z0-9-]+\\.nix)\\b[^\n]*\n(.*?)```")

// nixosDocExamples evaluates every role's example in docs/nixos.md: each
// must pass its assertions with no warning, so that the documentation
// matches the options.
func nixosDocExamples(t *testing.T, lib string) {
	doc, err := os.ReadFile(filepath.Join(nixosRepoRoot(t), "docs", "nixos.md"))
	if err != nil {
		t.Fatal(err)
	}
	examples := map[string]string{}
	for _, m := range nixosDocExample.FindAllStringSubmatch(string(doc), -1) {
		if m[1] != "flake.nix" {
			examples[m[1]] = m[2]
		}
	}
	for _, want := range []string{"cache1.nix", "laptop.nix", "ci-runner.nix", "web1.nix", "publisher.nix"} {
		if _, ok := examples[want]; !ok {
			t.Errorf("docs/nixos.md has no example starting with # %s", want)
		}
	}
	for name, text := range examples {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			r, errOut := evalNixOS(t, lib, "default", text)
			if r == nil {
				t.Fatalf("the example does not evaluate:\n%s\n%s", text, errOut)
			}
			nixosAssertions(t, r)
			nixosEq(t, "warnings", r.Warnings, []string{})
		})
	}
}
