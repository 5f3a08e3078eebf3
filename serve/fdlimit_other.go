//go:build !unix

package serve

// fdLimit is how many descriptors the process may hold open; this system
// sets no limit worth the name.
func fdLimit() int { return 1 << 16 }
