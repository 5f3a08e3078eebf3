// Package cachelock is the lock protocol that keeps uploads and prunes of
// one cache directory from racing, across processes, through files in
// gcroots/.lock/.
//
// Writers hold shared upload locks (Acquire, refreshed by acquiring again,
// Release), one file each, which go stale after StaleAfter without a
// refresh. A prune takes a Hold: it marks the cache as held, so that new
// locks are refused with ErrBusy, and waits for the fresh locks to go
// (ErrLocksHeld when they do not in time). serve checks and renames a
// narinfo into place inside Guard, and a prune deletes inside Exclusive,
// so the two never overlap. A forget holds the cache as a prune does.
// List and Holder tell who holds what now, for 'kiss-onion status'.
//
// The package decides nothing about what to keep or delete (package prune)
// and speaks no HTTP (package serve answers PUT and DELETE of
// gcroots/.lock/NAME with Acquire and Release).
package cachelock
