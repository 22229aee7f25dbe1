package main

// This file is the storage seam. Store is the one interface in the service:
// swap MapStore for a database by writing another implementation of it,
// without touching service.go or handlers.go.

import (
	"bytes"
	"context"
	"slices"
	"sync"
)

// Record is an entry as stored: its JSON, exactly as GET serves it, and a
// version that changes whenever the JSON does (served as the ETag).
type Record struct {
	JSON    []byte
	Version string
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

func versionMatches(version string, ifMatch []string) bool {
	if ifMatch == nil {
		return true
	}
	for _, tag := range ifMatch {
		if tag == "*" || tag == version {
			return true
		}
	}
	return false
}

// MapStore is the in-memory store: a map guarded by a mutex, with an index
// that keeps ids sorted so a page costs the same however large the book is.
type MapStore struct {
	mu      sync.RWMutex
	records map[ID]Record
	order   sortedIDs
	closed  bool
}

// NewMapStore returns an empty in-memory store.
func NewMapStore() *MapStore {
	return &MapStore{records: make(map[ID]Record)}
}

// Insert adds a record under a new id.
func (s *MapStore) Insert(_ context.Context, id ID, rec Record) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errStoreClosed
	}
	s.records[id] = rec
	s.order.insert(id)
	return nil
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
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(id, ifMatch); err != nil {
		return err
	}
	s.records[id] = rec
	return nil
}

// Delete removes the record under id if ifMatch holds.
func (s *MapStore) Delete(_ context.Context, id ID, ifMatch []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(id, ifMatch); err != nil {
		return err
	}
	delete(s.records, id)
	s.order.remove(id)
	return nil
}

// check must be called with s.mu held.
func (s *MapStore) check(id ID, ifMatch []string) error {
	if s.closed {
		return errStoreClosed
	}
	cur, ok := s.records[id]
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
	s.order.ascend(after, func(id ID) bool {
		if len(items) == limit {
			more = true
			return false
		}
		items = append(items, Item{ID: id, Record: s.records[id]})
		return true
	})
	return items, more, nil
}

// Close makes every later change fail; reads still work.
func (s *MapStore) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	return nil
}

var errStoreClosed = storeError("the store is closed")

type storeError string

func (e storeError) Error() string { return string(e) }

// sortedIDs keeps ids in order in chunks of bounded size: insert, remove and
// finding where a page starts cost O(log n + chunk size), never O(n).
// Ids arrive almost always in increasing order, so inserts append.
type sortedIDs struct {
	chunks [][]ID // each sorted and non-empty; chunk i's ids all precede chunk i+1's
}

const maxChunk = 512

func compareIDs(a, b ID) int { return bytes.Compare(a[:], b[:]) }

// chunkFor returns the index of the first chunk whose last id is >= id,
// or len(chunks) when id is after them all.
func (x *sortedIDs) chunkFor(id ID) int {
	i, _ := slices.BinarySearchFunc(x.chunks, id, func(c []ID, id ID) int {
		return compareIDs(c[len(c)-1], id)
	})
	return i
}

func (x *sortedIDs) insert(id ID) {
	ci := x.chunkFor(id)
	if ci == len(x.chunks) { // after every id: the common case
		if ci > 0 && len(x.chunks[ci-1]) < maxChunk {
			x.chunks[ci-1] = append(x.chunks[ci-1], id)
		} else {
			x.chunks = append(x.chunks, append(make([]ID, 0, maxChunk), id))
		}
		return
	}
	c := x.chunks[ci]
	i, found := slices.BinarySearchFunc(c, id, compareIDs)
	if found {
		return
	}
	c = slices.Insert(c, i, id)
	if len(c) > maxChunk {
		right := append(make([]ID, 0, maxChunk), c[len(c)/2:]...)
		x.chunks[ci] = c[:len(c)/2]
		x.chunks = slices.Insert(x.chunks, ci+1, right)
		return
	}
	x.chunks[ci] = c
}

func (x *sortedIDs) remove(id ID) {
	ci := x.chunkFor(id)
	if ci == len(x.chunks) {
		return
	}
	c := x.chunks[ci]
	i, found := slices.BinarySearchFunc(c, id, compareIDs)
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

// ascend calls fn for each id after after, in order, until fn returns false.
func (x *sortedIDs) ascend(after ID, fn func(ID) bool) {
	ci := x.chunkFor(after)
	if ci == len(x.chunks) {
		return
	}
	i, found := slices.BinarySearchFunc(x.chunks[ci], after, compareIDs)
	if found {
		i++
	}
	for ; ci < len(x.chunks); ci, i = ci+1, 0 {
		for _, id := range x.chunks[ci][i:] {
			if !fn(id) {
				return
			}
		}
	}
}
