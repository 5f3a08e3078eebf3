// Package upstream fetches into the cache what it lacks from upstream
// caches such as cache.nixos.org, keeping their signatures (kiss-onion
// serve --upstream): a machine whose only way out is the onion still gets
// all of nixpkgs through it.
//
// A Fetcher asks its upstreams, in order, for a narinfo; one that no
// upstream key signed is refused. It resolves the path's closure the same
// way (closure.go), and only then may serve answer the narinfo. The NARs
// then download in the background, each checked as it comes (the file's
// hash and size when given, and always the signed NarHash and NarSize,
// decompressing as it goes), and are stored through the serve package,
// each narinfo after its NAR and its references', visible last, so that
// the cache stays a valid file:// cache closed under references. A client
// reads a NAR still downloading from a spool as it grows (OpenNar).
// Nothing of a path that fails a check stays in the cache.
//
// Upstream requests are bounded: a connect and a header timeout of a few
// seconds (a dead upstream costs a reader seconds; Nix disables a slow
// substituter for a minute), a stall timeout while a NAR downloads, and a
// size limit. Concurrent fetches of one path share one; a miss is
// remembered for a short while, so that a storm of queries for paths no
// upstream has does not become a storm upstream.
//
// With a keep time, it names what it fetched in a marker (KeepMarker)
// until that long after the path's last read, which serve reports (Used)
// when it sends a NAR; prunes then keep the path.
//
// It does not decide what to delete (package prune).
package upstream
