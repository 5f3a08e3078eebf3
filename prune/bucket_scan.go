package prune

import (
	"context"
	"errors"
	"io/fs"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/kiss-onion/kiss-onion/internal/nixcache"
	"github.com/kiss-onion/kiss-onion/s3store"
)

// bucketItem is a narinfo for a worker to read: its node, hash part and
// name.
type bucketItem struct {
	n    uint32
	k    key
	name string
}

// topObject sorts an object of the top folder: a narinfo or a listing,
// with its hash part, or neither.
func topObject(name string) (k key, narinfo, listing bool) {
	if len(name) < nixcache.HashLen || strings.HasPrefix(name, ".") {
		return k, false, false
	}
	switch name[nixcache.HashLen:] {
	case narinfoExt:
		narinfo = true
	case lsExt:
		listing = true
	default:
		return k, false, false
	}
	k, ok := parseKey(name[:nixcache.HashLen])
	return k, narinfo && ok, listing && ok
}

// scanBucketNarInfos lists the top folder a thousand objects a request
// and reads, on the workers, the narinfos whose ETag and size the
// metadata cache does not know: a warm prune of an unchanged bucket reads
// none. Young narinfos are kept whatever the markers say.
func (b *bucketPruner) scanBucketNarInfos(ctx context.Context) error {
	b.names = make(map[string]objMeta)
	work := make(chan []bucketItem, 2*b.workers)
	results := make(chan *scanned, 2*b.workers)
	var workers sync.WaitGroup
	for range b.workers {
		workers.Go(func() {
			for chunk := range work {
				res := &scanned{}
				for _, it := range chunk {
					b.readNarInfo(ctx, it, res)
				}
				results <- res
			}
		})
	}
	collected := make(chan struct{})
	go func() {
		defer close(collected)
		var refs []uint32
		for res := range results {
			b.mu.Lock()
			refs = b.apply(res, refs)
			b.mu.Unlock()
		}
	}()
	err := b.st.ListDir(ctx, "", func(page []s3store.Info) error {
		var chunk []bucketItem
		b.mu.Lock()
		g := b.g
		for _, o := range page {
			k, narinfo, listing := topObject(o.Name)
			switch {
			case listing:
				g.flags[g.intern(k)] |= fLs
				b.names[o.Name] = objMeta{o.Size, b.young(o.ModTime)}
			case narinfo:
				n := g.intern(k)
				b.listed = append(b.listed, n)
				b.names[o.Name] = objMeta{o.Size, b.young(o.ModTime)}
				g.flags[n] |= fPresent
				if b.young(o.ModTime) {
					g.flags[n] |= fRoot
				}
				if !g.has(n, fData) || g.ident[n] != etagIdent(o) {
					chunk = append(chunk, bucketItem{n: n, k: k, name: o.Name})
				}
				b.c.scanned.Add(1)
			}
		}
		b.mu.Unlock()
		for len(chunk) > 0 {
			c := chunk[:min(len(chunk), 32)]
			chunk = chunk[len(c):]
			select {
			case work <- c:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	})
	close(work)
	workers.Wait()
	close(results)
	<-collected
	return err
}

// readNarInfo reads and parses one narinfo into res; its identity is the
// ETag and size of the version read.
func (b *bucketPruner) readNarInfo(ctx context.Context, it bucketItem, res *scanned) {
	data, info, err := b.readObject(ctx, it.name, maxNarInfoSize)
	if errors.Is(err, fs.ErrNotExist) {
		res.gone = append(res.gone, it.n)
		return
	}
	b.c.read.Add(1)
	if err != nil && ctx.Err() != nil {
		// Not the narinfo's fault: the prune stops anyway, and this one
		// must not be remembered as malformed.
		res.gone = append(res.gone, it.n)
		return
	}
	b.parseNarInfo(it.n, it.k, it.name, etagIdent(info), data, err, res)
}

// bucketAuxFile reports whether the object name is an aux file: a
// realisation, a build trace (build-trace-v2/<drv>/<out>) or a debuginfo
// entry, with no part starting with '.'.
func bucketAuxFile(name string) bool {
	for _, a := range auxDirs {
		rest, ok := strings.CutPrefix(name, a.name+"/")
		if !ok {
			continue
		}
		parts := strings.Split(rest, "/")
		if len(parts) != a.depth {
			return false
		}
		for _, p := range parts {
			if p == "" || p[0] == '.' {
				return false
			}
		}
		return true
	}
	return false
}

// scanBucketAux lists the aux folders and learns what each object names,
// reading only those whose ETag and size the metadata cache does not
// know.
func (b *bucketPruner) scanBucketAux(ctx context.Context, cached map[string]auxInfo) error {
	var objs []s3store.Info
	for _, a := range auxDirs {
		err := b.st.List(ctx, a.name+"/", func(page []s3store.Info) error {
			for _, o := range page {
				if bucketAuxFile(o.Name) {
					objs = append(objs, o)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	b.aux = make([]auxFile, len(objs))
	b.auxSizes = make([]int64, len(objs))
	for i, o := range objs {
		b.auxSizes[i] = o.Size
	}
	var read atomic.Int64
	b.parallel(len(objs), func(i int) {
		o := objs[i]
		af := auxFile{rel: o.Name, young: b.young(o.ModTime)}
		ident := etagIdent(o)
		if c, ok := cached[o.Name]; ok && c.ident == ident {
			af.info = c
		} else {
			data, info, err := b.readObject(ctx, o.Name, maxAuxSize)
			read.Add(1)
			if errors.Is(err, fs.ErrNotExist) {
				af.info.kind, af.young = auxMalformed, true // gone: never ours to delete
			} else {
				af.info = b.parseAux(o.Name, data, err)
				af.info.ident = etagIdent(info)
			}
		}
		b.aux[i] = af
	})
	if read.Load() > 0 || len(cached) != len(objs) {
		b.metaDirty = true
	}
	return ctx.Err()
}

// recheckBucket runs once the hold has waited out every Guard begun
// before it, so no narinfo is being published: it re-reads the markers,
// lists the top folder again, and keeps, with their closure, the narinfos
// that appeared or changed since the scan (uploads that did not follow
// the protocol, or landed while the prune waited for the locks).
func (b *bucketPruner) recheckBucket(ctx context.Context) error {
	g := b.g
	keys, err := b.readBucketRoots(ctx)
	if err != nil {
		return err
	}
	var stack []uint32
	for _, k := range keys {
		stack = append(stack, g.intern(k))
	}
	b.roots = append(b.roots, stack...)
	g.keep(stack)

	var fresh []bucketItem
	err = b.st.ListDir(ctx, "", func(page []s3store.Info) error {
		for _, o := range page {
			k, narinfo, listing := topObject(o.Name)
			switch {
			case listing:
				g.flags[g.intern(k)] |= fLs
			case narinfo:
				n, seen := g.lookup(k)
				if seen && g.has(n, fPresent|fData) && g.ident[n] == etagIdent(o) {
					continue
				}
				fresh = append(fresh, bucketItem{n: g.intern(k), k: k, name: o.Name})
			}
		}
		return nil
	})
	if err != nil || len(fresh) == 0 {
		return err
	}
	b.log.WithField("narinfos", len(fresh)).Debug("narinfos appeared or changed during the prune")
	res := &scanned{}
	var nodes []uint32
	for _, it := range fresh {
		b.readNarInfo(ctx, it, res)
		g.flags[it.n] |= fPresent | fRoot
		nodes = append(nodes, it.n)
	}
	b.apply(res, nil)
	g.keep(nodes)
	return ctx.Err()
}
