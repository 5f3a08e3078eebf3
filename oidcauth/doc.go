// Package oidcauth lets a client in by an OpenID Connect token, the kind
// CI systems such as GitHub Actions mint for each job: it checks the
// token (with github.com/coreos/go-oidc: signature by a key the issuer
// lists, issuer, audience, expiry, not-before), then maps its claims to a
// role by rules such as "repository=org/infra,ref=refs/heads/main".
//
// It takes the token from an HTTP request, as a bearer token or as the
// password of basic auth (how Nix sends credentials from its netrc-file),
// and tells why it refused one with a typed Error whose message never
// holds the token. It does not know about the cache or its roles beyond
// "writer or reader": cmd adapts a Grant to the server's identity.
package oidcauth
