package closure

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

const (
	h1 = "0c0s1ig7gb5jn0v1aq7m5d7lbhr7xp2n"
	h2 = "1d1s1ig7gb5jn0v1aq7m5d7lbhr7xp2n"
	h3 = "2f2s1ig7gb5jn0v1aq7m5d7lbhr7xp2n"
)

func TestRoundTrip(t *testing.T) {
	info := []byte("StorePath: /nix/store/" + h1 + "-a\nReferences: " + h2 + "-b\n")
	for _, complete := range []bool{true, false} {
		w := NewWriter()
		w.Found(h1, info)
		w.Missing(h2)
		w.Unknown(h3)
		w.Found(h3, nil)
		got, err := Parse(bytes.NewReader(w.End(complete)), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		want := Answer{Complete: complete, Records: []Record{
			{Hash: h1, Status: Found, NarInfo: info},
			{Hash: h2, Status: Missing},
			{Hash: h3, Status: Unknown},
			{Hash: h3, Status: Found, NarInfo: []byte{}},
		}}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("complete=%v: got %+v, want %+v", complete, got, want)
		}
	}
}

func TestParseRefuses(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		max            int64
	}{
		{"empty", "", "not a closure answer", 0},
		{"other format", "StorePath: /nix/store/x\n", "not a closure answer", 0},
		{"no last line", header + h1 + " missing\n", "unexpected EOF", 0},
		{"last line without newline", header + "end", "unexpected EOF", 0},
		{"cut narinfo", header + h1 + " 10\nabc", "unexpected EOF", 0},
		{"narinfo without newline", header + h1 + " 3\nabcXend\n", "not followed by a newline", 0},
		{"bad hash", header + "../etc/passwd missing\nend\n", "not a store hash", 0},
		{"bad status", header + h1 + " gone\nend\n", "bad status or size", 0},
		{"negative size", header + h1 + " -1\nend\n", "bad status or size", 0},
		{"huge size", header + h1 + " 99999999999\nend\n", "bad status or size", 0},
		{"data after the end", header + "end\nmore", "data after its last line", 0},
		{"over the limit", header + h1 + " 40\n" + strings.Repeat("x", 40) + "\nend\n", "larger than", 100},
		{"long line over the limit", header + strings.Repeat("x", 200) + "\n", "larger than", 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			max := tc.max
			if max == 0 {
				max = 1 << 20
			}
			_, err := Parse(strings.NewReader(tc.in), max)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%q) = %v, want an error with %q", tc.in, err, tc.want)
			}
		})
	}
}

func TestParseQuery(t *testing.T) {
	if got, err := ParseQuery(h1 + "," + h2); err != nil || !reflect.DeepEqual(got, []string{h1, h2}) {
		t.Errorf("ParseQuery of two hashes = %v, %v", got, err)
	}
	for _, bad := range []string{"", h1 + ",", "x", h1 + ",../x", strings.TrimSuffix(strings.Repeat(h1+",", MaxRoots+1), ",")} {
		if _, err := ParseQuery(bad); err == nil {
			t.Errorf("ParseQuery(%.40q...) took it", bad)
		}
	}
	if Query([]string{h1, h2}) != PathPrefix+h1+","+h2 {
		t.Errorf("Query = %q", Query([]string{h1, h2}))
	}
}

func TestReferences(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string
	}{
		{"none", "StorePath: /nix/store/" + h1 + "-a\nReferences: \n", nil},
		{"two", "StorePath: x\nReferences: " + h2 + "-b " + h3 + "-c.drv\nDeriver: " + h1 + "-d\n", []string{h2, h3}},
		{"no line", "StorePath: x\n", nil},
		{"last line unterminated", "References: " + h2 + "-b", []string{h2}},
		{"junk skipped", "References: ../../etc " + h2 + " " + h3 + "-ok\n", []string{h3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := References([]byte(tc.in)); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("References = %q, want %q", got, tc.want)
			}
		})
	}
}

// FuzzParse checks that no input makes Parse panic or take more than it
// was allowed, and that what it accepts writes back the same.
func FuzzParse(f *testing.F) {
	w := NewWriter()
	w.Found(h1, []byte("StorePath: x\n"))
	w.Missing(h2)
	f.Add(w.End(true))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, err := Parse(bytes.NewReader(in), 1<<16)
		if err != nil {
			return
		}
		w := NewWriter()
		for _, r := range a.Records {
			switch r.Status {
			case Found:
				w.Found(r.Hash, r.NarInfo)
			case Missing:
				w.Missing(r.Hash)
			case Unknown:
				w.Unknown(r.Hash)
			}
		}
		if out := w.End(a.Complete); !bytes.Equal(out, in) {
			t.Errorf("accepted %q, writes back %q", in, out)
		}
	})
}
