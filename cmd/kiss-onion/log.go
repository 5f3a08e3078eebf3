package main

import (
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"

	"github.com/sirupsen/logrus"
)

// logFlags are --log-format and --log-level, which every command that logs
// takes. Every logger of the binary is built from them, here.
type logFlags struct {
	format string
	level  string
}

func (l *logFlags) add(fs *flag.FlagSet) {
	fs.StringVar(&l.format, "log-format", "text", "log `format`: text or json")
	fs.StringVar(&l.level, "log-level", "info", "log `level`: debug, info, warn or error")
}

// daemon returns the logger of a long-running command (serve, proxy) on
// w: timestamped logfmt lines, or JSON.
func (l logFlags) daemon(w io.Writer) (*logrus.Entry, error) {
	return l.build(w, &logrus.TextFormatter{DisableColors: true, FullTimestamp: true})
}

// cli returns the logger of a one-shot command on w: "kiss-onion: ..."
// lines in the house style, or JSON.
func (l logFlags) cli(w io.Writer) (*logrus.Entry, error) {
	return l.build(w, cliFormatter{})
}

func (l logFlags) build(w io.Writer, text logrus.Formatter) (*logrus.Entry, error) {
	lg := logrus.New()
	lg.SetOutput(w)
	switch l.format {
	case "text", "":
		lg.SetFormatter(text)
	case "json":
		lg.SetFormatter(&logrus.JSONFormatter{})
	default:
		return nil, usagef("--log-format must be text or json, not %q", l.format)
	}
	level := l.level
	if level == "" {
		level = "info"
	}
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, usagef("--log-level: %v", err)
	}
	lg.SetLevel(lvl)
	return logrus.NewEntry(lg), nil
}

// quieter returns a logger like log that passes on only level and above:
// for tor's chatter under a one-shot command.
func quieter(log *logrus.Entry, level logrus.Level) *logrus.Entry {
	lg := logrus.New()
	lg.SetOutput(log.Logger.Out)
	lg.SetFormatter(log.Logger.Formatter)
	lg.SetLevel(min(level, log.Logger.GetLevel()))
	return logrus.NewEntry(lg).WithFields(log.Data)
}

// cliFormatter prints log entries in the house style: "kiss-onion:
// warning: ..." for warnings, "kiss-onion: error: ..." for errors,
// "kiss-onion: ..." for the rest; then ": " and the error, if the entry
// has one, and its other fields as (key=value, ...), so that nothing a
// logger was given is lost on a terminal.
type cliFormatter struct{}

func (cliFormatter) Format(e *logrus.Entry) ([]byte, error) {
	var b strings.Builder
	b.WriteString("kiss-onion: ")
	switch e.Level {
	case logrus.WarnLevel:
		b.WriteString("warning: ")
	case logrus.ErrorLevel, logrus.FatalLevel, logrus.PanicLevel:
		b.WriteString("error: ")
	}
	b.WriteString(e.Message)
	if err, ok := e.Data[logrus.ErrorKey]; ok {
		fmt.Fprintf(&b, ": %v", err)
	}
	keys := make([]string, 0, len(e.Data))
	for k := range e.Data {
		if k != logrus.ErrorKey {
			keys = append(keys, k)
		}
	}
	if len(keys) > 0 {
		sort.Strings(keys)
		b.WriteString(" (")
		for i, k := range keys {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s=%v", k, e.Data[k])
		}
		b.WriteString(")")
	}
	b.WriteByte('\n')
	return []byte(b.String()), nil
}
