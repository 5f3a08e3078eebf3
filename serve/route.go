package serve

import (
	"net/url"
	"strings"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

// kind is what a request path names in the cache layout.
type kind int

const (
	kindCacheInfo   kind = iota // nix-cache-info
	kindNarInfo                 // <hash>.narinfo
	kindListing                 // <hash>.ls
	kindNar                     // nar/<file>
	kindLog                     // log/<drv>
	kindRealisation             // realisations/<id>.doi
	kindBuildTrace              // build-trace-v2/<drv>/<out>.doi
	kindDebugInfo               // debuginfo/<build-id>
	kindRoot                    // gcroots/<name>[/<name>...]
	kindLock                    // gcroots/.lock/<name>
	kindClosure                 // kiss-onion/closure/<hash>[,<hash>...] (closure.go)
)

// target is a request path resolved to a file of the cache.
type target struct {
	kind kind
	rel  string // the file's path relative to the cache directory
	name string // narinfo/listing: the hash part; lock: the lock's name
}

// routeError is a path the cache refuses, with the HTTP status to answer.
type routeError struct {
	status int
	msg    string
}

func (e *routeError) Error() string { return e.msg }

func badPath(msg string) error { return &routeError{status: 400, msg: msg} }

var errNotFound = &routeError{status: 404, msg: "not found"}

// route maps a request URL to a cache file. It refuses traversal, encoded
// slashes, NUL bytes and names outside the layout's character sets, so the
// path it returns never leaves the cache directory.
func route(u *url.URL) (target, error) {
	if u.RawPath != "" {
		raw := strings.ToLower(u.RawPath)
		if strings.Contains(raw, "%2f") || strings.Contains(raw, "%5c") || strings.Contains(raw, "%00") {
			return target{}, badPath("encoded slash, backslash or NUL in path")
		}
	}
	p := u.Path
	if !strings.HasPrefix(p, "/") {
		return target{}, badPath("path must be absolute")
	}
	p = p[1:]
	if strings.IndexByte(p, 0) >= 0 || strings.IndexByte(p, '\\') >= 0 {
		return target{}, badPath("NUL or backslash in path")
	}
	if p == "" {
		return target{}, errNotFound
	}
	for rest := p; ; {
		seg, after, more := strings.Cut(rest, "/")
		if seg == "" || seg == "." || seg == ".." {
			return target{}, badPath("empty, '.' or '..' segment in path")
		}
		if len(seg) > 255 {
			// No file system takes a longer name; open would fail with
			// ENAMETOOLONG, a 500 for what is the client's mistake.
			return target{}, badPath("path segment longer than 255 bytes")
		}
		if !more {
			break
		}
		rest = after
	}

	dir, rest, nested := strings.Cut(p, "/")
	if !nested {
		switch {
		case p == "nix-cache-info":
			return target{kind: kindCacheInfo, rel: p}, nil
		case strings.HasSuffix(p, ".narinfo"):
			h := strings.TrimSuffix(p, ".narinfo")
			if !nixcache.IsHashPart(h) {
				return target{}, badPath("narinfo name is not a 32-character store hash")
			}
			return target{kind: kindNarInfo, rel: p, name: h}, nil
		case strings.HasSuffix(p, ".ls"):
			h := strings.TrimSuffix(p, ".ls")
			if !nixcache.IsHashPart(h) {
				return target{}, badPath("listing name is not a 32-character store hash")
			}
			return target{kind: kindListing, rel: p, name: h}, nil
		}
		return target{}, errNotFound
	}
	switch dir {
	case "nar":
		if err := nixcache.CheckNarURL(p); err != nil {
			return target{}, badPath("nar name: " + err.Error())
		}
		return target{kind: kindNar, rel: p}, nil
	case "log":
		if err := nixcache.CheckBaseName(rest); err != nil {
			return target{}, badPath("log name: " + err.Error())
		}
		return target{kind: kindLog, rel: p}, nil
	case "realisations":
		id, ok := strings.CutSuffix(rest, ".doi")
		if !ok || nixcache.CheckName(id) != nil || strings.Contains(rest, "/") {
			return target{}, badPath("realisation name must be <id>.doi")
		}
		return target{kind: kindRealisation, rel: p}, nil
	case "build-trace-v2":
		drv, out, ok := strings.Cut(rest, "/")
		outName, isDoi := strings.CutSuffix(out, ".doi")
		if !ok || !isDoi || nixcache.CheckBaseName(drv) != nil || nixcache.CheckName(outName) != nil || strings.Contains(out, "/") {
			return target{}, badPath("build trace name must be <drv>/<output>.doi")
		}
		return target{kind: kindBuildTrace, rel: p}, nil
	case "debuginfo":
		if err := nixcache.CheckName(rest); err != nil || strings.Contains(rest, "/") {
			return target{}, badPath("debuginfo name must be a build id")
		}
		return target{kind: kindDebugInfo, rel: p}, nil
	case closureDir:
		return routeClosure(rest)
	case "gcroots":
		if name, ok := strings.CutPrefix(rest, ".lock/"); ok {
			if err := nixcache.CheckName(name); err != nil || strings.Contains(name, "/") {
				return target{}, badPath("lock name: must be one name of letters, digits and -_.+=:! not starting with '.'")
			}
			return target{kind: kindLock, rel: p, name: name}, nil
		}
		if err := nixcache.CheckMarkerName(rest); err != nil {
			return target{}, badPath(err.Error())
		}
		return target{kind: kindRoot, rel: p}, nil
	}
	return target{}, errNotFound
}
