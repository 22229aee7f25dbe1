//go:build !unix

package main

// What differs elsewhere (Windows): no descriptor limit to read, and no
// -data directory, which needs Unix file locking and directory fsync.

import (
	"errors"
	"os"
)

func openFileLimit() (int, bool) { return 0, false }

const noFollow = 0

func lockFile(*os.File) error { return dataDirUnsupported }

var dataDirUnsupported = errors.New("-data needs a Unix-like system (Linux, macOS, the BSDs) for its file locking and directory fsync; here, keep entries in memory or in PostgreSQL (-database-url)")
