// Package gateway is a client machine's local entrance into a cache's
// onions: a Gateway runs a client tor holding a bundle's key (package
// onion) and serves plain HTTP on loopback, so that Nix, the nix-daemon,
// publish and update need no SOCKS proxy, torsocks or system tor.
//
// Its Forwarder relays each request to the read or the write onion,
// streaming bodies both ways, spreading requests over a few circuits that
// tor keeps apart (distinct SOCKS credentials) and keeping them warm.
//
// The cache is often away (the appliance off, the machine offline, tor
// slow to find the descriptor), and Nix must then carry on in seconds
// (docs/offline.md). The Forwarder is in one of three States: probing (at
// the start), reachable, unreachable. A request waits at most DialTimeout
// for tor to connect it: tor holds a SOCKS request for two minutes when
// its network is gone, and still calls its network "up". A request that
// fails (tor refuses the onion, a connection breaks, the dial times out)
// makes the Forwarder answer every request itself, at once, until a
// background probe (GET /nix-cache-info, a new one every few seconds even
// while earlier ones wait, each with a long timeout of its own, so that a
// slow descriptor fetch is not taken for a dead onion) reaches the onion
// again; then it logs "onion reachable" and how long it was
// away. Its answers are those that make Nix carry on: nix-cache-info from
// the copy it remembers (kept in a file, across restarts); 404 for the
// other binary-cache files (narinfo, NAR, listing, log, realisation), so
// that Nix builds the path or takes it from another substituter, with or
// without --fallback; 421 to a write (Nix 2.8 retries a 5xx upload with an
// empty body, then stalls); 502 to anything else, such as a marker, which
// a 404 would misreport as missing. Each carries ErrorHeader and
// Cache-Control: no-store. Its health is served as JSON at HealthPath.
//
// A cache may have several front ends (serves over one store, each with
// its own onions): a Forwarder given them keeps each one's state apart,
// sends requests to those that answer, fails a request over to another
// before any answer, and resumes a broken NAR download on another with a
// Range request (frontends.go).
//
// It does not parse bundles or key files (package clientauth), does not
// ask tor's control port about the network (tor says "up" long after its
// relays are gone), and knows nothing of the cache's protocol beyond the
// file names above and what a probe needs.
package gateway
