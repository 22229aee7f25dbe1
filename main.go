// Addrservice is an address-book REST service built on the standard library
// alone, and a starting point to copy for a Go service of your own.
//
// Endpoints (contract: openapi.json, also served at GET /openapi.json; README
// for examples):
//
//	POST   /addresses        create an entry: 201, Location, ETag
//	GET    /addresses        list entries in id order: ?limit=N&after=ID, Link rel="next"
//	GET    /addresses/{id}   one entry: ETag, If-None-Match
//	PUT    /addresses/{id}   replace an entry: 204, If-Match
//	DELETE /addresses/{id}   delete an entry: 204, If-Match
//	GET    /healthz          liveness
//	GET    /readyz           readiness: 503 while shutting down or while the store refuses writes
//	GET    /openapi.json     this API's OpenAPI 3.1 description
//	GET    /metrics          Prometheus metrics (docs/observability.md)
//
// Usage:
//
//	addrservice [-addr :8080] [-data DIR | -database-url URL] [-log-level info]
//	            [-log-format text] [-max-body 1MiB] [-max-body-memory 64MiB]
//	            [-max-store-bytes 128MiB] [-max-conns 4096] [-store-timeout 5s]
//	            [-shutdown-timeout 10s] [-debug-addr 127.0.0.1:6060] [-version]
//
// Every flag can also be set as ADDRSERVICE_<FLAG>, such as ADDRSERVICE_MAX_BODY;
// a flag on the command line wins.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signalContext()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop() // os.Exit runs no deferred calls
	os.Exit(exitStatus(err, os.Stderr))
}

// signalContext returns a context cancelled by the first SIGINT, SIGTERM or
// SIGHUP; a second one ends the process at once. SIGHUP drains like SIGTERM
// because it is what a closing terminal or a supervisor's restart sends, and
// dying mid-write on it would be the worst answer. SIGPIPE is ignored: a log
// reader that goes away turns log writes into errors, which are counted
// (see logBuffer), instead of killing the service.
func signalContext() (context.Context, context.CancelFunc) {
	signal.Ignore(syscall.SIGPIPE)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		<-ctx.Done()
		stop() // from now on a second signal ends the process at once
	}()
	return ctx, stop
}

// exitStatus reports err and returns the exit status: 0 after a clean stop,
// 2 for a bad flag or variable, 1 for any other failure.
func exitStatus(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, "addrservice:", err)
	var usage *usageError
	if errors.As(err, &usage) {
		return 2
	}
	return 1
}

// run is the whole program: it serves until ctx is cancelled, then drains.
// Logs go to stdout; the usage asked for with -h goes to stderr.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cfg, err := parseConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if cfg.version {
		b := readBuildInfo()
		fmt.Fprintf(stdout, "addrservice %s revision %s modified %t %s\n", b.Version, b.Revision, b.Modified, b.GoVersion)
		return nil
	}
	return serve(ctx, cfg, stdout, stderr)
}

// config is everything the flags and environment decide.
type config struct {
	addr            string
	dataDir         string
	databaseURL     string // see openDatabase
	logLevel        slog.Level
	logFormat       string
	maxBody         int64
	maxBodyMemory   int64 // request bodies held at once, across all requests
	maxStoreBytes   int64 // the stored entries' JSON, in all
	maxConns        int   // connections served at once; ones idle a second give way to new ones
	storeTimeout    time.Duration
	shutdownTimeout time.Duration
	debugAddr       string // pprof, expvar and /metrics, on a listener of their own; "" for none
	version         bool   // print the build and exit
	timeouts        serverTimeouts
}

// serverTimeouts bound how long a client may hold a connection. They are not
// flags: the defaults suit a service behind a load balancer, and tests
// shorten them.
type serverTimeouts struct {
	readHeader time.Duration // slow-header (slowloris) clients are cut off here
	read       time.Duration // the whole request, body included
	write      time.Duration // from the end of the request headers to the end of the response
	idle       time.Duration // a keep-alive connection waiting for its next request
	maxHeader  int           // bytes of request line and headers
}

var defaultTimeouts = serverTimeouts{
	readHeader: 5 * time.Second,
	read:       30 * time.Second,
	write:      30 * time.Second,
	idle:       120 * time.Second,
	maxHeader:  16 << 10,
}

// usageError is a bad flag or variable: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// parseConfig reads flags, then ADDRSERVICE_* variables for flags not given.
// Each error is one line naming the flag or variable.
func parseConfig(args []string, getenv func(string) string, usageOut io.Writer) (config, error) {
	cfg := config{timeouts: defaultTimeouts}
	fs := flag.NewFlagSet("addrservice", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported in one line below, not with the usage
	fs.StringVar(&cfg.addr, "addr", ":8080", "listen `address`, host:port")
	fs.StringVar(&cfg.dataDir, "data", "", "keep entries under `DIR`; empty keeps them in memory only")
	fs.StringVar(&cfg.databaseURL, "database-url", "", "keep entries in the PostgreSQL database at `URL` (postgres://user:password@host/db); needs postgres.go, see the README")
	fs.Func("log-level", "log `level`: debug, info, warn or error (default info)", func(s string) error {
		levels := map[string]slog.Level{"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError}
		level, ok := levels[s]
		if !ok {
			return errors.New("must be debug, info, warn or error")
		}
		cfg.logLevel = level
		return nil
	})
	cfg.logFormat = "text"
	fs.Func("log-format", "log `format`: text (key=value) or json (default text)", func(s string) error {
		if s != "text" && s != "json" {
			return errors.New("must be text or json")
		}
		cfg.logFormat = s
		return nil
	})
	bytesFlag := func(name string, p *int64, value int64, usage string) {
		*p = value
		fs.Func(name, fmt.Sprintf("%s, in `bytes` (or with KiB, MiB, GiB) (default %s)", usage, formatBytes(value)), func(s string) error {
			n, err := parseBytes(s)
			*p = n
			return err
		})
	}
	bytesFlag("max-body", &cfg.maxBody, 1<<20, "largest request body, before and after gzip decoding")
	bytesFlag("max-body-memory", &cfg.maxBodyMemory, 64<<20, "memory for request bodies being read and list pages being sent, across all requests; past it a request gets 503")
	bytesFlag("max-store-bytes", &cfg.maxStoreBytes, 128<<20, "largest total of stored entries' JSON; past it creates and growing replaces get 507")
	cfg.maxConns = 4096
	fs.Func("max-conns", "connections served at once; at the limit one idle for a second gives way, or more wait to be accepted (`count`, default 4096)", func(s string) error {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return errors.New("must be a whole number, at least 1")
		}
		cfg.maxConns = n
		return nil
	})
	durationFlag := func(name string, p *time.Duration, value time.Duration, usage string) {
		*p = value
		fs.Func(name, fmt.Sprintf("%s, as a `duration` (default %s)", usage, value), func(s string) error {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				return errors.New("must be a positive duration such as 10s")
			}
			*p = d
			return nil
		})
	}
	durationFlag("store-timeout", &cfg.storeTimeout, 5*time.Second, "how long one call into the store may take before the request gets 503")
	durationFlag("shutdown-timeout", &cfg.shutdownTimeout, 10*time.Second, "how long in-flight requests may take to finish after a signal")

	fs.StringVar(&cfg.debugAddr, "debug-addr", "", "serve pprof, expvar and /metrics on this `address` too, such as 127.0.0.1:6060; keep it private (default none)")
	fs.BoolVar(&cfg.version, "version", false, "print the version and VCS revision of this build, and exit")

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(usageOut, "Usage: addrservice [flags]\n\nEach flag can also be set as ADDRSERVICE_<FLAG> (ADDRSERVICE_MAX_BODY); the flag wins.\n\nFlags:")
			fs.SetOutput(usageOut)
			fs.PrintDefaults()
			return cfg, err
		}
		return cfg, &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return cfg, &usageError{fmt.Sprintf("unexpected argument %q: every setting is a flag", fs.Arg(0))}
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		name := "ADDRSERVICE_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		value := getenv(name)
		// ADDRSERVICE_VERSION is too likely to be set for other reasons
		// (a deployment's own version) to be read as -version.
		if given[f.Name] || value == "" || envErr != nil || f.Name == "version" {
			return
		}
		if err := fs.Set(f.Name, value); err != nil {
			envErr = &usageError{fmt.Sprintf("invalid value %q for %s: %v", value, name, err)}
		}
		given[f.Name] = true
	})
	if envErr != nil {
		return cfg, envErr
	}
	if _, _, err := net.SplitHostPort(cfg.addr); err != nil {
		return cfg, &usageError{fmt.Sprintf("invalid value %q for -addr (or ADDRSERVICE_ADDR): must be host:port, such as :8080", cfg.addr)}
	}
	if _, _, err := net.SplitHostPort(cfg.debugAddr); err != nil && cfg.debugAddr != "" {
		return cfg, &usageError{fmt.Sprintf("invalid value %q for -debug-addr (or ADDRSERVICE_DEBUG_ADDR): must be host:port, such as 127.0.0.1:6060", cfg.debugAddr)}
	}
	// The URL is never quoted back: it may hold a password.
	if cfg.databaseURL != "" && cfg.dataDir != "" {
		return cfg, &usageError{"-data and -database-url (or their ADDRSERVICE_ variables) choose two different stores: set one"}
	}
	if cfg.databaseURL != "" && given["max-store-bytes"] {
		return cfg, &usageError{"-max-store-bytes (or ADDRSERVICE_MAX_STORE_BYTES) bounds the memory and -data stores; with -database-url the database's size is the database's to limit: unset it"}
	}
	if cfg.databaseURL != "" && openDatabase == nil {
		return cfg, &usageError{"-database-url (or ADDRSERVICE_DATABASE_URL) is set, but this build has no PostgreSQL store: copy testdata/postgres/postgres.go beside main.go as the README says (Swap the store)"}
	}
	if cfg.maxBodyMemory <= cfg.maxBody {
		return cfg, &usageError{fmt.Sprintf("-max-body-memory (%d) must be larger than -max-body (%d), or no body of the largest size could ever be read", cfg.maxBodyMemory, cfg.maxBody)}
	}
	return cfg, nil
}

// parseBytes reads a size such as 1048576, 512KiB, 64MiB or 1GiB.
func parseBytes(s string) (int64, error) {
	digits, unit := s, int64(1)
	for suffix, size := range map[string]int64{"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30} {
		if d, ok := strings.CutSuffix(s, suffix); ok {
			digits, unit = d, size
		}
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n < 1 || strings.TrimLeft(digits, "0123456789") != "" || n > math.MaxInt64/unit {
		return 0, errors.New("must be a whole number of bytes, at least 1, such as 1048576 or 64MiB")
	}
	return n * unit, nil
}

// formatBytes writes n the way parseBytes reads it, in the largest unit
// that divides it.
func formatBytes(n int64) string {
	for _, u := range []struct {
		suffix string
		size   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n >= u.size && n%u.size == 0 {
			return strconv.FormatInt(n/u.size, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// serve opens the store, listens, serves until ctx is done, then drains.
// Logs go to logOut; stderr hears when writing them fails.
func serve(ctx context.Context, cfg config, logOut, stderr io.Writer) error {
	logs := newLogBuffer(logOut, 100*time.Millisecond)
	defer func() {
		if lost := logs.Close(time.Second); lost > 0 {
			warn(stderr, fmt.Sprintf("addrservice: %d log lines were not written (the log output failed or took nothing)\n", lost))
		}
	}()
	log := newLogger(logs, cfg.logFormat, cfg.logLevel)
	logs.onFail = func(err error) {
		warn(stderr, fmt.Sprintf("addrservice: writing the log failed (%v); lines are dropped and counted until it works again\n", err))
	}
	logs.onRecover = func(lost int64) {
		log.Warn("log output works again; lines written while it failed are lost", "lost_lines", lost)
	}

	// One store per resource: a second resource opens its own here and
	// adds it to stores, which readiness checks and every return closes.
	var stores []Store
	defer func() { closeStores(stores) }() // a second Close is harmless
	entryStore, err := openStore(ctx, cfg, log, "addresses", "", storedRecord(ParseEntry))
	if err != nil {
		return err
	}
	stores = append(stores, entryStore)

	// Listen before anything else can fail late: a port in use is reported now.
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	maxConns := connectionLimit(cfg.maxConns)
	conns := newLimitListener(ln, maxConns)

	build := readBuildInfo()
	httpStats := newHTTPMetrics()
	processMetrics := func(w io.Writer) {
		writeMetric(w, "addrservice_connections_open", "gauge", "Client connections open.", float64(conns.open.Load()))
		writeMetric(w, "addrservice_connections_limit", "gauge", "Client connections served at once (-max-conns); more wait to be accepted.", float64(maxConns))
		// A second resource's store is measured by adding it here.
		if s, ok := entryStore.(interface{ Size() (int, int64, int64) }); ok {
			entries, bytes, limit := s.Size()
			writeMetric(w, "addrservice_store_entries", "gauge", "Entries in the address book.", float64(entries))
			writeMetric(w, "addrservice_store_bytes", "gauge", "Bytes of the stored entries' JSON.", float64(bytes))
			writeMetric(w, "addrservice_store_limit_bytes", "gauge", "Largest total of the stored entries' JSON (-max-store-bytes; 0: none).", float64(limit))
		}
		writeMetric(w, "addrservice_log_lines_lost_total", "counter", "Log lines dropped because the log output failed or fell too far behind.", float64(logs.lost.Load()))
		build.writeMetric(w)
		writeRuntimeMetrics(w)
	}

	var ready atomic.Bool
	ready.Store(true)
	srv := &http.Server{
		Handler: newHandler(log, resources{book: NewCollection[Entry](entryStore, log, cfg.storeTimeout)}, handlerConfig{
			maxBody:     cfg.maxBody,
			bodies:      newBodyBudget(cfg.maxBodyMemory),
			ready:       &ready,
			storeReady:  readiness(time.Second, stores...),
			metrics:     httpStats,
			moreMetrics: processMetrics,
		}),
		ReadHeaderTimeout: cfg.timeouts.readHeader,
		ReadTimeout:       cfg.timeouts.read,
		WriteTimeout:      cfg.timeouts.write,
		IdleTimeout:       cfg.timeouts.idle,
		MaxHeaderBytes:    cfg.timeouts.maxHeader,
		// "OPTIONS *" reaches the handler, to be answered as a problem
		// with an X-Request-ID like every other request.
		DisableGeneralOptionsHandler: true,
		ErrorLog:                     slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ConnState:                    conns.connState,
	}

	debugAddr := ""
	if cfg.debugAddr != "" {
		dln, err := net.Listen("tcp", cfg.debugAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("-debug-addr: %w", err)
		}
		debugAddr = dln.Addr().String()
		// No write timeout: a CPU profile or a trace answers after as many
		// seconds as it was asked for.
		dsrv := &http.Server{
			Handler:           debugHandler(srv.Handler), // its /metrics is the public one's, counted there too
			ReadHeaderTimeout: cfg.timeouts.readHeader,
			ErrorLog:          srv.ErrorLog,
		}
		go dsrv.Serve(dln)
		defer dsrv.Close()
		// Mutex and block profiles are empty unless sampled; these rates
		// cost little and are set only when someone can read them.
		runtime.SetMutexProfileFraction(100)
		runtime.SetBlockProfileRate(int(100 * time.Microsecond))
	}
	settings := []any{"addr", ln.Addr().String(), "store", cfg.storeKind(), "data", cfg.dataDir, "log_level", cfg.logLevel.String(),
		"max_body", cfg.maxBody, "max_body_memory", cfg.maxBodyMemory, "max_conns", maxConns,
		"store_timeout", cfg.storeTimeout.String(), "shutdown_timeout", cfg.shutdownTimeout.String(), "debug_addr", debugAddr,
		"version", build.Version, "revision", build.Revision, "modified", build.Modified}
	if cfg.storeKind() != "database" { // a database's size is not limited here
		settings = append(settings, "max_store_bytes", cfg.maxStoreBytes)
	}
	log.Info("starting", settings...)

	served := make(chan error, 1)
	go func() { served <- srv.Serve(conns) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}

	ready.Store(false)
	log.Info("shutting down", "timeout", cfg.shutdownTimeout.String())
	// A fresh context: ctx is already cancelled.
	sctx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		log.Warn("in-flight requests did not finish in time; closing their connections", "err", err)
		srv.Close()
	}
	if err := closeStores(stores); err != nil {
		return fmt.Errorf("closing the store: %w", err)
	}
	log.Info("stopped", "lost_log_lines", logs.lost.Load())
	return nil
}

// closeStores closes every store, reporting every failure.
func closeStores(stores []Store) error {
	var errs []error
	for _, s := range stores {
		errs = append(errs, s.Close())
	}
	return errors.Join(errs...)
}

// connectionLimit lowers want, if it must, to leave descriptorReserve file
// descriptors free whatever the clients do, so the store's writes never
// fail for lack of one.
func connectionLimit(want int) int {
	files, ok := openFileLimit()
	if !ok {
		return want
	}
	return max(1, min(want, files-descriptorReserve))
}

// descriptorReserve is what connections may never use: the store, the log,
// and a margin.
const descriptorReserve = 128

// limitListener accepts at most max connections at once. At the limit, a
// connection that has been idle (kept alive between requests) for
// minIdleToGive or more gives way, the longest idle first, so clients that
// open connections and leave them idle cannot lock new ones out, while
// clients that keep theirs busy are left alone. When none has been idle so
// long, new connections wait in the kernel's queue, costing the process
// nothing.
type limitListener struct {
	net.Listener
	slots     chan struct{}
	open      atomic.Int64 // connections accepted and not yet closed, for /metrics
	closed    chan struct{}
	closeOnce sync.Once

	mu   sync.Mutex
	idle map[*limitedConn]time.Time // since when each idle connection has waited
}

// minIdleToGive is how long a connection must have been idle to give way.
const minIdleToGive = time.Second

func newLimitListener(ln net.Listener, max int) *limitListener {
	return &limitListener{Listener: ln, slots: make(chan struct{}, max), closed: make(chan struct{}), idle: make(map[*limitedConn]time.Time)}
}

func (l *limitListener) Accept() (net.Conn, error) {
	select {
	case l.slots <- struct{}{}:
	default: // at the limit: ask an idle connection to go, now and then
		tick := time.NewTicker(minIdleToGive / 4)
		defer tick.Stop()
		for waiting := true; waiting; {
			l.makeRoom()
			select {
			case l.slots <- struct{}{}:
				waiting = false
			case <-tick.C:
			case <-l.closed:
				return nil, net.ErrClosed
			}
		}
	}
	c, err := l.Listener.Accept()
	if err != nil {
		<-l.slots
		return nil, err
	}
	l.open.Add(1)
	return &limitedConn{Conn: c, release: sync.OnceFunc(func() { l.open.Add(-1); <-l.slots })}, nil
}

// makeRoom ends the connection idle the longest, if it has been idle for
// minIdleToGive. It does so by its read deadline rather than by closing it:
// the server, waiting for the next request, then closes it itself. Had a
// request just arrived on it, the server has set its own deadline for it,
// or its handler finds a body it cannot read and changes nothing: a request
// is never cut after it has been acted on.
func (l *limitListener) makeRoom() {
	l.mu.Lock()
	defer l.mu.Unlock()
	var oldest *limitedConn
	for c, since := range l.idle {
		if oldest == nil || since.Before(l.idle[oldest]) {
			oldest = c
		}
	}
	if oldest != nil && time.Since(l.idle[oldest]) >= minIdleToGive {
		oldest.SetReadDeadline(time.Unix(1, 0))
		delete(l.idle, oldest)
	}
}

// connState is the server's ConnState hook: it keeps track of which
// connections are idle, and since when.
func (l *limitListener) connState(conn net.Conn, state http.ConnState) {
	c, ok := conn.(*limitedConn)
	if !ok {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if state == http.StateIdle {
		l.idle[c] = time.Now()
	} else {
		delete(l.idle, c)
	}
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

type limitedConn struct {
	net.Conn
	release func()
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.release()
	return err
}

// storeKind names the store the configuration asks for: "database",
// "files" (-data) or "memory". It is what the starting line logs, never the
// URL, which may hold a password.
func (c config) storeKind() string {
	switch {
	case c.databaseURL != "":
		return "database"
	case c.dataDir != "":
		return "files"
	}
	return "memory"
}

// openDatabase opens the database store of one resource, in its own table.
// It is nil unless a file that provides a database store, such as
// testdata/postgres/postgres.go copied beside this one, sets it in its init:
// so the service needs no driver, and no other file changes, until one is
// wanted.
var openDatabase func(ctx context.Context, url, table string) (Store, error)

// openStore opens the store of one resource as the configuration asks: in a
// database (a table named resource), in the directory subdir of -data
// (checking each file with load; "" is -data itself, the address book's), or
// in memory.
func openStore(ctx context.Context, cfg config, log *slog.Logger, resource, subdir string, load func([]byte) (Record, error)) (Store, error) {
	switch cfg.storeKind() {
	case "database":
		return openDatabase(ctx, cfg.databaseURL, resource)
	case "memory":
		return NewMapStore(cfg.maxStoreBytes), nil
	}
	store, err := OpenMapStore(filepath.Join(cfg.dataDir, subdir), cfg.maxStoreBytes, load)
	if err != nil {
		return nil, err
	}
	if _, size, limit := store.Size(); limit > 0 && size > limit {
		log.Warn("the stored records are over -max-store-bytes; creates are refused until deletes make room",
			"resource", resource, "bytes", size, "max_store_bytes", limit)
	}
	return store, nil
}

// newLogger returns a logger whose records carry the request id of the
// context they are logged with. When w buffers (has a Flush method, as
// logBuffer does), records at WARN and above are flushed at once.
func newLogger(w io.Writer, format string, level slog.Level) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(w, opts)
	if format == "json" {
		h = slog.NewJSONHandler(w, opts)
	}
	flush := func() {}
	if b, ok := w.(interface{ Flush() }); ok {
		flush = b.Flush
	}
	return slog.New(logHandler{h, flush})
}

// logHandler adds the request id to every record logged with a request's
// context, so the service layer's own logs carry it too, and flushes
// buffered output after each record at WARN and above.
type logHandler struct {
	slog.Handler
	flush func()
}

func (h logHandler) Handle(ctx context.Context, r slog.Record) error {
	if id := requestID(ctx); id != "" {
		r.AddAttrs(slog.String("request_id", id))
	}
	err := h.Handler.Handle(ctx, r)
	if r.Level >= slog.LevelWarn {
		h.flush()
	}
	return err
}

func (h logHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return logHandler{h.Handler.WithAttrs(attrs), h.flush}
}

func (h logHandler) WithGroup(name string) slog.Handler {
	return logHandler{h.Handler.WithGroup(name), h.flush}
}

// logBuffer collects log lines and writes them out in one call every
// interval: at thousands of requests a second, a write per line costs more
// than the lines themselves. Only its own goroutine writes, so a log reader
// that stalls or goes away never holds up a request: lines past
// maxLogBuffer wait nowhere, and lines whose write fails are dropped, both
// counted in lost. Lines at WARN and above are handed to the writer at once
// (see logHandler), so what a kill -9 can lose is the INFO lines of the last
// interval.
type logBuffer struct {
	mu        sync.Mutex
	buf       []byte
	out       io.Writer
	lost      atomic.Int64     // lines dropped: output failed or too far behind
	writing   atomic.Int64     // lines in the write under way
	failing   bool             // the last write failed; only the writer goroutine uses it
	onFail    func(err error)  // when writes start to fail
	onRecover func(lost int64) // when they work again
	kick      chan struct{}
	stop      chan struct{}
	done      chan struct{}
}

const maxLogBuffer = 1 << 20 // lines past this are dropped, not queued

func newLogBuffer(out io.Writer, interval time.Duration) *logBuffer {
	b := &logBuffer{out: out, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		var spare []byte
		for {
			select {
			case <-tick.C:
			case <-b.kick:
			case <-b.stop:
				b.writeOut(&spare)
				return
			}
			b.writeOut(&spare)
		}
	}()
	return b
}

// Write queues p, one log record.
func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf)+len(p) > maxLogBuffer {
		b.lost.Add(1)
		return len(p), nil
	}
	b.buf = append(b.buf, p...)
	if len(b.buf) >= 64<<10 {
		b.Flush()
	}
	return len(p), nil
}

// Flush asks the writer goroutine to write out what is queued now.
func (b *logBuffer) Flush() {
	select {
	case b.kick <- struct{}{}:
	default: // a write is already due
	}
}

// writeOut swaps the queue for spare and writes it, outside the lock.
func (b *logBuffer) writeOut(spare *[]byte) {
	b.mu.Lock()
	out := b.buf
	b.buf = (*spare)[:0]
	b.mu.Unlock()
	if len(out) == 0 {
		*spare = out
		return
	}
	lines := int64(bytes.Count(out, []byte{'\n'}))
	b.writing.Store(lines)
	_, err := b.out.Write(out)
	b.writing.Store(0)
	if err != nil {
		b.lost.Add(lines)
		if !b.failing && b.onFail != nil {
			b.onFail(err)
		}
		b.failing = true
	} else if b.failing {
		b.failing = false
		if b.onRecover != nil {
			b.onRecover(b.lost.Load())
		}
	}
	*spare = out
}

// Close writes out what is queued and stops the writer goroutine, waiting
// at most wait: a log output that takes nothing (a pipe nobody reads) must
// not hold the process. It returns the count of lines lost, those still
// unwritten included.
func (b *logBuffer) Close(wait time.Duration) int64 {
	close(b.stop)
	select {
	case <-b.done:
	case <-time.After(wait):
		b.mu.Lock()
		b.lost.Add(int64(bytes.Count(b.buf, []byte{'\n'})) + b.writing.Load())
		b.buf = b.buf[:0]
		b.mu.Unlock()
	}
	return b.lost.Load()
}

// warn writes msg to w, waiting at most a moment: stderr may be the same
// pipe as a log output that takes nothing.
func warn(w io.Writer, msg string) {
	done := make(chan struct{})
	go func() {
		io.WriteString(w, msg)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(100 * time.Millisecond):
	}
}

// buildInfo says which build is running, from what the Go toolchain wrote
// into the binary: the module version (a pseudo-version made from the VCS
// revision when built from a checkout), the revision, and whether the tree
// had changes not committed.
type buildInfo struct {
	Version   string `json:"version"`
	Revision  string `json:"revision"`
	Modified  bool   `json:"modified"`
	GoVersion string `json:"-"`
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: "(devel)", Revision: "unknown", GoVersion: runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if info.Main.Version != "" { // empty in a test binary
		b.Version = info.Main.Version
	}
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

// writeMetric writes the addrservice_build_info convention's gauge: always
// 1, the build in its labels, so a query can join any series to the build
// that produced it.
func (b buildInfo) writeMetric(w io.Writer) {
	fmt.Fprintf(w, "# HELP addrservice_build_info The build that is running.\n# TYPE addrservice_build_info gauge\n"+
		"addrservice_build_info{version=%q,revision=%q,go_version=%q} 1\n", b.Version, b.Revision, b.GoVersion)
}

// runtimeMetrics are the Go runtime's own figures /metrics reports, named
// as the Prometheus Go client names them, so existing dashboards read them.
var runtimeMetrics = []struct{ sample, name, kind, help string }{
	{"/sched/goroutines:goroutines", "go_goroutines", "gauge", "Goroutines that currently exist."},
	{"/sched/gomaxprocs:threads", "go_sched_gomaxprocs_threads", "gauge", "GOMAXPROCS: threads that may run Go code at once."},
	{"/gc/heap/live:bytes", "go_gc_heap_live_bytes", "gauge", "Heap memory the last GC found live."},
	{"/memory/classes/heap/objects:bytes", "go_memory_classes_heap_objects_bytes", "gauge", "Heap memory in objects, live or not yet swept."},
	{"/memory/classes/total:bytes", "go_memory_classes_total_bytes", "gauge", "All memory the Go runtime has mapped."},
	{"/gc/cycles/total:gc-cycles", "go_gc_cycles_total", "counter", "Completed GC cycles."},
}

// gcPauseBuckets are the bounds, in seconds, of the GC pause histogram;
// the runtime's own has some hundred finer buckets.
var gcPauseBuckets = []float64{10e-6, 50e-6, 100e-6, 500e-6, 1e-3, 5e-3, 10e-3, 50e-3, 100e-3, 1}

// writeRuntimeMetrics reads runtime/metrics and writes the figures above and
// the histogram of GC pauses (stop-the-world time, which a request waits
// through).
func writeRuntimeMetrics(w io.Writer) {
	samples := make([]metrics.Sample, len(runtimeMetrics)+1)
	for i, m := range runtimeMetrics {
		samples[i].Name = m.sample
	}
	samples[len(runtimeMetrics)].Name = "/sched/pauses/total/gc:seconds"
	metrics.Read(samples)
	for i, m := range runtimeMetrics {
		if samples[i].Value.Kind() == metrics.KindUint64 {
			writeMetric(w, m.name, m.kind, m.help, float64(samples[i].Value.Uint64()))
		}
	}
	if samples[len(runtimeMetrics)].Value.Kind() != metrics.KindFloat64Histogram {
		return
	}
	h := samples[len(runtimeMetrics)].Value.Float64Histogram()
	fmt.Fprint(w, "# HELP go_sched_pauses_total_gc_seconds Stop-the-world pauses for garbage collection; no sum, which the runtime does not keep.\n# TYPE go_sched_pauses_total_gc_seconds histogram\n")
	var cumulative, total uint64
	i := 0 // h.Counts[i] counts pauses from h.Buckets[i] up to h.Buckets[i+1]
	for _, bound := range gcPauseBuckets {
		for ; i < len(h.Counts) && h.Buckets[i+1] <= bound; i++ {
			cumulative += h.Counts[i]
		}
		fmt.Fprintf(w, "go_sched_pauses_total_gc_seconds_bucket{le=\"%s\"} %d\n", formatFloat(bound), cumulative)
	}
	for _, n := range h.Counts {
		total += n
	}
	fmt.Fprintf(w, "go_sched_pauses_total_gc_seconds_bucket{le=\"+Inf\"} %d\ngo_sched_pauses_total_gc_seconds_count %d\n", total, total)
}

// debugHandler serves what an operator needs to look inside the process,
// on a listener of its own that the public never reaches: profiles and
// traces (net/http/pprof), expvar, and the public listener's /metrics.
// The pprof handlers are registered here by hand; importing net/http/pprof
// also puts them on http.DefaultServeMux, which nothing serves. The command
// line is left out of both pprof and expvar: it may hold -database-url's
// password.
func debugHandler(public http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index) // heap, goroutine, mutex, block, allocs, threadcreate by name
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /debug/vars", func(w http.ResponseWriter, r *http.Request) {
		vars := map[string]json.RawMessage{}
		expvar.Do(func(kv expvar.KeyValue) {
			if kv.Key != "cmdline" {
				vars[kv.Key] = json.RawMessage(kv.Value.String())
			}
		})
		w.Header()["Content-Type"] = jsonType
		json.NewEncoder(w).Encode(vars)
	})
	mux.Handle("GET /metrics", public)
	return mux
}
