//go:build !unix

package serve

// freeSpace cannot tell here.
func freeSpace(dir string) (int64, bool) { return 0, false }
