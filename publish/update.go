package publish

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/internal/atomicfile"
	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// UpdateOptions configure Update.
type UpdateOptions struct {
	// Cache is the URL of the cache's read role: a Gateway's URL, or a
	// local listener.
	Cache string
	// Action is switch-to-configuration's argument: "switch" or "boot".
	Action string
	// Marker is the marker's name under gcroots/.
	Marker string
	// Profile is the system profile; /nix/var/nix/profiles/system when empty.
	Profile string
	// PublisherKey, when set, must have signed the marker, and the
	// marker's generation must not be older than the last one applied.
	// Without it AllowUnsigned must be set, and any marker is taken.
	PublisherKey  *nixcache.PublicKey
	AllowUnsigned bool
	// StateDir keeps what was applied last (required).
	StateDir string
	// StoreDir is the Nix store directory; /nix/store when empty.
	StoreDir string
	// Nix runs nix-store and nix-env.
	Nix Nix
	// NetrcFile is as in Options: its entry for the cache's host is sent
	// with the marker's read and nix's fetches.
	NetrcFile string
	// Log receives every step; logrus's standard logger when nil.
	Log *logrus.Entry
}

// Updated is what Update did.
type Updated struct {
	Path       string // the system the marker names
	Generation uint64 // the marker's signed generation; 0 when unsigned
	Changed    bool   // false when the profile already named Path
}

// Applied is what the state directory keeps of the last system Update
// applied from a marker.
type Applied struct {
	Marker     string    `json:"marker"`
	Path       string    `json:"path"`
	Generation uint64    `json:"generation"`
	Publisher  string    `json:"publisher,omitempty"` // the key's name
	At         time.Time `json:"applied_at"`
}

// Update brings the system profile to what the marker names: it reads the
// marker from the cache and checks it (signature and generation, with a
// publisher key), does nothing more when the profile names that system
// already, else realises it from the cache (`nix-store --realise` with the
// cache as the substituter), sets the profile (`nix-env --profile --set`),
// runs `bin/switch-to-configuration ACTION` and records the generation.
// When a step fails, the profile is left as it was (put back if the
// activation failed) and nothing is recorded.
func Update(ctx context.Context, o UpdateOptions) (Updated, error) {
	u, err := newUpdater(o)
	if err != nil {
		return Updated{}, err
	}
	if err := os.MkdirAll(u.o.StateDir, 0o700); err != nil {
		return Updated{}, fmt.Errorf("update: state directory: %w", err)
	}
	unlock, err := lockState(u.o.StateDir)
	if err != nil {
		return Updated{}, err
	}
	defer unlock()
	if u.last, err = readApplied(u.statePath); err != nil {
		return Updated{}, fmt.Errorf("update: %w", err)
	}

	res, err := u.readMarker(ctx)
	if err != nil {
		return res, err
	}
	old, err := os.Readlink(u.o.Profile)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("update: profile: %w", err)
	}
	if cur := profileTarget(u.o.Profile, u.o.StoreDir); cur == res.Path {
		u.log.WithFields(logrus.Fields{"profile": u.o.Profile, "path": res.Path}).
			Info("the profile names the system already: nothing to do")
		return res, u.record(res)
	}
	activate, err := u.realise(ctx, res.Path)
	if err != nil {
		return res, err
	}
	if err := u.setProfile(ctx, res.Path); err != nil {
		return res, err
	}
	if err := u.activate(ctx, activate, old); err != nil {
		return res, err
	}
	res.Changed = true
	if err := u.record(res); err != nil {
		return res, fmt.Errorf("update: %s is active, but recording it failed: %w", res.Path, err)
	}
	u.log.WithFields(logrus.Fields{"action": u.o.Action, "marker": u.o.Marker, "profile": u.o.Profile, "path": res.Path}).
		Info("update done")
	return res, nil
}

// updater is one run of Update.
type updater struct {
	o         UpdateOptions // with the defaults filled in
	log       *logrus.Entry
	cache     string       // o.Cache without a final slash
	client    *http.Client // reaches the cache
	statePath string       // where what was applied from the marker is recorded
	last      *Applied     // what was, when the state is locked; nil: nothing yet
}

// newUpdater fills in the defaults of o and checks it, before anything is
// touched.
func newUpdater(o UpdateOptions) (*updater, error) {
	log := o.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.StoreDir == "" {
		o.StoreDir = nixcache.DefaultStoreDir
	}
	if o.Profile == "" {
		o.Profile = "/nix/var/nix/profiles/system"
	}
	if o.Action != "switch" && o.Action != "boot" {
		return nil, fmt.Errorf("update: action %q: want switch or boot", o.Action)
	}
	if o.PublisherKey == nil && !o.AllowUnsigned {
		return nil, errors.New("update: no publisher key, and unsigned markers are not allowed")
	}
	if o.StateDir == "" {
		return nil, errors.New("update: no state directory")
	}
	cache := strings.TrimSuffix(o.Cache, "/")
	m, err := ParseMarkerURL(cache+"/gcroots/"+o.Marker, "")
	if err != nil {
		return nil, fmt.Errorf("update: %w", err)
	}
	if err := withNetrc(m, &o.Nix, o.NetrcFile); err != nil {
		return nil, fmt.Errorf("update: %w", err)
	}
	return &updater{o: o, log: log, cache: cache, client: m.client,
		statePath: filepath.Join(o.StateDir, "applied", strings.ReplaceAll(o.Marker, "/", ":")+".json")}, nil
}

// readMarker reads the marker from the cache and checks that it names one
// system. With a publisher key, the marker must be signed by it, and its
// generation must be neither older than the last one applied nor the same
// one naming another system: a replayed old marker cannot roll the host
// back.
func (u *updater) readMarker(ctx context.Context) (Updated, error) {
	o, last := u.o, u.last
	u.log.WithFields(logrus.Fields{"marker": o.Marker, "cache": u.cache}).Info("read marker")
	data, err := getMarker(ctx, u.client, u.cache, o.Marker)
	if err != nil {
		return Updated{}, fmt.Errorf("update: %w", err)
	}
	marker, err := ParseMarker(data, o.StoreDir)
	if err != nil {
		return Updated{}, fmt.Errorf("update: marker %s: %w", o.Marker, err)
	}
	if len(marker.Paths) != 1 {
		return Updated{}, fmt.Errorf("update: marker %s names %d store paths, want one system", o.Marker, len(marker.Paths))
	}
	path := marker.Paths[0]
	res := Updated{Path: path}
	if o.PublisherKey != nil {
		st, err := marker.Verify(o.Marker, *o.PublisherKey)
		if err != nil {
			return res, fmt.Errorf("update: refusing marker %s: %w", o.Marker, err)
		}
		res.Generation = st.Generation
		if last != nil && st.Generation < last.Generation {
			return res, fmt.Errorf("update: refusing marker %s: %w: its generation %d is older than %d (%s, applied %s)",
				o.Marker, ErrRollback, st.Generation, last.Generation, last.Path, last.At.UTC().Format(time.RFC3339))
		}
		if last != nil && st.Generation == last.Generation && path != last.Path {
			return res, fmt.Errorf("update: refusing marker %s: generation %d names %s, but it named %s when applied", o.Marker, st.Generation, path, last.Path)
		}
		u.log.WithFields(logrus.Fields{"marker": o.Marker, "path": path, "publisher": o.PublisherKey.Name(), "generation": st.Generation}).
			Info("marker signed by the publisher")
	} else {
		u.log.WithFields(logrus.Fields{"marker": o.Marker, "path": path}).
			Info("marker read, signature not checked: unsigned markers allowed")
	}
	return res, nil
}

// record writes what res says was applied from the marker to the state
// directory, unless it is what was recorded last.
func (u *updater) record(res Updated) error {
	a := Applied{Marker: u.o.Marker, Path: res.Path, Generation: res.Generation, At: time.Now().UTC()}
	if u.o.PublisherKey != nil {
		a.Publisher = u.o.PublisherKey.Name()
	}
	if u.last != nil && u.last.Path == a.Path && u.last.Generation == a.Generation {
		return nil
	}
	return writeApplied(u.statePath, a)
}

// realise fetches the system at path from the cache into the store and
// returns its activation program. It runs before the profile changes, so
// that a system that cannot be fetched, or is not a NixOS system, leaves
// the profile alone.
func (u *updater) realise(ctx context.Context, path string) (string, error) {
	if err := u.o.Nix.run(ctx, u.log, "nix-store", "--realise", path,
		"--option", "substituters", u.cache,
		"--option", "narinfo-cache-negative-ttl", "0"); err != nil {
		return "", fmt.Errorf("update: realise %s from the cache: %w; the profile is unchanged", path, err)
	}
	activate := filepath.Join(u.o.Nix.Physical(path), "bin", "switch-to-configuration")
	if fi, err := os.Stat(activate); err != nil || fi.Mode()&0o111 == 0 {
		return "", fmt.Errorf("update: %s is not a NixOS system: no executable bin/switch-to-configuration; the profile is unchanged", path)
	}
	return activate, nil
}

// setProfile points the profile at the system at path, as a new
// generation.
func (u *updater) setProfile(ctx context.Context, path string) error {
	if err := os.MkdirAll(filepath.Dir(u.o.Profile), 0o755); err != nil {
		return fmt.Errorf("update: profile: %w", err)
	}
	if err := u.o.Nix.run(ctx, u.log, "nix-env", "--profile", u.o.Profile, "--set", path); err != nil {
		return fmt.Errorf("update: set the profile: %w; the profile is unchanged", err)
	}
	return nil
}

// activate runs the activation program with the action. When it fails,
// the profile goes back to old (a generation link; none when ""), so that
// it never names a system that did not activate.
func (u *updater) activate(ctx context.Context, activate, old string) error {
	u.log.WithField("command", activate+" "+u.o.Action).Info("run")
	cmd := exec.CommandContext(ctx, activate, u.o.Action)
	cmd.Stdout, cmd.Stderr = u.o.Nix.output(), u.o.Nix.output()
	if err := cmd.Run(); err != nil {
		err = fmt.Errorf("update: %s %s: %w", activate, u.o.Action, err)
		if rerr := restoreProfile(u.o.Profile, old); rerr != nil {
			return fmt.Errorf("%w; and putting the profile back failed: %v", err, rerr)
		}
		if old == "" {
			return fmt.Errorf("%w; the profile was removed again", err)
		}
		return fmt.Errorf("%w; the profile points at %s again", err, old)
	}
	return nil
}

// profileTarget follows the profile's symlinks (generation links) to the
// store path it names, without looking inside the store (which may be a
// chroot's). It returns "" when there is none.
func profileTarget(profile, storeDir string) string {
	p := profile
	prefix := strings.TrimSuffix(storeDir, "/") + "/"
	for range 16 {
		t, err := os.Readlink(p)
		if err != nil {
			return ""
		}
		if !filepath.IsAbs(t) {
			t = filepath.Join(filepath.Dir(p), t)
		}
		if strings.HasPrefix(t, prefix) {
			return t
		}
		p = t
	}
	return ""
}

// restoreProfile points the profile back at old (a generation link), or
// removes it when old is "": atomically, as nix-env does.
func restoreProfile(profile, old string) error {
	if old == "" {
		return os.Remove(profile)
	}
	tmp := profile + ".kiss-onion-tmp"
	os.Remove(tmp)
	if err := os.Symlink(old, tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, profile); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// lockState takes an exclusive lock on the state directory, so that two
// updates never run at once.
func lockState(dir string) (func(), error) {
	path := filepath.Join(dir, "update.lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("update: lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("update: another update holds %s", path)
		}
		return nil, fmt.Errorf("update: lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

func readApplied(path string) (*Applied, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var a Applied
	if err := json.Unmarshal(data, &a); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &a, nil
}

func writeApplied(path string, a Applied) error {
	data, err := json.MarshalIndent(a, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(data, '\n'), 0o600)
}
