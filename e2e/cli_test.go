package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestServeCommandLine runs the real binary with bad settings: each is an
// error that says what is wrong, on stderr in the house voice, with the
// exit code for a usage error (2) or a failure (1).
func TestServeCommandLine(t *testing.T) {
	dir := t.TempDir()
	badConfig := filepath.Join(dir, "bad.toml")
	os.WriteFile(badConfig, []byte("cache-dir = \""+filepath.Join(dir, "c")+"\"\n\npriorty = 3\n"), 0o644)
	goodConfig := filepath.Join(dir, "good.toml")
	os.WriteFile(goodConfig, []byte("tor = \"off\"\n"), 0o644)
	base := []string{"serve", "--cache-dir", filepath.Join(dir, "cache"), "--state-dir", filepath.Join(dir, "state")}
	tests := []struct {
		name string
		args []string
		code int
		says []string
	}{
		{"no command", nil, 2, []string{"Usage:"}},
		{"unknown command", []string{"serv"}, 2, []string{"kiss-onion: error: unknown command \"serv\"", "kiss-onion: hint:"}},
		{"unknown flag", append(base, "--bogus"), 2, []string{"kiss-onion: error:", "bogus"}},
		{"config error names file and line", append(base, "--config", badConfig), 1, []string{badConfig + ":3", `unknown key "priorty"`}},
		{"missing config file", append(base, "--config", filepath.Join(dir, "none.toml")), 1, []string{"none.toml"}},
		{"non-loopback listener", append(base, "--tor", "off", "--listen", "0.0.0.0:8080"), 2, []string{"not a loopback address", "--allow-remote"}},
		{"listener address without port", append(base, "--tor", "off", "--listen", "127.0.0.1"), 2, []string{"--listen"}},
		{"tor off with no listener", append(base, "--config", goodConfig), 2, []string{"--listen"}},
		{"bad tor mode", append(base, "--tor", "maybe"), 2, []string{"--tor must be"}},
		{"bad writer key", append(base, "--tor", "off", "--listen", "127.0.0.1:0", "--trusted-writer-key", "nokey"), 2, []string{"--trusted-writer-key"}},
		{"bad upload size", append(base, "--max-upload-size", "lots"), 2, []string{"max-upload-size"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := runKissOnion(t, tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d\n%s", code, tt.code, out)
			}
			for _, s := range tt.says {
				if !strings.Contains(out, s) {
					t.Errorf("output does not say %q:\n%s", s, out)
				}
			}
		})
	}
	// The state directory is private even when it existed before.
	state := filepath.Join(dir, "state2")
	os.MkdirAll(state, 0o755)
	srv := startServer(t, "", "--state-dir", state)
	srv.stop()
	if fi, err := os.Stat(state); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state directory mode %v, want 0700 (%v)", fi.Mode().Perm(), err)
	}
}
