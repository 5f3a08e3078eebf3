package main

import (
	"strings"
	"testing"
)

// TestServeStoreRefusals: a store serve cannot use is refused before
// anything starts, naming the flag.
func TestServeStoreRefusals(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--store", "/srv/cache"}, "--store \"/srv/cache\": want s3://BUCKET/PREFIX"},
		{[]string{"--store", "s3://b/p?colour=red"}, "unknown parameter"},
	} {
		args := append([]string{"serve", "--tor", "off", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir()}, tc.args...)
		code, out, _ := runInProcess(t, args...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("serve %q: exit %d, want a failure saying %q:\n%s", tc.args, code, tc.want, out)
		}
	}
}
