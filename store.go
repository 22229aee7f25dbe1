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
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
type Store interface {
	Insert(ctx context.Context, id ID, rec Record) error
	Get(ctx context.Context, id ID) (Record, error)
	Replace(ctx context.Context, id ID, rec Record, ifMatch []string) error
	Delete(ctx context.Context, id ID, ifMatch []string) error
	// List returns up to limit items with ids after after, in id order, and
	// whether more remain.
	List(ctx context.Context, after ID, limit int) (items []Item, more bool, err error)
	Close() error
}

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
type MapStore struct {
	mu      sync.RWMutex // guards records and order; never held during disk I/O
	records map[ID]Record
	order   sortedItems // the same records in id order, for pages

	writers idLocks               // one writer at a time per entry, across its disk I/O
	life    sync.RWMutex          // writes hold it shared; Close takes it to wait for them
	closed  bool                  // guarded by life
	broken  atomic.Pointer[error] // set once a write may have reached the disk but failed; see write
	files   *entryFiles           // nil: memory only
}

// NewMapStore returns an empty store that keeps entries in memory only.
func NewMapStore() *MapStore {
	return &MapStore{records: make(map[ID]Record)}
}

// OpenMapStore returns a store that persists to dir, loading what dir holds.
// See entryFiles for the format and the guarantees.
func OpenMapStore(dir string) (*MapStore, error) {
	files, err := openEntryFiles(dir)
	if err != nil {
		return nil, err
	}
	loaded, err := files.load()
	if err != nil {
		files.close()
		return nil, err
	}
	s := NewMapStore()
	s.files = files
	slices.SortFunc(loaded, func(a, b Item) int { return compareIDs(a.ID, b.ID) })
	for _, it := range loaded {
		s.records[it.ID] = it.Record
		s.order.set(it)
	}
	return s, nil
}

// Insert adds a record under a new id.
func (s *MapStore) Insert(_ context.Context, id ID, rec Record) error {
	defer s.writers.lock(id)()
	return s.write(func() error { return s.put(id, rec) })
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
// holds id's writer lock.
func (s *MapStore) put(id ID, rec Record) error {
	if err := s.files.write(id, rec.JSON); err != nil {
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
	if s.closed {
		return errStoreClosed
	}
	if broken := s.broken.Load(); broken != nil {
		return *broken
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

var errStoreClosed = errors.New("the store is closed")

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
// A nil *entryFiles is the memory-only store: every method does nothing.
type entryFiles struct {
	dir  string
	lock *os.File

	// The file-system calls that can fail for lack of space or a bad disk;
	// tests replace them to simulate a full disk or a failing fsync.
	writeFile func(f *os.File, data []byte) error
	syncFile  func(f *os.File) error
}

const (
	entrySuffix = ".json"
	tempPrefix  = ".tmp-"
	lockName    = ".lock"
)

func openEntryFiles(dir string) (*entryFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("data directory %s is not usable: %w", dir, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("data directory %s is in use by another process", dir)
		}
		return nil, fmt.Errorf("data directory %s: locking %s: %w", dir, lockName, err)
	}
	return &entryFiles{
		dir:       dir,
		lock:      lock,
		writeFile: func(f *os.File, data []byte) error { _, err := f.Write(data); return err },
		syncFile:  (*os.File).Sync,
	}, nil
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
	tmp, err := os.CreateTemp(f.dir, tempPrefix+id.String()+"-*")
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
	d, err := os.Open(f.dir)
	if err != nil {
		return err
	}
	err = f.syncFile(d)
	if closeErr := d.Close(); err == nil {
		err = closeErr
	}
	return err
}

// load reads every entry file, in parallel, after removing temporary files
// that a crash left behind. Any entry file that does not hold a valid entry
// stops the load: starting empty, or without it, would hide data.
// Files that are not entries are left alone.
func (f *entryFiles) load() ([]Item, error) {
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
		if ok && strings.HasSuffix(name, entrySuffix) && de.Type().IsRegular() {
			ids = append(ids, id)
		}
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
				items[i], errs[i] = f.loadEntry(ids[i])
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return items, nil
}

func (f *entryFiles) loadEntry(id ID) (Item, error) {
	data, err := os.ReadFile(f.path(id))
	if err != nil {
		return Item{}, fmt.Errorf("reading %s: %w", f.path(id), err)
	}
	e, err := ParseEntry(data)
	if err != nil {
		detail := err.Error()
		var invalid *InvalidError
		if errors.As(err, &invalid) && len(invalid.Fields) > 0 {
			detail = invalid.Fields[0].Field + " " + invalid.Fields[0].Message
		}
		return Item{}, fmt.Errorf("data file %s does not hold a valid entry (%s); fix or move it away, then start again", f.path(id), detail)
	}
	rec, err := NewRecord(e)
	return Item{ID: id, Record: rec}, err
}

func (f *entryFiles) close() error {
	if f == nil {
		return nil
	}
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
