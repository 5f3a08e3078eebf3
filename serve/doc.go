// Package serve is the HTTP side of the cache: it serves a flat directory
// that is, at every instant, a valid file:// Nix binary cache, and accepts
// what `nix copy --to http://...` uploads, GC-root markers and upload locks.
//
// A Cache hands out one http.Handler per Role: the read role answers GET and
// HEAD; the write role also takes PUT (and DELETE for gcroots/). Which role a
// client gets is decided outside, by which listener or onion it reached.
//
// Uploads are streamed to .tmp/, fsynced and renamed into place, so a reader
// never sees a partial file. A narinfo is refused until the NAR it names and
// the narinfos of its references are there, so the cache stays closed under
// references. serve knows nothing of Tor and does not prune.
package serve
