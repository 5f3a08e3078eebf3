package serve

import (
	"net"
	"testing"

	"github.com/valyala/fasthttp"
)

// BenchmarkNarInfoHit is the read role's hot path: a narinfo answered from
// memory. Its allocations a request should stay at zero.
func BenchmarkNarInfoHit(b *testing.B) {
	tc := newTestCache(b, nil)
	tc.upload(b, hashB, "dep")
	var req fasthttp.Request
	req.SetRequestURI("/" + hashB + ".narinfo")
	req.Header.Set("User-Agent", "curl/7.88.1 Nix/2.8.0")
	req.Header.Set("Accept", "*/*")
	conn, other := net.Pipe()
	defer conn.Close()
	defer other.Close()
	var ctx fasthttp.RequestCtx
	ctx.Init2(conn, nil, false)
	req.CopyTo(&ctx.Request)
	tc.handleRead(&ctx)
	if ctx.Response.StatusCode() != 200 {
		b.Fatalf("status %d", ctx.Response.StatusCode())
	}
	b.ReportAllocs()
	for b.Loop() {
		ctx.Response.Reset()
		tc.handleRead(&ctx)
	}
}
