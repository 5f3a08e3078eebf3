package access

import (
	"bytes"
	"context"
	"slices"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
)

// DefaultPoll is how often Watch looks for changes in the registries when
// Config.Poll is 0.
const DefaultPoll = 2 * time.Second

// Publisher publishes and takes down onion services; *onion.Tor is one.
type Publisher interface {
	Publish(ctx context.Context, s onion.Service) error
	Unpublish(ctx context.Context, id *onion.Identity) error
}

// Onion is one of the onion services whose clients Onions keeps.
type Onion struct {
	Identity *onion.Identity
	// Target is where the onion's port 80 goes (see onion.Service).
	Target string
}

// Config configures Onions.
type Config struct {
	// Read and Write are the read and the write onion.
	Read, Write Onion
	// Registries are the registry files whose clients are admitted, the
	// state directory's first (see Load).
	Registries []string
	// PublicRead publishes the read onion without client authorization:
	// anyone who knows its address may read. The write onion is never
	// published without it.
	PublicRead bool
	// Publisher publishes the onions (required).
	Publisher Publisher
	// Poll is how often Watch looks at the registries' stamps; DefaultPoll
	// when not positive.
	Poll time.Duration
	// Log receives what is published and taken down, and the errors of
	// Watch; logrus's standard logger when nil.
	Log *logrus.Entry
	// Published, when not nil, is told what Apply did with an onion
	// ("read" or "write"): published it, again with other keys (up), or
	// took it down or left it unpublished for want of keys (not up).
	Published func(onion string, up bool)
}

// Keys are the client keys the registries admit at one moment, and the
// versions of the files they were read from.
type Keys struct {
	// Read and Write are the keys of the read and of the write onion.
	Read, Write [][32]byte
	stamps      []clientauth.Stamp
}

// Load reads the registries at paths (a missing file has no client) and
// merges their keys with clientauth.MergeKeys: each key once, and none that
// any of them revoked.
func Load(paths ...string) (Keys, error) {
	var k Keys
	var regs []*clientauth.Registry
	for _, path := range paths {
		reg, err := clientauth.LoadRegistry(path)
		if err != nil {
			return Keys{}, err
		}
		regs = append(regs, reg)
		k.stamps = append(k.stamps, reg.Stamp())
	}
	k.Read, k.Write = clientauth.MergeKeys(regs...)
	return k, nil
}

// Onions keeps the read and the write onion admitting exactly the keys of
// the registries. It remembers what it published, to publish an onion
// again only when its keys change. It is not safe for concurrent use:
// call Apply before Watch starts, not while it runs.
type Onions struct {
	cfg         Config
	log         *logrus.Entry
	read, write published
	stamps      []clientauth.Stamp // of the registries whose keys are applied
}

// published is what is published of one onion.
type published struct {
	up   bool
	keys [][32]byte
}

// New returns Onions for cfg, with nothing published yet.
func New(cfg Config) *Onions {
	if cfg.Poll <= 0 {
		cfg.Poll = DefaultPoll
	}
	o := &Onions{cfg: cfg, log: cfg.Log}
	if o.log == nil {
		o.log = logrus.NewEntry(logrus.StandardLogger())
	}
	return o
}

// Apply makes the onions admit exactly k's keys: an onion whose keys
// changed is published again; one left with no key is taken down, or not
// published, rather than published open (unless Config.PublicRead for the
// read onion, which then admits anyone whatever the keys). It stops at the
// first error of the Publisher. Watch then looks for changes since the
// versions of the files k was loaded from.
func (o *Onions) Apply(ctx context.Context, k Keys) error {
	o.stamps = k.stamps
	for _, s := range []struct {
		name   string
		onion  Onion
		keys   [][32]byte
		public bool
		cur    *published
	}{
		{"read", o.cfg.Read, k.Read, o.cfg.PublicRead, &o.read},
		{"write", o.cfg.Write, k.Write, false, &o.write},
	} {
		if s.public {
			s.keys = nil
		}
		if s.cur.up && sameKeys(s.keys, s.cur.keys) {
			continue
		}
		l := o.log.WithFields(logrus.Fields{"onion": s.name, "address": s.onion.Identity.Address(), "clients": len(s.keys)})
		if len(s.keys) == 0 && !s.public {
			if s.cur.up {
				if err := o.cfg.Publisher.Unpublish(ctx, s.onion.Identity); err != nil {
					return err
				}
				s.cur.up = false
				l.Warn("no client keys left: onion taken down")
			} else {
				l.Warn("no client keys: onion not published")
			}
			s.cur.keys = nil
			o.published(s.name, false)
			continue
		}
		err := o.cfg.Publisher.Publish(ctx, onion.Service{Name: s.name, Identity: s.onion.Identity, Target: s.onion.Target, ClientKeys: s.keys})
		if err != nil {
			return err
		}
		s.cur.up, s.cur.keys = true, s.keys
		o.published(s.name, true)
		if s.public {
			l.Warn("onion published without client authorization (--public-read)")
		} else {
			l.Info("onion published")
		}
	}
	return nil
}

func (o *Onions) published(name string, up bool) {
	if o.cfg.Published != nil {
		o.cfg.Published(name, up)
	}
}

// sameKeys reports whether a and b hold the same keys, in any order.
func sameKeys(a, b [][32]byte) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	cmp := func(x, y [32]byte) int { return bytes.Compare(x[:], y[:]) }
	slices.SortFunc(a, cmp)
	slices.SortFunc(b, cmp)
	return slices.Equal(a, b)
}

// Watch applies the registries' keys again when they change, until ctx
// ends, so that `keys add` and `keys revoke` take effect without a
// restart: it compares the files' stamps with those of the keys applied
// every Config.Poll, and reloads whenever reload fires, changed or not
// (reload may be nil). A registry that does not load (a half-edited file)
// keeps what is published: the error is logged, and the registries are
// tried again when they change. A Publisher error is logged, and tried
// again on the next change or reload.
func (o *Onions) Watch(ctx context.Context, reload <-chan struct{}) {
	tick := time.NewTicker(o.cfg.Poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-reload:
			if !ok {
				reload = nil
				continue
			}
		case <-tick.C:
			if slices.Equal(o.stat(), o.stamps) {
				continue
			}
		}
		k, err := Load(o.cfg.Registries...)
		if err != nil {
			o.log.WithError(err).Error("client keys not reloaded")
			o.stamps = o.stat()
			continue
		}
		if err := o.Apply(ctx, k); err != nil {
			o.log.WithError(err).Error("onions not published with the new client keys")
		}
	}
}

// stat returns the stamps of the registries now; a file that cannot be
// read has the zero stamp.
func (o *Onions) stat() []clientauth.Stamp {
	var stamps []clientauth.Stamp
	for _, path := range o.cfg.Registries {
		st, _ := clientauth.StatRegistry(path)
		stamps = append(stamps, st)
	}
	return stamps
}
