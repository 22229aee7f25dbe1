package main

// Tests of PostgresStore, beside postgres.go. Those that need a database read
// its URL from ADDRSERVICE_TEST_DATABASE_URL and skip when it is unset; they
// create and drop tables of their own there, named test_<random>.
// ./check.sh postgres runs them on a throwaway database.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
)

func TestPostgresStoreContract(t *testing.T) {
	url := testDatabaseURL(t)
	testStoreContract(t, func(t *testing.T) Store { s, _ := openTestTable(t, url); return s })
}

// TestPostgresStoreContractAcrossInstances runs the contract on two stores
// of one table, as two instances of the service use it, taking turns call
// by call: what one writes the other reads, and writers on both still have
// one winner per version.
func TestPostgresStoreContractAcrossInstances(t *testing.T) {
	url := testDatabaseURL(t)
	testStoreContract(t, func(t *testing.T) Store {
		a, table := openTestTable(t, url)
		b, err := OpenPostgresStore(context.Background(), url, table)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return &twoInstances{stores: [2]*PostgresStore{a, b}}
	})
}

// twoInstances sends each call to one of two stores in turn.
type twoInstances struct {
	stores [2]*PostgresStore
	calls  atomic.Uint32
}

func (s *twoInstances) next() *PostgresStore { return s.stores[s.calls.Add(1)%2] }

func (s *twoInstances) Insert(ctx context.Context, id ID, rec Record) error {
	return s.next().Insert(ctx, id, rec)
}

func (s *twoInstances) Get(ctx context.Context, id ID) (Record, error) { return s.next().Get(ctx, id) }

func (s *twoInstances) Replace(ctx context.Context, id ID, rec Record, ifMatch []string) error {
	return s.next().Replace(ctx, id, rec, ifMatch)
}

func (s *twoInstances) Delete(ctx context.Context, id ID, ifMatch []string) error {
	return s.next().Delete(ctx, id, ifMatch)
}

func (s *twoInstances) List(ctx context.Context, after ID, limit int) ([]Item, bool, error) {
	return s.next().List(ctx, after, limit)
}

func (s *twoInstances) Close() error { return errors.Join(s.stores[0].Close(), s.stores[1].Close()) }

// TestPostgresStoresStartTogether: instances that start at once, on a table
// that does not exist yet, all open it.
func TestPostgresStoresStartTogether(t *testing.T) {
	url := testDatabaseURL(t)
	table := testTable(t, url)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var s *PostgresStore
			if s, errs[i] = OpenPostgresStore(context.Background(), url, table); s != nil {
				s.Close()
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Errorf("opening one new table from 8 stores at once: %v", err)
	}
}

// TestPostgresStoreOpensATableItMayNotCreate: a role that may only read and
// write rows uses a table that its owner created, as in a database whose
// schema a DBA manages.
func TestPostgresStoreOpensATableItMayNotCreate(t *testing.T) {
	ctx := context.Background()
	dbURL := testDatabaseURL(t)
	owner, table := openTestTable(t, dbURL)
	role := table + "_rows"
	if _, err := owner.db.ExecContext(ctx, `CREATE ROLE `+role); err != nil {
		t.Skipf("cannot create a role to test with: %v", err)
	}
	t.Cleanup(func() { owner.db.ExecContext(ctx, `DROP OWNED BY `+role+`; DROP ROLE `+role) })
	if _, err := owner.db.ExecContext(ctx, `GRANT SELECT, INSERT, UPDATE, DELETE ON `+table+` TO `+role); err != nil {
		t.Fatal(err)
	}
	// pgx sends URL parameters it does not know as settings of the session:
	// role=NAME makes this one act as the role from its start.
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("role", role)
	u.RawQuery = q.Encode()

	s, err := OpenPostgresStore(ctx, u.String(), table)
	if err != nil {
		t.Fatalf("opening the existing table as %s: %v", role, err)
	}
	defer s.Close()
	if err := s.Insert(ctx, ID{1}, record(t, "Ada")); err != nil {
		t.Errorf("Insert as %s: %v", role, err)
	}
	other := testTable(t, dbURL)
	if s, err := OpenPostgresStore(ctx, u.String(), other); err == nil {
		s.Close()
		t.Errorf("%s created table %s; the test proves nothing", role, other)
	}
}

func TestPostgresStoreReady(t *testing.T) {
	s, _ := openTestTable(t, testDatabaseURL(t))
	if err := s.Ready(context.Background()); err != nil {
		t.Errorf("Ready = %v, want nil", err)
	}
	s.Close()
	if err := s.Ready(context.Background()); err == nil {
		t.Error("Ready after Close = nil, want an error")
	}
}

// TestPostgresStoreRefusesBadTableNames: the table name is spliced into SQL,
// so anything but a plain lowercase name is refused before connecting.
func TestPostgresStoreRefusesBadTableNames(t *testing.T) {
	for _, table := range []string{"", "Addresses", "2024", "address-book", "address book", `a"b`, "a;drop table x",
		"public.addresses", "adresse_é", strings.Repeat("a", 64)} {
		s, err := OpenPostgresStore(context.Background(), "postgres://nowhere.invalid/db", table)
		if err == nil || !strings.Contains(err.Error(), "table name") {
			t.Errorf("table %q: got %v, want an error about the table name", table, err)
		}
		if s != nil {
			s.Close()
		}
	}
}

// TestPostgresBadURLIsAUsageError: a URL that does not parse exits with
// status 2 at start, and its password is not printed.
func TestPostgresBadURLIsAUsageError(t *testing.T) {
	_, err := openDatabase(context.Background(), "postgres://addrservice:s3cret@localhost:port/addrservice", "addresses")
	var usage *usageError
	if !errors.As(err, &usage) {
		t.Fatalf("got %v, want a usage error", err)
	}
	if msg := err.Error(); !strings.Contains(msg, "-database-url") || strings.Contains(msg, "s3cret") || strings.Contains(msg, "\n") {
		t.Errorf("error %q: want one line naming -database-url, without the password", msg)
	}
}

// BenchmarkPostgresStore reports creates and GETs per second on PostgreSQL,
// through the service as BenchmarkCreate does, one client at a time and 32
// at once, beside the memory and -data stores measured the same way. Each
// run has a store of its own; GETs read the entries of a book of 1,000 in
// turn.
func BenchmarkPostgresStore(b *testing.B) {
	entry, err := ParseEntry(sampleEntries(b)["testdata/rajesh-kumar.json"])
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	stores := []struct {
		name string
		open func(b *testing.B) Store
	}{
		{"memory", func(*testing.B) Store { return NewMapStore(0) }},
		{"data", func(b *testing.B) Store {
			s, err := OpenMapStore(b.TempDir(), 0, storedRecord(ParseEntry))
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { s.Close() })
			return s
		}},
		{"postgres", func(b *testing.B) Store { s, _ := openTestTable(b, testDatabaseURL(b)); return s }},
	}
	for _, store := range stores {
		for _, clients := range []int{1, 32} {
			b.Run(fmt.Sprintf("store=%s/get/clients=%d", store.name, clients), func(b *testing.B) {
				svc := NewCollection[Entry](store.open(b), slog.New(slog.DiscardHandler), time.Second)
				ids := make([]ID, 1000)
				var wg sync.WaitGroup
				for w := range 10 { // ten at a time, which PostgreSQL commits together
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := w; i < len(ids); i += 10 {
							var err error
							if ids[i], _, err = svc.Create(ctx, entry); err != nil {
								b.Error(err)
								return
							}
						}
					}()
				}
				wg.Wait()
				perSecond(b, clients, "gets/s", func(i int) {
					if _, err := svc.Get(ctx, ids[i%len(ids)]); err != nil {
						b.Error(err)
					}
				})
			})
		}
		for _, clients := range []int{1, 32} {
			b.Run(fmt.Sprintf("store=%s/create/clients=%d", store.name, clients), func(b *testing.B) {
				svc := NewCollection[Entry](store.open(b), slog.New(slog.DiscardHandler), time.Second)
				perSecond(b, clients, "creates/s", func(int) {
					if _, _, err := svc.Create(ctx, entry); err != nil {
						b.Error(err)
					}
				})
			})
		}
	}
}

// perSecond runs op b.N times, from clients goroutines at once, and reports
// how many ran a second as unit.
func perSecond(b *testing.B, clients int, unit string, op func(i int)) {
	b.ResetTimer()
	if clients == 1 {
		for i := range b.N {
			op(i)
		}
	} else {
		var next atomic.Int64
		b.SetParallelism((clients + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				op(int(next.Add(1)))
			}
		})
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), unit)
}

func testDatabaseURL(tb testing.TB) string {
	tb.Helper()
	url := os.Getenv("ADDRSERVICE_TEST_DATABASE_URL")
	if url == "" {
		tb.Skip("ADDRSERVICE_TEST_DATABASE_URL is not set: no PostgreSQL database to test on")
	}
	return url
}

// testTable returns a new table name, and drops the table when tb ends if
// it was created.
func testTable(tb testing.TB, url string) string {
	tb.Helper()
	table := fmt.Sprintf("test_%016x", rand.Uint64())
	tb.Cleanup(func() {
		db, err := sql.Open("pgx", url)
		if err == nil {
			_, err = db.Exec(`DROP TABLE IF EXISTS ` + table)
			db.Close()
		}
		if err != nil {
			tb.Errorf("dropping table %s: %v", table, err)
		}
	})
	return table
}

// openTestTable opens a store on a new table, which is dropped when tb ends.
func openTestTable(tb testing.TB, url string) (*PostgresStore, string) {
	tb.Helper()
	table := testTable(tb, url)
	s, err := OpenPostgresStore(context.Background(), url, table)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s, table
}

// TestPostgresStoreThatCannotBeReachedIsUnavailable: a database that refuses
// connections, or accepts them and never answers (a paused server), makes
// every call ErrUnavailable (503) by its deadline, not a 500, and never
// hangs. It needs no database.
func TestPostgresStoreThatCannotBeReachedIsUnavailable(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0") // accepts, never answers
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
		}
	}()
	refusing, _ := net.Listen("tcp", "127.0.0.1:0")
	refused := refusing.Addr().String()
	refusing.Close()
	for name, addr := range map[string]string{"refused": refused, "silent": silent.Addr().String()} {
		t.Run(name, func(t *testing.T) {
			cfg, err := pgx.ParseConfig("postgres://addrservice@" + addr + "/addrservice?connect_timeout=30")
			if err != nil {
				t.Fatal(err)
			}
			db := stdlib.OpenDB(*cfg)
			t.Cleanup(func() { db.Close() })
			s := &PostgresStore{db: db, sql: statementsFor("addresses")}
			calls := map[string]func(ctx context.Context) error{
				"Ready":  s.Ready,
				"Insert": func(ctx context.Context) error { return s.Insert(ctx, ID{1}, Record{JSON: []byte(`{}`)}) },
				"Get":    func(ctx context.Context) error { _, err := s.Get(ctx, ID{1}); return err },
				"List":   func(ctx context.Context) error { _, _, err := s.List(ctx, ID{}, 10); return err },
				"Delete": func(ctx context.Context) error { return s.Delete(ctx, ID{1}, nil) },
			}
			for op, call := range calls {
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				start := time.Now()
				err := call(ctx)
				cancel()
				if !errors.Is(err, ErrUnavailable) || time.Since(start) > 3*time.Second {
					t.Errorf("%s: %v after %v, want ErrUnavailable within the deadline", op, err, time.Since(start))
				}
			}
		})
	}
}
