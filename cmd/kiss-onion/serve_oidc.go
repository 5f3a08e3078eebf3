package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/oidcauth"
	"github.com/kiss-onion/kiss-onion/serve"
)

// oidcFlags are serve's flags for letting clients in by OpenID Connect
// tokens (package oidcauth), such as those GitHub Actions mints.
type oidcFlags struct {
	issuer    string
	audience  string
	writers   stringList
	readers   stringList
	nameClaim string
	listen    string
	// rules parsed from writers and readers by check.
	writerRules, readerRules []oidcauth.Rule
}

// oidcTimeout bounds each request to the issuer: discovery at start and
// each later fetch of its keys.
const oidcTimeout = 10 * time.Second

func (o *oidcFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&o.issuer, "oidc-issuer", "", "let clients in by OIDC tokens of this issuer `URL` (https, or http on loopback), as bearer tokens or basic-auth passwords")
	fs.StringVar(&o.audience, "oidc-audience", "", "tokens must hold this `audience` (aud), needed with --oidc-issuer")
	fs.Var(&o.writers, "oidc-writer", "a token whose claims match this `rule` (claim=value[,claim=value...]) may write (repeatable; tried before reader rules)")
	fs.Var(&o.readers, "oidc-reader", "a token whose claims match this `rule` may read (repeatable)")
	fs.StringVar(&o.nameClaim, "oidc-name-claim", "sub", "the token `claim` that names a client in logs")
	fs.StringVar(&o.listen, "listen-oidc", "", "take OIDC tokens for both roles on this loopback `address` (host:port), plain HTTP for a TLS reverse proxy in front")
}

// listening reports whether a door taking tokens was asked for.
func (o *oidcFlags) listening() bool { return o.listen != "" }

// check refuses flags that do not fit together, and parses the rules;
// tlsDoor says whether the TLS door, which takes tokens too, is asked for.
func (o *oidcFlags) check(tlsDoor bool) error {
	if o.issuer == "" {
		if o.audience != "" || len(o.writers)+len(o.readers) > 0 || o.listen != "" {
			return usagef("--oidc-audience, --oidc-writer, --oidc-reader and --listen-oidc need --oidc-issuer")
		}
		return nil
	}
	u, err := url.Parse(o.issuer)
	if err != nil || u.Host == "" || (u.Scheme != "https" && !(u.Scheme == "http" && isLoopbackHost(u.Hostname()))) {
		return usagef("--oidc-issuer %q: want an https URL (http only on loopback, for tests)", o.issuer)
	}
	if o.audience == "" {
		return usagef("--oidc-issuer needs --oidc-audience: a token for another service must not open this cache")
	}
	if len(o.writers)+len(o.readers) == 0 {
		return usagef("--oidc-issuer needs at least one --oidc-writer or --oidc-reader rule")
	}
	for _, set := range []struct {
		flag  string
		texts stringList
		rules *[]oidcauth.Rule
	}{{"oidc-writer", o.writers, &o.writerRules}, {"oidc-reader", o.readers, &o.readerRules}} {
		for _, s := range set.texts {
			r, err := oidcauth.ParseRule(s)
			if err != nil {
				return usagef("--%s: %v", set.flag, err)
			}
			*set.rules = append(*set.rules, r)
		}
	}
	if o.listen == "" && !tlsDoor {
		return usagef("--oidc-issuer needs a door that takes tokens: --listen-oidc or --listen-tls")
	}
	if o.listen == "" {
		return nil
	}
	// Tokens travel in clear on this door: never off the machine,
	// whatever --allow-remote says.
	return checkListenAddr("listen-oidc", o.listen, false)
}

func isLoopbackHost(host string) bool {
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// authenticator reaches the issuer (within oidcTimeout) and returns what
// lets a request in by its token, for any door that takes tokens.
func (o *oidcFlags) authenticator(ctx context.Context, log *logrus.Entry) (serve.Authenticator, error) {
	v, err := oidcauth.New(ctx, oidcauth.Config{
		Issuer:    o.issuer,
		Audience:  o.audience,
		Writers:   o.writerRules,
		Readers:   o.readerRules,
		NameClaim: o.nameClaim,
		Timeout:   oidcTimeout,
		Log:       log.WithField("component", "oidc"),
	})
	if err != nil {
		return nil, fmt.Errorf("--oidc-issuer: %w", err)
	}
	log.WithFields(logrus.Fields{"issuer": o.issuer, "audience": o.audience, "writer_rules": len(o.writerRules), "reader_rules": len(o.readerRules)}).Info("oidc issuer reached")
	return serve.AuthenticatorFunc(func(r *http.Request) (serve.Identity, error) {
		g, err := v.Authenticate(r)
		if err != nil {
			return serve.Identity{}, err
		}
		role := serve.Read
		if g.Writer {
			role = serve.Write
		}
		return serve.Identity{Name: g.Name, Door: oidcauth.Door, Role: role}, nil
	}), nil
}

// serve starts the --listen-oidc door, if asked for, with auth (from
// authenticator), and returns its server (nil without one); a failure of
// the server later goes to errc.
func (o *oidcFlags) serve(auth serve.Authenticator, cache *serve.Cache, log *logrus.Entry, status *statusServer, errc chan<- error) (*serve.Server, error) {
	if o.listen == "" {
		return nil, nil
	}
	ln, err := net.Listen("tcp", o.listen)
	if err != nil {
		return nil, fmt.Errorf("--listen-oidc: %w", err)
	}
	srv := cache.NewDoorServer(auth, nil, log.WithField("door", oidcauth.Door))
	log.WithFields(logrus.Fields{"door": oidcauth.Door, "url": "http://" + ln.Addr().String()}).Info("listening")
	status.listeningDoor(oidcauth.Door, "http://"+ln.Addr().String(), nil)
	go func() {
		if err := srv.Serve(ln); err != nil {
			errc <- fmt.Errorf("oidc listener: %w", err)
		}
	}()
	return srv, nil
}
