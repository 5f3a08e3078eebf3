package main

import (
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/serve"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

// tlsFlags are serve's flags for the TLS door: one listener where a
// client certificate of the cache's CA decides the role (docs/tls.md).
type tlsFlags struct {
	listen   string
	names    stringList
	certFile string
	keyFile  string
}

func (t *tlsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&t.listen, "listen-tls", "", "serve both roles over TLS on this `address` (host:port), to clients with a certificate from 'keys add --tls'")
	fs.Var(&t.names, "tls-name", "a DNS `name` or IP address clients reach --listen-tls at, put in the cache's own server certificate (repeatable; the first makes the bundles' URL)")
	fs.StringVar(&t.certFile, "tls-cert", "", "serve this PEM certificate `file` on --listen-tls instead of the cache's own, read again when it changes (with --tls-key; clients then trust the system's roots)")
	fs.StringVar(&t.keyFile, "tls-key", "", "the private key `file` of --tls-cert")
}

// check checks the flags, before anything starts.
func (t *tlsFlags) check(allowRemote bool) error {
	if t.listen == "" {
		if len(t.names) > 0 || t.certFile != "" || t.keyFile != "" {
			return usagef("--tls-name, --tls-cert and --tls-key need --listen-tls")
		}
		return nil
	}
	if (t.certFile == "") != (t.keyFile == "") {
		return usagef("give --tls-cert and --tls-key together")
	}
	if t.certFile != "" && len(t.names) > 0 {
		return usagef("--tls-name names the hosts of the cache's own certificate: with --tls-cert, your certificate names them")
	}
	return checkListenAddr("listen-tls", t.listen, allowRemote)
}

// startTLSDoor listens on --listen-tls and serves the door there, with
// the cache's CA, its own or the user's server certificate, and the
// registries; it records the door's URL in the state directory for
// 'keys add --tls'. A request with no client certificate goes to tokens
// (OIDC bearer tokens; nil refuses it). It returns nil without
// --listen-tls.
func startTLSDoor(f serveFlags, tokens serve.Authenticator, cache *serve.Cache, log *logrus.Entry, status *statusServer, metrics *serveMetrics, errc chan<- error) (*serve.Server, error) {
	t := f.tls
	if t.listen == "" {
		return nil, nil
	}
	dir := tlsca.Dir(f.stateDir)
	ca, err := tlsca.LoadOrCreate(dir)
	if err != nil {
		return nil, err
	}
	var cert *tlsca.ServedCert
	certLog := log.WithField("door", tlsca.DoorName)
	own := t.certFile == ""
	if own {
		cert, err = tlsca.NewOwnCert(ca, tlsHosts(t), certLog)
	} else {
		cert, err = tlsca.NewFileCert(t.certFile, t.keyFile, certLog)
	}
	if err != nil {
		return nil, fmt.Errorf("--listen-tls: server certificate: %w", err)
	}
	door, err := tlsca.NewDoor(tlsca.DoorConfig{CA: ca, Registries: registryPaths(f), Next: tokens, Log: log.WithField("door", tlsca.DoorName)})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", t.listen)
	if err != nil {
		return nil, fmt.Errorf("--listen-tls: %w", err)
	}
	info := tlsca.DoorInfo{URL: tlsURL(t, ln.Addr())}
	if own {
		info.ServerFingerprint = tlsca.Fingerprint(cert.Current().Leaf)
		cert.OnChange(func(leaf *x509.Certificate) {
			info := info
			info.ServerFingerprint = tlsca.Fingerprint(leaf)
			if err := tlsca.SaveDoor(dir, info); err != nil {
				certLog.WithError(err).Warn("renewed tls server certificate not recorded")
			}
		})
	}
	if err := tlsca.SaveDoor(dir, info); err != nil {
		ln.Close()
		return nil, err
	}
	metrics.servesTLS(cert)
	srv := cache.NewDoorServer(door, door.TLSConfig(cert), log)
	leaf := cert.Current().Leaf
	log.WithFields(logrus.Fields{"door": tlsca.DoorName, "url": info.URL, "listener": ln.Addr().String(), "server_fingerprint": tlsca.Fingerprint(leaf), "not_after": leaf.NotAfter.UTC().Format(time.RFC3339)}).Info("listening")
	status.listeningDoor(tlsca.DoorName, "https://"+ln.Addr().String(), cert)
	go func() {
		if err := srv.Serve(ln); err != nil {
			errc <- fmt.Errorf("tls listener: %w", err)
		}
	}()
	return srv, nil
}

// tlsHosts returns the names of the cache's own server certificate: the
// --tls-name ones, the listen address's host and loopback.
func tlsHosts(t tlsFlags) []string {
	hosts := slices.Clone([]string(t.names))
	for _, h := range tlsca.DefaultHosts(t.listen) {
		if !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// tlsURL returns the URL clients reach the door at: the first
// --tls-name, else the listen host (this machine's name when it listens
// on every address), with the port it listens on.
func tlsURL(t tlsFlags, addr net.Addr) string {
	host, _, _ := net.SplitHostPort(t.listen)
	if len(t.names) > 0 {
		host = t.names[0]
	} else if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		if name, err := os.Hostname(); err == nil {
			host = name
		}
	}
	port := ""
	if ta, ok := addr.(*net.TCPAddr); ok {
		port = strconv.Itoa(ta.Port)
	}
	return "https://" + net.JoinHostPort(host, port)
}
