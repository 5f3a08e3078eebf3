package publish

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/sirupsen/logrus"
)

// Nix runs the nix commands of Publish and Update.
type Nix struct {
	// Store is given to every command as --store ("" for Nix's default):
	// a chroot store (an absolute directory, or local?root=DIR) puts store
	// paths under DIR on disk, which Update takes into account.
	Store string
	// Options are given to every command as --option NAME VALUE.
	Options [][2]string
	// Output receives the commands' output; os.Stderr when nil.
	Output io.Writer
}

// ParseNixOption parses "NAME=VALUE" for Nix.Options.
func ParseNixOption(s string) ([2]string, error) {
	name, value, ok := strings.Cut(s, "=")
	name = strings.TrimSpace(name)
	if !ok || name == "" || strings.ContainsAny(name, " \t") {
		return [2]string{}, fmt.Errorf("nix option %q: want NAME=VALUE", s)
	}
	return [2]string{name, strings.TrimSpace(value)}, nil
}

// args returns the arguments every command gets after its own.
func (n Nix) args() []string {
	var a []string
	if n.Store != "" {
		a = append(a, "--store", n.Store)
	}
	for _, o := range n.Options {
		a = append(a, "--option", o[0], o[1])
	}
	return a
}

// run runs a nix program with args (then the common arguments), its output
// going to n.Output, and logs it first.
func (n Nix) run(ctx context.Context, log *logrus.Entry, program string, args ...string) error {
	args = append(args, n.args()...)
	log.WithField("command", program+" "+strings.Join(args, " ")).Info("run")
	cmd := exec.CommandContext(ctx, program, args...)
	cmd.Stdout, cmd.Stderr = n.output(), n.output()
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w", program, err)
	}
	return nil
}

func (n Nix) output() io.Writer {
	if n.Output == nil {
		return os.Stderr
	}
	return n.Output
}

// root returns the directory a chroot store lives under, or "".
func (n Nix) root() string {
	s := n.Store
	if strings.HasPrefix(s, "/") {
		return filepath.Clean(s)
	}
	if rest, ok := strings.CutPrefix(s, "local?"); ok {
		if q, err := url.ParseQuery(rest); err == nil && strings.HasPrefix(q.Get("root"), "/") {
			return filepath.Clean(q.Get("root"))
		}
	}
	return ""
}

// Physical returns where the store path p is on disk.
func (n Nix) Physical(p string) string {
	if r := n.root(); r != "" {
		return filepath.Join(r, p)
	}
	return p
}
