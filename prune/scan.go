package prune

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
)

const (
	narinfoExt = ".narinfo"
	lsExt      = ".ls"
	chunkSize  = 512
)

// scanItem is a narinfo for a worker to check: its node, and the
// identity under which the graph's data for it was recorded, if any.
type scanItem struct {
	n       uint32
	k       key
	cached  uint64
	hasData bool
	regular bool // the listing said it is a regular file
}

// scanned is what a worker learned of a chunk of narinfos.
type scanned struct {
	gone    []uint32 // no longer a regular file
	young   []uint32 // modified after the cutoff
	parsed  []parsedNarInfo
	refKeys []key
}

// parsedNarInfo is one narinfo read by a worker; its references are
// refKeys[refs0:refs1] of its chunk's result.
type parsedNarInfo struct {
	n            uint32
	ident        uint64
	urlHash      uint64
	deriver      key
	hasDeriver   bool
	refs0, refs1 int
	malformed    bool
}

// scanNarInfos lists the cache directory and checks every narinfo, on
// several workers: a narinfo whose stat identity matches the metadata
// cache's is not read; the others are read and parsed. The listing also
// notes the .ls files and the directory inode of each narinfo.
func (p *pruner) scanNarInfos(ctx context.Context) error {
	work := make(chan []scanItem, 2*p.workers)
	results := make(chan *scanned, 2*p.workers)
	var workers sync.WaitGroup
	for w := 0; w < p.workers; w++ {
		workers.Add(1)
		go func() {
			defer workers.Done()
			var buf []byte
			for chunk := range work {
				res := &scanned{}
				for _, it := range chunk {
					buf = p.checkNarInfo(it, res, buf)
				}
				results <- res
			}
		}()
	}
	collected := make(chan struct{})
	go func() {
		defer close(collected)
		var refs []uint32
		for res := range results {
			p.mu.Lock()
			refs = p.apply(res, refs)
			p.mu.Unlock()
		}
	}()

	type pending struct {
		k       key
		ino     uint64
		regular bool
	}
	var narinfos []pending
	var listings []key
	// The metadata cache lists narinfos in the order the last listing
	// found them: walk its nodes in step, probing the table only when the
	// directory has changed there.
	cursor := 0
	flush := func() {
		p.mu.Lock()
		g := p.g
		chunk := make([]scanItem, 0, len(narinfos))
		for _, e := range narinfos {
			var n uint32
			if cursor < len(g.keys) && g.keys[cursor] == e.k {
				n = uint32(cursor)
			} else {
				n = g.intern(e.k)
			}
			cursor = int(n) + 1
			p.listed = append(p.listed, n)
			g.flags[n] |= fPresent
			g.ino[n] = e.ino
			chunk = append(chunk, scanItem{n: n, k: e.k, cached: g.ident[n], hasData: g.flags[n]&fData != 0, regular: e.regular})
		}
		for _, k := range listings {
			g.flags[g.intern(k)] |= fLs
		}
		p.mu.Unlock()
		p.c.scanned.Add(int64(len(narinfos)))
		narinfos, listings = narinfos[:0], listings[:0]
		if len(chunk) > 0 {
			work <- chunk
		}
	}
	err := p.top.each(func(name []byte, ino uint64, typ int) error {
		if name[0] == '.' || typ == typeDir || typ == typeOther {
			return nil
		}
		switch {
		case len(name) == nixcache.HashLen+len(narinfoExt) && bytes.HasSuffix(name, []byte(narinfoExt)):
			if k, ok := parseKey(name[:nixcache.HashLen]); ok {
				narinfos = append(narinfos, pending{k, ino, typ == typeFile})
			}
		case len(name) == nixcache.HashLen+len(lsExt) && bytes.HasSuffix(name, []byte(lsExt)):
			if k, ok := parseKey(name[:nixcache.HashLen]); ok {
				listings = append(listings, k)
			}
		default:
			return nil
		}
		if len(narinfos) >= chunkSize || len(listings) >= chunkSize {
			flush()
			return ctx.Err()
		}
		return nil
	})
	if err == nil {
		flush()
	}
	close(work)
	workers.Wait()
	close(results)
	<-collected
	return err
}

// checkNarInfo stats one narinfo and, unless the graph's data for it is
// current, reads and parses it. buf is a reusable read buffer.
func (p *pruner) checkNarInfo(it scanItem, res *scanned, buf []byte) []byte {
	name := it.k.String() + narinfoExt
	var fi fileInfo
	var data []byte
	var err error
	if it.hasData || !it.regular {
		// A stat may be all it takes; and what the listing did not call
		// a regular file is not opened before a stat says it is one.
		fi, err = p.top.stat(name)
		if err == nil && fi.typ == typeFile && !(it.hasData && it.cached == fi.ident) {
			fi, data, err = p.top.statRead(name, buf, maxNarInfoSize)
		}
	} else {
		fi, data, err = p.top.statRead(name, buf, maxNarInfoSize)
	}
	if err == nil && fi.typ != typeFile || errors.Is(err, fs.ErrNotExist) {
		// Gone, or a symlink or a directory: not ours to judge.
		res.gone = append(res.gone, it.n)
		return buf
	}
	if err != nil && fi.typ != typeFile {
		p.log.WithError(err).WithField("path", name).Warn("keeping a narinfo that cannot be read")
		p.c.malformed.Add(1)
		res.parsed = append(res.parsed, parsedNarInfo{n: it.n, malformed: true})
		return buf
	}
	if p.isYoung(fi.mtime) {
		res.young = append(res.young, it.n)
	}
	if it.hasData && it.cached == fi.ident {
		return buf
	}
	p.c.read.Add(1)
	if data != nil {
		buf = data
	}
	p.parseNarInfo(it.n, it.k, name, fi.ident, data, err, res)
	return buf
}

// parseNarInfo records in res what the narinfo of node n (hash part k,
// file name) says: data as read under the identity ident, or the error
// of reading it. A narinfo that does not parse or validate is malformed.
func (p *pruner) parseNarInfo(n uint32, k key, name string, ident uint64, data []byte, err error, res *scanned) {
	pi := parsedNarInfo{n: n, ident: ident, refs0: len(res.refKeys)}
	var problem error
	if err != nil {
		problem = err
	} else if ni, err := nixcache.ParseNarInfo(data); err != nil {
		problem = err
		pi.urlHash = looseURLHash(data)
	} else {
		problem = p.checkEdges(ni, k)
		pi.urlHash = hashURL(path.Clean(ni.URL))
		for _, r := range ni.References {
			if len(r) > nixcache.HashLen && r[nixcache.HashLen] == '-' {
				if k, ok := parseKey(r[:nixcache.HashLen]); ok {
					res.refKeys = append(res.refKeys, k)
				}
			}
		}
		if d := ni.Deriver; len(d) > nixcache.HashLen {
			pi.deriver, pi.hasDeriver = parseKey(d[:nixcache.HashLen])
		}
	}
	pi.refs1 = len(res.refKeys)
	if problem != nil {
		p.log.WithError(problem).WithField("path", name).Warn("keeping a malformed narinfo")
		p.c.malformed.Add(1)
		pi.malformed = true
	}
	res.parsed = append(res.parsed, pi)
}

// checkEdges checks what the pruner relies on: the narinfo is for the
// store path its file is named after, and its references and deriver are
// store path base names. (serve validates the rest on upload; a bad
// signature or hash changes nothing of what a path keeps.)
func (p *pruner) checkEdges(ni *nixcache.NarInfo, k key) error {
	base, err := nixcache.BaseName(p.opt.StoreDir, ni.StorePath)
	if err != nil {
		return fmt.Errorf("StorePath: %w", err)
	}
	if base[:nixcache.HashLen] != k.String() {
		return fmt.Errorf("StorePath %s does not match the file name", ni.StorePath)
	}
	for _, r := range ni.References {
		if err := nixcache.CheckBaseName(r); err != nil {
			return fmt.Errorf("References: %q: %w", r, err)
		}
	}
	if ni.Deriver != "" {
		if err := nixcache.CheckBaseName(ni.Deriver); err != nil {
			return fmt.Errorf("Deriver: %q: %w", ni.Deriver, err)
		}
	}
	return nil
}

// looseURLHash finds the URL line of a narinfo that does not parse, so
// that the file it names is kept with it.
func looseURLHash(data []byte) uint64 {
	for _, l := range bytes.Split(data, []byte("\n")) {
		if u, ok := bytes.CutPrefix(l, []byte("URL:")); ok {
			u = bytes.TrimSpace(u)
			if len(u) > 0 {
				return hashURL(path.Clean(string(u)))
			}
		}
	}
	return 0
}

// apply records a worker's findings in the graph; p.mu is held. refs is
// scratch space, returned for reuse.
func (p *pruner) apply(res *scanned, refs []uint32) []uint32 {
	g := p.g
	for _, n := range res.gone {
		g.flags[n] &^= fPresent
	}
	for _, n := range res.young {
		g.flags[n] |= fRoot
	}
	for _, pi := range res.parsed {
		refs = refs[:0]
		for _, k := range res.refKeys[pi.refs0:pi.refs1] {
			refs = append(refs, g.intern(k))
		}
		var d uint32
		if pi.hasDeriver {
			d = g.intern(pi.deriver) + 1
		}
		g.setData(pi.n, pi.ident, pi.urlHash, d, refs, pi.malformed)
	}
	return refs
}

// auxFile is a realisations/, build-trace-v2/ or debuginfo/ file.
type auxFile struct {
	rel     string // relative to the cache, with '/'
	info    auxInfo
	young   bool
	deleted bool
}

// auxDirs are the directories of files that name a store path or a NAR
// in their content; their depth is 1, except build-trace-v2/<drv>/<out>.doi.
var auxDirs = []struct {
	name  string
	depth int
}{
	{"realisations", 1},
	{"build-trace-v2", 2},
	{"debuginfo", 1},
}

// scanAux lists the aux directories and learns what each file names,
// reading only files that the metadata cache does not answer.
func (p *pruner) scanAux(ctx context.Context, cached map[string]auxInfo) error {
	var files []string
	var list func(rel string, depth int) error
	list = func(rel string, depth int) error {
		d, err := openDir(filepath.Join(p.opt.CacheDir, filepath.FromSlash(rel)))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		defer d.close()
		var subdirs []string
		err = d.each(func(name []byte, ino uint64, typ int) error {
			switch {
			case name[0] == '.':
			case typ == typeDir:
				if depth > 1 {
					subdirs = append(subdirs, rel+"/"+string(name))
				}
			case typ == typeFile || typ == typeUnknown:
				files = append(files, rel+"/"+string(name))
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, s := range subdirs {
			if err := list(s, depth-1); err != nil {
				return err
			}
		}
		return ctx.Err()
	}
	for _, a := range auxDirs {
		if err := list(a.name, a.depth); err != nil {
			return err
		}
	}
	p.aux = make([]auxFile, len(files))
	var read atomic.Int64
	p.parallel(len(files), func(i int) {
		rel := files[i]
		af := auxFile{rel: rel}
		dirName, name := path.Split(rel)
		d, err := openDir(filepath.Join(p.opt.CacheDir, filepath.FromSlash(dirName)))
		var fi fileInfo
		if err == nil {
			fi, err = d.stat(name)
		}
		switch {
		case err != nil || (fi.typ != typeFile):
			af.info.kind = auxMalformed // kept; gone or odd, so never ours to delete
			af.young = true
		default:
			af.young = p.isYoung(fi.mtime)
			if c, ok := cached[rel]; ok && c.ident == fi.ident {
				af.info = c
				break
			}
			data, err := d.readFile(name, nil, fi.size, maxAuxSize)
			af.info = p.parseAux(rel, data, err)
			af.info.ident = fi.ident
			read.Add(1)
		}
		if d != nil {
			d.close()
		}
		p.aux[i] = af
	})
	if read.Load() > 0 || len(cached) != len(files) {
		p.metaDirty = true
	}
	return nil
}

// parseAux reads what an aux file names: realisations and build traces
// are JSON objects whose "outPath" (at the top, or in "value") is the
// output's store path; debuginfo files are JSON objects whose "archive" is
// the NAR's URL relative to debuginfo/. A file that says neither is kept.
func (p *pruner) parseAux(rel string, data []byte, err error) auxInfo {
	bad := func(err error) auxInfo {
		p.log.WithError(err).WithField("path", rel).Warn("keeping a malformed or unreadable file")
		return auxInfo{kind: auxMalformed}
	}
	if err != nil {
		return bad(err)
	}
	var v struct {
		OutPath string `json:"outPath"`
		Value   *struct {
			OutPath string `json:"outPath"`
		} `json:"value"`
		Archive string `json:"archive"`
	}
	if err := json.Unmarshal(data, &v); err != nil {
		return bad(fmt.Errorf("not a JSON object: %w", err))
	}
	if strings.HasPrefix(rel, "debuginfo/") {
		if v.Archive == "" {
			return bad(errors.New(`no "archive"`))
		}
		u := path.Join("debuginfo", v.Archive)
		if !strings.HasPrefix(u, "nar/") {
			return bad(errors.New(`"archive" is not under nar/`))
		}
		return auxInfo{kind: auxNar, urlHash: hashURL(u)}
	}
	out := v.OutPath
	if out == "" && v.Value != nil {
		out = v.Value.OutPath
	}
	out = strings.TrimPrefix(out, strings.TrimSuffix(p.opt.StoreDir, "/")+"/")
	if nixcache.CheckBaseName(out) != nil {
		return bad(errors.New(`no valid "outPath"`))
	}
	k, _ := parseKey(out[:nixcache.HashLen])
	return auxInfo{kind: auxOutPath, target: k}
}
