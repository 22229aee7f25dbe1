package main

// This file is a Store on PostgreSQL, for instances of the service that share
// one database. It lives under testdata/, which the go tool ignores, so that
// the service's module needs no driver until this file is wanted. To use it,
// follow the README ("Swap the store"): copy this file beside
// main.go, go get the driver, set -database-url. Its init sets openDatabase
// (main.go), so no other file changes. ./check.sh postgres follows the same
// steps on a copy of the project and a throwaway database.
//
// It uses database/sql, with pgx as the driver, rather than pgx's own pool
// (pgxpool): the store then reads like the standard-library code around it
// and uses types every Go programmer knows (sql.DB, sql.ErrNoRows), and a
// copier who wants another driver changes the import, not the store. The
// price is small: pgx still speaks PostgreSQL's binary protocol underneath
// and keeps each statement prepared per connection. Measured on the 2-core
// machine this was built on, a Get took 60-78 µs through database/sql and
// 65-81 µs through pgxpool (three runs each): the round trip is the cost,
// and database/sql's 13 more allocations a query do not show beside it.

import (
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"net"
	"regexp"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

func init() {
	openDatabase = func(ctx context.Context, url, table string) (Store, error) {
		// A URL that does not parse is a bad value (exit status 2), not a
		// failed start. pgx masks the password in what it quotes back.
		if _, err := pgx.ParseConfig(url); err != nil {
			return nil, &usageError{"invalid value for -database-url (or ADDRSERVICE_DATABASE_URL): " + err.Error()}
		}
		return OpenPostgresStore(ctx, url, table)
	}
}

// PostgresStore keeps the records of one resource in one table:
//
//	id      bytea PRIMARY KEY  16 bytes; byte order is id order, so the key's index serves pages
//	body    bytea NOT NULL     the entry's JSON, byte for byte as GET serves it
//	version bytea NOT NULL     16 bytes, served as the ETag
//
// The JSON is bytea, not jsonb (which reorders keys and drops spaces) nor
// text (which the server may convert to the database's encoding), so an
// ETag computed from the bytes holds whatever the database. To read it in
// psql: SELECT convert_from(body, 'UTF8')::jsonb FROM addresses.
//
// Each change and its precondition are one statement, so writers on any
// number of instances sharing the table never both win on one version.
type PostgresStore struct {
	db  *sql.DB
	sql statements
}

// statements are the store's SQL for its table. The table name is spliced
// in, since SQL has no parameters for names; validTable keeps that safe.
type statements struct {
	create, insert, get, replace, delete, exists, list string
}

func statementsFor(table string) statements {
	t := `"` + table + `"` // quoted, so that a name such as "group" or "order" is a name, not a keyword
	return statements{
		create: `CREATE TABLE IF NOT EXISTS ` + t + ` (
			id      bytea PRIMARY KEY CHECK (length(id) = 16),
			body    bytea NOT NULL,
			version bytea NOT NULL CHECK (length(version) = 16))`,
		insert:  `INSERT INTO ` + t + ` (id, body, version) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`,
		get:     `SELECT body, version FROM ` + t + ` WHERE id = $1`,
		replace: `UPDATE ` + t + ` SET body = $1, version = $2 WHERE id = $3 AND ($4 OR version = ANY($5))`,
		delete:  `DELETE FROM ` + t + ` WHERE id = $1 AND ($2 OR version = ANY($3))`,
		exists:  `SELECT EXISTS (SELECT 1 FROM ` + t + ` WHERE id = $1)`,
		list:    `SELECT id, body, version FROM ` + t + ` WHERE id > $1 ORDER BY id LIMIT $2`,
	}
}

// validTable accepts what PostgreSQL takes unquoted as it is: lowercase
// letters, digits and underscores, at most 63 bytes, not starting with a
// digit. Nothing else can reach the spliced SQL.
var validTable = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`).MatchString

// maxConns is how many connections one instance opens at most, so that
// instances together stay within PostgreSQL's max_connections: ten
// instances fit in its default of 100, less what else connects.
const maxConns = 10

// schemaLock is the advisory lock that instances starting at once take
// while creating their tables: without it, of two that run CREATE TABLE IF
// NOT EXISTS on one new table at once, one fails on a unique index of
// PostgreSQL's own catalog (TestPostgresStoresStartTogether, every time).
const schemaLock = 0x61646472 // "addr"

// OpenPostgresStore connects to the database at url and returns the store
// of table, creating the table if it is missing.
func OpenPostgresStore(ctx context.Context, url, table string) (*PostgresStore, error) {
	if !validTable(table) {
		return nil, fmt.Errorf("table name %q: want 1 to 63 lowercase letters, digits and underscores, not starting with a digit", table)
	}
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	db := stdlib.OpenDB(*cfg)
	// database/sql keeps two idle connections unless told otherwise, so under
	// load it would open and close a connection for most queries. Idle ones
	// still close after a while, so that a burst does not hold them for ever.
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	db.SetConnMaxIdleTime(5 * time.Minute)
	s := &PostgresStore{db: db, sql: statementsFor(table)}
	if err := s.createTable(ctx, table); err != nil {
		db.Close()
		return nil, fmt.Errorf("opening table %s of the PostgreSQL store: %w", table, err)
	}
	return s, nil
}

// createTable creates the table unless it exists. A role without the right
// to create tables can use a table that a database owner created with the
// same statement (see statementsFor).
func (s *PostgresStore) createTable(ctx context.Context, table string) error {
	var exists bool
	if err := s.db.QueryRowContext(ctx, `SELECT to_regclass($1) IS NOT NULL`, `"`+table+`"`).Scan(&exists); err != nil || exists {
		return err
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() // does nothing after Commit
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, schemaLock); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, s.sql.create); err != nil {
		return err
	}
	return tx.Commit()
}

// Insert adds a record under an id not in use.
func (s *PostgresStore) Insert(ctx context.Context, id ID, rec Record) error {
	res, err := s.db.ExecContext(ctx, s.sql.insert, id[:], rec.JSON, rec.Version[:])
	if err != nil {
		return unavailable(err)
	}
	if n, err := res.RowsAffected(); err != nil || n == 0 {
		return cmp.Or(err, ErrExists)
	}
	return nil
}

// Get returns the record stored under id.
func (s *PostgresStore) Get(ctx context.Context, id ID) (Record, error) {
	var rec Record
	err := s.db.QueryRowContext(ctx, s.sql.get, id[:]).Scan(&rec.JSON, (*bytes16)(&rec.Version))
	if errors.Is(err, sql.ErrNoRows) {
		return Record{}, ErrNotFound
	}
	return rec, unavailable(err)
}

// Replace swaps the record under id if ifMatch holds.
func (s *PostgresStore) Replace(ctx context.Context, id ID, rec Record, ifMatch []string) error {
	anyVersion, versions := precondition(ifMatch)
	res, err := s.db.ExecContext(ctx, s.sql.replace, rec.JSON, rec.Version[:], id[:], anyVersion, versions)
	return s.changed(ctx, id, anyVersion, res, err)
}

// Delete removes the record under id if ifMatch holds.
func (s *PostgresStore) Delete(ctx context.Context, id ID, ifMatch []string) error {
	anyVersion, versions := precondition(ifMatch)
	res, err := s.db.ExecContext(ctx, s.sql.delete, id[:], anyVersion, versions)
	return s.changed(ctx, id, anyVersion, res, err)
}

// precondition turns ifMatch into the parameters of a conditional change:
// whether any version will do, and else the versions that will. A tag that
// is not a version (32 lowercase hex characters, written like an id)
// matches none, as in MapStore.
func precondition(ifMatch []string) (anyVersion bool, versions [][]byte) {
	if ifMatch == nil {
		return true, nil
	}
	versions = [][]byte{}
	for _, tag := range ifMatch {
		if tag == "*" {
			return true, nil
		}
		if v, ok := ParseID(tag); ok {
			versions = append(versions, v[:])
		}
	}
	return false, versions
}

// changed returns the outcome of a conditional change. When it changed no
// row, the entry was missing or its version did not match, and a second
// look tells which. That look comes after the change, not before it, so it
// decides nothing: were the entry deleted in between, not found is as true
// an answer as a failed precondition was.
func (s *PostgresStore) changed(ctx context.Context, id ID, anyVersion bool, res sql.Result, err error) error {
	if err != nil {
		return unavailable(err)
	}
	if n, err := res.RowsAffected(); err != nil || n == 1 {
		return err
	}
	if anyVersion {
		return ErrNotFound
	}
	var exists bool
	if err := s.db.QueryRowContext(ctx, s.sql.exists, id[:]).Scan(&exists); err != nil {
		return unavailable(err)
	}
	if exists {
		return ErrPreconditionFailed
	}
	return ErrNotFound
}

// List returns a page of records in id order. It asks for one row more
// than the page holds: that row's presence is whether more remain. The
// rows are copies, held until the page is written, so a page stops early
// (saying more remain) once it holds maxPageBytes of JSON: a thousand large
// records would otherwise cost a request a thousand times their size.
func (s *PostgresStore) List(ctx context.Context, after ID, limit int) ([]Item, bool, error) {
	rows, err := s.db.QueryContext(ctx, s.sql.list, after[:], limit+1)
	if err != nil {
		return nil, false, unavailable(err)
	}
	defer rows.Close()
	items := make([]Item, 0, min(limit, 128))
	size := 0
	for rows.Next() {
		if len(items) == limit || size >= maxPageBytes {
			return items, true, nil
		}
		var it Item
		if err := rows.Scan((*bytes16)(&it.ID), &it.JSON, (*bytes16)(&it.Version)); err != nil {
			return nil, false, err
		}
		items = append(items, it)
		size += len(it.JSON)
	}
	return items, false, unavailable(rows.Err())
}

// maxPageBytes bounds the JSON one page of List copies out of the database.
const maxPageBytes = 1 << 20

// unavailable marks a failure to reach the database, or an answer that did
// not come before the deadline, as ErrUnavailable: the client gets 503 and
// Retry-After rather than 500, and the log keeps the details.
func unavailable(err error) error {
	var connect *pgconn.ConnectError
	var network net.Error
	if errors.As(err, &connect) || errors.As(err, &network) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w (%w)", ErrUnavailable, err)
	}
	return err
}

// Ready reports whether the database answers, for /readyz: an instance that
// cannot reach it should get no traffic.
func (s *PostgresStore) Ready(ctx context.Context) error {
	return unavailable(s.db.PingContext(ctx))
}

// Close closes the store's connections; closing again does nothing.
func (s *PostgresStore) Close() error {
	return s.db.Close()
}

// bytes16 reads a 16-byte bytea column (an id or a version) into its array.
type bytes16 [16]byte

func (b *bytes16) Scan(src any) error {
	v, ok := src.([]byte)
	if !ok || len(v) != len(b) {
		return fmt.Errorf("want 16 bytes, got %T of length %d", src, len(v))
	}
	copy(b[:], v)
	return nil
}
