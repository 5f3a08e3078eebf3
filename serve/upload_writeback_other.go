//go:build !linux

package serve

import "os"

func startWriteback(f *os.File, off, n int64) {}
