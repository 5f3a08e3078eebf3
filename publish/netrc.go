package publish

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
)

// Netrc is the entry of a netrc file (curl's format, which Nix's
// netrc-file option names) for one host: the credentials publish,
// with-lock and update send with their own requests to a cache whose
// door takes basic auth, as an OIDC door takes a token as its password.
type Netrc struct {
	// File is the netrc file, given to nix as its netrc-file option.
	File string
	// Host is the machine the entry is for.
	Host string

	login, password string
}

// String names the entry, and never its password.
func (n Netrc) String() string { return "netrc " + n.File + " for " + n.Host }

// ReadNetrc returns the entry of the netrc file for host: its "machine
// host" entry, else its "default" one. Tokens are separated by blanks, a
// token may be double-quoted (with \" and \\ inside), a "#" at the start
// of a token comments out the rest of its line, and a macdef's lines run
// to the next empty line, as in curl.
func ReadNetrc(file, host string) (Netrc, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return Netrc{}, fmt.Errorf("netrc: %w", err)
	}
	entries, err := parseNetrc(string(data))
	if err != nil {
		return Netrc{}, fmt.Errorf("netrc %s: %w", file, err)
	}
	found, ok := entries[host]
	if !ok {
		found, ok = entries[""]
	}
	if !ok {
		return Netrc{}, fmt.Errorf("netrc %s: no entry for machine %s, and no default", file, host)
	}
	if found.password == "" {
		return Netrc{}, fmt.Errorf("netrc %s: the entry for %s has no password", file, host)
	}
	found.File, found.Host = file, host
	return found, nil
}

// parseNetrc returns the entries of a netrc file by machine, the default
// one under "". The first entry of a machine wins, as in curl.
func parseNetrc(text string) (map[string]Netrc, error) {
	entries := map[string]Netrc{}
	lx := &netrcLexer{s: text, line: 1}
	var cur *Netrc
	var machine string
	end := func() {
		if _, dup := entries[machine]; cur != nil && !dup {
			entries[machine] = *cur
		}
		cur = nil
	}
	for {
		tok, ok, err := lx.next()
		if err != nil {
			return nil, err
		}
		if !ok {
			end()
			return entries, nil
		}
		at := lx.line
		if !slices.Contains([]string{"machine", "default", "login", "password", "account", "macdef"}, tok) {
			// Not quoted: a misplaced word may be a password.
			return nil, fmt.Errorf("line %d: a word that is not a keyword (machine, default, login, password, account, macdef) where one belongs", at)
		}
		var v string
		if tok != "default" {
			if v, err = lx.value(tok); err != nil {
				return nil, err
			}
		}
		switch tok {
		case "machine", "default":
			end()
			machine, cur = v, &Netrc{}
		case "login", "password", "account":
			if cur == nil {
				return nil, fmt.Errorf("line %d: %q before any machine or default", at, tok)
			}
			if tok == "login" {
				cur.login = v
			} else if tok == "password" {
				cur.password = v
			}
		case "macdef":
			lx.skipMacro()
		}
	}
}

// netrcLexer cuts a netrc file into words.
type netrcLexer struct {
	s    string // what is left
	line int    // the line the next word is on
}

// next returns the next word, false at the end.
func (lx *netrcLexer) next() (string, bool, error) {
	for {
		for lx.s != "" && strings.IndexByte(" \t\r\n", lx.s[0]) >= 0 {
			if lx.s[0] == '\n' {
				lx.line++
			}
			lx.s = lx.s[1:]
		}
		switch {
		case lx.s == "":
			return "", false, nil
		case lx.s[0] == '#':
			// A comment, to the end of its line.
			i := strings.IndexByte(lx.s, '\n')
			if i < 0 {
				i = len(lx.s)
			}
			lx.s = lx.s[i:]
			continue
		case lx.s[0] == '"':
			return lx.quoted()
		}
		i := strings.IndexAny(lx.s, " \t\r\n")
		if i < 0 {
			i = len(lx.s)
		}
		tok := lx.s[:i]
		lx.s = lx.s[i:]
		return tok, true, nil
	}
}

// value returns the word after the keyword tok.
func (lx *netrcLexer) value(tok string) (string, error) {
	at := lx.line
	v, ok, err := lx.next()
	if err == nil && !ok {
		err = fmt.Errorf("line %d: %q needs a value", at, tok)
	}
	return v, err
}

// quoted takes a double-quoted word, with \" and \\ inside.
func (lx *netrcLexer) quoted() (string, bool, error) {
	var b strings.Builder
	for i := 1; i < len(lx.s); i++ {
		switch c := lx.s[i]; c {
		case '"':
			lx.s = lx.s[i+1:]
			return b.String(), true, nil
		case '\\':
			if i+1 < len(lx.s) {
				i++
				b.WriteByte(lx.s[i])
			}
		case '\n':
			return "", false, fmt.Errorf("line %d: a quoted word runs past the end of its line", lx.line)
		default:
			b.WriteByte(c)
		}
	}
	return "", false, fmt.Errorf("line %d: a quoted word is not closed", lx.line)
}

// skipMacro skips a macdef's lines, which run to the next empty line.
func (lx *netrcLexer) skipMacro() {
	i := strings.Index(lx.s, "\n\n")
	if i < 0 {
		i = len(lx.s)
	}
	lx.line += strings.Count(lx.s[:i], "\n")
	lx.s = lx.s[i:]
}

// netrcTransport adds the entry's basic auth to requests for its host,
// and only to those: a redirect elsewhere gets no credentials.
type netrcTransport struct {
	base  http.RoundTripper
	netrc Netrc
}

func (t netrcTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Hostname() != t.netrc.Host {
		return t.base.RoundTrip(req)
	}
	req = req.Clone(req.Context())
	req.SetBasicAuth(t.netrc.login, t.netrc.password)
	return t.base.RoundTrip(req)
}

// UseNetrc makes the marker's requests carry the credentials of the
// netrc file's entry for the cache's host.
func (m *MarkerURL) UseNetrc(file string) (Netrc, error) {
	if m.base == nil {
		return Netrc{}, errors.New("a netrc file is for a cache URL, not a local cache directory")
	}
	n, err := ReadNetrc(file, m.base.Hostname())
	if err != nil {
		return Netrc{}, err
	}
	base := m.client.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	c := *m.client
	c.Transport = netrcTransport{base: base, netrc: n}
	m.client = &c
	return n, nil
}

// withNetrc makes the marker's requests and the nix commands carry the
// credentials of the netrc file, when one is given.
func withNetrc(m *MarkerURL, n *Nix, file string) error {
	if file == "" {
		return nil
	}
	if _, err := m.UseNetrc(file); err != nil {
		return err
	}
	n.Options = append(slices.Clip(n.Options), [2]string{"netrc-file", file})
	return nil
}
