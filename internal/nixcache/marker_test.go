package nixcache

import (
	"strings"
	"testing"
)

func TestCheckMarkerName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"web1", true},
		{"hosts/web1", true},
		{"ci:main!", true},
		{strings.Repeat("a/", 7) + "a", true},
		{strings.Repeat("a/", 8) + "a", false}, // nested too deep
		{"", false},
		{".lock", false},
		{"hosts/.hidden", false},
		{"hosts//web1", false},
		{"web1/", false},
		{"../web1", false},
		{"web 1", false},
		{strings.Repeat("a", 256), false},
	} {
		err := CheckMarkerName(tc.name)
		if (err == nil) != tc.ok {
			t.Errorf("CheckMarkerName(%q) = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
}
