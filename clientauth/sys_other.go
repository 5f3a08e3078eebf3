//go:build !unix

package clientauth

// lockFile does not lock where flock is missing.
func lockFile(string) (unlock func(), err error) { return func() {}, nil }
