// Package publish turns a cache into a pull-based deployment channel
// through GC-root markers.
//
//   - WithLock (with-lock): a command under the cache's upload lock, then a
//     marker; Publish: nix copy of store paths under that lock, then a
//     marker, signed when given a key (Statement, FormatMarker).
//   - Update: read a marker, verify it (ParseMarker, Marker.Verify, the last
//     applied generation against rollbacks), realise the system it names,
//     set the profile and activate it.
//
// It speaks to the cache over HTTP, usually through a local gateway
// (package gateway), whose own refusals it tells from the cache's
// (StatusError.FromGateway). It does not serve the cache (package serve),
// does not take the lock on the server side (packages serve and
// cachelock), and does not parse key files or bundles (package
// clientauth). It runs nix, nix-store and nix-env rather than speaking to
// the Nix daemon itself.
package publish
