package publish

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// markerCache is a cache's write role as far as publish and update use it:
// markers (GET, PUT) and locks (PUT, DELETE).
type markerCache struct {
	mu       sync.Mutex
	markers  map[string]string
	locks    map[string]bool
	unlocked bool // a marker PUT came without a lock
}

func newMarkerCache(t *testing.T) (*markerCache, string) {
	c := &markerCache{markers: map[string]string{}, locks: map[string]bool{}}
	srv := httptest.NewServer(c)
	t.Cleanup(srv.Close)
	return c, srv.URL
}

func (c *markerCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	rest, ok := strings.CutPrefix(r.URL.Path, "/gcroots/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	body, _ := io.ReadAll(r.Body)
	if lock, ok := strings.CutPrefix(rest, ".lock/"); ok {
		switch r.Method {
		case http.MethodPut:
			c.locks[lock] = true
		case http.MethodDelete:
			delete(c.locks, lock)
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	switch r.Method {
	case http.MethodGet:
		m, ok := c.markers[rest]
		if !ok {
			http.NotFound(w, r)
			return
		}
		io.WriteString(w, m)
	case http.MethodPut:
		if len(c.locks) == 0 {
			c.unlocked = true
		}
		c.markers[rest] = string(body)
		w.WriteHeader(http.StatusCreated)
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

func (c *markerCache) marker(name string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, ok := c.markers[name]
	return m, ok
}

func (c *markerCache) set(name, content string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.markers[name] = content
}

// fakeNix puts scripts named nix, nix-store and nix-env first on PATH; each
// appends its arguments to a log and exits with the status in the file
// <name>.status (0 when missing). nix-env --profile P --set S makes the
// profile a link to S, as the real one does.
func fakeNix(t *testing.T) (dir string, calls func() string) {
	dir = t.TempDir()
	for _, name := range []string{"nix", "nix-store", "nix-env"} {
		script := "#!/bin/sh\necho \"" + name + " $*\" >> " + dir + "/calls\n" +
			"status=$(cat " + dir + "/" + name + ".status 2>/dev/null || echo 0)\n" +
			"[ \"$status\" = 0 ] || exit $status\n"
		if name == "nix-env" {
			script += "ln -sfn \"$4\" \"$2\"\n"
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	return dir, func() string {
		b, _ := os.ReadFile(filepath.Join(dir, "calls"))
		return string(b)
	}
}

func failNix(t *testing.T, dir, name string) {
	if err := os.WriteFile(filepath.Join(dir, name+".status"), []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPublish(t *testing.T) {
	key := newKey(t, "fleet-1")
	t.Run("an unsigned marker names the paths", func(t *testing.T) {
		_, calls := fakeNix(t)
		c, url := newMarkerCache(t)
		_, err := Publish(context.Background(), Options{Cache: url, Name: "web1", Paths: []string{sysA}, Nix: Nix{Output: io.Discard}, Log: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		if m, _ := c.marker("web1"); m != sysA+"\n" {
			t.Errorf("marker %q", m)
		}
		if want := "nix --extra-experimental-features nix-command copy --to " + url + "?compression=zstd " + sysA; !strings.Contains(calls(), want) {
			t.Errorf("nix calls:\n%s\nwant %s", calls(), want)
		}
		if len(c.locks) != 0 || c.unlocked {
			t.Errorf("locks left %v, marker written without a lock: %v", c.locks, c.unlocked)
		}
	})
	t.Run("a signed marker's generation only grows", func(t *testing.T) {
		fakeNix(t)
		c, url := newMarkerCache(t)
		// A marker from a clock far ahead.
		c.set("web1", string(FormatMarker("web1", 1<<62, []string{sysB}, &key)))
		p, err := Publish(context.Background(), Options{Cache: url, Name: "web1", Paths: []string{sysA}, SigningKey: &key,
			CacheKeyFile: "/etc/nix/key.sec", Nix: Nix{Output: io.Discard}, Log: quiet()})
		if err != nil {
			t.Fatal(err)
		}
		data, _ := c.marker("web1")
		m, err := ParseMarker([]byte(data), "/nix/store")
		if err != nil {
			t.Fatal(err)
		}
		st, err := m.Verify("web1", key.PublicKey())
		if err != nil || st.Generation != 1<<62+1 || p.Generation != st.Generation || m.Paths[0] != sysA {
			t.Errorf("marker %q: %+v %v; published generation %d", data, st, err, p.Generation)
		}
	})
	t.Run("a failed nix copy writes no marker", func(t *testing.T) {
		dir, _ := fakeNix(t)
		failNix(t, dir, "nix")
		c, url := newMarkerCache(t)
		c.set("web1", sysB+"\n")
		_, err := Publish(context.Background(), Options{Cache: url, Name: "web1", Paths: []string{sysA}, Nix: Nix{Output: io.Discard}, Log: quiet()})
		if err == nil || !strings.Contains(err.Error(), "the marker was not written") {
			t.Errorf("error %v", err)
		}
		if m, _ := c.marker("web1"); m != sysB+"\n" {
			t.Errorf("marker changed to %q", m)
		}
		if len(c.locks) != 0 {
			t.Errorf("locks left: %v", c.locks)
		}
	})
}

func TestUpdate(t *testing.T) {
	key, other := newKey(t, "fleet-1"), newKey(t, "evil-1")
	pub := key.PublicKey()

	// A chroot store holding sysA and sysB, each with an activation script
	// that records its argument and fails when told to.
	root := t.TempDir()
	activated := filepath.Join(t.TempDir(), "activated")
	for _, p := range []string{sysA, sysB} {
		bin := filepath.Join(root, p, "bin")
		os.MkdirAll(bin, 0o755)
		script := "#!/bin/sh\necho \"" + p + " $1\" >> " + activated + "\n[ ! -e " + activated + ".fail ] || exit 3\n"
		if err := os.WriteFile(filepath.Join(bin, "switch-to-configuration"), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	type step struct {
		marker   string
		key      bool // with the publisher key
		failNix  string
		failAct  bool
		wantErr  error  // errors.Is; or
		wantText string // in the error
		want     string // the profile's target afterwards
		changed  bool
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{name: "signed markers apply, once", steps: []step{
			{marker: string(FormatMarker("web1", 10, []string{sysA}, &key)), key: true, want: sysA, changed: true},
			{marker: string(FormatMarker("web1", 10, []string{sysA}, &key)), key: true, want: sysA},
			{marker: string(FormatMarker("web1", 11, []string{sysB}, &key)), key: true, want: sysB, changed: true},
		}},
		{name: "a replayed older generation is a rollback", steps: []step{
			{marker: string(FormatMarker("web1", 10, []string{sysA}, &key)), key: true, want: sysA, changed: true},
			{marker: string(FormatMarker("web1", 11, []string{sysB}, &key)), key: true, want: sysB, changed: true},
			{marker: string(FormatMarker("web1", 10, []string{sysA}, &key)), key: true, wantErr: ErrRollback, want: sysB},
		}},
		{name: "another signer is refused", steps: []step{
			{marker: string(FormatMarker("web1", 10, []string{sysA}, &other)), key: true, wantErr: ErrBadSignature},
		}},
		{name: "unsigned is refused with a publisher key", steps: []step{
			{marker: sysA + "\n", key: true, wantErr: ErrUnsigned},
		}},
		{name: "unsigned is taken when allowed", steps: []step{
			{marker: sysA + "\n", want: sysA, changed: true},
		}},
		{name: "another marker's statement is refused", steps: []step{
			{marker: string(FormatMarker("web2", 10, []string{sysA}, &key)), key: true, wantErr: ErrMismatch},
		}},
		{name: "a failed realise leaves the profile", steps: []step{
			{marker: sysA + "\n", want: sysA, changed: true},
			{marker: sysB + "\n", failNix: "nix-store", wantText: "the profile is unchanged", want: sysA},
		}},
		{name: "a failed activation puts the profile back", steps: []step{
			{marker: sysA + "\n", want: sysA, changed: true},
			{marker: sysB + "\n", failAct: true, wantText: "points at", want: sysA},
			{marker: sysB + "\n", want: sysB, changed: true},
		}},
		{name: "no marker", steps: []step{{wantErr: ErrNoMarker}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, url := newMarkerCache(t)
			stateDir, profile := t.TempDir(), filepath.Join(t.TempDir(), "profiles", "system")
			os.Remove(activated)
			for i, s := range tc.steps {
				dir, _ := fakeNix(t)
				if s.failNix != "" {
					failNix(t, dir, s.failNix)
				}
				os.Remove(activated + ".fail")
				if s.failAct {
					os.WriteFile(activated+".fail", nil, 0o644)
				}
				if s.marker != "" {
					c.set("web1", s.marker)
				}
				o := UpdateOptions{Cache: url, Action: "switch", Marker: "web1", Profile: profile, StateDir: stateDir,
					Nix: Nix{Store: root, Output: io.Discard}, Log: quiet(), AllowUnsigned: !s.key}
				if s.key {
					o.PublisherKey = &pub
				}
				before, _ := os.ReadFile(activated)
				res, err := Update(context.Background(), o)
				switch {
				case s.wantErr != nil && !errors.Is(err, s.wantErr):
					t.Fatalf("step %d: error %v, want %v", i, err, s.wantErr)
				case s.wantText != "" && (err == nil || !strings.Contains(err.Error(), s.wantText)):
					t.Fatalf("step %d: error %v, want one saying %q", i, err, s.wantText)
				case s.wantErr == nil && s.wantText == "" && err != nil:
					t.Fatalf("step %d: %v", i, err)
				}
				if got := profileTarget(profile, "/nix/store"); got != s.want {
					t.Errorf("step %d: profile names %q, want %q", i, got, s.want)
				}
				if err == nil && res.Changed != s.changed {
					t.Errorf("step %d: changed = %v, want %v", i, res.Changed, s.changed)
				}
				after, _ := os.ReadFile(activated)
				ran := strings.TrimPrefix(string(after), string(before))
				if s.changed && ran != s.want+" switch\n" {
					t.Errorf("step %d: activations %q, want one of %s", i, ran, s.want)
				}
				if !s.changed && !s.failAct && ran != "" {
					t.Errorf("step %d: activation ran: %q", i, ran)
				}
			}
		})
	}
}
