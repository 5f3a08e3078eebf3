package prune

import (
	"testing"

	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

func TestBucketObjectNames(t *testing.T) {
	h := pt.HashPart("a")
	for _, tc := range []struct {
		name             string
		narinfo, listing bool
		aux              bool
	}{
		{h + ".narinfo", true, false, false},
		{h + ".ls", false, true, false},
		{h + ".narinfo.tmp", false, false, false},
		{"e" + h[1:] + ".narinfo", false, false, false}, // 'e' is not nixbase32
		{h[:31] + ".narinfo", false, false, false},
		{".probe-0123.narinfo", false, false, false},
		{"nix-cache-info", false, false, false},
		{"nar/" + h + ".narinfo", false, false, false},
		{"realisations/sha256:00!out.doi", false, false, true},
		{"realisations/x/y.doi", false, false, false},
		{"realisations/.hidden", false, false, false},
		{"build-trace-v2/" + h + "-a.drv/out.doi", false, false, true},
		{"build-trace-v2/out.doi", false, false, false},
		{"build-trace-v2/.x/out.doi", false, false, false},
		{"debuginfo/0123456789abcdef", false, false, true},
		{"debuginfo/", false, false, false},
		{"log/" + h + "-a.drv", false, false, false},
	} {
		_, narinfo, listing := topObject(tc.name)
		if narinfo != tc.narinfo || listing != tc.listing || bucketAuxFile(tc.name) != tc.aux {
			t.Errorf("%q: narinfo %v, listing %v, aux %v; want %v, %v, %v", tc.name, narinfo, listing,
				bucketAuxFile(tc.name), tc.narinfo, tc.listing, tc.aux)
		}
	}
}
