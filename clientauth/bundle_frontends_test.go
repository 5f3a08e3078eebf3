package clientauth

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Two more valid v3 onion addresses, for bundles of several front ends.
const (
	onionC = "ul5c6srvlorosb5fgae6ty34vxpxvr7gnielub3dd5kta4vt6jgomsad"
	onionD = "2tcqmg4byrucwj5az7delhgz26es5nqkip3t3uigbnwepcvhypmiteqd"
)

func TestBundleFrontendsRoundTrip(t *testing.T) {
	tests := []struct {
		name       string
		b          Bundle
		reads      []string
		writes     []string
		authFiles  []string
		configHave []string
	}{
		{
			name:      "one front end, as before",
			b:         Bundle{Name: "a", Role: RoleWriter, ReadOnion: onionA, WriteOnion: onionB},
			reads:     []string{onionA},
			writes:    []string{onionB},
			authFiles: []string{onionA, onionB},
		},
		{
			name:       "reader of two front ends",
			b:          Bundle{Name: "a", Role: RoleReader, ReadOnion: onionA, Frontends: []Frontend{{ReadOnion: onionC + ".onion"}}},
			reads:      []string{onionA, onionC},
			authFiles:  []string{onionA, onionC},
			configHave: []string{"[[frontend]]\nread_url = 'http://" + onionC + ".onion'\n"},
		},
		{
			name:       "writer of two front ends",
			b:          Bundle{Name: "a", Role: RoleWriter, ReadOnion: onionA, WriteOnion: onionB, Frontends: []Frontend{{ReadOnion: onionC, WriteOnion: strings.ToUpper(onionD)}}},
			reads:      []string{onionA, onionC},
			writes:     []string{onionB, onionD},
			authFiles:  []string{onionA, onionB, onionC, onionD},
			configHave: []string{"write_url = 'http://" + onionD + ".onion'"},
		},
	}
	urls := func(onions []string) []string {
		var out []string
		for _, o := range onions {
			out = append(out, "http://"+o+".onion")
		}
		return out
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, _ := GeneratePrivateKey()
			tt.b.Key = k
			dir := filepath.Join(t.TempDir(), "b")
			if err := WriteBundle(dir, tt.b); err != nil {
				t.Fatal(err)
			}
			for _, o := range tt.authFiles {
				data, err := os.ReadFile(filepath.Join(dir, o+AuthPrivateSuffix))
				if err != nil {
					t.Fatal(err)
				}
				if got, _, err := ParseClientAuthLine(string(data)); err != nil || got != o {
					t.Errorf("%s%s names %q (%v)", o, AuthPrivateSuffix, got, err)
				}
			}
			entries, _ := os.ReadDir(dir)
			if n := len(entries); n != len(tt.authFiles)+2 {
				t.Errorf("%d files in the bundle, want %d auth files, client.key and kiss-onion.toml", n, len(tt.authFiles))
			}
			conf, _ := os.ReadFile(filepath.Join(dir, BundleConfigFile))
			for _, s := range tt.configHave {
				if !strings.Contains(string(conf), s) {
					t.Errorf("kiss-onion.toml lacks %q:\n%s", s, conf)
				}
			}
			if len(tt.b.Frontends) == 0 && strings.Contains(string(conf), "frontend") {
				t.Errorf("a bundle of one front end has [[frontend]] tables:\n%s", conf)
			}
			got, err := LoadBundle(dir)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got.ReadURLs(), urls(tt.reads)) || !slices.Equal(got.WriteURLs(), urls(tt.writes)) {
				t.Errorf("ReadURLs %v, WriteURLs %v; want %v, %v", got.ReadURLs(), got.WriteURLs(), urls(tt.reads), urls(tt.writes))
			}
			if got.ReadURL() != "http://"+onionA+".onion" {
				t.Errorf("ReadURL = %q: the first front end's", got.ReadURL())
			}
		})
	}
}

// A bundle written before front ends existed (no [[frontend]], no
// knowledge of them) loads as one front end.
func TestOldBundleLoadsAsOneFrontend(t *testing.T) {
	k, _ := GeneratePrivateKey()
	dir := t.TempDir()
	old := "# kiss-onion client bundle, written by 'kiss-onion keys'.\n" +
		"name = 'ci'\nrole = 'writer'\npublic_key = '" + k.PublicKey().String() + "'\n" +
		"read_url = 'http://" + onionA + ".onion'\nwrite_url = 'http://" + onionB + ".onion'\n"
	os.WriteFile(filepath.Join(dir, BundleConfigFile), []byte(old), 0o600)
	b, err := LoadBundle(dir)
	if err != nil {
		t.Fatal(err)
	}
	if b.Frontends != nil || len(b.AllFrontends()) != 1 || !slices.Equal(b.Onions(), []string{onionA + ".onion", onionB + ".onion"}) {
		t.Errorf("old bundle: %+v, onions %v", b, b.Onions())
	}
}

func TestBadFrontendsNameFileAndLine(t *testing.T) {
	k, _ := GeneratePrivateKey()
	head := func(role string) string {
		s := "name = 'a'\nrole = '" + role + "'\npublic_key = '" + k.PublicKey().String() + "'\nread_url = 'http://" + onionA + ".onion'\n"
		if role == "writer" {
			s += "write_url = 'http://" + onionB + ".onion'\n"
		}
		return s
	}
	url := func(o string) string { return "'http://" + o + ".onion'" }
	tests := []struct {
		name, config string
		line         int
		substr       string
	}{
		{"reader's front end with a write_url", head("reader") + "[[frontend]]\nread_url = " + url(onionC) + "\nwrite_url = " + url(onionD) + "\n", 7, "[[frontend]] 1: a reader has no write_url"},
		{"writer's front end without write_url", head("writer") + "[[frontend]]\nread_url = " + url(onionC) + "\n", 7, "[[frontend]] 1: a writer needs write_url"},
		{"front end without read_url", head("reader") + "[[frontend]]\n", 5, "[[frontend]] 1: read_url"},
		{"second front end's bad onion", head("reader") + "[[frontend]]\nread_url = " + url(onionC) + "\n[[frontend]]\nread_url = 'http://example.onion'\n", 8, "[[frontend]] 2: read_url"},
		{"an onion twice", head("writer") + "[[frontend]]\nread_url = " + url(onionC) + "\nwrite_url = " + url(onionA) + "\n", 6, "listed twice"},
		{"unknown key in a front end", head("reader") + "[[frontend]]\nread_url = " + url(onionC) + "\nreadurl = 'x'\n", 7, `unknown key "frontend.readurl"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, BundleConfigFile)
			os.WriteFile(path, []byte(tt.config), 0o600)
			_, err := LoadBundle(dir)
			var fe *FileError
			if !errors.As(err, &fe) || fe.Path != path || (tt.line > 0 && fe.Line != tt.line) || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("LoadBundle = %v, want a FileError for line %d with %q", err, tt.line, tt.substr)
			}
		})
	}
}

func TestInvalidFrontendsAreNotWritten(t *testing.T) {
	k, _ := GeneratePrivateKey()
	tests := []struct {
		name   string
		b      Bundle
		substr string
	}{
		{"reader's front end with a write onion", Bundle{Role: RoleReader, ReadOnion: onionA, Frontends: []Frontend{{onionC, onionD}}}, "reader front end 2 has a write onion"},
		{"writer's front end without", Bundle{Role: RoleWriter, ReadOnion: onionA, WriteOnion: onionB, Frontends: []Frontend{{ReadOnion: onionC}}}, "writer front end 2 has no write onion"},
		{"front end without read onion", Bundle{Role: RoleReader, ReadOnion: onionA, Frontends: []Frontend{{}}}, "front end 2 has no read onion"},
		{"the same onion twice", Bundle{Role: RoleReader, ReadOnion: onionA, Frontends: []Frontend{{ReadOnion: onionA + ".onion"}}}, "listed twice"},
		{"bad onion", Bundle{Role: RoleReader, ReadOnion: onionA, Frontends: []Frontend{{ReadOnion: "example"}}}, "front end 2: malformed onion address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.b.Name, tt.b.Key = "a", k
			dir := filepath.Join(t.TempDir(), "b")
			if err := WriteBundle(dir, tt.b); err == nil || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("WriteBundle = %v, want %q", err, tt.substr)
			}
			if _, err := os.Stat(dir); err == nil {
				t.Error("an invalid bundle created its directory")
			}
		})
	}
}
