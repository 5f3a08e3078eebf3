package oidcauth

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseRule(t *testing.T) {
	for _, tt := range []struct {
		rule    string
		claims  []string
		wantErr string
	}{
		{rule: "repository=org/infra", claims: []string{"repository"}},
		{rule: "repository=org/infra,ref=refs/heads/main", claims: []string{"ref", "repository"}},
		{rule: "job_workflow_ref=org/infra/.github/workflows/push.yml@refs/heads/main", claims: []string{"job_workflow_ref"}},
		{rule: "sub=a=b", claims: []string{"sub"}},
		{rule: "", wantErr: `rule "" is empty`},
		{rule: "repository", wantErr: `rule "repository": "repository" is not claim=value`},
		{rule: "=org/infra", wantErr: `names no claim`},
		{rule: "repository=", wantErr: `rule "repository=": claim "repository" has no value`},
		{rule: "repository=a,,ref=b", wantErr: `"" is not claim=value`},
		{rule: "ref=a,ref=b", wantErr: `claim "ref" given twice`},
	} {
		t.Run(tt.rule, func(t *testing.T) {
			r, err := ParseRule(tt.rule)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseRule(%q) = %v, want an error with %q", tt.rule, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(r.Claims(), " "); got != strings.Join(tt.claims, " ") {
				t.Errorf("claims %q, want %q", got, tt.claims)
			}
			if r.String() != tt.rule {
				t.Errorf("String() = %q", r.String())
			}
		})
	}
}

func TestRuleMatch(t *testing.T) {
	r, err := ParseRule("repository=org/infra,ref=refs/heads/main,run_attempt=1")
	if err != nil {
		t.Fatal(err)
	}
	base := func() map[string]any {
		return map[string]any{"repository": "org/infra", "ref": "refs/heads/main", "run_attempt": "1", "other": true}
	}
	for _, tt := range []struct {
		name   string
		change func(map[string]any)
		want   bool
	}{
		{"every claim equal", func(map[string]any) {}, true},
		{"one claim differs", func(c map[string]any) { c["ref"] = "refs/heads/dev" }, false},
		{"one claim missing", func(c map[string]any) { delete(c, "ref") }, false},
		{"case matters", func(c map[string]any) { c["repository"] = "Org/Infra" }, false},
		{"a number never equals a string", func(c map[string]any) { c["run_attempt"] = float64(1) }, false},
		{"a list never equals a string", func(c map[string]any) { c["ref"] = []any{"refs/heads/main"} }, false},
		{"a boolean never equals a string", func(c map[string]any) { c["repository"] = true }, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.change(c)
			if got := r.Match(c); got != tt.want {
				t.Errorf("Match = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestReasonsDocumented: docs/oidc.md has a row for every reason.
func TestReasonsDocumented(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join("..", "docs", "oidc.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []Reason{NoToken, Malformed, Unsigned, UnsupportedAlgorithm, UnknownKey, BadSignature,
		KeysUnavailable, WrongIssuer, WrongAudience, Expired, NotYetValid, NoMatchingRule} {
		if !strings.Contains(string(doc), "\n| "+string(r)+" | `"+string(r)+":") {
			t.Errorf("docs/oidc.md has no row for %q", r)
		}
	}
}
