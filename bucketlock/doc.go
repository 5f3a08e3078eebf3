// Package bucketlock is the lock protocol of package cachelock on an
// S3-compatible bucket (package s3store), which has no flock: uploads and
// prunes of one cache in a bucket, from any number of processes and
// machines, do not race.
//
// The objects live under gcroots/.lock/ with the directory protocol's
// names. An upload lock is gcroots/.lock/<name> (Acquire, refreshed by
// acquiring again, Release); its LastModified is its last refresh, and it
// stops counting after cachelock.StaleAfter. A prune (or a forget) holds
// the cache with the marker gcroots/.lock/.prune: Hold creates it with a
// conditional PUT (If-None-Match: *), so of racing prunes exactly one
// wins and the others get cachelock.ErrPruneRunning; it refreshes the
// marker by a PUT conditional on the ETag it wrote (If-Match) every
// half a minute, and a marker not refreshed for StaleAfter is a dead
// prune's, which the next prune replaces with a PUT conditional on the
// ETag it read, so two prunes cannot both take over one dead marker.
//
// A bucket has no shared-exclusive lock either, so the prune's exclusion
// of publications is a bounded window, and only its deletion excludes
// them, as on a directory. Guard reads the marker and runs its function,
// with a deadline GuardWindow after the check was sent, unless the marker
// says the prune deletes; then it waits for the deletion to end (up to
// two minutes, then ErrBusy). A prune scans while uploads go on, then
// marks the cache as deleting (Hold.Deleting) and waits GuardWindow and a
// margin, so every Guard begun before the mark has ended, landed or given
// up; only then does it reread the markers and the narinfos that appeared
// during its scan, and delete. Acquire of a new lock is refused
// (ErrBusy) while a prune holds the cache, in any phase; a lock that is
// still fresh may be refreshed. A new lock is checked against the marker
// again after its PUT, and removed when a prune marked the cache
// meanwhile: Hold lists the locks after its mark until none is fresh, so
// it either sees the lock or its mark is seen. Only durations measured on
// one machine decide the window; staleness compares the store's
// LastModified with the local clock, so clocks must agree to well within
// StaleAfter.
//
// Stores without conditional writes (Probe reports false): two prunes
// could both take the marker, so Hold refuses to run there
// (ErrNoConditionalWrites) unless SetSinglePruner says this process is
// the only pruner of the bucket; then it checks for a fresh marker and
// writes its own with plain PUTs. Uploads, Guard and the other calls work
// the same on every store: they only read the marker and write locks.
package bucketlock
