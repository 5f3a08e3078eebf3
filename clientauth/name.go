package clientauth

import (
	"errors"
	"fmt"
)

// maxNameLen bounds a client name, which becomes a directory name.
const maxNameLen = 64

// ValidateName checks a client name: 1 to 64 letters, digits, '-', '_' or
// '.', not starting with '.' or '-'. Names are safe as file names and as
// command-line arguments.
func ValidateName(name string) error {
	switch {
	case name == "":
		return errors.New("empty client name")
	case len(name) > maxNameLen:
		return fmt.Errorf("client name is %d characters long, at most %d allowed", len(name), maxNameLen)
	case name[0] == '.' || name[0] == '-':
		return fmt.Errorf("client name %q starts with %q", name, name[0])
	}
	for _, c := range []byte(name) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '_' || c == '.'
		if !ok {
			return fmt.Errorf("client name %q has %q: use letters, digits, '-', '_' and '.'", name, c)
		}
	}
	return nil
}

// Role is what a client key may do: read the cache, or also write to it.
type Role string

// The roles. A writer key is authorized on both onions.
const (
	RoleReader Role = "reader"
	RoleWriter Role = "writer"
)

// ParseRole parses "reader" or "writer".
func ParseRole(s string) (Role, error) {
	switch r := Role(s); r {
	case RoleReader, RoleWriter:
		return r, nil
	}
	return "", fmt.Errorf("unknown role %q: want reader or writer", s)
}
