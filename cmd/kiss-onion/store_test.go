package main

import (
	"strings"
	"testing"
)

// TestServeStoreRefusals: what does not run on a bucket yet is refused
// before anything starts, naming the flag.
func TestServeStoreRefusals(t *testing.T) {
	up := []string{"--upstream", "http://127.0.0.1:1", "--upstream-key", "up-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--store", "/srv/cache"}, "want s3://BUCKET/PREFIX"},
		{append([]string{"--store", "s3://b/p", "--upstream-keep", "1h"}, up...), "--upstream-keep and --upstream-max-size do not run with --store yet"},
		{append([]string{"--store", "s3://b/p", "--upstream-max-size", "1G"}, up...), "--upstream-keep and --upstream-max-size do not run with --store yet"},
	} {
		args := append([]string{"serve", "--tor", "off", "--listen", "127.0.0.1:0", "--state-dir", t.TempDir()}, tc.args...)
		code, out, _ := runInProcess(t, args...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("serve %q: exit %d, want a failure saying %q:\n%s", tc.args, code, tc.want, out)
		}
	}
}
