// Package nixcache holds the Nix binary-cache formats that kiss-onion reads
// and checks: store paths, narinfo files, their signatures and GC-root markers.
//
// It parses what Nix writes and validates what a cache must refuse. It does
// not touch the file system and knows nothing of HTTP: serve and prune decide
// what to do with a bad file.
//
// It is the one place that imports github.com/nix-community/go-nix, for
// nixbase32, hash parsing and ed25519 signature formats. The narinfo parser
// and store-path checks are its own: go-nix's parser refuses the unknown keys
// that Nix ignores, reports no line numbers, and its store paths and
// fingerprints assume /nix/store.
package nixcache
