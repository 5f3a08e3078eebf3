package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/kiss-onion/kiss-onion/clientauth"
	"github.com/kiss-onion/kiss-onion/onion"
	"github.com/kiss-onion/kiss-onion/tlsca"
)

func init() {
	register("keys", "mint, list, export and revoke client keys", runKeys)
}

const keysUsage = `
Usage:
	kiss-onion keys add NAME --role reader|writer [--tls [--tls-url URL]] [--frontend FRONT]... [--out DIR] [--state-dir DIR]
	kiss-onion keys add NAME --role reader|writer --public-key KEY [--frontend FRONT]... [--out DIR] [--state-dir DIR]
	kiss-onion keys export NAME [--key FILE] [--frontend FRONT]... [--out DIR] [--state-dir DIR]
	kiss-onion keys list [--state-dir DIR]
	kiss-onion keys revoke NAME [--state-dir DIR]

Manages the x25519 client keys that decide who reaches the cache: a reader's
key is authorized on the read onion, a writer's on both onions. The state
directory keeps only the public halves (in clients.toml); a running
'kiss-onion serve' picks up every change without a restart.

	add      mints a key pair, registers its public half and writes the
	         private half to a bundle directory, the only place it is kept;
	         with --public-key, registers a key made elsewhere instead;
	         with --tls, also a TLS client certificate signed by the
	         cache's CA, for the TLS door (docs/tls.md)
	export   rewrites a client's bundle, from its private key file (--key)
	         or, without it, only its kiss-onion.toml
	list     prints the registered clients
	revoke   revokes a client's key, and its TLS certificate, for good

Arguments:
	NAME    the client's name: letters, digits, '-', '_' and '.', not
	        starting with '.' or '-'
	DIR     a bundle directory (created 0700; default ./NAME.bundle): the
	        private key (client.key), one <onion>.auth_private file per onion
	        for tor's ClientOnionAuthDir, and kiss-onion.toml with the onion
	        URLs, for 'kiss-onion proxy --bundle DIR'
	KEY     a public key in tor's form, 52 base32 characters, or a line of
	        tor's authorized_clients/ files: descriptor:x25519:KEY
	FILE    a private key file, like a bundle's client.key
	URL     the TLS door's https://HOST:PORT; by default the one that
	        'kiss-onion serve --listen-tls' recorded in the state directory
	FRONT   another front end of the cache (a serve over the same store
	        whose --clients-file is this state directory's clients.toml):
	        its state directory, or a directory holding copies of its
	        read.onion and write.onion files, which serve writes there; the
	        bundle then lists its onions too, and the gateway spreads its
	        requests over every front end (docs/gateway.md); repeatable

Examples:
	kiss-onion keys add laptop --role reader
	kiss-onion keys add ci --role writer --out /tmp/ci.bundle
	kiss-onion keys add builder --role writer --tls --tls-url https://cache.lan:8443
	kiss-onion keys export laptop --key laptop.bundle/client.key --out laptop.bundle
	kiss-onion keys add ci --role writer --frontend /var/lib/kiss-onion-b
	kiss-onion keys revoke laptop
`

// keysStdout is where the keys subcommands print their results.
var keysStdout io.Writer = os.Stdout

func runKeys(args []string) error {
	if len(args) == 0 {
		return usagef("missing subcommand: add, export, list or revoke")
	}
	sub, rest := args[0], args[1:]
	switch sub {
	case "add":
		return keysAdd(rest)
	case "export":
		return keysExport(rest)
	case "list":
		return keysList(rest)
	case "revoke":
		return keysRevoke(rest)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stderr, strings.TrimLeft(keysUsage, "\n"))
		return flag.ErrHelp
	}
	if strings.HasPrefix(sub, "-") {
		return usagef("missing subcommand (add, export, list or revoke) before %s", sub)
	}
	return usagef("unknown subcommand %q: want add, export, list or revoke", sub)
}

// keysFlagSet returns the flag set of a keys subcommand, with --state-dir.
func keysFlagSet(sub string) (*flag.FlagSet, *string) {
	flags := newFlagSet("keys "+sub, keysUsage)
	// parseFlags silences the flag package while parsing, but the usage
	// text newFlagSet installs prints to stderr regardless: print it only
	// for -h, not before every flag error.
	usage := flags.Usage
	flags.Usage = func() {
		if flags.Output() != io.Discard {
			usage()
		}
	}
	stateDir := flags.String("state-dir", "/var/lib/kiss-onion", "the `directory` where serve keeps its keys (created 0700)")
	return flags, stateDir
}

// keysOneName checks that the arguments are one valid client name.
func keysOneName(sub string, args []string) (string, error) {
	switch {
	case len(args) == 0:
		return "", usagef("keys %s: missing NAME", sub)
	case len(args) > 1:
		return "", usagef("keys %s: one NAME only, got %q", sub, args)
	}
	if err := clientauth.ValidateName(args[0]); err != nil {
		return "", usagef("%v", err)
	}
	return args[0], nil
}

// keysCheckOut refuses a bundle directory inside the state directory,
// which must never hold a private client key.
func keysCheckOut(out, stateDir string) error {
	in, err := inside(out, stateDir)
	if err != nil {
		return usagef("--out: %v", err)
	}
	if in {
		return usagef("--out %s is inside the state directory, where no private key may live", out)
	}
	return nil
}

func keysRegistryPath(stateDir string) string {
	return filepath.Join(stateDir, clientauth.RegistryFileName)
}

// keysOnions returns the addresses of the onions a role reaches, creating
// the onion identities in the state directory when missing, so that a
// bundle can be handed out before serve ever ran.
func keysOnions(stateDir string, role clientauth.Role) (read, write string, err error) {
	readPath, writePath := identityPaths(stateDir)
	if err := os.MkdirAll(filepath.Dir(readPath), 0o700); err != nil {
		return "", "", fmt.Errorf("create state directory: %w", err)
	}
	id, err := onion.LoadOrCreateIdentity(readPath)
	if err != nil {
		return "", "", err
	}
	read = id.Address()
	if role == clientauth.RoleWriter {
		id, err := onion.LoadOrCreateIdentity(writePath)
		if err != nil {
			return "", "", err
		}
		write = id.Address()
	}
	return read, write, nil
}

// frontendList is --frontend: the state directories of the cache's other
// front ends.
type frontendList []string

func (l *frontendList) String() string     { return strings.Join(*l, ",") }
func (l *frontendList) Set(s string) error { *l = append(*l, s); return nil }

// addFrontendFlag adds --frontend to a keys subcommand.
func addFrontendFlag(flags *flag.FlagSet) *frontendList {
	var l frontendList
	flags.Var(&l, "frontend", "also list the onions of the front end whose state `directory` (or a copy of its read.onion and write.onion) this is (repeatable)")
	return &l
}

// keysFrontends returns the front ends --frontend names, as a bundle of
// role lists them: the read onion of each, and the write onion of each
// for a writer. It reads the addresses serve wrote into each directory.
func keysFrontends(dirs []string, role clientauth.Role) ([]clientauth.Frontend, error) {
	var out []clientauth.Frontend
	for _, dir := range dirs {
		var f clientauth.Frontend
		names, addrs := []string{"read.onion"}, []*string{&f.ReadOnion}
		if role == clientauth.RoleWriter {
			names, addrs = append(names, "write.onion"), append(addrs, &f.WriteOnion)
		}
		for i, name := range names {
			path := filepath.Join(dir, name)
			data, err := os.ReadFile(path)
			if errors.Is(err, fs.ErrNotExist) {
				return nil, withHint(fmt.Errorf("--frontend %s: no %s", dir, name), "give the state directory of a front end's serve once it has published its onions, or a directory with copies of its read.onion and write.onion")
			}
			if err != nil {
				return nil, fmt.Errorf("--frontend: %w", err)
			}
			addr, err := clientauth.ParseOnionAddress(strings.TrimSpace(string(data)))
			if err != nil {
				return nil, fmt.Errorf("--frontend: %s: %w", path, err)
			}
			*addrs[i] = addr + ".onion"
		}
		out = append(out, f)
	}
	return out, nil
}

// keysPrintBundle says which files of a bundle were written.
func keysPrintBundle(dir string, b clientauth.Bundle) {
	names, _ := b.Files()
	fmt.Fprintf(keysStdout, "wrote %s: %s\n", dir, strings.Join(names, ", "))
}

// keysTLS mints a client certificate for name with the cache's CA
// (created when missing) and returns what a bundle needs of the TLS door:
// its URL (url, or the one serve recorded) and its server's fingerprint
// (when serve recorded it).
func keysTLS(stateDir, name, url string) (*clientauth.BundleTLS, error) {
	dir := tlsca.Dir(stateDir)
	door, err := tlsca.LoadDoor(dir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if url == "" {
		if err != nil {
			return nil, withHint(errors.New("no URL for the TLS door"), "give --tls-url https://HOST:PORT, or start 'kiss-onion serve --listen-tls ADDR' once: it records its URL in the state directory")
		}
		url = door.URL
	}
	url = strings.TrimSuffix(url, "/")
	if err := tlsca.CheckURL(url); err != nil {
		return nil, usagef("--tls-url: %v", err)
	}
	ca, err := tlsca.LoadOrCreate(dir)
	if err != nil {
		return nil, err
	}
	iss, err := ca.Issue(tlsca.Template{Client: true, Name: name})
	if err != nil {
		return nil, err
	}
	return &clientauth.BundleTLS{URL: url, CA: ca.CertPEM(), ServerFingerprint: door.ServerFingerprint, CertFingerprint: iss.Fingerprint(), Cert: iss.CertPEM, Key: iss.KeyPEM}, nil
}

// keysExportTLS returns what the bundle of a client with the TLS
// certificate fp says of the TLS door, without the certificate itself,
// or nil when serve never recorded the door.
func keysExportTLS(stateDir, fp string) (*clientauth.BundleTLS, error) {
	dir := tlsca.Dir(stateDir)
	door, err := tlsca.LoadDoor(dir)
	if errors.Is(err, fs.ErrNotExist) {
		warningf("the client has a TLS certificate, but no 'kiss-onion serve --listen-tls' recorded the door's URL in %s: the bundle leaves the TLS door out", stateDir)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	ca, err := tlsca.Load(dir)
	if err != nil {
		return nil, err
	}
	return &clientauth.BundleTLS{URL: door.URL, CA: ca.CertPEM(), ServerFingerprint: door.ServerFingerprint, CertFingerprint: fp}, nil
}

func keysBundleHint(dir string) {
	hintf("copy %s to the client and run 'kiss-onion proxy --bundle %s', or put its .auth_private files in tor's ClientOnionAuthDir", dir, dir)
}

func keysAdd(args []string) error {
	flags, stateDir := keysFlagSet("add")
	roleFlag := flags.String("role", "", "the client's `role`: reader or writer (required)")
	out := flags.String("out", "", "write the bundle to this `directory` (default ./NAME.bundle)")
	pubFlag := flags.String("public-key", "", "register this public `key`, made elsewhere, instead of minting one")
	withTLS := flags.Bool("tls", false, "also mint a TLS client certificate, for the TLS door (serve --listen-tls)")
	tlsURL := flags.String("tls-url", "", "the TLS door's `URL`, https://HOST:PORT, for the bundle (default: the one serve --listen-tls recorded)")
	frontends := addFrontendFlag(flags)
	pos, err := parseArgs(flags, args)
	if err != nil {
		return err
	}
	name, err := keysOneName("add", pos)
	if err != nil {
		return err
	}
	if *roleFlag == "" {
		return usagef("keys add: missing --role reader|writer")
	}
	role, err := clientauth.ParseRole(*roleFlag)
	if err != nil {
		return usagef("--role: %v", err)
	}

	b := clientauth.Bundle{Name: name, Role: role}
	switch {
	case *tlsURL != "" && !*withTLS:
		return usagef("--tls-url needs --tls")
	case *withTLS && *pubFlag != "":
		return usagef("--tls mints a private key for the bundle: it does not go with --public-key")
	case *withTLS:
		if b.TLS, err = keysTLS(*stateDir, name, *tlsURL); err != nil {
			return err
		}
	}
	if *pubFlag != "" {
		parse := clientauth.ParsePublicKey
		if strings.HasPrefix(*pubFlag, "descriptor:") {
			parse = clientauth.ParseServiceAuthLine
		}
		if b.PublicKey, err = parse(*pubFlag); err != nil {
			return usagef("--public-key: %v", err)
		}
	} else {
		if b.Key, err = clientauth.GeneratePrivateKey(); err != nil {
			return err
		}
		b.PublicKey = b.Key.PublicKey()
		if *out == "" {
			*out = name + ".bundle"
		}
		if err := keysCheckOut(*out, *stateDir); err != nil {
			return err
		}
	}
	if b.ReadOnion, b.WriteOnion, err = keysOnions(*stateDir, role); err != nil {
		return err
	}
	if b.Frontends, err = keysFrontends(*frontends, role); err != nil {
		return err
	}

	// The bundle is written while the registry is locked, and removed again
	// if the registry cannot be saved: a key is either registered with its
	// bundle written, or neither.
	var written []string
	err = clientauth.UpdateRegistry(keysRegistryPath(*stateDir), func(r *clientauth.Registry) error {
		c, err := r.Add(name, role, b.PublicKey)
		if err != nil {
			return err
		}
		if b.TLS != nil {
			if err := r.SetTLSCert(name, b.TLS.CertFingerprint); err != nil {
				return err
			}
		}
		b.Created = c.Created
		if *out == "" {
			return nil
		}
		names, err := b.Files()
		if err != nil {
			return err
		}
		if err := clientauth.WriteBundle(*out, b); err != nil {
			return err
		}
		for _, n := range names {
			written = append(written, filepath.Join(*out, n))
		}
		return nil
	})
	if err != nil {
		for _, p := range written {
			os.Remove(p)
		}
		switch {
		case errors.Is(err, clientauth.ErrClientExists):
			return withHint(err, "choose another name; 'kiss-onion keys list' shows the names in use")
		case errors.Is(err, fs.ErrExist):
			return withHint(err, "choose another --out directory, or remove the old bundle")
		}
		return err
	}

	fmt.Fprintf(keysStdout, "added %s %q (fingerprint %s)\n", role, name, b.PublicKey.Fingerprint())
	if b.TLS != nil {
		fmt.Fprintf(keysStdout, "TLS certificate %s for %s\n", b.TLS.CertFingerprint, b.TLS.URL)
	}
	if *out != "" {
		keysPrintBundle(*out, b)
	}
	switch {
	case b.Key != nil:
		keysBundleHint(*out)
	case *out != "":
		hintf("copy %s to the client, next to its private key", *out)
	default:
		for _, u := range b.ReadURLs() {
			fmt.Fprintf(keysStdout, "read_url = %s\n", u)
		}
		for _, u := range b.WriteURLs() {
			fmt.Fprintf(keysStdout, "write_url = %s\n", u)
		}
		hintf("write the client's kiss-onion.toml with 'kiss-onion keys export %s --out DIR'", name)
	}
	return nil
}

func keysExport(args []string) error {
	flags, stateDir := keysFlagSet("export")
	out := flags.String("out", "", "write the bundle to this `directory` (default ./NAME.bundle)")
	keyFile := flags.String("key", "", "the client's private key `file` (like a bundle's client.key)")
	frontends := addFrontendFlag(flags)
	pos, err := parseArgs(flags, args)
	if err != nil {
		return err
	}
	name, err := keysOneName("export", pos)
	if err != nil {
		return err
	}
	if *out == "" {
		*out = name + ".bundle"
	}
	r, err := clientauth.LoadRegistry(keysRegistryPath(*stateDir))
	if err != nil {
		return err
	}
	c, ok := r.Client(name)
	if !ok {
		return withHint(fmt.Errorf("%w named %q", clientauth.ErrNoClient, name), "'kiss-onion keys list' shows the registered clients")
	}
	if c.IsRevoked() {
		return fmt.Errorf("client %q was revoked on %s", name, c.Revoked.Format(time.RFC3339))
	}
	b := clientauth.Bundle{Name: name, Role: c.Role, PublicKey: c.PublicKey, Created: c.Created}
	if c.TLSCert != "" {
		if b.TLS, err = keysExportTLS(*stateDir, c.TLSCert); err != nil {
			return err
		}
	}
	if *keyFile != "" {
		k, err := clientauth.ReadKeyFile(*keyFile)
		if err != nil {
			return err
		}
		if k.PublicKey() != c.PublicKey {
			return fmt.Errorf("%s holds key %s, but client %q is registered with key %s", *keyFile, k.PublicKey().Fingerprint(), name, c.PublicKey.Fingerprint())
		}
		b.Key = k
		if err := keysCheckOut(*out, *stateDir); err != nil {
			return err
		}
	}
	if b.ReadOnion, b.WriteOnion, err = keysOnions(*stateDir, c.Role); err != nil {
		return err
	}
	if b.Frontends, err = keysFrontends(*frontends, c.Role); err != nil {
		return err
	}
	if err := clientauth.ReplaceBundle(*out, b); err != nil {
		return err
	}
	keysPrintBundle(*out, b)
	if b.Key == nil {
		fmt.Fprintf(keysStdout, "no --key given: %s has no private key, and the client keeps its own\n", *out)
		hintf("copy %s to the client, next to its private key", *out)
		return nil
	}
	keysBundleHint(*out)
	return nil
}

func keysList(args []string) error {
	flags, stateDir := keysFlagSet("list")
	pos, err := parseArgs(flags, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("keys list takes no arguments, got %q", pos)
	}
	r, err := clientauth.LoadRegistry(keysRegistryPath(*stateDir))
	if err != nil {
		return err
	}
	clients := r.Clients()
	if len(clients) == 0 {
		hintf("no clients in %s yet: add one with 'kiss-onion keys add NAME --role reader'", r.Path())
		return nil
	}
	tw := tabwriter.NewWriter(keysStdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tROLE\tCREATED\tFINGERPRINT\tREVOKED\tTLS CERTIFICATE")
	for _, c := range clients {
		revoked, cert := "-", "-"
		if c.IsRevoked() {
			revoked = c.Revoked.UTC().Format(time.RFC3339)
		}
		if c.TLSCert != "" {
			cert = c.TLSCert
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", c.Name, c.Role, c.Created.UTC().Format(time.RFC3339), c.PublicKey.Fingerprint(), revoked, cert)
	}
	return tw.Flush()
}

func keysRevoke(args []string) error {
	flags, stateDir := keysFlagSet("revoke")
	pos, err := parseArgs(flags, args)
	if err != nil {
		return err
	}
	name, err := keysOneName("revoke", pos)
	if err != nil {
		return err
	}
	path := keysRegistryPath(*stateDir)
	if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
		return withHint(fmt.Errorf("%w named %q: no %s", clientauth.ErrNoClient, name, path), "check --state-dir")
	}
	err = clientauth.UpdateRegistry(path, func(r *clientauth.Registry) error {
		return r.Revoke(name)
	})
	switch {
	case errors.Is(err, clientauth.ErrRevoked):
		warningf("%v", err)
		return nil
	case errors.Is(err, clientauth.ErrNoClient):
		return withHint(err, "'kiss-onion keys list' shows the registered clients")
	case err != nil:
		return err
	}
	fmt.Fprintf(keysStdout, "revoked %q: a running 'kiss-onion serve' drops its key (and its TLS certificate) without a restart\n", name)
	return nil
}
