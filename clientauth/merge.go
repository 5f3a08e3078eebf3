package clientauth

import "slices"

// MergeKeys returns the keys to authorize on the read and the write onion
// when the clients of all of regs may come in: each key once, in the order
// regs and their files list them, and none that any of regs revoked,
// whatever the others say. It reads no file; empty results are nil.
func MergeKeys(regs ...*Registry) (readKeys, writeKeys [][32]byte) {
	revoked := map[[32]byte]bool{}
	for _, reg := range regs {
		for _, c := range reg.clients {
			if c.IsRevoked() {
				revoked[c.PublicKey.Bytes()] = true
			}
		}
	}
	add := func(list, keys [][32]byte) [][32]byte {
		for _, k := range keys {
			if !revoked[k] && !slices.Contains(list, k) {
				list = append(list, k)
			}
		}
		return list
	}
	for _, reg := range regs {
		readKeys = add(readKeys, reg.ReadKeys())
		writeKeys = add(writeKeys, reg.WriteKeys())
	}
	return readKeys, writeKeys
}

// MergeTLS returns the clients that may come in through the TLS door, by
// the fingerprint of their certificate: those of all of regs that have
// one, and none that any of regs revoked (by name's certificate or by
// fingerprint), whatever the others say. When two registries give one
// fingerprint to different roles, the first in regs decides.
func MergeTLS(regs ...*Registry) map[string]Client {
	revoked := map[string]bool{}
	for _, reg := range regs {
		for _, c := range reg.clients {
			if c.IsRevoked() && c.TLSCert != "" {
				revoked[c.TLSCert] = true
			}
		}
	}
	out := map[string]Client{}
	for _, reg := range regs {
		for _, c := range reg.clients {
			if _, seen := out[c.TLSCert]; c.TLSCert == "" || c.IsRevoked() || revoked[c.TLSCert] || seen {
				continue
			}
			out[c.TLSCert] = c
		}
	}
	return out
}
