package clientauth

import (
	"bytes"
	"crypto/sha3"
	"encoding/base32"
	"errors"
	"fmt"
	"strings"
)

// authPrefix starts both of Tor's client-authorization forms after the
// optional onion address.
const authPrefix = "descriptor:x25519:"

// AuthPrivateSuffix ends the name of the files Tor loads from its
// ClientOnionAuthDir.
const AuthPrivateSuffix = ".auth_private"

// ServiceAuthLine returns the line a service is authorized with, as in a
// file of a HiddenServiceDir's authorized_clients/:
// "descriptor:x25519:<base32 public key>". ADD_ONION's ClientAuthV3= takes
// the part after the last colon, p.String().
func ServiceAuthLine(p PublicKey) string {
	return authPrefix + p.String()
}

// ParseServiceAuthLine parses a line made by ServiceAuthLine. Its errors
// never contain the key.
func ParseServiceAuthLine(line string) (PublicKey, error) {
	s, ok := strings.CutPrefix(strings.TrimSpace(line), authPrefix)
	if !ok {
		return PublicKey{}, errors.New("malformed service authorization: want descriptor:x25519:<public key>")
	}
	return ParsePublicKey(s)
}

// ClientAuthLine returns the line of a client's ".auth_private" file that
// lets it reach onion (an address with or without ".onion"):
// "<address without .onion>:descriptor:x25519:<base32 private key>".
func ClientAuthLine(onion string, k *PrivateKey) (string, error) {
	host, err := ParseOnionAddress(onion)
	if err != nil {
		return "", err
	}
	return host + ":" + authPrefix + k.String(), nil
}

// ParseClientAuthLine parses a line made by ClientAuthLine and returns the
// onion address (without ".onion") and the private key. Its errors never
// contain the key.
func ParseClientAuthLine(line string) (onion string, k *PrivateKey, err error) {
	host, rest, ok := strings.Cut(strings.TrimSpace(line), ":")
	if !ok {
		return "", nil, errors.New("malformed client authorization: want <onion>:descriptor:x25519:<private key>")
	}
	onion, err = ParseOnionAddress(host)
	if err != nil {
		// Not err: were the line garbled, host could be the key.
		return "", nil, errors.New("malformed client authorization: bad onion address")
	}
	s, ok := strings.CutPrefix(rest, authPrefix)
	if !ok {
		return "", nil, errors.New("malformed client authorization: want <onion>:descriptor:x25519:<private key>")
	}
	k, err = ParsePrivateKey(s)
	if err != nil {
		return "", nil, err
	}
	return onion, k, nil
}

// AuthPrivateFileName returns the name of the file in a ClientOnionAuthDir
// that holds the key for onion: "<address without .onion>.auth_private",
// the name Tor itself uses.
func AuthPrivateFileName(onion string) (string, error) {
	host, err := ParseOnionAddress(onion)
	if err != nil {
		return "", err
	}
	return host + AuthPrivateSuffix, nil
}

// onionEncoding is the base32 of onion addresses, which Tor writes lowercase.
var onionEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// ParseOnionAddress checks a v3 onion address (with or without ".onion",
// either case) and returns its 56 characters in lowercase, without
// ".onion". It checks the version and the checksum, so a mistyped address is
// caught before Tor is asked for it.
func ParseOnionAddress(addr string) (string, error) {
	host := strings.TrimSuffix(strings.ToLower(addr), ".onion")
	if len(host) != 56 {
		return "", fmt.Errorf("malformed onion address %q: want 56 base32 characters and .onion", addr)
	}
	b, err := onionEncoding.DecodeString(host)
	if err != nil || len(b) != 35 {
		return "", fmt.Errorf("malformed onion address %q: not base32", addr)
	}
	pub, sum, version := b[:32], b[32:34], b[34]
	if version != 3 {
		return "", fmt.Errorf("malformed onion address %q: version %d, want 3", addr, version)
	}
	if !bytes.Equal(sum, onionChecksum(pub)) {
		return "", fmt.Errorf("malformed onion address %q: bad checksum", addr)
	}
	return host, nil
}

// onionChecksum returns the two checksum bytes of a v3 onion address for
// the ed25519 public key pub (Tor's rend-spec-v3, "Encoding onion addresses").
func onionChecksum(pub []byte) []byte {
	h := sha3.New256()
	h.Write([]byte(".onion checksum"))
	h.Write(pub)
	h.Write([]byte{3})
	return h.Sum(nil)[:2]
}
