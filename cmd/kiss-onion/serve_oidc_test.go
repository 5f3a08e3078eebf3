package main

import (
	"strings"
	"testing"
)

func TestOIDCFlagsCheck(t *testing.T) {
	const iss = "https://token.actions.githubusercontent.com"
	for _, tt := range []struct {
		name    string
		args    []string
		tlsDoor bool
		wantErr string
	}{
		{"none", nil, false, ""},
		{"a writer door", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "repository=org/infra,ref=refs/heads/main", "--listen-oidc", "127.0.0.1:8082"}, false, ""},
		{"a reader door on a loopback http issuer", []string{"--oidc-issuer", "http://127.0.0.1:9999", "--oidc-audience", "a", "--oidc-reader", "repository_owner=org", "--listen-oidc", "[::1]:8082"}, false, ""},
		{"rules without an issuer", []string{"--oidc-writer", "repository=org/infra"}, false, "need --oidc-issuer"},
		{"no audience", []string{"--oidc-issuer", iss, "--oidc-writer", "repository=org/infra", "--listen-oidc", "127.0.0.1:8082"}, false, "needs --oidc-audience"},
		{"no rule", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--listen-oidc", "127.0.0.1:8082"}, false, "at least one --oidc-writer or --oidc-reader"},
		{"a bad writer rule", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "repository=org/infra,ref", "--listen-oidc", "127.0.0.1:8082"}, false, `--oidc-writer: rule "repository=org/infra,ref": "ref" is not claim=value`},
		{"a bad reader rule", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "repository=org/infra", "--oidc-reader", "=x", "--listen-oidc", "127.0.0.1:8082"}, false, `--oidc-reader: rule "=x"`},
		{"an http issuer off loopback", []string{"--oidc-issuer", "http://issuer.example", "--oidc-audience", "a", "--oidc-writer", "a=b", "--listen-oidc", "127.0.0.1:8082"}, false, "want an https URL"},
		{"no door", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "a=b"}, false, "--listen-oidc or --listen-tls"},
		{"the TLS door only", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "a=b"}, true, ""},
		{"a door off loopback, even with --allow-remote", []string{"--oidc-issuer", iss, "--oidc-audience", "a", "--oidc-writer", "a=b", "--listen-oidc", "0.0.0.0:8082", "--allow-remote"}, false, "not a loopback address"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var o oidcFlags
			fs := newFlagSet("serve", "")
			o.register(fs)
			fs.Bool("allow-remote", false, "")
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err := o.check(tt.tlsDoor)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("check: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("check = %v, want an error with %q", err, tt.wantErr)
			}
		})
	}
}
