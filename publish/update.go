package publish

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
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
	log := o.Log
	if log == nil {
		log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.StoreDir == "" {
		o.StoreDir = "/nix/store"
	}
	if o.Profile == "" {
		o.Profile = "/nix/var/nix/profiles/system"
	}
	if o.Action != "switch" && o.Action != "boot" {
		return Updated{}, fmt.Errorf("update: action %q: want switch or boot", o.Action)
	}
	if o.PublisherKey == nil && !o.AllowUnsigned {
		return Updated{}, errors.New("update: no publisher key, and unsigned markers are not allowed")
	}
	if o.StateDir == "" {
		return Updated{}, errors.New("update: no state directory")
	}
	cache := strings.TrimSuffix(o.Cache, "/")
	m, err := ParseMarkerURL(cache+"/gcroots/"+o.Marker, "")
	if err != nil {
		return Updated{}, fmt.Errorf("update: %w", err)
	}
	if err := os.MkdirAll(o.StateDir, 0o700); err != nil {
		return Updated{}, fmt.Errorf("update: state directory: %w", err)
	}
	unlock, err := lockState(o.StateDir)
	if err != nil {
		return Updated{}, err
	}
	defer unlock()
	statePath := filepath.Join(o.StateDir, "applied", strings.ReplaceAll(o.Marker, "/", ":")+".json")
	last, err := readApplied(statePath)
	if err != nil {
		return Updated{}, fmt.Errorf("update: %w", err)
	}

	// 1. The marker, checked.
	log.Infof("read marker %s from %s", o.Marker, cache)
	data, err := getMarker(ctx, m.client, cache, o.Marker)
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
		log.Infof("marker %s names %s, signed by %s, generation %d", o.Marker, path, o.PublisherKey.Name(), st.Generation)
	} else {
		log.Infof("marker %s names %s (signature not checked: unsigned markers allowed)", o.Marker, path)
	}
	record := func() error {
		a := Applied{Marker: o.Marker, Path: path, Generation: res.Generation, At: time.Now().UTC()}
		if o.PublisherKey != nil {
			a.Publisher = o.PublisherKey.Name()
		}
		if last != nil && last.Path == a.Path && last.Generation == a.Generation {
			return nil
		}
		return writeApplied(statePath, a)
	}

	// 2. Nothing to do when the profile names it already.
	old, err := os.Readlink(o.Profile)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return res, fmt.Errorf("update: profile: %w", err)
	}
	if cur := profileTarget(o.Profile, o.StoreDir); cur == path {
		log.Infof("profile %s already names %s: nothing to do", o.Profile, path)
		return res, record()
	}

	// 3. Realise it from the cache.
	if err := o.Nix.run(ctx, log, "nix-store", "--realise", path,
		"--option", "substituters", cache,
		"--option", "narinfo-cache-negative-ttl", "0"); err != nil {
		return res, fmt.Errorf("update: realise %s from the cache: %w; the profile is unchanged", path, err)
	}
	activate := filepath.Join(o.Nix.Physical(path), "bin", "switch-to-configuration")
	if fi, err := os.Stat(activate); err != nil || fi.Mode()&0o111 == 0 {
		return res, fmt.Errorf("update: %s is not a NixOS system: no executable bin/switch-to-configuration; the profile is unchanged", path)
	}

	// 4. Point the profile at it.
	if err := os.MkdirAll(filepath.Dir(o.Profile), 0o755); err != nil {
		return res, fmt.Errorf("update: profile: %w", err)
	}
	if err := o.Nix.run(ctx, log, "nix-env", "--profile", o.Profile, "--set", path); err != nil {
		return res, fmt.Errorf("update: set the profile: %w; the profile is unchanged", err)
	}

	// 5. Activate it.
	log.Infof("run %s %s", activate, o.Action)
	cmd := exec.CommandContext(ctx, activate, o.Action)
	cmd.Stdout, cmd.Stderr = o.Nix.output(), o.Nix.output()
	if err := cmd.Run(); err != nil {
		err = fmt.Errorf("update: %s %s: %w", activate, o.Action, err)
		if rerr := restoreProfile(o.Profile, old); rerr != nil {
			return res, fmt.Errorf("%w; and putting the profile back failed: %v", err, rerr)
		}
		if old == "" {
			return res, fmt.Errorf("%w; the profile was removed again", err)
		}
		return res, fmt.Errorf("%w; the profile points at %s again", err, old)
	}
	res.Changed = true
	if err := record(); err != nil {
		return res, fmt.Errorf("update: %s is active, but recording it failed: %w", path, err)
	}
	log.Infof("%s %s done: profile %s names %s", o.Action, o.Marker, o.Profile, path)
	return res, nil
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
