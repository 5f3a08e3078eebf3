// Package tlsca is the cache's own small certificate authority, for the
// TLS door: clients present a certificate it signed, and the cache serves
// a certificate it signed (unless the user supplies one).
//
// The CA lives in the state directory (Dir, 0700): its key (0600, PEM
// PKCS#8, ECDSA P-256, which Go, curl and Nix's TLS libraries all take)
// and its certificate. Issue mints client certificates (the common name
// is the client's name) and server certificates (for the names and
// addresses the server answers on). Fingerprint names a certificate in
// the client registry.
//
// A certificate only proves that the CA signed it: the role comes from
// the registry, never from the certificate, so that revoking a client in
// the registry is enough (see Door). The package deliberately does not
// parse the registry (package clientauth) nor serve anything (package
// serve); Door ties the three together.
package tlsca
