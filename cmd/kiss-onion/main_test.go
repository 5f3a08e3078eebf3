package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// runInProcess runs kiss-onion ARGS... in this process and returns its exit
// code, what it wrote to stderr, and the flag sets it made.
func runInProcess(t *testing.T, args ...string) (int, string, []*flag.FlagSet) {
	t.Helper()
	var buf bytes.Buffer
	var made []*flag.FlagSet
	oldStderr := stderr
	stderr = &buf
	flagSetMade = func(fs *flag.FlagSet) { made = append(made, fs) }
	defer func() { stderr, flagSetMade = oldStderr, nil }()
	code := run(args)
	return code, buf.String(), made
}

func TestEveryCommandsHelpListsEveryFlag(t *testing.T) {
	var cases [][]string
	for name := range commands {
		cases = append(cases, []string{name, "-h"}, []string{name, "--help"})
	}
	for _, sub := range []string{"add", "export", "list", "revoke"} {
		cases = append(cases, []string{"keys", sub, "-h"})
	}
	for _, args := range cases {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			code, out, made := runInProcess(t, args...)
			if code != 0 {
				t.Fatalf("exit %d, want 0; stderr:\n%s", code, out)
			}
			if !strings.Contains(out, "Usage:") {
				t.Errorf("no usage text:\n%s", out)
			}
			if len(made) == 0 && args[0] != "keys" {
				t.Fatal("made no flag set")
			}
			_, flags, ok := strings.Cut(out, "\nFlags:\n")
			if len(made) > 0 && !ok {
				t.Fatalf("no Flags: part:\n%s", out)
			}
			for _, fs := range made {
				n := 0
				fs.VisitAll(func(f *flag.Flag) {
					n++
					if !strings.Contains(flags, "-"+f.Name+" ") && !strings.Contains(flags, "-"+f.Name+"\n") {
						t.Errorf("flag -%s is not listed:\n%s", f.Name, flags)
					}
				})
				if n == 0 {
					t.Errorf("flag set %s has no flags", fs.Name())
				}
			}
		})
	}
}

func TestParseArgsTakesFlagsAnywhere(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		want    []string
		wantDry bool
		wantDir string
	}{
		{"flags first", []string{"--dry-run", "--dir", "d", "a", "b"}, []string{"a", "b"}, true, "d"},
		{"flags last", []string{"a", "b", "--dry-run", "--dir=d"}, []string{"a", "b"}, true, "d"},
		{"flags between", []string{"a", "--dir", "d", "b"}, []string{"a", "b"}, false, "d"},
		{"after -- everything is an argument", []string{"a", "--", "--dry-run", "-x"}, []string{"a", "--dry-run", "-x"}, false, ""},
		{"no arguments", []string{"--dry-run"}, nil, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			dry := fs.Bool("dry-run", false, "")
			dir := fs.String("dir", "", "")
			got, err := parseArgs(fs, tc.args)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) || *dry != tc.wantDry || *dir != tc.wantDir {
				t.Errorf("parseArgs(%q) = %q, dry-run %v, dir %q; want %q, %v, %q", tc.args, got, *dry, *dir, tc.want, tc.wantDry, tc.wantDir)
			}
		})
	}
}

func TestPruneTakesFlagsAfterTheCacheDirectory(t *testing.T) {
	cache := t.TempDir()
	if err := os.WriteFile(filepath.Join(cache, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, _ := runInProcess(t, "prune", cache, "--dry-run", "--state-dir", "")
	if code != 0 {
		t.Fatalf("prune CACHE --dry-run: exit %d\n%s", code, out)
	}
}

func TestInside(t *testing.T) {
	for _, tc := range []struct {
		dir, parent string
		want        bool
	}{
		{"/srv/cache", "/srv/cache", true},
		{"/srv/cache/gcroots/st", "/srv/cache", true},
		{"/srv/cache-2", "/srv/cache", false},
		{"/srv", "/srv/cache", false},
		{"/srv/cache/../state", "/srv/cache", false},
		{"/srv/..cache", "/srv", true},
	} {
		got, err := inside(tc.dir, tc.parent)
		if err != nil || got != tc.want {
			t.Errorf("inside(%q, %q) = %v, %v; want %v", tc.dir, tc.parent, got, err, tc.want)
		}
	}
}

func TestInsideSeesThroughSymlinks(t *testing.T) {
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	os.MkdirAll(filepath.Join(cache, "gcroots", "st"), 0o700)
	link := filepath.Join(root, "link")
	if err := os.Symlink(filepath.Join(cache, "gcroots", "st"), link); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{link, filepath.Join(link, "not-yet")} {
		in, err := inside(dir, cache)
		if err != nil || !in {
			t.Errorf("inside(%s, cache) = %v, %v; want true: the link leads into the cache", dir, in, err)
		}
	}
	if err := checkApart(cache, link); err == nil {
		t.Error("checkApart accepted a state directory that a symlink puts inside the cache")
	}
	elsewhere := filepath.Join(root, "state")
	if err := checkApart(cache, elsewhere); err != nil {
		t.Errorf("checkApart(%s, %s) = %v", cache, elsewhere, err)
	}
}
