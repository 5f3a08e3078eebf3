package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestApplyConfigFile(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		args    []string
		want    map[string]string // flag -> value after
		wantErr []string          // substrings of the error
	}{
		{
			name: "keys set unset flags, dashes or underscores",
			file: "cache-dir = \"/srv/cache\"\npriority = 40\nwant_mass_query = false\n",
			want: map[string]string{"cache-dir": "/srv/cache", "priority": "40", "want-mass-query": "false"},
		},
		{
			name: "flags win over the file",
			file: "cache-dir = \"/srv/cache\"\npriority = 40\n",
			args: []string{"--priority", "10"},
			want: map[string]string{"cache-dir": "/srv/cache", "priority": "10"},
		},
		{
			name: "arrays fill repeatable flags",
			file: "trusted-writer-key = [\"a:x\", \"b:y\"]\n",
			want: map[string]string{"trusted-writer-key": "a:x,b:y"},
		},
		{
			name:    "unknown key names file and line",
			file:    "cache-dir = \"/srv\"\n\ncache-size = 3\n",
			wantErr: []string{"kiss-onion.toml:3", `unknown key "cache-size"`},
		},
		{
			name:    "bad value names file, line and key",
			file:    "# settings\npriority = \"high\"\n",
			wantErr: []string{"kiss-onion.toml:2", "priority"},
		},
		{
			name:    "syntax error names file and line",
			file:    "cache-dir = \"/srv\"\npriority = \n",
			wantErr: []string{"kiss-onion.toml:2"},
		},
		{
			name:    "every problem is reported",
			file:    "a = 1\nb = 2\n",
			wantErr: []string{"kiss-onion.toml:1", "kiss-onion.toml:2"},
		},
		{
			name:    "tables are not settings",
			file:    "[tor]\nmode = \"off\"\n",
			wantErr: []string{"unknown key \"tor\""},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kiss-onion.toml")
			os.WriteFile(path, []byte(tt.file), 0o644)
			fs := newFlagSet("serve", "")
			fs.String("cache-dir", "", "")
			fs.Int("priority", 30, "")
			fs.Bool("want-mass-query", true, "")
			var keys stringList
			fs.Var(&keys, "trusted-writer-key", "")
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err := applyConfigFile(fs, path)
			if tt.wantErr != nil {
				if err == nil {
					t.Fatal("no error")
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), strings.Replace(w, "kiss-onion.toml", path, 1)) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for name, want := range tt.want {
				if got := fs.Lookup(name).Value.String(); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
		})
	}
}

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "4K": 4 << 10, "512M": 512 << 20, "8G": 8 << 30, "8GiB": 8 << 30, "1t": 1 << 40} {
		if got, err := parseByteSize(in); err != nil || got != want {
			t.Errorf("parseByteSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "0", "8X", "G", "99999999999T"} {
		if _, err := parseByteSize(in); err == nil {
			t.Errorf("parseByteSize(%q) accepted", in)
		}
	}
}
