// Package e2e holds the end-to-end tests: the real kiss-onion binary, the
// real Nix client (Debian's nix-bin) and, for the onion tests, real tor
// processes on a private Tor network on 127.0.0.1. They share one build of
// the binary per test binary (TestMain).
package e2e
