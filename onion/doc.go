// Package onion runs tor and publishes kiss-onion's v3 onion services.
//
// It is the only package of kiss-onion that imports bine
// (github.com/cretz/bine). It owns:
//
//   - onion service identities (Identity): an ed25519 key in a 0600 file
//     under the state directory, so an onion's address survives restarts;
//   - the service tor (Start, Tor): a tor process started through bine, its
//     output routed into the injected logger, owned by this process
//     (TAKEOWNERSHIP and __OwningControllerProcess) so that it dies with it,
//     supervised (restarted with backoff when it exits or its control port
//     stops answering);
//   - onion services (Service, Tor.Publish): published with ADD_ONION,
//     replaced in place (DEL_ONION then ADD_ONION) when their authorized
//     client keys change, and republished at the same address after a tor
//     restart;
//   - the client side (Config.Socks, Tor.SocksAddr, Tor.AddClientAuth): a
//     tor with a SOCKS5 port on 127.0.0.1 (ExtendedErrors on, so that a
//     refusal says why), holding client authorization keys given over the
//     control port (ONION_CLIENT_AUTH_ADD), restored after a restart too:
//     for tests and for a local gateway.
//
// It deliberately does not decide policy: which client keys are authorized
// on which onion, and whether an onion may run without client authorization,
// are the caller's choices (an empty key list publishes an open onion). It
// does not parse or store client key files (package clientauth does), does
// not serve HTTP, and never writes tor's HiddenServiceDir: services live in
// tor's memory only, for as long as this process's control connection does.
//
// A private Tor network for tests and the offline demo lives in the
// subpackage testnet.
package onion
