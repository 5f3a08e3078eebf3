package prune

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	pt "github.com/kiss-onion/kiss-onion/prune/prunetest"
)

func TestKeyRoundTrip(t *testing.T) {
	for _, name := range []string{"a", "b", "hello-2.12", "x.drv"} {
		h := pt.HashPart(name)
		k, ok := parseKey(h)
		if !ok || k.String() != h {
			t.Errorf("parseKey(%q) = %v, %v; String() = %q", h, k, ok, k.String())
		}
	}
	for _, bad := range []string{"", "e0000000000000000000000000000000", "0000000000000000000000000000000", "000000000000000000000000000000000"} {
		if _, ok := parseKey(bad); ok {
			t.Errorf("parseKey(%q) accepted it", bad)
		}
	}
}

// metaRun prunes dir with a metadata cache in state.
func metaRun(t *testing.T, dir, state string) Stats {
	t.Helper()
	st, err := Run(context.Background(), Options{CacheDir: dir, StateDir: state, Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestMetadataCache(t *testing.T) {
	base := scenario{
		paths: []pt.Path{
			p("a", "b", "c"), p("b", "d"), p("c"), p("d"),
			p("g1", "g2"), p("g2"),
		},
		markers: map[string][]string{"m": {"a"}},
	}
	for _, tc := range []struct {
		name string
		// between runs the first and the second prune
		between   func(t *testing.T, dir string)
		kept      []string
		gone      []string
		goneFiles []string
		read      int64
		invalidOK bool
	}{
		{
			name:    "an unchanged cache is not read again",
			between: func(t *testing.T, dir string) {},
			kept:    []string{"a", "b", "c", "d"},
			gone:    []string{"g1", "g2"},
			read:    0,
		},
		{
			name: "a narinfo rewritten in place, same size and time, is read again",
			between: func(t *testing.T, dir string) {
				// a no longer refers to c: c must go, whatever the cache says.
				f := filepath.Join(dir, pt.NarInfoFile("a"))
				fi, _ := os.Stat(f)
				old, _ := os.ReadFile(f)
				data := strings.Replace(string(old), " "+pt.BaseName("c"), "", 1)
				data += strings.Repeat("\n", len(old)-len(data))
				time.Sleep(10 * time.Millisecond)
				must(t, os.WriteFile(f, []byte(data), 0o644))
				must(t, os.Chtimes(f, fi.ModTime(), fi.ModTime()))
			},
			kept: []string{"a", "b", "d"},
			gone: []string{"c", "g1", "g2"},
			read: 1,
		},
		{
			name: "a narinfo replaced by rename is read again",
			between: func(t *testing.T, dir string) {
				// b now refers to g2 too: g2 must stay.
				f := filepath.Join(dir, pt.NarInfoFile("b"))
				must(t, os.WriteFile(f+".new", pt.NarInfo(p("b", "d", "g2")), 0o644))
				must(t, os.Rename(f+".new", f))
				old := time.Now().Add(-time.Hour)
				must(t, os.Chtimes(f, old, old))
			},
			kept: []string{"a", "b", "d", "g2"},
			gone: []string{"g1"},
			read: 1,
		},
		{
			name: "a narinfo deleted out of band loses its NAR",
			between: func(t *testing.T, dir string) {
				must(t, os.Remove(filepath.Join(dir, pt.NarInfoFile("d"))))
			},
			kept:      []string{"a", "b", "c"},
			goneFiles: []string{pt.NarURL("d")},
			read:      0,
			invalidOK: true, // b refers to d, which is gone
		},
		{
			name: "a narinfo deleted and written again with other references",
			between: func(t *testing.T, dir string) {
				f := filepath.Join(dir, pt.NarInfoFile("c"))
				must(t, os.Remove(f))
				must(t, os.WriteFile(f, pt.NarInfo(p("c", "g1")), 0o644))
				old := time.Now().Add(-time.Hour)
				must(t, os.Chtimes(f, old, old))
			},
			kept: []string{"a", "b", "c", "d", "g1", "g2"},
			read: 1,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := base.build(t)
			state := t.TempDir()
			// A dry run fills the metadata cache and deletes nothing.
			st, err := Run(context.Background(), Options{CacheDir: dir, StateDir: state, Log: quietLog(), DryRun: true})
			must(t, err)
			if st.Read != 6 {
				t.Errorf("first prune read %d narinfos, want 6", st.Read)
			}
			tc.between(t, dir)
			st = metaRun(t, dir, state)
			if st.Read != tc.read {
				t.Errorf("second prune read %d narinfos, want %d", st.Read, tc.read)
			}
			sc := scenario{kept: tc.kept, gone: tc.gone, goneFiles: tc.goneFiles, invalidOK: tc.invalidOK}
			sc.check(t, dir)
		})
	}
}

func TestCorruptMetadataCacheIsRebuilt(t *testing.T) {
	sc := scenario{paths: []pt.Path{p("a", "b"), p("b"), p("g")}, markers: map[string][]string{"m": {"a"}}}
	for _, corrupt := range []struct {
		name string
		fn   func(data []byte) []byte
	}{
		{"flipped byte", func(d []byte) []byte { d[len(d)/2] ^= 0x40; return d }},
		{"truncated", func(d []byte) []byte { return d[:len(d)-9] }},
		{"empty", func(d []byte) []byte { return nil }},
		{"garbage", func(d []byte) []byte { return []byte("KOPRMETA and then nonsense") }},
	} {
		t.Run(corrupt.name, func(t *testing.T) {
			dir := sc.build(t)
			state := t.TempDir()
			metaRun(t, dir, state)
			f := metaPath(state, dir)
			data, err := os.ReadFile(f)
			must(t, err)
			must(t, os.WriteFile(f, corrupt.fn(data), 0o600))
			// Something to delete, so that trusting bad data would show.
			must(t, pt.Write(dir, p("g2")))
			backdate(t, dir, time.Hour)
			st := metaRun(t, dir, state)
			if st.Read != 3 {
				t.Errorf("prune over a corrupt cache read %d narinfos, want all 3", st.Read)
			}
			(scenario{kept: []string{"a", "b"}, gone: []string{"g", "g2"}}).check(t, dir)
			if st := metaRun(t, dir, state); st.Read != 0 {
				t.Errorf("prune after the rebuild read %d narinfos, want 0", st.Read)
			}
		})
	}
}

func TestMetadataCacheOfAnotherCacheIsIgnored(t *testing.T) {
	sc := scenario{paths: []pt.Path{p("a")}, markers: map[string][]string{"m": {"a"}}}
	dir1, dir2 := sc.build(t), sc.build(t)
	state := t.TempDir()
	metaRun(t, dir1, state)
	// Same state directory, other cache: its own file.
	if st := metaRun(t, dir2, state); st.Read != 1 {
		t.Errorf("read %d, want 1", st.Read)
	}
	// A file copied from another cache does not check out.
	data, _ := os.ReadFile(metaPath(state, dir1))
	os.WriteFile(metaPath(state, dir2), data, 0o600)
	if st := metaRun(t, dir2, state); st.Read != 1 {
		t.Errorf("read %d with another cache's file, want 1", st.Read)
	}
}

func TestUnchangedDirectoriesAreNotSwept(t *testing.T) {
	base := scenario{
		paths:   []pt.Path{p("a", "b"), p("b"), withDeriver(p("c"), "c.drv"), p("g")},
		markers: map[string][]string{"m": {"a", "c"}},
		files:   map[string]string{pt.LogFile("c.drv"): "log"},
	}
	for _, tc := range []struct {
		name    string
		between func(t *testing.T, dir string)
		swept   bool
		gone    []string
	}{
		{"nothing changed", func(t *testing.T, dir string) {}, false, nil},
		{"an orphan NAR arrived", func(t *testing.T, dir string) {
			must(t, pt.WriteFile(dir, "nar/orphan.nar", []byte("x")))
			backdate(t, filepath.Join(dir, "nar"), time.Hour)
		}, true, []string{"nar/orphan.nar"}},
		{"a narinfo was deleted out of band", func(t *testing.T, dir string) {
			must(t, os.Remove(filepath.Join(dir, pt.NarInfoFile("b"))))
		}, true, []string{pt.NarURL("b")}},
		{"a marker was dropped", func(t *testing.T, dir string) {
			must(t, os.Remove(filepath.Join(dir, "gcroots", "m")))
			must(t, pt.WriteMarker(dir, "m2", "a"))
			backdate(t, filepath.Join(dir, "gcroots"), time.Hour)
		}, true, []string{pt.NarURL("c"), pt.NarInfoFile("c"), pt.LogFile("c.drv")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := base.build(t)
			state := t.TempDir()
			metaRun(t, dir, state)
			tc.between(t, dir)
			log, debugs := capturingLog()
			log.Logger.SetLevel(logrus.DebugLevel)
			if _, err := Run(context.Background(), Options{CacheDir: dir, StateDir: state, Log: log}); err != nil {
				t.Fatal(err)
			}
			skipped := strings.Contains(strings.Join(debugs(), "\n"), "nar/ unchanged")
			if skipped == tc.swept {
				t.Errorf("nar/ swept = %v, want %v; log:\n%s", !skipped, tc.swept, strings.Join(debugs(), "\n"))
			}
			for _, rel := range tc.gone {
				if exists(dir, rel) {
					t.Errorf("%s survived", rel)
				}
			}
		})
	}
}
