package serve

import (
	"errors"
	"io"
	"io/fs"
	"net/http"
	"strings"
	"time"

	"github.com/kiss-onion/kiss-onion/internal/closure"
)

// Closure queries (package closure has the format): the narinfos of the
// closure of up to closure.MaxRoots paths in one answer, on any role, from
// the narinfos the cache keeps in memory when it can.

// closureDir is the first segment of a closure query's path.
const closureDir = "kiss-onion"

const (
	maxClosurePaths = 100_000
	maxClosureBytes = 64 << 20
	// closureWalks bounds the walks at once: each may hold
	// maxClosureBytes.
	closureWalks = 4
)

// routeClosure routes the rest of a path under closureDir.
func routeClosure(rest string) (target, error) {
	list, ok := strings.CutPrefix(rest, strings.TrimPrefix(closure.PathPrefix, "/"+closureDir+"/"))
	if !ok {
		return target{}, errNotFound
	}
	if _, err := closure.ParseQuery(list); err != nil {
		return target{}, badPath(err.Error())
	}
	return target{kind: kindClosure, rel: closureDir + "/" + rest, name: list}, nil
}

// readClosure answers a closure query.
func (c *Cache) readClosure(t target, q *query) answer {
	select {
	case c.closureWalks <- struct{}{}:
		defer func() { <-c.closureWalks }()
	case <-time.After(pendingWait):
		return answer{status: http.StatusServiceUnavailable, msg: "too many closure queries at once: ask again, or for each narinfo"}
	}
	body := c.closure(strings.Split(t.name, ","))
	// No validators: the answer is computed, and conditional or range
	// requests of it make no sense.
	a := answer{status: http.StatusOK, ctype: closure.ContentType, length: int64(len(body))}
	if !q.head {
		a.data = body
	}
	return a
}

// closure walks the references from roots, breadth first, and returns
// the answer.
func (c *Cache) closure(roots []string) []byte {
	w := closure.NewWriter()
	seen := make(map[string]bool, len(roots))
	queue := make([]string, 0, len(roots))
	for _, h := range roots {
		if !seen[h] {
			seen[h] = true
			queue = append(queue, h)
		}
	}
	// The queue grows as the walk goes: no range over it.
	for i := 0; i < len(queue); i++ {
		if i >= maxClosurePaths || w.Len() >= maxClosureBytes {
			return w.End(false)
		}
		h := queue[i]
		data, err := c.narInfoBytes(h)
		switch {
		case err == nil:
			w.Found(h, data)
			for _, ref := range closure.References(data) {
				if !seen[ref] {
					seen[ref] = true
					queue = append(queue, ref)
				}
			}
		case errors.Is(err, fs.ErrNotExist) && c.cfg.Upstream == nil && !c.durable.committing(h+".narinfo"):
			w.Missing(h)
		default:
			w.Unknown(h)
		}
	}
	return w.End(true)
}

// narInfoBytes returns the narinfo of hash as a GET would: from memory
// when the cache keeps narinfos there.
func (c *Cache) narInfoBytes(hash string) ([]byte, error) {
	if c.bucket != nil {
		return c.narInfoBytesBucket(hash)
	}
	rel := hash + ".narinfo"
	if c.narinfos != nil {
		e, err := c.narinfos.get(c.root, rel)
		if err != nil {
			return nil, err
		}
		return e.data, nil
	}
	f, err := c.root.open(rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxNarInfoSize))
}
