package serve

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/cachelock"
	"github.com/kiss-onion/kiss-onion/prune"
)

// forgetLockWait is how long a DELETE of a narinfo waits for the upload
// locks held, or for a prune, before answering 503.
var forgetLockWait = 30 * time.Second

// forgetRetryAfter is the Retry-After of that 503, in seconds.
const forgetRetryAfter = "60"

// maxListed bounds the referrers a refused DELETE names.
const maxListed = 1000

// WithReferrersParam is the query parameter of DELETE /<hash>.narinfo
// that forgets the paths referring to it too, as 'kiss-onion forget
// --with-referrers' does: "?with-referrers=1" ("true" too; "0" and
// "false" leave it off). Any other parameter is refused with 400.
const WithReferrersParam = "with-referrers"

// forgetQuery parses the query of a DELETE of a narinfo: whether to
// forget the referrers too.
func forgetQuery(raw string) (withReferrers bool, err error) {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return false, fmt.Errorf("malformed query %q: %v", raw, err)
	}
	for name, vs := range q {
		if name != WithReferrersParam {
			return false, fmt.Errorf("unknown query parameter %q (the only one is %s=1)", name, WithReferrersParam)
		}
		if len(vs) != 1 {
			return false, fmt.Errorf("%s given %d times", name, len(vs))
		}
		switch vs[0] {
		case "1", "true":
			withReferrers = true
		case "0", "false":
		default:
			return false, fmt.Errorf("%s=%q: want 1 or 0", name, vs[0])
		}
	}
	return withReferrers, nil
}

// forget answers DELETE /<hash>.narinfo on the write role: the store path
// goes from the cache as 'kiss-onion forget' takes it, with prune.Forget:
// 200 once it is gone, 404 when it is not in the cache, 409 naming the
// paths that refer to it and the markers that root them when there are
// any (then nothing changes), 503 while upload locks stay held or a prune
// runs, 400 for a query other than WithReferrersParam. With it the
// referrers go too, and the 200 names them ("referrer STORE_PATH" lines).
//
// While the forget holds the cache no narinfo upload is checked, and those
// acknowledged become visible first (quiesce): so no upload is acknowledged
// on the strength of what the forget deletes, and every referrer
// acknowledged before is seen. Once the answer is sent, neither role
// serves the narinfo, from memory or otherwise.
func (c *Cache) forget(w http.ResponseWriter, r *http.Request, t target) {
	withReferrers, err := forgetQuery(r.URL.RawQuery)
	if err != nil {
		c.refuse(w, r, http.StatusBadRequest, "%s: %v", t.rel, err)
		return
	}
	var mu sync.Mutex
	var lastNarInfo time.Time
	res, err := prune.Forget(r.Context(), prune.ForgetOptions{
		CacheDir:      c.cfg.Dir,
		StateDir:      c.cfg.StateDir,
		StoreDir:      c.cfg.StoreDir,
		Paths:         []string{t.name},
		WithReferrers: withReferrers,
		LockWait:      forgetLockWait,
		Quiesce:       c.quiesce,
		Log:           c.log,
		Deleted: func(rel string, size int64) {
			c.Removed(rel, size)
			if strings.HasSuffix(rel, ".narinfo") && !strings.Contains(rel, "/") {
				if c.narinfos != nil {
					c.narinfos.drop(rel)
				}
				mu.Lock()
				lastNarInfo = time.Now()
				mu.Unlock()
			}
		},
	})
	c.forgotten(lastNarInfo)
	c.answerForget(w, r, t, res, err)
}

// answerForget answers a DELETE of a narinfo with what the forget found
// and did, on a directory or a bucket alike.
func (c *Cache) answerForget(w http.ResponseWriter, r *http.Request, t target, res prune.ForgetResult, err error) {
	var body strings.Builder
	switch {
	case errors.Is(err, prune.ErrReferenced):
		fmt.Fprintf(&body, "%v; forget them first\n", err)
		writeForgetListing(&body, res)
		c.log.WithFields(logrus.Fields{"path": t.rel, "referrers": len(res.Referrers), "markers": len(res.Markers)}).Info("forget refused: referenced")
		writePlain(w, http.StatusConflict, strings.TrimSuffix(body.String(), "\n"))
	case errors.Is(err, cachelock.ErrLocksHeld), errors.Is(err, cachelock.ErrPruneRunning):
		w.Header().Set("Retry-After", forgetRetryAfter)
		c.refuse(w, r, http.StatusServiceUnavailable, "%s: %v", t.rel, err)
	case errors.Is(err, context.Canceled):
		c.refuse(w, r, http.StatusServiceUnavailable, "%s: the forget was cut short: %v", t.rel, err)
	case err != nil:
		c.log.WithField("path", t.rel).WithError(err).Error("forget failed")
		writePlain(w, http.StatusInternalServerError, fmt.Sprintf("%s: forget failed: %v", t.rel, err))
	case len(res.Paths) == 0:
		c.refuse(w, r, http.StatusNotFound, "%s: not in the cache", t.rel)
	default:
		asked := res.Paths[len(res.Paths)-1] // referrers come first
		for _, p := range res.Paths {
			if strings.HasPrefix(path.Base(p), t.name) {
				asked = p
			}
		}
		c.log.WithFields(logrus.Fields{"path": asked, "referrers": len(res.Referrers), "files": res.Files, "bytes": res.Bytes}).Info("forgot")
		if len(res.Referrers) > 0 {
			fmt.Fprintf(&body, "forgot %s and %d referrers: %d files, %s deleted\n", asked, len(res.Referrers), res.Files, prune.FormatBytes(res.Bytes))
		} else {
			fmt.Fprintf(&body, "forgot %s: %d files, %s deleted\n", asked, res.Files, prune.FormatBytes(res.Bytes))
		}
		for i, p := range res.Referrers {
			if i == maxListed {
				fmt.Fprintf(&body, "... and %d more referrers\n", len(res.Referrers)-maxListed)
				break
			}
			fmt.Fprintf(&body, "referrer %s\n", p)
		}
		for _, m := range res.Markers {
			fmt.Fprintf(&body, "marker %s names %s, which is gone\n", m.Marker, m.Root)
		}
		writePlain(w, http.StatusOK, strings.TrimSuffix(body.String(), "\n"))
	}
}

// writeForgetListing writes the referrers and the markers of a refused
// forget, a line each: "referrer STORE_PATH" and "marker REL names
// STORE_PATH"; 'kiss-onion forget' prints them as they come.
func writeForgetListing(b *strings.Builder, res prune.ForgetResult) {
	for i, p := range res.Referrers {
		if i == maxListed {
			fmt.Fprintf(b, "... and %d more referrers\n", len(res.Referrers)-maxListed)
			break
		}
		fmt.Fprintf(b, "referrer %s\n", p)
	}
	for i, m := range res.Markers {
		if i == maxListed {
			fmt.Fprintf(b, "... and %d more markers\n", len(res.Markers)-maxListed)
			break
		}
		fmt.Fprintf(b, "marker %s names %s\n", m.Marker, m.Root)
	}
}

// quiesce is the forget's prune.ForgetOptions.Quiesce: it stops narinfo
// uploads between their check and the begin of their commit, and waits
// for every commit pending, so that what the forget scans is all that was
// acknowledged. Commits need no more than the guard, which the forget
// takes only later.
func (c *Cache) quiesce() (resume func()) {
	c.forgetting.Lock()
	c.durable.barrier()
	return c.forgetting.Unlock
}

// forgotten returns once no read can serve a narinfo that a forget deleted
// at or before last (zero: none) from memory: a read that looked at the
// file just before it went may have put it back after its drop, trusted
// for revalidateAfter from that look.
func (c *Cache) forgotten(last time.Time) {
	if c.narinfos == nil || last.IsZero() {
		return
	}
	time.Sleep(time.Until(last.Add(revalidateAfter)))
}

// ForgetSettle is how long a running serve may go on serving, from
// memory, a narinfo deleted behind its back (by 'kiss-onion forget' or
// 'kiss-onion prune' on the cache directory or bucket, or by another
// front end on the bucket): whoever deletes one and must see it gone
// from both roles of every front end waits that long after the deletion.
const ForgetSettle = revalidateAfter
