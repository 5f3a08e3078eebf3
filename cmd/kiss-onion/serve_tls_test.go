package main

import (
	"net"
	"strings"
	"testing"
)

func TestTLSFlagsCheck(t *testing.T) {
	for _, tt := range []struct {
		name        string
		f           tlsFlags
		allowRemote bool
		says        string // "" when accepted
	}{
		{"off", tlsFlags{}, false, ""},
		{"loopback", tlsFlags{listen: "127.0.0.1:8443"}, false, ""},
		{"remote refused", tlsFlags{listen: "0.0.0.0:8443"}, false, "add --allow-remote"},
		{"remote allowed", tlsFlags{listen: "0.0.0.0:8443", names: stringList{"cache.lan"}}, true, ""},
		{"a name without listener", tlsFlags{names: stringList{"cache.lan"}}, false, "need --listen-tls"},
		{"a certificate without its key", tlsFlags{listen: "127.0.0.1:8443", certFile: "c.pem"}, false, "together"},
		{"names with the user's certificate", tlsFlags{listen: "127.0.0.1:8443", certFile: "c.pem", keyFile: "k.pem", names: stringList{"x"}}, false, "your certificate names them"},
		{"the user's certificate", tlsFlags{listen: "127.0.0.1:8443", certFile: "c.pem", keyFile: "k.pem"}, false, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.f.check(tt.allowRemote)
			if tt.says == "" && err != nil || tt.says != "" && (err == nil || !strings.Contains(err.Error(), tt.says)) {
				t.Errorf("check: %v, want %q", err, tt.says)
			}
		})
	}
}

func TestTLSURLAndHosts(t *testing.T) {
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8443}
	for _, tt := range []struct {
		name  string
		f     tlsFlags
		url   string
		hosts string
	}{
		{"loopback", tlsFlags{listen: "127.0.0.1:0"}, "https://127.0.0.1:8443", "127.0.0.1 localhost ::1"},
		{"first name", tlsFlags{listen: "0.0.0.0:8443", names: stringList{"cache.lan", "10.0.0.2"}}, "https://cache.lan:8443", "cache.lan 10.0.0.2 localhost 127.0.0.1 ::1"},
		{"IPv6 name", tlsFlags{listen: "[::]:8443", names: stringList{"fd00::2"}}, "https://[fd00::2]:8443", "fd00::2 localhost 127.0.0.1 ::1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tlsURL(tt.f, addr); got != tt.url {
				t.Errorf("tlsURL = %q, want %q", got, tt.url)
			}
			if got := strings.Join(tlsHosts(tt.f), " "); got != tt.hosts {
				t.Errorf("tlsHosts = %q, want %q", got, tt.hosts)
			}
		})
	}
}
