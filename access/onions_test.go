package access_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/access"
	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
)

// poll is the tests' Config.Poll; quiet is how long a test waits to see
// that nothing more is published: many polls.
const (
	poll  = 5 * time.Millisecond
	quiet = 20 * poll
)

// world is what a test runs against: the two onions, their registry files
// in a temporary directory, keys known by name and a recording publisher.
type world struct {
	t                       *testing.T
	read, write             *onion.Identity
	registry, clients       string // the state directory's registry and a --clients-file
	keys                    map[string]clientauth.PublicKey
	calls                   chan string
	publicRead              bool
	log                     *logrus.Entry
	hook                    *recordHook
	readTarget, writeTarget string

	mu        sync.Mutex
	published []string // what Config.Published was told: "<onion> <up>"
}

func newWorld(t *testing.T, publicRead bool) *world {
	t.Helper()
	dir := t.TempDir()
	w := &world{
		t:           t,
		registry:    filepath.Join(dir, "state", clientauth.RegistryFileName),
		clients:     filepath.Join(dir, "clients-file.toml"),
		keys:        map[string]clientauth.PublicKey{},
		calls:       make(chan string, 100),
		publicRead:  publicRead,
		readTarget:  "unix:" + filepath.Join(dir, "read.sock"),
		writeTarget: "unix:" + filepath.Join(dir, "write.sock"),
	}
	var err error
	if w.read, err = onion.LoadOrCreateIdentity(filepath.Join(dir, "read.key")); err != nil {
		t.Fatal(err)
	}
	if w.write, err = onion.LoadOrCreateIdentity(filepath.Join(dir, "write.key")); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b", "w"} {
		k, err := clientauth.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		w.keys[name] = k.PublicKey()
	}
	logger := logrus.New()
	logger.SetOutput(io.Discard)
	hook := &recordHook{}
	logger.AddHook(hook)
	w.log, w.hook = logrus.NewEntry(logger), hook
	return w
}

// onions returns Onions over w's onions and files, publishing through w.
func (w *world) onions() *access.Onions {
	return access.New(access.Config{
		Read:       access.Onion{Identity: w.read, Target: w.readTarget},
		Write:      access.Onion{Identity: w.write, Target: w.writeTarget},
		Registries: []string{w.registry, w.clients},
		PublicRead: w.publicRead,
		Publisher:  w,
		Poll:       poll,
		Log:        w.log,
		Published: func(onion string, up bool) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.published = append(w.published, fmt.Sprint(onion, " ", up))
		},
	})
}

// start loads the registries, applies their keys, and runs Watch until
// the test ends.
func (w *world) start(reload <-chan struct{}) {
	w.t.Helper()
	w.watch(w.apply(), reload)
}

// apply returns Onions that applied the registries' keys.
func (w *world) apply() *access.Onions {
	w.t.Helper()
	o := w.onions()
	k, err := access.Load(w.registry, w.clients)
	if err != nil {
		w.t.Fatal(err)
	}
	if err := o.Apply(context.Background(), k); err != nil {
		w.t.Fatal(err)
	}
	return o
}

// watch runs o.Watch until the test ends.
func (w *world) watch(o *access.Onions, reload <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		o.Watch(ctx, reload)
	}()
	w.t.Cleanup(func() {
		cancel()
		<-done
	})
}

// Publish records "publish <onion> <key names>", and fails the test when
// an onion would be published open but for --public-read or at the wrong
// target.
func (w *world) Publish(_ context.Context, s onion.Service) error {
	name, target := "read", w.readTarget
	if s.Identity == w.write {
		name, target = "write", w.writeTarget
	}
	if s.Name != name || s.Target != target {
		w.t.Errorf("published %q at %s, want %q at %s", s.Name, s.Target, name, target)
	}
	if len(s.ClientKeys) == 0 {
		if name != "read" || !w.publicRead {
			w.t.Errorf("the %s onion published without client authorization", name)
		}
		w.calls <- "publish " + name + " open"
		return nil
	}
	w.calls <- "publish " + name + " " + w.names(s.ClientKeys)
	return nil
}

// Unpublish records "unpublish <onion>".
func (w *world) Unpublish(_ context.Context, id *onion.Identity) error {
	name := "read"
	if id == w.write {
		name = "write"
	}
	w.calls <- "unpublish " + name
	return nil
}

// names returns the names of keys, in order.
func (w *world) names(keys [][32]byte) string {
	var out []string
	for _, k := range keys {
		for name, pub := range w.keys {
			if pub.Bytes() == k {
				out = append(out, name)
			}
		}
	}
	return strings.Join(out, " ")
}

// expect waits for these calls, in order, then for quiet: no other call.
func (w *world) expect(when string, want ...string) {
	w.t.Helper()
	var got []string
	timeout := time.After(5 * time.Second)
	for len(got) < len(want) {
		select {
		case c := <-w.calls:
			got = append(got, c)
		case <-timeout:
			w.t.Fatalf("%s: publisher got %q, want %q", when, got, want)
		}
	}
	select {
	case c := <-w.calls:
		got = append(got, c)
	case <-time.After(quiet):
	}
	if !slices.Equal(got, want) {
		w.t.Fatalf("%s: publisher got %q, want %q", when, got, want)
	}
}

// path returns the file a step edits: "registry" or "clients".
func (w *world) path(file string) string {
	if file == "clients" {
		return w.clients
	}
	return w.registry
}

// edit changes a registry file through clientauth, as `kiss-onion keys`
// does: edits are applied in one update; no edit removes the file.
type edit func(w *world, r *clientauth.Registry) error

func add(name, role, key string) edit {
	return func(w *world, r *clientauth.Registry) error {
		_, err := r.Add(name, clientauth.Role(role), w.keys[key])
		return err
	}
}

func revoke(name string) edit {
	return func(w *world, r *clientauth.Registry) error { return r.Revoke(name) }
}

func (w *world) edit(file string, edits ...edit) {
	w.t.Helper()
	if len(edits) == 0 {
		if err := os.Remove(w.path(file)); err != nil {
			w.t.Fatal(err)
		}
		return
	}
	err := clientauth.UpdateRegistry(w.path(file), func(r *clientauth.Registry) error {
		for _, e := range edits {
			if err := e(w, r); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		w.t.Fatal(err)
	}
}

// change is one edit of a file, and what it must publish.
type change struct {
	file  string // "registry" or "clients"
	edits []edit // none removes the file
	want  []string
}

func TestOnionsFollowTheRegistries(t *testing.T) {
	tests := []struct {
		name       string
		publicRead bool
		registry   []edit
		clients    []edit
		start      []string // what the first Apply publishes
		changes    []change
	}{
		{
			name:     "a key revoked in the registry leaves the read onion",
			registry: []edit{add("laptop", "reader", "a"), add("ci", "writer", "w")},
			clients:  []edit{add("desk", "reader", "b")},
			start:    []string{"publish read a w b", "publish write w"},
			changes: []change{
				{file: "registry", edits: []edit{revoke("laptop")}, want: []string{"publish read w b"}},
			},
		},
		{
			name:     "a key revoked in the clients file leaves the read onion",
			registry: []edit{add("laptop", "reader", "a"), add("ci", "writer", "w")},
			clients:  []edit{add("desk", "reader", "b")},
			start:    []string{"publish read a w b", "publish write w"},
			changes: []change{
				{file: "clients", edits: []edit{revoke("desk")}, want: []string{"publish read a w"}},
			},
		},
		{
			name:     "a key revoked in the clients file is out though the registry admits it",
			registry: []edit{add("laptop", "reader", "a"), add("ci", "writer", "w")},
			clients:  []edit{add("desk", "reader", "b")},
			start:    []string{"publish read a w b", "publish write w"},
			changes: []change{
				{file: "clients", edits: []edit{add("stolen", "reader", "a"), revoke("stolen")}, want: []string{"publish read w b"}},
			},
		},
		{
			name:     "the last writer revoked takes the write onion down",
			registry: []edit{add("laptop", "reader", "a"), add("ci", "writer", "w")},
			start:    []string{"publish read a w", "publish write w"},
			changes: []change{
				{file: "registry", edits: []edit{revoke("ci")}, want: []string{"publish read a", "unpublish write"}},
			},
		},
		{
			name:     "the last key revoked takes the read onion down, and a new key brings it back",
			registry: []edit{add("laptop", "reader", "a")},
			start:    []string{"publish read a"},
			changes: []change{
				{file: "registry", edits: []edit{revoke("laptop")}, want: []string{"unpublish read"}},
				{file: "registry", edits: []edit{add("desk", "reader", "b")}, want: []string{"publish read b"}},
			},
		},
		{
			name:    "a key taken out of the clients file and put back publishes the onion again",
			clients: []edit{add("desk", "reader", "b")},
			start:   []string{"publish read b"},
			changes: []change{
				{file: "clients", want: []string{"unpublish read"}},
				{file: "clients", edits: []edit{add("desk", "reader", "b")}, want: []string{"publish read b"}},
			},
		},
		{
			name:     "a writer added publishes the write onion",
			registry: []edit{add("laptop", "reader", "a")},
			start:    []string{"publish read a"},
			changes: []change{
				{file: "registry", edits: []edit{add("ci", "writer", "w")}, want: []string{"publish read a w", "publish write w"}},
			},
		},
		{
			name:     "the same keys in another file publish nothing",
			registry: []edit{add("laptop", "reader", "a")},
			start:    []string{"publish read a"},
			changes: []change{
				{file: "clients", edits: []edit{add("laptop", "reader", "a")}},
			},
		},
		{
			name:       "with public read the read onion stays open, the write onion needs a key",
			publicRead: true,
			start:      []string{"publish read open"},
			changes: []change{
				{file: "registry", edits: []edit{add("laptop", "reader", "a")}},
				{file: "registry", edits: []edit{add("ci", "writer", "w")}, want: []string{"publish write w"}},
				{file: "registry", edits: []edit{revoke("ci")}, want: []string{"unpublish write"}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, tt.publicRead)
			if len(tt.registry) > 0 {
				w.edit("registry", tt.registry...)
			}
			if len(tt.clients) > 0 {
				w.edit("clients", tt.clients...)
			}
			w.start(nil)
			w.expect("start", tt.start...)
			for i, c := range tt.changes {
				w.edit(c.file, c.edits...)
				w.expect(fmt.Sprintf("change %d, of the %s file", i+1, c.file), c.want...)
			}
		})
	}
}

// TestReloadRereadsAFileThePollMisses rewrites the registry in place
// with the same size and modification time, so that its stamp does not
// change: the poll does not see it, a reload (SIGHUP) does. The file is
// rewritten before Watch starts, lest a poll fall between the write and
// the restored time.
func TestReloadRereadsAFileThePollMisses(t *testing.T) {
	w := newWorld(t, false)
	w.edit("registry", add("laptop", "reader", "a"))
	o := w.apply()
	w.expect("start", "publish read a")

	before, err := os.Stat(w.registry)
	if err != nil {
		t.Fatal(err)
	}
	stamp, _ := clientauth.StatRegistry(w.registry)
	data, _ := os.ReadFile(w.registry)
	data = bytes.Replace(data, []byte(w.keys["a"].String()), []byte(w.keys["b"].String()), 1)
	if err := os.WriteFile(w.registry, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(w.registry, time.Time{}, before.ModTime()); err != nil {
		t.Fatal(err)
	}
	if now, _ := clientauth.StatRegistry(w.registry); now != stamp {
		t.Fatal("rewriting the registry changed its stamp: the test proves nothing")
	}
	reload := make(chan struct{})
	w.watch(o, reload)
	w.expect("polls of the registry rewritten with the same stamp")

	reload <- struct{}{}
	w.expect("reload", "publish read b")
}

func TestRegistryThatDoesNotParseKeepsWhatIsPublished(t *testing.T) {
	w := newWorld(t, false)
	w.edit("registry", add("laptop", "reader", "a"))
	w.start(nil)
	w.expect("start", "publish read a")

	// A half-edited registry, saved as an editor does: replaced at once,
	// so that the poll sees one version.
	half := filepath.Join(t.TempDir(), "half.toml")
	if err := os.WriteFile(half, []byte("version = 1\n\n[[client]]\nname = 'desk'\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(half, w.registry); err != nil {
		t.Fatal(err)
	}
	w.expect("a half-edited registry")
	var logged []*logrus.Entry
	for _, e := range w.hook.AllEntries() {
		if e.Message == "client keys not reloaded" {
			logged = append(logged, e)
		}
	}
	if len(logged) != 1 {
		t.Fatalf("%q logged %d times over %d polls, want once", "client keys not reloaded", len(logged), quiet/poll)
	}
	if err, _ := logged[0].Data[logrus.ErrorKey].(error); err == nil || logged[0].Level != logrus.ErrorLevel {
		t.Errorf("logged %v at %v, want the parse error at level error", logged[0].Data, logged[0].Level)
	}

	// The file fixed.
	fixed := filepath.Join(t.TempDir(), clientauth.RegistryFileName)
	err := clientauth.UpdateRegistry(fixed, func(r *clientauth.Registry) error {
		if _, err := r.Add("laptop", clientauth.RoleReader, w.keys["a"]); err != nil {
			return err
		}
		_, err := r.Add("desk", clientauth.RoleReader, w.keys["b"])
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(fixed, w.registry); err != nil {
		t.Fatal(err)
	}
	w.expect("the registry fixed", "publish read a b")
}

func TestApplyLogsEachOnion(t *testing.T) {
	tests := []struct {
		name       string
		publicRead bool
		before     []string // keys of the read and the write onion applied first
		keys       []string // then these
		want       []string // "<level> <message> <onion> <clients>"
		published  []string // what Config.Published is told
	}{
		{
			name:      "both onions published",
			keys:      []string{"a w", "w"},
			want:      []string{"info onion published read 2", "info onion published write 1"},
			published: []string{"read true", "write true"},
		},
		{
			name:      "no writer: the write onion is not published",
			keys:      []string{"a", ""},
			want:      []string{"info onion published read 1", "warning no client keys: onion not published write 0"},
			published: []string{"read true", "write false"},
		},
		{
			name:      "the last writer gone: the write onion is taken down",
			before:    []string{"a w", "w"},
			keys:      []string{"a", ""},
			want:      []string{"info onion published read 1", "warning no client keys left: onion taken down write 0"},
			published: []string{"read true", "write false"},
		},
		{
			name:       "public read: the read onion is published open",
			publicRead: true,
			keys:       []string{"a", "w"},
			want:       []string{"warning onion published without client authorization (--public-read) read 0", "info onion published write 1"},
			published:  []string{"read true", "write true"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t, tt.publicRead)
			keys := func(names []string) access.Keys {
				var k access.Keys
				for i, list := range []*[][32]byte{&k.Read, &k.Write} {
					for _, name := range strings.Fields(names[i]) {
						*list = append(*list, w.keys[name].Bytes())
					}
				}
				return k
			}
			o := w.onions()
			if tt.before != nil {
				if err := o.Apply(context.Background(), keys(tt.before)); err != nil {
					t.Fatal(err)
				}
				w.hook.Reset()
				w.published = nil
			}
			if err := o.Apply(context.Background(), keys(tt.keys)); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range w.hook.AllEntries() {
				addr := map[any]string{"read": w.read.Address(), "write": w.write.Address()}[e.Data["onion"]]
				if e.Data["address"] != addr {
					t.Errorf("%q logged with address %v, want %s", e.Message, e.Data["address"], addr)
				}
				got = append(got, fmt.Sprintf("%s %s %v %v", e.Level, e.Message, e.Data["onion"], e.Data["clients"]))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("logged\n%q\nwant\n%q", got, tt.want)
			}
			if !slices.Equal(w.published, tt.published) {
				t.Errorf("Published was told %q, want %q", w.published, tt.published)
			}
		})
	}
}

func TestLoadWithoutClientsAdmitsNobody(t *testing.T) {
	dir := t.TempDir()
	k, err := access.Load(filepath.Join(dir, clientauth.RegistryFileName), filepath.Join(dir, "clients-file.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(k.Read) != 0 || len(k.Write) != 0 {
		t.Errorf("Load of missing registries = %v, %v, want no key", k.Read, k.Write)
	}
}

// recordHook keeps every entry logged, for tests to read back.
type recordHook struct {
	mu      sync.Mutex
	entries []*logrus.Entry
}

func (h *recordHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h *recordHook) Fire(e *logrus.Entry) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := *e
	h.entries = append(h.entries, &c)
	return nil
}

// AllEntries returns what was logged so far.
func (h *recordHook) AllEntries() []*logrus.Entry {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]*logrus.Entry(nil), h.entries...)
}

// Reset forgets what was logged.
func (h *recordHook) Reset() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.entries = nil
}
