// Package testnet runs a private Tor network on 127.0.0.1: three directory
// authorities and three relays, with no internet needed.
//
// It serves the end-to-end tests (one network per test binary, started in
// TestMain) and the offline demo (`kiss-onion serve --tor local`). A tor
// that joins the network adds TorrcLines to its configuration; StartClient
// starts a plain client tor with a SOCKS port for tests.
//
// Start brings the network up in stages, because a network started all at
// once came up about one time in four: authorities and relays first, then it
// polls an authority until its consensus lists every relay, sends the relays
// SIGHUP (which resets their directory download back-off), and waits until
// every relay's DirPort serves the consensus and all its microdescriptors.
// Every wait polls with a deadline; none sleeps a fixed time.
//
// Keys (authority certificates, relay identities) live under the network's
// directory and are reused when it is started again; everything else in a
// node's data directory is discarded at start, since the ports change.
//
// What it deliberately does not do: it is no general Tor network simulator
// (no exits, no bridges, no IPv6, fixed size), it never touches the real Tor
// network, and its tors are plain os/exec processes, not bine's: only the
// product's own tors go through package onion. Its keys and its network
// protect nothing and must never carry real traffic.
package testnet
