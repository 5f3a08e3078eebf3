package upstream

import "sync"

// flightGroup runs one call per key at a time: concurrent callers of a
// key share the running call's result (golang.org/x/sync/singleflight, in
// the little that is needed here).
type flightGroup struct {
	mu    sync.Mutex
	calls map[string]*flight
}

type flight struct {
	done chan struct{}
	err  error
}

// do runs fn for key unless a call for key is running, in which case it
// waits for that call and returns its error.
func (g *flightGroup) do(key string, fn func() error) error {
	g.mu.Lock()
	if g.calls == nil {
		g.calls = map[string]*flight{}
	}
	if fl, ok := g.calls[key]; ok {
		g.mu.Unlock()
		<-fl.done
		return fl.err
	}
	fl := &flight{done: make(chan struct{})}
	g.calls[key] = fl
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		delete(g.calls, key)
		g.mu.Unlock()
		close(fl.done)
	}()
	fl.err = fn()
	return fl.err
}
