// Package prune deletes what no GC root of a kiss-onion cache reaches, and
// holds the lock protocol that keeps prunes and uploads from racing.
//
// (Package documentation is completed with the pruner.)
package prune
