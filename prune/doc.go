// Package prune deletes store paths from a kiss-onion cache directory:
// what no GC root reaches (Run), or the paths an operator names and, on
// request, what refers to them (Forget). Both work under the lock protocol
// of package cachelock that keeps deletions and uploads from racing, and
// share one scanner of the narinfos.
//
// Run keeps the closure of the roots (the store paths named by the
// markers under gcroots/ and any extra root directories) through
// References and Deriver: each kept path keeps its narinfo, its .ls, the
// file its URL names, log/<drv> for the deriver it names, and the
// realisations, build traces and debuginfo entries that point at it or its
// NAR. A narinfo that does not parse is kept, with its URL's file.
// Everything else under those names goes; nix-cache-info, gcroots/ and
// .tmp/ are never touched (except .tmp/ files untouched for a day: partial
// uploads of a dead process).
//
// The cache stays valid at every instant, even when the prune is killed:
// narinfos are deleted referrers first, and each before its NAR. So no
// narinfo ever names a missing NAR or reference.
//
// Speed on big caches comes from reading in parallel relative to directory
// descriptors, from a graph of parallel slices indexed by interned hashes
// (no object per path), and from a metadata cache in the state directory
// that remembers what each narinfo said under which stat identity (inode,
// size, modification and change times): a narinfo whose stat is unchanged
// is not read again; one changed, replaced or deleted since is.
//
// It coordinates with uploads across processes through the files in
// gcroots/.lock/ (package cachelock). A prune marks the cache as held, waits for
// the upload locks to go, and deletes only while no Guard runs; before
// deleting it re-reads the markers and every narinfo that appeared during
// the prune, and keeps what they reach.
//
// Forget deletes the narinfos it is asked to (referrers first, with
// WithReferrers), their listings and the NARs no narinfo left names, and
// refuses (ErrReferenced) while a path that stays refers to one of them,
// naming the referrers and the markers that root them. It holds the cache
// as a prune does, reads the metadata cache without writing it, and looks
// again, before deleting, at the narinfos that came during its scan.
//
// RunBucket and ForgetBucket do the same on a cache in an S3-compatible
// bucket, under package bucketlock's protocol, with the same graph,
// planning and results; objects are read and deleted in batches of
// requests, referrers first, so the bucket too stays a valid cache.
//
// A prune that keeps a metadata cache also records its outcome there
// (LastRun), for 'kiss-onion status'.
//
// The package does not serve HTTP, upload, or schedule prunes: serve
// answers the lock requests, calls Run on its schedule and Forget for a
// DELETE of a narinfo, and the CLI shows progress.
package prune
