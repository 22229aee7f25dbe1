//go:build unix

package main

// What differs on Unix-like systems (Linux, macOS, the BSDs): the file
// descriptor limit, and the calls that keep a -data directory safe.

import (
	"math"
	"os"
	"syscall"
)

// openFileLimit returns how many files the process may have open, if known.
func openFileLimit() (int, bool) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur > math.MaxInt32 {
		return 0, false
	}
	return int(lim.Cur), true
}

// noFollow opens a file without following a symbolic link (ELOOP instead)
// and without blocking on a FIFO planted in its place.
const noFollow = syscall.O_NOFOLLOW | syscall.O_NONBLOCK

// lockFile takes an exclusive lock on f, released when f is closed; it is
// errLocked when another process holds it.
func lockFile(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if err == syscall.EWOULDBLOCK {
		return errLocked
	}
	return err
}

// dataDirUnsupported is why -data cannot work here: nil, it can.
var dataDirUnsupported error
