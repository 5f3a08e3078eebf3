package clientauth

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

func TestBundleRoundTrip(t *testing.T) {
	created := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name  string
		b     Bundle
		files []string
	}{
		{
			name:  "reader",
			b:     Bundle{Name: "laptop", Role: RoleReader, ReadOnion: onionA + ".onion"},
			files: []string{"client.key", "kiss-onion.toml", onionA + ".auth_private"},
		},
		{
			name:  "writer",
			b:     Bundle{Name: "ci", Role: RoleWriter, ReadOnion: onionA, WriteOnion: strings.ToUpper(onionB)},
			files: []string{"client.key", "kiss-onion.toml", onionA + ".auth_private", onionB + ".auth_private"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, _ := GeneratePrivateKey()
			tt.b.Key, tt.b.Created = k, created
			dir := filepath.Join(t.TempDir(), "x", tt.name+".bundle")
			if err := WriteBundle(dir, tt.b); err != nil {
				t.Fatal(err)
			}
			if m := mode(t, dir); m != 0o700 {
				t.Errorf("bundle dir mode %o, want 700", m)
			}
			entries, _ := os.ReadDir(dir)
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
				if m := mode(t, filepath.Join(dir, e.Name())); m != 0o600 {
					t.Errorf("%s mode %o, want 600", e.Name(), m)
				}
			}
			sort.Strings(names)
			sort.Strings(tt.files)
			if fmt.Sprint(names) != fmt.Sprint(tt.files) {
				t.Errorf("bundle files %v, want %v", names, tt.files)
			}

			for _, f := range tt.files {
				if !strings.HasSuffix(f, AuthPrivateSuffix) {
					continue
				}
				data, _ := os.ReadFile(filepath.Join(dir, f))
				onion, k2, err := ParseClientAuthLine(string(data))
				if err != nil || onion+AuthPrivateSuffix != f || k2.String() != k.String() {
					t.Errorf("%s: %q, %v", f, onion, err)
				}
			}
			keyFile, _ := os.ReadFile(filepath.Join(dir, BundleKeyFile))
			wantKeyFile := "# created: 2025-01-02T03:04:05Z\n# public key: " + k.PublicKey().String() + "\n" + k.String() + "\n"
			if string(keyFile) != wantKeyFile {
				t.Errorf("client.key:\n%s\nwant:\n%s", keyFile, wantKeyFile)
			}

			got, err := LoadBundle(dir)
			if err != nil {
				t.Fatal(err)
			}
			if got.Name != tt.b.Name || got.Role != tt.b.Role || got.Key == nil || got.Key.String() != k.String() || got.PublicKey != k.PublicKey() {
				t.Errorf("LoadBundle = %+v", got)
			}
			if got.ReadURL() != "http://"+onionA+".onion" {
				t.Errorf("ReadURL = %q", got.ReadURL())
			}
			if tt.b.Role == RoleWriter && got.WriteURL() != "http://"+onionB+".onion" {
				t.Errorf("WriteURL = %q", got.WriteURL())
			}
			if tt.b.Role == RoleReader && got.WriteURL() != "" {
				t.Errorf("reader's WriteURL = %q", got.WriteURL())
			}
		})
	}
}

func TestWriteBundleRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	k, _ := GeneratePrivateKey()
	b := Bundle{Name: "a", Role: RoleReader, Key: k, ReadOnion: onionA}
	if err := WriteBundle(dir, b); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, BundleKeyFile))
	k2, _ := GeneratePrivateKey()
	b.Key = k2
	err := WriteBundle(dir, b)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second WriteBundle = %v, want fs.ErrExist", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, BundleKeyFile))
	if string(before) != string(after) {
		t.Error("client.key was overwritten")
	}

	// A single existing file is enough to refuse, and nothing is written.
	dir2 := t.TempDir()
	os.WriteFile(filepath.Join(dir2, BundleConfigFile), []byte("mine"), 0o600)
	if err := WriteBundle(dir2, b); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteBundle over kiss-onion.toml = %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir2, BundleKeyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Error("WriteBundle left a client.key behind")
	}
}

func TestReplaceBundle(t *testing.T) {
	dir := t.TempDir()
	k, _ := GeneratePrivateKey()
	if err := WriteBundle(dir, Bundle{Name: "w", Role: RoleReader, Key: k, ReadOnion: onionA}); err != nil {
		t.Fatal(err)
	}
	// The same key, now as a writer with both onions.
	if err := ReplaceBundle(dir, Bundle{Name: "w", Role: RoleWriter, Key: k, ReadOnion: onionA, WriteOnion: onionB}); err != nil {
		t.Fatal(err)
	}
	b, err := LoadBundle(dir)
	if err != nil || b.Role != RoleWriter || b.Key == nil || b.WriteURL() == "" {
		t.Fatalf("LoadBundle after ReplaceBundle = %+v, %v", b, err)
	}
	// Only kiss-onion.toml, with the same public key: client.key stays.
	if err := ReplaceBundle(dir, Bundle{Name: "w", Role: RoleWriter, PublicKey: k.PublicKey(), ReadOnion: onionA, WriteOnion: onionB}); err != nil {
		t.Fatal(err)
	}
	if b, err := LoadBundle(dir); err != nil || b.Key == nil {
		t.Fatalf("LoadBundle after a key-less ReplaceBundle = %+v, %v", b, err)
	}
	// Another key is refused, with or without its private half.
	other, _ := GeneratePrivateKey()
	for _, b := range []Bundle{
		{Name: "w", Role: RoleReader, Key: other, ReadOnion: onionA},
		{Name: "w", Role: RoleReader, PublicKey: other.PublicKey(), ReadOnion: onionA},
	} {
		err := ReplaceBundle(dir, b)
		if err == nil || !strings.Contains(err.Error(), "holds another key") {
			t.Errorf("ReplaceBundle with another key = %v", err)
		}
	}
	if b, _ := ReadKeyFile(filepath.Join(dir, BundleKeyFile)); b == nil || b.String() != k.String() {
		t.Error("client.key was replaced")
	}
}

func TestKeylessBundleHoldsConfigOnly(t *testing.T) {
	dir := t.TempDir()
	pub := newPub(t)
	b := Bundle{Name: "own-key", Role: RoleWriter, PublicKey: pub, ReadOnion: onionA, WriteOnion: onionB}
	if names, _ := b.Files(); fmt.Sprint(names) != "[kiss-onion.toml]" {
		t.Errorf("Files() = %v", names)
	}
	if err := WriteBundle(dir, b); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("%d files, want kiss-onion.toml only", len(entries))
	}
	got, err := LoadBundle(dir)
	if err != nil || got.Key != nil || got.PublicKey != pub || got.WriteURL() != "http://"+onionB+".onion" {
		t.Errorf("LoadBundle = %+v, %v", got, err)
	}
}

func TestInvalidBundlesAreNotWritten(t *testing.T) {
	k, _ := GeneratePrivateKey()
	other, _ := GeneratePrivateKey()
	tests := []struct {
		name   string
		b      Bundle
		substr string
	}{
		{"no key", Bundle{Name: "a", Role: RoleReader, ReadOnion: onionA}, "no key"},
		{"mismatched halves", Bundle{Name: "a", Role: RoleReader, Key: k, PublicKey: other.PublicKey(), ReadOnion: onionA}, "does not match"},
		{"bad name", Bundle{Name: ".a", Role: RoleReader, Key: k, ReadOnion: onionA}, "starts with '.'"},
		{"bad role", Bundle{Name: "a", Role: "root", Key: k, ReadOnion: onionA}, "unknown role"},
		{"no read onion", Bundle{Name: "a", Role: RoleReader, Key: k}, "no read onion"},
		{"writer without write onion", Bundle{Name: "a", Role: RoleWriter, Key: k, ReadOnion: onionA}, "no write onion"},
		{"reader with write onion", Bundle{Name: "a", Role: RoleReader, Key: k, ReadOnion: onionA, WriteOnion: onionB}, "reader bundle has a write onion"},
		{"bad onion", Bundle{Name: "a", Role: RoleReader, Key: k, ReadOnion: "example.onion"}, "malformed onion address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "b")
			err := WriteBundle(dir, tt.b)
			if err == nil || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("WriteBundle = %v, want error with %q", err, tt.substr)
			}
			if _, err := os.Stat(dir); !errors.Is(err, fs.ErrNotExist) {
				t.Error("an invalid bundle created its directory")
			}
		})
	}
}

func TestCorruptBundleNamesFileAndLine(t *testing.T) {
	k, _ := GeneratePrivateKey()
	other, _ := GeneratePrivateKey()
	secret := k.String()
	cfg := func(lines ...string) string {
		return strings.Join(lines, "\n") + "\n"
	}
	name, role := `name = "a"`, `role = "reader"`
	pub := `public_key = "` + k.PublicKey().String() + `"`
	read := `read_url = "http://` + onionA + `.onion"`
	tests := []struct {
		name, config, key string
		file              string
		line              int
		substr            string
	}{
		{"toml syntax", cfg(name, "role = reader"), "", BundleConfigFile, 2, "toml"},
		{"unknown key", cfg(name, role, pub, read, `wirte_url = "x"`), "", BundleConfigFile, 5, `unknown key "wirte_url"`},
		{"bad role", cfg(name, `role = "admin"`, pub, read), "", BundleConfigFile, 2, "unknown role"},
		{"bad read_url", cfg(name, role, pub, `read_url = "https://`+onionA+`.onion"`), "", BundleConfigFile, 4, "read_url"},
		{"bad onion", cfg(name, role, pub, `read_url = "http://`+onionB[:50]+`aaaaaa.onion"`), "", BundleConfigFile, 4, "malformed onion"},
		{"writer without write_url", cfg(name, `role = "writer"`, pub, read), "", BundleConfigFile, 2, "needs write_url"},
		{"bad public key", cfg(name, role, `public_key = "`+secret[:30]+`"`, read), "", BundleConfigFile, 3, "malformed x25519 public key"},
		{"bad private key", cfg(name, role, pub, read), "# created: now\n\n" + secret[:50] + "\n", BundleKeyFile, 3, "malformed x25519 private key"},
		{"two private keys", cfg(name, role, pub, read), secret + "\n" + other.String() + "\n", BundleKeyFile, 2, "more than one key"},
		{"empty key file", cfg(name, role, pub, read), "# nothing\n", BundleKeyFile, 0, "no key"},
		{"key of another client", cfg(name, role, pub, read), other.String() + "\n", BundleKeyFile, -1, "holds key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, BundleConfigFile), []byte(tt.config), 0o600)
			if tt.key != "" {
				os.WriteFile(filepath.Join(dir, BundleKeyFile), []byte(tt.key), 0o600)
			}
			_, err := LoadBundle(dir)
			if err == nil {
				t.Fatal("corrupt bundle loaded")
			}
			path := filepath.Join(dir, tt.file)
			if tt.line >= 0 {
				var fe *FileError
				if !errors.As(err, &fe) || fe.Path != path || fe.Line != tt.line {
					t.Errorf("error %q: want a FileError for %s line %d", err, tt.file, tt.line)
				}
			}
			if !strings.HasPrefix(err.Error(), path) || !strings.Contains(err.Error(), tt.substr) {
				t.Errorf("error %q, want %s...%q", err, path, tt.substr)
			}
			if strings.Contains(err.Error(), secret[:10]) || strings.Contains(err.Error(), other.String()[:10]) {
				t.Errorf("error %q echoes a private key", err)
			}
		})
	}
}

func TestBundleDirectoryMustBeTheOwnersAlone(t *testing.T) {
	k, _ := GeneratePrivateKey()
	b := Bundle{Name: "a", Role: RoleReader, Key: k, ReadOnion: onionA}
	root := t.TempDir()
	open := filepath.Join(root, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777) // past the umask
	groupW := filepath.Join(root, "group")
	os.Mkdir(groupW, 0o770)
	os.Chmod(groupW, 0o770)
	target := filepath.Join(root, "target")
	os.Mkdir(target, 0o700)
	link := filepath.Join(root, "link")
	os.Symlink(target, link)
	for _, tc := range []struct {
		name, dir, want string
	}{
		{"a directory anyone can write", open, "writable by others"},
		{"a group-writable directory", groupW, "writable by others"},
		{"a symlink to a directory", link, "symlink"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for name, write := range map[string]func(string, Bundle) error{"WriteBundle": WriteBundle, "ReplaceBundle": ReplaceBundle} {
				err := write(tc.dir, b)
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Errorf("%s(%s) = %v, want an error saying %q", name, tc.dir, err, tc.want)
				}
			}
			for _, d := range []string{tc.dir, target} {
				if ents, _ := os.ReadDir(d); len(ents) != 0 {
					t.Errorf("%s holds %d files after a refusal", d, len(ents))
				}
			}
		})
	}
	// A new directory, and an existing private one, are fine.
	for _, dir := range []string{filepath.Join(root, "new"), target} {
		if err := WriteBundle(dir, b); err != nil {
			t.Errorf("WriteBundle(%s): %v", dir, err)
		}
	}
}
