package clientauth

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestMergeKeys(t *testing.T) {
	// entry is one client of a registry: key names one of the test's keys,
	// a "-" before the role revokes it.
	type entry struct {
		name, role, key string
	}
	keys := map[string]PublicKey{}
	for _, k := range []string{"a", "b", "w"} {
		keys[k] = newPub(t)
	}
	// build saves a registry with these clients and loads it back, as
	// serve reads it.
	build := func(t *testing.T, entries []entry) *Registry {
		t.Helper()
		path := filepath.Join(t.TempDir(), RegistryFileName)
		r, err := LoadRegistry(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			role, revoked := strings.CutPrefix(e.role, "-")
			if _, err := r.Add(e.name, Role(role), keys[e.key]); err != nil {
				t.Fatal(err)
			}
			if revoked {
				if err := r.Revoke(e.name); err != nil {
					t.Fatal(err)
				}
			}
		}
		if err := r.Save(); err != nil {
			t.Fatal(err)
		}
		loaded, err := LoadRegistry(path)
		if err != nil {
			t.Fatal(err)
		}
		return loaded
	}
	// names turns keys back into the test's names, in order.
	names := func(list [][32]byte) string {
		var out []string
		for _, k := range list {
			for name, pub := range keys {
				if pub.Bytes() == k {
					out = append(out, name)
				}
			}
		}
		return strings.Join(out, " ")
	}

	tests := []struct {
		name        string
		files       [][]entry
		read, write string
	}{
		{
			name: "a key revoked in the first file is out",
			files: [][]entry{
				{{"laptop", "-reader", "a"}, {"desk", "reader", "b"}},
				{{"laptop", "reader", "a"}},
			},
			read: "b",
		},
		{
			name: "a key revoked in the second file is out",
			files: [][]entry{
				{{"laptop", "reader", "a"}, {"desk", "reader", "b"}},
				{{"old-laptop", "-reader", "a"}},
			},
			read: "b",
		},
		{
			name: "a writer revoked in one file is out of both onions",
			files: [][]entry{
				{{"ci", "writer", "w"}},
				{{"ci", "-writer", "w"}},
			},
		},
		{
			name: "a writer key is on both onions",
			files: [][]entry{
				{{"laptop", "reader", "a"}, {"ci", "writer", "w"}},
			},
			read:  "a w",
			write: "w",
		},
		{
			name: "a key in both files is there once",
			files: [][]entry{
				{{"laptop", "reader", "a"}, {"ci", "writer", "w"}},
				{{"ci", "writer", "w"}, {"laptop", "reader", "a"}},
			},
			read:  "a w",
			write: "w",
		},
		{
			name: "a reader in one file and a writer in the other is a writer",
			files: [][]entry{
				{{"laptop", "reader", "a"}},
				{{"laptop", "writer", "a"}},
			},
			read:  "a",
			write: "a",
		},
		{
			name: "keys come in the order of the files",
			files: [][]entry{
				{{"desk", "reader", "b"}},
				{{"laptop", "reader", "a"}},
			},
			read: "b a",
		},
		{
			name:  "empty registries admit nobody",
			files: [][]entry{{}, {}},
		},
		{
			name: "no registry admits nobody",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var regs []*Registry
			for _, entries := range tt.files {
				regs = append(regs, build(t, entries))
			}
			read, write := MergeKeys(regs...)
			if got := names(read); got != tt.read {
				t.Errorf("read keys %q, want %q", got, tt.read)
			}
			if got := names(write); got != tt.write {
				t.Errorf("write keys %q, want %q", got, tt.write)
			}
			if tt.read == "" && read != nil || tt.write == "" && write != nil {
				t.Errorf("MergeKeys = %v, %v: want nil for no key", read, write)
			}
		})
	}
}
