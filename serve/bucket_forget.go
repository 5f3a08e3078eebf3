package serve

import (
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/kiss-onion/kiss-onion/bucketlock"
	"github.com/kiss-onion/kiss-onion/prune"
)

// forgetBucket answers DELETE /<hash>.narinfo on the write role of a
// cache on a bucket as forget does on a directory, with the same
// statuses and bodies, running prune.ForgetBucket under the bucket's
// lock protocol: it holds the cache as a prune does, scans while uploads
// go on, then waits out every upload checked before (bucketlock's guard
// window, ten seconds and a margin) before it deletes, so a successful
// DELETE takes that long. A refusal (404, 409) comes before the wait.
//
// The index of this front end drops each narinfo as it goes, and the
// answer waits ForgetSettle after the last one: a read that looked at a
// narinfo just before it went may have put it back, trusted for
// revalidateAfter. Another front end on the bucket trusts its index as
// long, then asks the bucket: once the answer is sent, no front end
// serves the forgotten narinfos, and NARs are never served from memory.
// The hold stays, deleting, through that wait, so that no front end
// accepts meanwhile an upload whose reference it found only in memory.
func (c *Cache) forgetBucket(w http.ResponseWriter, r *http.Request, t target) {
	withReferrers, err := forgetQuery(r.URL.RawQuery)
	if err != nil {
		c.refuse(w, r, http.StatusBadRequest, "%s: %v", t.rel, err)
		return
	}
	// The protocol object the uploads use, with their guard window.
	locks, _ := c.cfg.BucketLocks.(*bucketlock.Locks)
	var mu sync.Mutex
	var lastNarInfo time.Time
	res, err := prune.ForgetBucket(r.Context(), prune.ForgetBucketOptions{
		ForgetOptions: prune.ForgetOptions{
			StateDir:      c.cfg.StateDir,
			StoreDir:      c.cfg.StoreDir,
			Paths:         []string{t.name},
			WithReferrers: withReferrers,
			LockWait:      forgetLockWait,
			Log:           c.log,
			Deleted: func(rel string, size int64) {
				c.Removed(rel, size)
				if topNarInfo(rel) {
					c.bucket.index.drop(strings.TrimSuffix(rel, ".narinfo"))
					mu.Lock()
					lastNarInfo = time.Now()
					mu.Unlock()
				}
			},
		},
		Store:  c.bucket.st,
		Name:   c.cfg.BucketName,
		Locks:  locks,
		Settle: ForgetSettle,
	})
	if !lastNarInfo.IsZero() {
		time.Sleep(time.Until(lastNarInfo.Add(ForgetSettle)))
	}
	c.answerForget(w, r, t, res, err)
}
