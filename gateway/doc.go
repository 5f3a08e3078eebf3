// Package gateway is a client machine's local entrance into a cache's
// onions: a Gateway runs a client tor holding a bundle's key (package
// onion) and serves plain HTTP on loopback, so that Nix, the nix-daemon,
// publish and update need no SOCKS proxy, torsocks or system tor.
//
// Its Forwarder relays each request to the read or the write onion,
// streaming bodies both ways, spreading requests over a few circuits that
// tor keeps apart (distinct SOCKS credentials) and keeping them warm. While
// the onion is unreachable it answers 502 (421 to a write, which Nix does
// not retry with an empty body), marked with ErrorHeader so that a client
// can tell the gateway's refusal from the cache's; its health is served as
// JSON at HealthPath.
//
// It does not parse bundles or key files (package clientauth) and knows
// nothing of the cache's protocol beyond what a probe needs.
package gateway
