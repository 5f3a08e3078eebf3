package oidcauth

import (
	"fmt"
	"sort"
	"strings"
)

// A Rule matches a token whose claims hold every one of its claim=value
// pairs. Only string claims match: a claim that is a number, a boolean,
// a list or an object never equals a rule's value, so a rule cannot be
// met by a claim of another type that prints the same.
type Rule struct {
	claims map[string]string
	text   string
}

// ParseRule parses "claim=value,claim=value". A value may hold '=' but
// not ','; claims and values are taken as written, spaces included.
func ParseRule(s string) (Rule, error) {
	r := Rule{claims: map[string]string{}, text: s}
	if strings.TrimSpace(s) == "" {
		return Rule{}, fmt.Errorf("rule %q is empty: want claim=value[,claim=value...]", s)
	}
	for _, part := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(part, "=")
		switch {
		case !ok:
			return Rule{}, fmt.Errorf("rule %q: %q is not claim=value", s, part)
		case k == "":
			return Rule{}, fmt.Errorf("rule %q: %q names no claim", s, part)
		case v == "":
			return Rule{}, fmt.Errorf("rule %q: claim %q has no value", s, k)
		}
		if _, dup := r.claims[k]; dup {
			return Rule{}, fmt.Errorf("rule %q: claim %q given twice", s, k)
		}
		r.claims[k] = v
	}
	return r, nil
}

// String returns the rule as it was written.
func (r Rule) String() string { return r.text }

// Match reports whether claims hold every pair of the rule as strings.
func (r Rule) Match(claims map[string]any) bool {
	if len(r.claims) == 0 {
		return false
	}
	for k, want := range r.claims {
		got, ok := claims[k].(string)
		if !ok || got != want {
			return false
		}
	}
	return true
}

// Claims returns the names of the claims the rule checks, sorted.
func (r Rule) Claims() []string {
	var names []string
	for k := range r.claims {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}
