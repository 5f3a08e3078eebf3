package serve

import (
	"crypto/tls"
	"errors"
	"net/http"

	"github.com/sirupsen/logrus"
)

// A door is a listener that clients of both roles reach: rather than the
// listener deciding the role, as an onion does, each request is served in
// the role its own credentials grant (a TLS client certificate, a bearer
// token). The onions stay doors of their own, outside this file.

// Identity is whom a door let in, and in which role.
type Identity struct {
	// Name names the client in logs: a registry name, or an OIDC
	// subject. Never a secret.
	Name string
	// Door is the kind of credentials that proved it: "tls", "oidc".
	Door string
	Role Role
}

// Authenticator tells whom a request comes from.
type Authenticator interface {
	// Authenticate returns the identity the request's credentials prove,
	// or an error whose message tells the client why they do not (it is
	// sent as the body of a 401, and logged: it must hold no secret).
	Authenticate(r *http.Request) (Identity, error)
}

// AuthenticatorFunc is a function used as an Authenticator.
type AuthenticatorFunc func(r *http.Request) (Identity, error)

// Authenticate calls f(r).
func (f AuthenticatorFunc) Authenticate(r *http.Request) (Identity, error) { return f(r) }

// ErrNoCredentials is the error an Authenticator returns for a request
// that carries no credentials it knows.
var ErrNoCredentials = errors.New("no credentials: this door takes a client certificate or a bearer token")

// NewDoorServer returns the server of a door: every request goes through
// auth, and is then answered as the read or the write role would answer
// it. A request auth refuses gets a 401, with a Basic challenge for the
// clients that send credentials only when asked; a write by a reader gets
// a 405, as on the read listener. With tlsConfig the door speaks TLS, and
// auth sees the client's certificates in r.TLS.
func (c *Cache) NewDoorServer(auth Authenticator, tlsConfig *tls.Config, l *logrus.Entry) *Server {
	if l == nil {
		l = c.log
	}
	s := c.NewServer(Write, l)
	s.tls = tlsConfig
	read, write := c.countHTTP(Read, c.handler(Read)), c.countHTTP(Write, c.handler(Write))
	s.write.Handler = s.paced(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := auth.Authenticate(r)
		if err != nil {
			w.Header().Set("WWW-Authenticate", `Basic realm="kiss-onion", charset="UTF-8"`)
			c.refuse(w, r, http.StatusUnauthorized, "%v", err)
			return
		}
		if l.Logger.IsLevelEnabled(logrus.DebugLevel) {
			l.WithFields(logrus.Fields{"method": r.Method, "path": r.URL.Path, "client": id.Name, "door": id.Door, "role": id.Role.String()}).Debug("request")
		}
		if id.Role == Write {
			write.ServeHTTP(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			// 405 as on the read listener, never 403: Nix takes a 403
			// for "not there" and would skip the upload silently.
			w.Header().Set("Allow", "GET, HEAD")
			c.refuse(w, r, http.StatusMethodNotAllowed, "%s %q is a reader: it may not %s", id.Door, id.Name, r.Method)
			return
		}
		read.ServeHTTP(w, r)
	}))
	return s
}
