package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

func TestCLILogLinesKeepTheErrorAndFields(t *testing.T) {
	for _, tc := range []struct {
		name string
		log  func(*logrus.Entry)
		want string
	}{
		{"plain", func(l *logrus.Entry) { l.Info("pruned") }, "kiss-onion: pruned\n"},
		{"warning with its cause", func(l *logrus.Entry) {
			l.WithError(errors.New("exit status 1")).Warn("restart tor")
		}, "kiss-onion: warning: restart tor: exit status 1\n"},
		{"error with fields, sorted", func(l *logrus.Entry) {
			l.WithFields(logrus.Fields{"lock": "web1.1a2b", "after": "30m0s"}).WithError(errors.New("refused")).Error("lock lost")
		}, "kiss-onion: error: lock lost: refused (after=30m0s, lock=web1.1a2b)\n"},
		{"debug is below the default level", func(l *logrus.Entry) { l.Debug("noise") }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			log, err := logFlags{}.cli(&buf)
			if err != nil {
				t.Fatal(err)
			}
			tc.log(log)
			if buf.String() != tc.want {
				t.Errorf("got %q, want %q", buf.String(), tc.want)
			}
		})
	}
}

func TestJSONLogsAreStructured(t *testing.T) {
	for _, build := range []func(logFlags, *bytes.Buffer) (*logrus.Entry, error){
		func(f logFlags, b *bytes.Buffer) (*logrus.Entry, error) { return f.cli(b) },
		func(f logFlags, b *bytes.Buffer) (*logrus.Entry, error) { return f.daemon(b) },
	} {
		var buf bytes.Buffer
		log, err := build(logFlags{format: "json", level: "info"}, &buf)
		if err != nil {
			t.Fatal(err)
		}
		log.WithField("lock", "ci.1").WithError(errors.New("gone")).Warn("refresh the upload lock")
		var got map[string]any
		if err := json.Unmarshal(buf.Bytes(), &got); err != nil {
			t.Fatalf("not JSON: %q: %v", buf.String(), err)
		}
		if got["msg"] != "refresh the upload lock" || got["lock"] != "ci.1" || got["error"] != "gone" || got["level"] != "warning" {
			t.Errorf("JSON entry = %v", got)
		}
	}
}

func TestLogFlagsRefuseUnknownValues(t *testing.T) {
	for _, f := range []logFlags{{format: "xml"}, {format: "text", level: "loud"}} {
		_, err := f.cli(&bytes.Buffer{})
		var ue *usageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), "--log-") {
			t.Errorf("%+v: %v, want a usage error naming the flag", f, err)
		}
	}
}
