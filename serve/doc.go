// Package serve is the HTTP side of the cache: it serves a flat directory
// that is, at every instant, a valid file:// Nix binary cache, and accepts
// what `nix copy --to http://...` uploads, GC-root markers and upload locks.
//
// A Cache hands out one Server per Role: the read role (on fasthttp, for
// the rate of narinfo GETs) answers GET and HEAD; the write role (on
// net/http, for streamed uploads) also takes PUT, and DELETE for gcroots/
// and for a narinfo (forget.go: the store path leaves the cache as
// 'kiss-onion forget' takes it, with prune.Forget; bucket_forget.go with
// prune.ForgetBucket on a bucket).
// Both answer reads the same way (read.go). Which role a client gets is
// decided outside, by which listener or onion it reached.
//
// Uploads are streamed to .tmp/ and renamed into place only once whole and
// durable, so a reader never sees a partial file. A NAR is acknowledged when
// it has arrived and matched its name's hash, and made durable and visible
// just after. A narinfo is acknowledged once it is well formed and its NAR
// and references are in the cache; it becomes visible only once they and
// it are durable (durable.go), so the cache stays closed under references,
// also across a crash. Until then reads of it wait, so a client that got a
// 2xx reads what it wrote; a marker's 2xx means that everything acknowledged
// before it is durable.
//
// With Config.Upstream (fallback.go, package upstream), a narinfo or NAR
// the cache lacks is asked of upstream caches: the narinfo is answered
// once its closure's narinfos are checked, the NAR as it downloads, and
// both are stored as uploads are. Hits never reach it.
//
// Locks on gcroots/.lock/ are answered with package cachelock, whose Guard
// also keeps a narinfo's check and rename apart from a prune's deletions.
// What the cache answers, receives and holds is counted for Prometheus
// (metrics.go), without a map look-up or an allocation on the read path.
// serve knows nothing of Tor (package onion, and package access for who
// may connect) and does not decide what to delete (package prune).
package serve
