// Package clientauth manages the x25519 client-authorization keys that decide
// who can reach kiss-onion's onion services, and the files that carry them.
//
// A reader key is authorized on the read onion; a writer key on both the read
// and the write onion. The package provides:
//
//   - PrivateKey and PublicKey, which parse from and print to Tor's form
//     (RFC 4648 base32 without padding), plus the lines Tor reads from its
//     files: "descriptor:x25519:<public>" on the service side and
//     "<onion>:descriptor:x25519:<private>" in a client's ".auth_private" file;
//   - the Registry, the state directory's list of clients (clients.toml): only
//     public keys, with each client's name, role, creation and revocation time,
//     updated under a lock (UpdateRegistry) and replaced atomically, so that a
//     running service can poll its Stamp and reload it when it changes;
//   - the Bundle, the directory handed to a client machine: its private key
//     (client.key), one ".auth_private" file per onion the key may reach and a
//     kiss-onion.toml naming the onion URLs;
//   - MergeKeys, the rule for several registries at once (the state
//     directory's and a declarative clients file): a key revoked in any of
//     them is out.
//
// The package deliberately does not talk to Tor, create onion identities or
// watch files: package access keeps the onions admitting the keys that
// MergeKeys returns, and the command line decides where files go. Private
// keys never enter the registry.
package clientauth
