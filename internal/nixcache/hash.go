package nixcache

import (
	"errors"

	"github.com/nix-community/go-nix/pkg/nixhash"
)

// SHA256Digest returns the digest of a narinfo hash field (NarHash or
// FileHash) in any of the forms Nix writes, when it is a sha256.
func SHA256Digest(s string) ([]byte, error) {
	h, err := nixhash.ParseAny(s, nil)
	if err != nil {
		return nil, errors.New("not a hash (want sha256:<nixbase32>)")
	}
	if h.Algo() != nixhash.SHA256 {
		return nil, errors.New("not a sha256 hash")
	}
	return h.Digest(), nil
}
