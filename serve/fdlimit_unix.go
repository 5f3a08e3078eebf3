//go:build unix

package serve

import "syscall"

// fdLimit is how many descriptors the process may hold open: the soft
// RLIMIT_NOFILE, which the Go runtime raised to (one below) the hard
// limit at start.
func fdLimit() int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 1024
	}
	return int(min(uint64(lim.Cur), 1<<20))
}
