// Package publish is the client side of kiss-onion: the local gateway into
// the cache's onions, and pull-based deployment through GC-root markers.
//
//   - Forwarder and Gateway: a Gateway runs a client tor holding a bundle's
//     key (package onion) and serves plain HTTP on loopback; its Forwarder
//     relays each request to the read or the write onion, streaming bodies
//     both ways, spreading requests over a few circuits that tor keeps apart
//     (distinct SOCKS credentials) and keeping them warm, answering 502 with
//     the reason while the onion is unreachable, and its health as JSON.
//   - WithLock (with-lock): a command under the cache's upload lock, then a
//     marker; Publish: nix copy of store paths under that lock, then a
//     marker, signed when given a key (Statement, FormatMarker).
//   - Update: read a marker, verify it (ParseMarker, Marker.Verify, the last
//     applied generation against rollbacks), realise the system it names,
//     set the profile and activate it.
//
// It does not serve the cache (package serve), does not take the lock on
// the server side (packages serve and cachelock), and does not parse key files or bundles
// (package clientauth). It runs nix, nix-store and nix-env rather than
// speaking to the Nix daemon itself.
package publish
