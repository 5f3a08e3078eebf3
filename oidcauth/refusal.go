package oidcauth

import "fmt"

// Reason is why a token was refused.
type Reason string

// The reasons a token is refused, each named in the refusal's message.
const (
	NoToken              Reason = "no token"
	Malformed            Reason = "malformed"
	Unsigned             Reason = "unsigned"
	UnsupportedAlgorithm Reason = "unsupported algorithm"
	UnknownKey           Reason = "unknown key"
	BadSignature         Reason = "bad signature"
	KeysUnavailable      Reason = "issuer keys unavailable"
	WrongIssuer          Reason = "wrong issuer"
	WrongAudience        Reason = "wrong audience"
	Expired              Reason = "expired"
	NotYetValid          Reason = "not yet valid"
	NoMatchingRule       Reason = "no matching rule"
)

// Error is a refusal. Its message names the reason and says more, with
// claim values from the token quoted and cut short, but never the token.
type Error struct {
	Reason Reason
	detail string
}

func (e *Error) Error() string {
	return "oidc token refused: " + string(e.Reason) + ": " + e.detail
}

func refuse(reason Reason, format string, args ...any) *Error {
	return &Error{Reason: reason, detail: fmt.Sprintf(format, args...)}
}

// short quotes a value taken from a token, cut to a length that keeps a
// log line readable whatever the token's sender put there.
func short(s string) string {
	const max = 120
	if len(s) > max {
		s = s[:max] + "..."
	}
	return fmt.Sprintf("%q", s)
}
