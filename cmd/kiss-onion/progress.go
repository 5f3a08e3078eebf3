package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/prune"
	"github.com/kiss-onion/kiss-onion/publish"
)

// The progress of the long one-shot commands, prune and publish: a bar
// at the bottom of the terminal when stderr is one and the log is text
// (github.com/schollz/progressbar), plain log lines otherwise.

// termBar is a progress bar on stderr; what else is written to it (the
// log) goes above the bar. Its methods may be called from several
// goroutines.
type termBar struct {
	mu   sync.Mutex
	w    io.Writer
	bar  *progressbar.ProgressBar
	done bool
}

// newTermBar returns a bar of max steps (-1 when unknown: a spinner) on
// stderr when it is a terminal and the log format is text; else nil.
func newTermBar(logFormat string, max int64, opts ...progressbar.Option) *termBar {
	if logFormat == "json" || !isTerminal(os.Stderr) {
		return nil
	}
	opts = append([]progressbar.Option{
		progressbar.OptionSetWriter(stderr),
		progressbar.OptionUseANSICodes(true),
		// No goroutine of its own: it is drawn when told something.
		progressbar.OptionSetSpinnerChangeInterval(0),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionSetWidth(30),
	}, opts...)
	return &termBar{w: stderr, bar: progressbar.NewOptions64(max, opts...)}
}

// Write writes p above the bar.
func (b *termBar) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.bar.Clear()
	n, err := b.w.Write(p)
	if !b.done {
		b.bar.RenderBlank()
	}
	return n, err
}

// above runs fn, which writes elsewhere on the terminal (stdout), with
// the bar out of the way.
func (b *termBar) above(fn func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.bar.Clear()
	fn()
	if !b.done {
		b.bar.RenderBlank()
	}
}

func (b *termBar) describe(s string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		b.bar.Describe(s)
	}
}

// set moves the bar to n steps of max.
func (b *termBar) set(n, max int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		if max != b.bar.GetMax64() {
			b.bar.ChangeMax64(max)
		}
		b.bar.Set64(n)
	}
}

// finish takes the bar off the terminal for good.
func (b *termBar) finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		b.bar.Clear()
		b.bar.Exit()
		b.done = true
	}
}

// pruneProgress returns the prune.Options.Progress of `kiss-onion prune`:
// the phase and the counts on bar, or without one a log line at each
// change of phase and every progressLogEvery within one.
func pruneProgress(bar *termBar, log *logrus.Entry) func(prune.Stats) {
	if bar != nil {
		return func(st prune.Stats) {
			if st.Phase != prune.PhaseDone {
				bar.describe(fmt.Sprintf("%s: %d narinfos scanned, %d kept, %d files deleted, %s freed",
					st.Phase, st.Scanned, st.Kept, st.Deleted, prune.FormatBytes(st.BytesFreed)))
			}
		}
	}
	phase, at := "", time.Time{}
	return func(st prune.Stats) {
		if st.Phase == prune.PhaseDone || st.Phase == phase && time.Since(at) < progressLogEvery {
			return
		}
		phase, at = st.Phase, time.Now()
		log.WithFields(logrus.Fields{"scanned": st.Scanned, "kept": st.Kept, "deleted": st.Deleted,
			"freed": prune.FormatBytes(st.BytesFreed)}).Info("prune: " + st.Phase)
	}
}

// progressLogEvery is how often a long phase logs its progress when there
// is no bar.
const progressLogEvery = 10 * time.Second

// Lines of `nix copy`'s output when stderr is not a terminal (Nix 2.8 to
// 2.18 at least): "copying 2 paths...", then one line as each path starts:
// "copying path '/nix/store/...' [from 'local'] to 'http://...'...".
var (
	nixCopyingPaths = regexp.MustCompile(`^copying ([0-9]+) paths`)
	nixCopyingPath  = regexp.MustCompile(`^copying path '([^']+)'`)
)

// pushProgress follows `nix copy` for publish: it reads nix's output
// (its publish.Nix.Output) and counts the paths pushed, and their bytes
// from the NAR sizes (uncompressed) that `nix path-info` gave for the
// closure. On a terminal the bar shows them, in place of nix's lines
// about each path; without one nix's output passes as it is. At the end
// a log line says what was pushed.
type pushProgress struct {
	bar   *termBar  // nil without a terminal
	out   io.Writer // where the rest of nix's output goes
	log   *logrus.Entry
	sizes map[string]int64 // NAR size of each path of the closure, if known

	mu      sync.Mutex
	buf     []byte
	total   int64  // paths to push: the closure's until nix says
	current string // the path being pushed
	paths   int64  // paths pushed
	bytes   int64  // their NAR sizes
}

// newPushProgress returns the progress of a push, with a bar when
// logFormat and stderr allow one; logOut is where the log should go.
func newPushProgress(logFormat string) (p *pushProgress, logOut io.Writer) {
	p = &pushProgress{out: stderr, log: logrus.NewEntry(logrus.StandardLogger())}
	if p.bar = newTermBar(logFormat, 1, progressbar.OptionShowCount(), progressbar.OptionSetDescription("pushing")); p.bar != nil {
		p.out = p.bar
	}
	return p, p.out
}

// measure asks nix for the NAR sizes of the closure of paths, which it
// is about to push.
func (p *pushProgress) measure(ctx context.Context, n publish.Nix, paths []string) {
	sizes, err := closureSizes(ctx, n, paths)
	if err != nil {
		// nix copy will say what is wrong; the progress goes without sizes.
		p.log.WithError(err).Debug("no NAR sizes for the progress")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sizes, p.total = sizes, int64(len(sizes))
}

// Write reads nix's output a line at a time.
func (p *pushProgress) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.buf = append(p.buf, b...)
	for {
		i := bytes.IndexByte(p.buf, '\n')
		if i < 0 {
			return len(b), nil
		}
		line := p.buf[:i+1]
		p.line(strings.TrimRight(string(line), "\r\n"))
		if p.bar == nil || !nixCopyingPath.Match(line) && !nixCopyingPaths.Match(line) {
			p.out.Write(line)
		}
		p.buf = p.buf[i+1:]
	}
}

func (p *pushProgress) line(s string) {
	if m := nixCopyingPaths.FindStringSubmatch(s); m != nil {
		p.total, _ = strconv.ParseInt(m[1], 10, 64)
	} else if m := nixCopyingPath.FindStringSubmatch(s); m != nil {
		p.donePath()
		p.current = m[1]
	} else {
		return
	}
	if p.bar != nil {
		p.bar.set(p.paths, max(p.total, p.paths+1, 1))
		if _, name, ok := strings.Cut(filepath.Base(p.current), "-"); ok {
			p.bar.describe(fmt.Sprintf("pushing %s (%s pushed)", name, prune.FormatBytes(p.bytes)))
		}
	}
}

// donePath counts the path being pushed as pushed: nix goes to the next
// only when it is.
func (p *pushProgress) donePath() {
	if p.current != "" {
		p.paths++
		p.bytes += p.sizes[p.current]
		p.current = ""
	}
}

// end takes the bar away and, when the push succeeded, says what it
// pushed.
func (p *pushProgress) end(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.buf) > 0 {
		p.out.Write(append(p.buf, '\n'))
		p.buf = nil
	}
	if p.bar != nil {
		p.bar.finish()
	}
	if err != nil {
		return
	}
	p.donePath()
	l := p.log.WithFields(logrus.Fields{"paths": p.paths, "bytes": p.bytes})
	if len(p.sizes) > 0 {
		l.Infof("pushed %d paths (%s of NARs, uncompressed); %d of the closure's %d were in the cache already",
			p.paths, prune.FormatBytes(p.bytes), int64(len(p.sizes))-p.paths, len(p.sizes))
	} else {
		l.Infof("pushed %d paths", p.paths)
	}
}

// closureSizes asks nix for the NAR size of every path in the closure of
// paths.
func closureSizes(ctx context.Context, n publish.Nix, paths []string) (map[string]int64, error) {
	args := append([]string{"--extra-experimental-features", "nix-command", "path-info", "--json", "--recursive"}, paths...)
	if n.Store != "" {
		args = append(args, "--store", n.Store)
	}
	for _, o := range n.Options {
		args = append(args, "--option", o[0], o[1])
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nix", args...).Output()
	if err != nil {
		return nil, fmt.Errorf("nix path-info: %w", err)
	}
	return parsePathInfo(out)
}

// parsePathInfo reads `nix path-info --json`: a list of objects with a
// path (Nix up to 2.18), or an object by path (later Nix).
func parsePathInfo(data []byte) (map[string]int64, error) {
	type info struct {
		Path    string `json:"path"`
		NarSize int64  `json:"narSize"`
	}
	sizes := map[string]int64{}
	var list []info
	if err := json.Unmarshal(data, &list); err == nil {
		for _, i := range list {
			sizes[i.Path] = i.NarSize
		}
		return sizes, nil
	}
	var byPath map[string]*info
	if err := json.Unmarshal(data, &byPath); err != nil {
		return nil, fmt.Errorf("nix path-info --json: %w", err)
	}
	for path, i := range byPath {
		if i != nil {
			sizes[path] = i.NarSize
		}
	}
	return sizes, nil
}
