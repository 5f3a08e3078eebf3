// Package access decides who may reach a kiss-onion cache: it keeps the
// read and the write onion services admitting exactly the client keys that
// the key registries allow, while serve runs.
//
// Load reads the registries (the state directory's, and any declarative
// clients file) and merges their keys with clientauth.MergeKeys: a key
// revoked in any of them is out. Onions.Apply publishes an onion again
// when its keys changed and takes it down when no key is left: an onion is
// never published without client authorization, except the read onion
// when Config.PublicRead says so. Onions.Watch polls the registries' stamps
// and applies their keys again on a change, or whenever it is told to
// reload.
//
// The package deliberately does not parse registry files (package
// clientauth does), start tor or create onion identities (package onion),
// nor catch signals: the command line wires them together, and turns
// SIGHUP into Watch's reload channel.
package access
