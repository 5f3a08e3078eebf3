// Command kiss-onion is a private Nix binary cache behind Tor.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// command is one subcommand: its name, a one-line summary and its entry point.
// run gets the arguments after the subcommand's name.
type command struct {
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

// register adds a subcommand; each subcommand's file calls it from init.
func register(name, summary string, run func(args []string) error) {
	commands[name] = command{summary: summary, run: run}
}

// usageError is an error in how the command was called: it exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// hintError is an error that comes with a hint of what to type next.
type hintError struct {
	err  error
	hint string
}

func (e *hintError) Error() string { return e.err.Error() }
func (e *hintError) Unwrap() error { return e.err }

// withHint attaches a hint to err.
func withHint(err error, format string, args ...any) error {
	return &hintError{err: err, hint: fmt.Sprintf(format, args...)}
}

var stderr io.Writer = os.Stderr

func errorf(format string, args ...any) {
	fmt.Fprintf(stderr, "kiss-onion: error: "+format+"\n", args...)
}

func warningf(format string, args ...any) {
	fmt.Fprintf(stderr, "kiss-onion: warning: "+format+"\n", args...)
}

func hintf(format string, args ...any) {
	fmt.Fprintf(stderr, "kiss-onion: hint: "+format+"\n", args...)
}

func mainUsage() string {
	var b strings.Builder
	b.WriteString("Usage:\n\tkiss-onion <command> [arguments]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for name := range commands {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Fprintf(&b, "\t%-10s %s\n", name, commands[name].summary)
	}
	b.WriteString("\nRun 'kiss-onion <command> -h' for a command's arguments.\n")
	return b.String()
}

func main() {
	os.Exit(run(os.Args[1:]))
}

// run dispatches to a subcommand and turns its error into an exit code.
func run(args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, mainUsage())
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		errorf("unknown command %q", args[0])
		hintf("run 'kiss-onion help' for the list of commands")
		return 2
	}
	err := cmd.run(args[1:])
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	}
	var ue *usageError
	if errors.As(err, &ue) {
		errorf("%s", ue.msg)
		hintf("run 'kiss-onion %s -h' for usage", args[0])
		return 2
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	errorf("%s", err)
	var he *hintError
	if errors.As(err, &he) {
		hintf("%s", he.hint)
	}
	return 1
}

// exitError makes run exit with code without printing anything more, for a
// command that already reported (or passes on a child's status).
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// flagSetMade, when set, sees every FlagSet that newFlagSet makes: a test
// checks with it that a command's usage lists all of its flags.
var flagSetMade func(*flag.FlagSet)

// newFlagSet returns a FlagSet whose usage prints usage (a text with an
// "Arguments:" part) followed by the flags.
func newFlagSet(name, usage string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	if flagSetMade != nil {
		flagSetMade(fs)
	}
	fs.SetOutput(stderr)
	fs.Usage = func() {
		// fs.Output, not stderr: parseFlags silences it for flag errors,
		// which get one line instead of the whole text.
		fmt.Fprint(fs.Output(), strings.TrimLeft(usage, "\n"))
		fmt.Fprintln(fs.Output(), "\nFlags:")
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args into fs, turning a flag error into a usage error.
func parseFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return flag.ErrHelp
	}
	if err != nil {
		return usagef("%s", err)
	}
	return nil
}

// parseArgs parses args into fs, allowing flags anywhere among the
// arguments ("prune /srv/cache --dry-run"), and returns the arguments.
// Everything after "--" is an argument.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := parseFlags(fs, args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}
