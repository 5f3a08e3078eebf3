package publish

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadNetrc(t *testing.T) {
	for _, tt := range []struct {
		name, netrc, host    string
		login, password, err string
	}{
		{"one line", "machine cache.lan login ci password tok\n", "cache.lan", "ci", "tok", ""},
		{"the host's entry, not the others'",
			"machine a.lan login a password pa\nmachine cache.lan\n  login ci\n  password tok\nmachine b.lan login b password pb", "cache.lan", "ci", "tok", ""},
		{"default after the machines", "machine a.lan login a password pa\ndefault login d password pd\n", "cache.lan", "d", "pd", ""},
		{"a machine before the default wins", "default login d password pd\nmachine cache.lan login ci password tok\n", "cache.lan", "ci", "tok", ""},
		{"the first entry of a machine wins", "machine cache.lan login one password p1\nmachine cache.lan login two password p2\n", "cache.lan", "one", "p1", ""},
		{"comments and account", "# the CI's token\nmachine cache.lan login ci # a comment\n account x password tok\n", "cache.lan", "ci", "tok", ""},
		{"a macdef skipped to its empty line",
			"macdef init\ncd /pub\nput password x\n\nmachine cache.lan login ci password tok\n", "cache.lan", "ci", "tok", ""},
		{"quoted words", `machine cache.lan login "c i" password "a \"b\" c"`, "cache.lan", "c i", `a "b" c`, ""},
		{"a password and no login", "machine cache.lan password tok", "cache.lan", "", "tok", ""},
		{"no entry", "machine a.lan login a password pa\n", "cache.lan", "", "", "no entry for machine cache.lan, and no default"},
		{"no password", "machine cache.lan login ci\n", "cache.lan", "", "", "the entry for cache.lan has no password"},
		{"a word it does not know", "machine cache.lan\nlogin ci\ntoken tok\n", "cache.lan", "", "", "line 3: a word that is not a keyword"},
		{"a password with no keyword", "machine cache.lan login ci s3cret\n", "cache.lan", "", "", "line 1: a word that is not a keyword"},
		{"a word with no value", "machine cache.lan login ci password", "cache.lan", "", "", `line 1: "password" needs a value`},
		{"a login before any machine", "login ci password tok\n", "cache.lan", "", "", `line 1: "login" before any machine`},
		{"an unclosed quote", "machine cache.lan\npassword \"tok\n", "cache.lan", "", "", "line 2: a quoted word runs past the end of its line"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "netrc")
			if err := os.WriteFile(file, []byte(tt.netrc), 0o600); err != nil {
				t.Fatal(err)
			}
			n, err := ReadNetrc(file, tt.host)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) || !strings.Contains(err.Error(), file) {
					t.Fatalf("ReadNetrc: %v, want an error naming %s and saying %q", err, file, tt.err)
				}
				if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "tok\"") {
					t.Errorf("the error shows a password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if n.login != tt.login || n.password != tt.password || n.File != file || n.Host != tt.host {
				t.Errorf("ReadNetrc = %q %q (%v), want login %q password %q", n.login, n.password, n, tt.login, tt.password)
			}
			if s := fmt.Sprintf("%v %+v", n, n); strings.Contains(s, tt.password) {
				t.Errorf("the entry prints its password: %s", s)
			}
		})
	}
}

// TestMarkerURLSendsTheNetrcEntry: a marker's requests carry the entry's
// basic auth, and a marker read from another host gets none.
func TestMarkerURLSendsTheNetrcEntry(t *testing.T) {
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		user, pass, _ := r.BasicAuth()
		got = append(got, r.Method+" "+r.URL.Path+" "+user+":"+pass)
		if r.Method == http.MethodPut {
			w.WriteHeader(http.StatusCreated)
		}
	}))
	defer srv.Close()
	file := filepath.Join(t.TempDir(), "netrc")
	if err := os.WriteFile(file, []byte("machine 127.0.0.1 login ci password tok\nmachine other.lan login o password po\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := ParseMarkerURL(srv.URL+"/gcroots/web1", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.UseNetrc(file); err != nil {
		t.Fatal(err)
	}
	if err := m.Put(t.Context(), "/nix/store/00000000000000000000000000000000-x"); err != nil {
		t.Fatal(err)
	}
	// The same client, asked for another host (as a redirect would):
	// "localhost" is not the entry's machine.
	other := strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)
	if _, err := getMarker(t.Context(), m.client, other, "web1"); err != nil {
		t.Fatal(err)
	}
	want := []string{"PUT /gcroots/web1 ci:tok", "GET /gcroots/web1 :"}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("requests:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	local, err := ParseMarkerURL(filepath.Join(dir, "gcroots", "web1"), "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := local.UseNetrc(file); err == nil {
		t.Error("UseNetrc on a local cache directory succeeded")
	}
}
