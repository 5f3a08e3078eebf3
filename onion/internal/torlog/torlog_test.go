package torlog

import (
	"bytes"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

func TestParse(t *testing.T) {
	cases := []struct {
		name, line, sev, msg string
	}{
		{"notice", "Nov 26 09:27:34.802 [notice] Tor 0.4.9.11 running", "notice", "Tor 0.4.9.11 running"},
		{"warn with brackets in message", "Nov 26 09:27:34.000 [warn] Path [x] is relative", "warn", "Path [x] is relative"},
		{"not a log line", "auth0 0872 A1A8", "", "auth0 0872 A1A8"},
		{"unknown severity", "Nov 26 09:27:34.000 [foo] bar", "", "Nov 26 09:27:34.000 [foo] bar"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sev, msg := Parse(c.line)
			if sev != c.sev || msg != c.msg {
				t.Errorf("Parse(%q) = %q, %q; want %q, %q", c.line, sev, msg, c.sev, c.msg)
			}
		})
	}
}

func TestWriterLogsLinesAtTorsLevel(t *testing.T) {
	var out bytes.Buffer
	l := logrus.New()
	l.SetOutput(&out)
	l.SetLevel(logrus.DebugLevel)
	l.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true})
	var seen []string
	w := &Writer{Log: logrus.NewEntry(l), OnLine: func(sev, msg string) { seen = append(seen, sev) }}
	// Lines split across writes are joined; a partial line waits.
	w.Write([]byte("Nov 26 09:27:34.802 [notice] Boot"))
	w.Write([]byte("strapped 100% (done): Done\nNov 26 09:27:35.000 [warn] careful\nNov 26 09:27:35.000 [err] bad\npartial"))
	got := out.String()
	for _, want := range []string{
		`level=debug msg="tor: Bootstrapped 100% (done): Done"`,
		`level=warning msg="tor: careful"`,
		`level=error msg="tor: bad"`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("log lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "partial") {
		t.Errorf("an unfinished line was logged")
	}
	if strings.Join(seen, ",") != "notice,warn,err" {
		t.Errorf("OnLine saw %v", seen)
	}
	if r := w.Recent(); strings.Join(r, ",") != "careful,bad" {
		t.Errorf("Recent() = %v", r)
	}
}
