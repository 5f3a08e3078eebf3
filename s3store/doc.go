// Package s3store keeps a kiss-onion cache's files as objects in an
// S3-compatible bucket (SeaweedFS, Garage, MinIO, AWS S3), under a key
// prefix, with the promises the flat directory gives: an object appears
// whole or not at all, uploads stream with bounded memory, reads stream
// with a byte range.
//
// A Store puts an object from a reader of known or unknown size: at most
// PartSize in one PUT, larger bodies as a multipart upload that is
// completed only once every part has arrived and aborted on any error or
// cancellation, so that no reader ever sees part of it. It gets an object
// or a range of it, stats it (size, ETag, modification time), lists a
// prefix page by page, deletes keys in batches, and creates a small object
// only if no object has that key (If-None-Match: *), for a lock protocol
// on the bucket; Probe tells whether the store honours that condition.
// AbortUploads removes the multipart uploads that killed processes left.
//
// Names passed to a Store are the cache's relative paths
// ("nar/<hash>.nar.xz", "<hash>.narinfo"); the prefix is added and
// removed here. Errors for a missing object match fs.ErrNotExist, for a
// refused conditional create fs.ErrExist.
//
// The package knows nothing of narinfos, references or locks: it is the
// storage that serve and prune will sit on (docs/s3.md), and the only
// package that imports minio-go.
package s3store
