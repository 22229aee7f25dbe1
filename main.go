// Addrservice is an address-book REST service built on the standard library
// alone, and a starting point to copy for a Go service of your own.
//
// Endpoints (contract: api-v1.md; README for examples):
//
//	POST   /addresses        create an entry: 201, Location, ETag
//	GET    /addresses        list entries in id order: ?limit=N&after=ID, Link rel="next"
//	GET    /addresses/{id}   one entry: ETag, If-None-Match
//	PUT    /addresses/{id}   replace an entry: 204, If-Match
//	DELETE /addresses/{id}   delete an entry: 204, If-Match
//	GET    /healthz          liveness
//	GET    /readyz           readiness: 503 once shutdown has begun
//
// Usage:
//
//	addrservice [-addr :8080] [-data DIR | -database-url URL] [-log-level info]
//	            [-log-format text] [-max-body 1048576] [-shutdown-timeout 10s]
//
// Every flag can also be set as ADDRSERVICE_<FLAG>, such as ADDRSERVICE_MAX_BODY;
// a flag on the command line wins.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // from now on a second signal ends the process at once
	}()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "addrservice:", err)
		var usage *usageError
		if errors.As(err, &usage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
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
	cfg.tuneGC = getenv("GOGC") == "" // an operator's GOGC wins
	return serve(ctx, cfg, stdout)
}

// config is everything the flags and environment decide.
type config struct {
	addr            string
	dataDir         string
	databaseURL     string // see openDatabase
	logLevel        slog.Level
	logFormat       string
	maxBody         int64
	shutdownTimeout time.Duration
	timeouts        serverTimeouts
	tuneGC          bool // see tuneGC
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
	maxHeader:  64 << 10,
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
	cfg.maxBody = 1 << 20
	fs.Func("max-body", "largest request body in `bytes`, before and after gzip decoding (default 1048576)", func(s string) error {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 1 {
			return errors.New("must be a whole number of bytes, at least 1")
		}
		cfg.maxBody = n
		return nil
	})
	cfg.shutdownTimeout = 10 * time.Second
	fs.Func("shutdown-timeout", "how long in-flight requests may take to finish after a signal, as a `duration` (default 10s)", func(s string) error {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return errors.New("must be a positive duration such as 10s")
		}
		cfg.shutdownTimeout = d
		return nil
	})

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
		if given[f.Name] || value == "" || envErr != nil {
			return
		}
		if err := fs.Set(f.Name, value); err != nil {
			envErr = &usageError{fmt.Sprintf("invalid value %q for %s: %v", value, name, err)}
		}
	})
	if envErr != nil {
		return cfg, envErr
	}
	if _, _, err := net.SplitHostPort(cfg.addr); err != nil {
		return cfg, &usageError{fmt.Sprintf("invalid value %q for -addr (or ADDRSERVICE_ADDR): must be host:port, such as :8080", cfg.addr)}
	}
	// The URL is never quoted back: it may hold a password.
	if cfg.databaseURL != "" && cfg.dataDir != "" {
		return cfg, &usageError{"-data and -database-url (or their ADDRSERVICE_ variables) choose two different stores: set one"}
	}
	if cfg.databaseURL != "" && openDatabase == nil {
		return cfg, &usageError{"-database-url (or ADDRSERVICE_DATABASE_URL) is set, but this build has no PostgreSQL store: copy testdata/postgres/postgres.go beside main.go as the README says (Outgrowing one machine)"}
	}
	return cfg, nil
}

// serve opens the store, listens, serves until ctx is done, then drains.
func serve(ctx context.Context, cfg config, logOut io.Writer) error {
	logs := newLogBuffer(logOut, 100*time.Millisecond)
	defer logs.Close()
	log := newLogger(logs, cfg.logFormat, cfg.logLevel)

	store, err := openStore(ctx, cfg, "addresses")
	if err != nil {
		return err
	}
	defer store.Close()

	// Listen before anything else can fail late: a port in use is reported now.
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}

	if cfg.tuneGC {
		gcCtx, stopGC := context.WithCancel(ctx)
		defer stopGC()
		go tuneGC(gcCtx)
	}

	var ready atomic.Bool
	ready.Store(true)
	srv := &http.Server{
		Handler:           newHandler(log, NewService(store, log), handlerConfig{maxBody: cfg.maxBody, ready: &ready}),
		ReadHeaderTimeout: cfg.timeouts.readHeader,
		ReadTimeout:       cfg.timeouts.read,
		WriteTimeout:      cfg.timeouts.write,
		IdleTimeout:       cfg.timeouts.idle,
		MaxHeaderBytes:    cfg.timeouts.maxHeader,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	log.Info("starting", "addr", ln.Addr().String(), "data", cfg.dataDir, "log_level", cfg.logLevel.String(),
		"max_body", cfg.maxBody, "shutdown_timeout", cfg.shutdownTimeout.String())

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
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
	if err := store.Close(); err != nil {
		return fmt.Errorf("closing the store: %w", err)
	}
	log.Info("stopped")
	return nil
}

// tuneGC keeps the heap's headroom for garbage near gcHeadroom rather than
// proportional to the heap. The stored entries are nearly all of the live
// heap, and the default GOGC=100 lets the heap grow to twice them between
// collections; requests make little garbage, so with a large book a
// collection at +25% costs little CPU and keeps the process near the size of
// its data. A small book keeps the default, where collections are cheap.
func tuneGC(ctx context.Context) {
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	current := 100
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(sample)
		percent := gcPercentFor(sample[0].Value.Uint64())
		if percent < current-5 || percent > current+5 {
			debug.SetGCPercent(percent)
			current = percent
		}
	}
}

// gcPercentFor returns the GOGC that gives a live heap of live bytes about
// 32 MiB of headroom, within 25 to 100.
func gcPercentFor(live uint64) int {
	const headroom = 32 << 20
	return int(min(max(headroom*100/max(live, 1), 25), 100))
}

// openDatabase opens the database store of one resource, in its own table.
// It is nil unless a file that provides a database store, such as
// testdata/postgres/postgres.go copied beside this one, sets it in its init:
// so the service needs no driver, and no other file changes, until one is
// wanted.
var openDatabase func(ctx context.Context, url, table string) (Store, error)

// openStore returns the store of one resource that the configuration asks
// for: in a database, in a directory, or in memory.
func openStore(ctx context.Context, cfg config, resource string) (Store, error) {
	switch {
	case cfg.databaseURL != "":
		return openDatabase(ctx, cfg.databaseURL, resource)
	case cfg.dataDir != "":
		return OpenMapStore(cfg.dataDir)
	}
	return NewMapStore(), nil
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
// than the lines themselves. Lines at WARN and above are flushed at once (see
// logHandler), so only INFO lines of the last interval can be lost if the
// process is killed.
type logBuffer struct {
	mu   sync.Mutex
	buf  []byte
	out  io.Writer
	stop chan struct{}
	done chan struct{}
}

const maxLogBuffer = 64 << 10 // flush early past this many bytes

func newLogBuffer(out io.Writer, interval time.Duration) *logBuffer {
	b := &logBuffer{out: out, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(b.done)
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				b.Flush()
			case <-b.stop:
				b.Flush()
				return
			}
		}
	}()
	return b
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) >= maxLogBuffer {
		b.flushLocked()
	}
	return len(p), nil
}

// Flush writes out what is buffered.
func (b *logBuffer) Flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
}

func (b *logBuffer) flushLocked() {
	if len(b.buf) > 0 {
		b.out.Write(b.buf) // nowhere to report a failed log write
		b.buf = b.buf[:0]
	}
}

// Close flushes and stops the flushing goroutine.
func (b *logBuffer) Close() {
	close(b.stop)
	<-b.done
}
