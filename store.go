package main

// This file is the storage seam. Store is the one interface in the service:
// swap MapStore for a database by writing another implementation of it,
// without touching service.go or handlers.go.

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Record is an entry as stored: its JSON, exactly as GET serves it, and a
// version that changes whenever the JSON does (served as the ETag).
type Record struct {
	JSON    []byte
	Version Version
}

// Version identifies one content of an entry. It holds no pointer, so a
// million stored versions give the garbage collector nothing to trace.
type Version [16]byte

// String returns the version as 32 lowercase hex characters.
func (v Version) String() string { return hex.EncodeToString(v[:]) }

// matches reports whether tag, as a client wrote it, is this version.
func (v Version) matches(tag string) bool {
	var text [32]byte
	hex.Encode(text[:], v[:])
	return tag == string(text[:])
}

// Item is one entry of a listing.
type Item struct {
	ID ID
	Record
}

// Store keeps records by id. Implementations must be safe for concurrent use
// and must apply a precondition and the change it guards as one step.
//
// ifMatch is a precondition on the current version: nil means none, "*"
// matches any existing entry, any other element must equal the version.
// A missing entry is ErrNotFound whatever the precondition; a precondition
// that does not hold is ErrPreconditionFailed.
//
// Every call gets a context with a deadline (see Collection.call); a store
// that waits on anything but memory must give up when it passes.
type Store interface {
	// Insert stores rec under id, unless something is stored there already:
	// then it is ErrExists, and the stored record stays as it was.
	Insert(ctx context.Context, id ID, rec Record) error
	Get(ctx context.Context, id ID) (Record, error)
	Replace(ctx context.Context, id ID, rec Record, ifMatch []string) error
	Delete(ctx context.Context, id ID, ifMatch []string) error
	// List returns up to limit items with ids after after, in id order, and
	// whether more remain.
	List(ctx context.Context, after ID, limit int) (items []Item, more bool, err error)
	// Close waits for changes under way and releases what the store holds;
	// closing again does nothing.
	Close() error
}

// readiness returns a check of every store that has a Ready method. Ready
// is optional, outside Store: a store that can tell when it cannot take
// writes (MapStore on a directory, a database that does not answer) says so
// with Ready(ctx) error, and /readyz reports it. Each check gets at most
// readyTimeout, and its answer stands for the next reuse: a flood of probes
// costs the store one check per interval, not one each.
func readiness(reuse time.Duration, stores ...Store) func(context.Context) error {
	var mu sync.Mutex // held across a check, so probes at once share it
	var last error
	var checked time.Time
	return func(ctx context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if !checked.IsZero() && time.Since(checked) < reuse {
			return last
		}
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), readyTimeout)
		defer cancel()
		var errs []error
		for _, s := range stores {
			if r, ok := s.(interface{ Ready(context.Context) error }); ok {
				errs = append(errs, r.Ready(ctx))
			}
		}
		last, checked = errors.Join(errs...), time.Now()
		return last
	}
}

// readyTimeout bounds a readiness check, so /readyz answers within about a
// second even when a database does not answer at all.
const readyTimeout = time.Second

func versionMatches(version Version, ifMatch []string) bool {
	if ifMatch == nil {
		return true
	}
	for _, tag := range ifMatch {
		if tag == "*" || version.matches(tag) {
			return true
		}
	}
	return false
}

// MapStore keeps every record in a map guarded by a mutex, and the same
// records in id order (sortedItems) so a page costs the same however large
// the book is. Memory is always what serves reads. Opened on a directory, it also writes
// every change through to one file per entry before acknowledging it.
//
// The records' JSON may total at most maxBytes (0: no limit), so that memory
// has a bound an operator can plan for; a change past it is ErrStoreFull.
type MapStore struct {
	mu       sync.RWMutex // guards records, order and bytes; never held during disk I/O
	records  map[ID]Record
	order    sortedItems // the same records in id order, for pages
	bytes    int64       // the records' JSON, plus changes being written
	maxBytes int64

	writers idLocks               // one writer at a time per entry, across its disk I/O
	life    sync.RWMutex          // writes hold it shared; Close takes it to wait for them
	closed  bool                  // guarded by life
	broken  atomic.Pointer[error] // set once a write may have reached the disk but failed; see write
	files   *entryFiles           // nil: memory only
}

// NewMapStore returns an empty store that keeps records in memory only,
// their JSON totalling at most maxBytes (0: no limit).
func NewMapStore(maxBytes int64) *MapStore {
	return &MapStore{records: make(map[ID]Record), maxBytes: maxBytes}
}

// OpenMapStore returns a store that persists to dir, loading what dir holds;
// load turns each file's bytes into a record, refusing any that is not a
// valid record of the resource (see storedRecord). See entryFiles for the
// format and the guarantees. A directory that already holds more than
// maxBytes is opened all the same: its data is never refused, but changes
// that grow it are, until deletes make room.
func OpenMapStore(dir string, maxBytes int64, load func([]byte) (Record, error)) (*MapStore, error) {
	files, err := openEntryFiles(dir, defaultFileOps)
	if err != nil {
		return nil, err
	}
	loaded, err := files.load(load)
	if err != nil {
		files.close()
		return nil, err
	}
	s := NewMapStore(maxBytes)
	s.files = files
	slices.SortFunc(loaded, func(a, b Item) int { return compareIDs(a.ID, b.ID) })
	for _, it := range loaded {
		s.records[it.ID] = it.Record
		s.order.set(it)
		s.bytes += int64(len(it.JSON))
	}
	return s, nil
}

// Size returns the entries the store holds, their bytes of JSON, and its
// limit (0: none). /metrics reports it, for any store that has it.
func (s *MapStore) Size() (entries int, bytes, limit int64) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.records), s.bytes, s.maxBytes
}

// Insert adds a record under an id not in use.
func (s *MapStore) Insert(_ context.Context, id ID, rec Record) error {
	defer s.writers.lock(id)()
	return s.write(func() error {
		if err := s.check(id, nil); !errors.Is(err, ErrNotFound) {
			return ErrExists
		}
		return s.put(id, rec)
	})
}

// Get returns the record stored under id.
func (s *MapStore) Get(_ context.Context, id ID) (Record, error) {
	s.mu.RLock()
	rec, ok := s.records[id]
	s.mu.RUnlock()
	if !ok {
		return Record{}, ErrNotFound
	}
	return rec, nil
}

// Replace swaps the record under id if ifMatch holds.
func (s *MapStore) Replace(_ context.Context, id ID, rec Record, ifMatch []string) error {
	defer s.writers.lock(id)()
	return s.write(func() error {
		if err := s.check(id, ifMatch); err != nil {
			return err
		}
		return s.put(id, rec)
	})
}

// put writes rec through to disk, then makes it what reads see. The caller
// holds id's writer lock. The room rec needs is taken before the disk write,
// so concurrent writers cannot together pass the limit.
func (s *MapStore) put(id ID, rec Record) error {
	s.mu.Lock()
	grow := int64(len(rec.JSON)) - int64(len(s.records[id].JSON))
	if grow > 0 && s.maxBytes > 0 && s.bytes+grow > s.maxBytes {
		s.mu.Unlock()
		return ErrStoreFull
	}
	s.bytes += grow
	s.mu.Unlock()
	if err := s.files.write(id, rec.JSON); err != nil {
		s.mu.Lock()
		s.bytes -= grow
		s.mu.Unlock()
		return err
	}
	s.mu.Lock()
	s.records[id] = rec
	s.order.set(Item{id, rec})
	s.mu.Unlock()
	return nil
}

// Delete removes the record under id if ifMatch holds.
func (s *MapStore) Delete(_ context.Context, id ID, ifMatch []string) error {
	defer s.writers.lock(id)()
	return s.write(func() error {
		if err := s.check(id, ifMatch); err != nil {
			return err
		}
		if err := s.files.remove(id); err != nil {
			return err
		}
		s.mu.Lock()
		s.bytes -= int64(len(s.records[id].JSON))
		delete(s.records, id)
		s.order.remove(id)
		s.mu.Unlock()
		return nil
	})
}

// write runs change unless the store is closed or broken. A change that
// fails after the disk may already hold it breaks the store: the map and the
// disk may disagree, and only a restart, which reloads the disk, makes them
// one again. Writes fail from then on; reads go on.
func (s *MapStore) write(change func() error) error {
	s.life.RLock()
	defer s.life.RUnlock()
	if err := s.refusal(); err != nil {
		return err
	}
	err := change()
	var uncertain *uncertainWriteError
	if errors.As(err, &uncertain) {
		broken := fmt.Errorf("the store refuses writes until a restart: %w", err)
		s.broken.CompareAndSwap(nil, &broken)
	}
	return err
}

// check returns why a change to id must not happen, if it must not. The
// caller holds id's writer lock, so the answer stays true until it writes.
func (s *MapStore) check(id ID, ifMatch []string) error {
	s.mu.RLock()
	cur, ok := s.records[id]
	s.mu.RUnlock()
	if !ok {
		return ErrNotFound
	}
	if !versionMatches(cur.Version, ifMatch) {
		return ErrPreconditionFailed
	}
	return nil
}

// List returns a page of records in id order.
func (s *MapStore) List(_ context.Context, after ID, limit int) ([]Item, bool, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	items := make([]Item, 0, min(limit, len(s.records)))
	more := false
	s.order.ascend(after, func(it Item) bool {
		if len(items) == limit {
			more = true
			return false
		}
		items = append(items, it)
		return true
	})
	return items, more, nil
}

// Close waits for writes under way, then refuses new ones and releases the
// data directory. Reads still work. Closing twice is harmless.
func (s *MapStore) Close() error {
	s.life.Lock()
	defer s.life.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.files.close()
}

var (
	errStoreClosed = errors.New("the store is closed")
	errLocked      = errors.New("locked by another process")
)

// Ready reports why the store cannot take writes now, or nil: it is closed,
// a write left the disk uncertain, or its directory is gone or cannot be
// written. /readyz answers 503 with this reason.
func (s *MapStore) Ready(context.Context) error {
	s.life.RLock()
	defer s.life.RUnlock()
	if err := s.refusal(); err != nil {
		return err
	}
	return s.files.probe()
}

// refusal returns why the store refuses every write, or nil. The caller
// holds life.
func (s *MapStore) refusal() error {
	if s.closed {
		return errStoreClosed
	}
	if broken := s.broken.Load(); broken != nil {
		return *broken
	}
	return nil
}

// idLocks hands out one mutex per id in use, so writers to one entry queue
// in order while writers to others never wait on them.
type idLocks struct {
	mu    sync.Mutex
	locks map[ID]*idLock
}

type idLock struct {
	sync.Mutex
	users int // guarded by idLocks.mu
}

// lock locks id and returns the function that unlocks it.
func (l *idLocks) lock(id ID) (unlock func()) {
	l.mu.Lock()
	if l.locks == nil {
		l.locks = make(map[ID]*idLock)
	}
	m := l.locks[id]
	if m == nil {
		m = &idLock{}
		l.locks[id] = m
	}
	m.users++
	l.mu.Unlock()
	m.Lock()
	return func() {
		m.Unlock()
		l.mu.Lock()
		if m.users--; m.users == 0 {
			delete(l.locks, id)
		}
		l.mu.Unlock()
	}
}

// ---- persistence ------------------------------------------------------------------

// entryFiles keeps one file per entry in a directory: DIR/<id>.json holds
// exactly the entry's JSON as GET serves it, so cat and jq read the data.
//
// A write goes to a temporary file in DIR, is fsync'd, renamed over the
// entry's file, and DIR is fsync'd; a delete removes the file and fsyncs DIR.
// Only then is the change acknowledged. A crash at any point leaves either
// the old file or the new one, never a torn one; temporary files are removed
// at the next start. DIR/.lock is held (flock) while the store is open, so a
// second process cannot write the same directory.
//
// DIR itself stays open from start to close: fsyncing it after a rename
// needs no new descriptor, so running out of descriptors (EMFILE) can fail a
// write before its rename, harmlessly, but never leave the disk uncertain.
//
// A nil *entryFiles is the memory-only store: every method does nothing.
type entryFiles struct {
	dir     string
	dirFile *os.File // DIR, held open for fsync
	lock    *os.File
	fileOps
}

// fileOps are the file-system calls that can fail for lack of space,
// descriptors or a bad disk; tests replace them to simulate each failure.
type fileOps struct {
	createTemp func(dir, pattern string) (*os.File, error)
	writeFile  func(f *os.File, data []byte) error
	syncFile   func(f *os.File) error
}

var defaultFileOps = fileOps{
	createTemp: os.CreateTemp,
	writeFile:  func(f *os.File, data []byte) error { _, err := f.Write(data); return err },
	syncFile:   (*os.File).Sync,
}

const (
	entrySuffix = ".json"
	tempPrefix  = ".tmp-"
	lockName    = ".lock"
)

// openEntryFiles opens DIR, creating it if needed, and takes its lock. It
// refuses a DIR it cannot write, and a .lock that is not a plain file (a
// planted symlink must not make it create or lock a file elsewhere).
func openEntryFiles(dir string, ops fileOps) (*entryFiles, error) {
	if dataDirUnsupported != nil {
		return nil, dataDirUnsupported
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	dirFile, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("data directory %s is not usable: %w", dir, err)
	}
	lockPath := filepath.Join(dir, lockName)
	lock, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE|noFollow, 0o600)
	if err == nil {
		if info, statErr := lock.Stat(); statErr != nil || !info.Mode().IsRegular() {
			lock.Close()
			err = errors.New("not a regular file")
		}
	}
	if err != nil {
		dirFile.Close()
		advice := "remove it and start again"
		switch {
		case errors.Is(err, syscall.ELOOP):
			err = errors.New("it is a symbolic link")
		case errors.Is(err, fs.ErrPermission):
			advice = "give the service's user read and write access to it"
		}
		return nil, fmt.Errorf("data directory %s is not usable: %s: %w; %s", dir, lockPath, err, advice)
	}
	if err := lockFile(lock); err != nil {
		lock.Close()
		dirFile.Close()
		if errors.Is(err, errLocked) {
			return nil, fmt.Errorf("data directory %s is in use by another process", dir)
		}
		return nil, fmt.Errorf("data directory %s: locking %s: %w", dir, lockName, err)
	}
	f := &entryFiles{dir: dir, dirFile: dirFile, lock: lock, fileOps: ops}
	if err := f.probe(); err != nil {
		f.close()
		return nil, fmt.Errorf("data directory %s cannot be written: %w", dir, err)
	}
	return f, nil
}

// probe reports whether DIR can take a write now: it is still the directory
// opened at start, and a file can be created and written in it.
func (f *entryFiles) probe() error {
	if f == nil {
		return nil
	}
	held, err := f.dirFile.Stat()
	if err != nil {
		return err
	}
	if now, err := os.Stat(f.dir); err != nil || !os.SameFile(held, now) {
		return errors.New("the data directory was removed or replaced")
	}
	tmp, err := f.createTemp(f.dir, tempPrefix+"probe-*")
	if err != nil {
		return fmt.Errorf("cannot create a file in the data directory: %w", withoutPath(err))
	}
	err = f.writeFile(tmp, []byte("{}"))
	tmp.Close()
	os.Remove(tmp.Name())
	if err != nil {
		return fmt.Errorf("cannot write to the data directory: %w", withoutPath(err))
	}
	return nil
}

// withoutPath drops the file name from a file-system error: the reason is
// shown on /readyz, and paths are the operator's business, not a client's.
func withoutPath(err error) error {
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return pathErr.Err
	}
	return err
}

func (f *entryFiles) path(id ID) string {
	return filepath.Join(f.dir, id.String()+entrySuffix)
}

// uncertainWriteError is a failure after which the disk may or may not hold
// the change: the rename or removal happened, but making it durable failed.
type uncertainWriteError struct{ err error }

func (e *uncertainWriteError) Error() string { return e.err.Error() }
func (e *uncertainWriteError) Unwrap() error { return e.err }

// write makes data the content of id's file, durably, or fails leaving the
// old file as it was.
func (f *entryFiles) write(id ID, data []byte) error {
	if f == nil {
		return nil
	}
	tmp, err := f.createTemp(f.dir, tempPrefix+id.String()+"-*")
	if err != nil {
		return fmt.Errorf("writing entry %s: %w", id, err)
	}
	err = f.writeFile(tmp, data)
	if err == nil {
		err = f.syncFile(tmp)
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), f.path(id))
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("writing entry %s: %w", id, err)
	}
	if err := f.syncDir(); err != nil {
		return &uncertainWriteError{fmt.Errorf("writing entry %s: syncing the directory: %w", id, err)}
	}
	return nil
}

// remove deletes id's file durably.
func (f *entryFiles) remove(id ID) error {
	if f == nil {
		return nil
	}
	if err := os.Remove(f.path(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting entry %s: %w", id, err)
	}
	if err := f.syncDir(); err != nil {
		return &uncertainWriteError{fmt.Errorf("deleting entry %s: syncing the directory: %w", id, err)}
	}
	return nil
}

func (f *entryFiles) syncDir() error {
	return f.syncFile(f.dirFile)
}

// load reads every entry file, in parallel, after removing temporary files
// that a crash left behind. Any entry file that does not hold a valid record
// (load says), or is not a regular file (a symlink, a directory), stops the
// load: starting empty, or without it, would hide data. Files whose names
// are not entries' are left alone.
func (f *entryFiles) load(load func([]byte) (Record, error)) ([]Item, error) {
	names, err := os.ReadDir(f.dir)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	var ids []ID
	for _, de := range names {
		name := de.Name()
		if strings.HasPrefix(name, tempPrefix) {
			if err := os.Remove(filepath.Join(f.dir, name)); err != nil {
				return nil, fmt.Errorf("removing the leftover temporary file: %w", err)
			}
			continue
		}
		id, ok := ParseID(strings.TrimSuffix(name, entrySuffix))
		if !ok || !strings.HasSuffix(name, entrySuffix) {
			continue
		}
		if !de.Type().IsRegular() {
			return nil, fmt.Errorf("data file %s is not a regular file (%s); move it away, then start again", filepath.Join(f.dir, name), describeType(de.Type()))
		}
		ids = append(ids, id)
	}

	items := make([]Item, len(ids))
	errs := make([]error, len(ids))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < len(ids); i = int(next.Add(1) - 1) {
				items[i], errs[i] = f.loadEntry(ids[i], load)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return items, nil
}

func (f *entryFiles) loadEntry(id ID, load func([]byte) (Record, error)) (Item, error) {
	// O_NOFOLLOW: a symlink swapped in after the directory was listed is
	// refused, not followed out of DIR.
	file, err := os.OpenFile(f.path(id), os.O_RDONLY|noFollow, 0)
	if err != nil {
		return Item{}, fmt.Errorf("reading %s: %w", f.path(id), err)
	}
	defer file.Close()
	if info, err := file.Stat(); err != nil || !info.Mode().IsRegular() {
		return Item{}, fmt.Errorf("data file %s is not a regular file; move it away, then start again", f.path(id))
	}
	data, err := io.ReadAll(file)
	if err != nil {
		return Item{}, fmt.Errorf("reading %s: %w", f.path(id), err)
	}
	rec, err := load(data)
	if err != nil {
		detail := err.Error()
		var invalid *InvalidError
		if errors.As(err, &invalid) && len(invalid.Fields) > 0 {
			detail = invalid.Fields[0].Field + " " + invalid.Fields[0].Message
		}
		return Item{}, fmt.Errorf("data file %s does not hold a valid record (%s); fix or move it away, then start again", f.path(id), detail)
	}
	return Item{ID: id, Record: rec}, nil
}

func describeType(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	case m.IsDir():
		return "a directory"
	}
	return "a special file"
}

func (f *entryFiles) close() error {
	if f == nil {
		return nil
	}
	f.dirFile.Close()
	return f.lock.Close() // closing the descriptor releases the flock
}

// sortedItems keeps items in id order in chunks of bounded size: set,
// remove and finding where a page starts cost O(log n + chunk size), never
// O(n), and a page is read from consecutive memory rather than looked up id
// by id. Ids arrive almost always in increasing order, so inserts append.
type sortedItems struct {
	chunks [][]Item // each sorted and non-empty; chunk i's ids all precede chunk i+1's
}

const maxChunk = 256

func compareIDs(a, b ID) int { return bytes.Compare(a[:], b[:]) }

func compareItem(it Item, id ID) int { return compareIDs(it.ID, id) }

// chunkFor returns the index of the first chunk whose last id is >= id,
// or len(chunks) when id is after them all.
func (x *sortedItems) chunkFor(id ID) int {
	i, _ := slices.BinarySearchFunc(x.chunks, id, func(c []Item, id ID) int {
		return compareIDs(c[len(c)-1].ID, id)
	})
	return i
}

// set inserts it, or replaces the item with its id.
func (x *sortedItems) set(it Item) {
	ci := x.chunkFor(it.ID)
	if ci == len(x.chunks) { // after every id: the common case
		if ci > 0 && len(x.chunks[ci-1]) < maxChunk {
			x.chunks[ci-1] = append(x.chunks[ci-1], it)
		} else {
			x.chunks = append(x.chunks, append(make([]Item, 0, maxChunk), it))
		}
		return
	}
	c := x.chunks[ci]
	i, found := slices.BinarySearchFunc(c, it.ID, compareItem)
	if found {
		c[i] = it
		return
	}
	c = slices.Insert(c, i, it)
	if len(c) > maxChunk {
		right := append(make([]Item, 0, maxChunk), c[len(c)/2:]...)
		x.chunks[ci] = c[:len(c)/2]
		x.chunks = slices.Insert(x.chunks, ci+1, right)
		return
	}
	x.chunks[ci] = c
}

func (x *sortedItems) remove(id ID) {
	ci := x.chunkFor(id)
	if ci == len(x.chunks) {
		return
	}
	c := x.chunks[ci]
	i, found := slices.BinarySearchFunc(c, id, compareItem)
	if !found {
		return
	}
	c = slices.Delete(c, i, i+1)
	if len(c) == 0 {
		x.chunks = slices.Delete(x.chunks, ci, ci+1)
		return
	}
	x.chunks[ci] = c
}

// ascend calls fn for each item with an id after after, in order, until fn
// returns false.
func (x *sortedItems) ascend(after ID, fn func(Item) bool) {
	ci := x.chunkFor(after)
	if ci == len(x.chunks) {
		return
	}
	i, found := slices.BinarySearchFunc(x.chunks[ci], after, compareItem)
	if found {
		i++
	}
	for ; ci < len(x.chunks); ci, i = ci+1, 0 {
		for _, it := range x.chunks[ci][i:] {
			if !fn(it) {
				return
			}
		}
	}
}
