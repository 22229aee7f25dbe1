package main

// This file is the HTTP layer: routes, request decoding, status codes,
// headers and middleware. Business rules live in service.go.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"mime"
	"net/http"
	"net/url"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// handlerConfig is what the HTTP layer needs beyond the service.
type handlerConfig struct {
	maxBody     int64                           // largest request body, before and after gzip decoding
	bodies      *bodyBudget                     // memory for request bodies and pages in flight, across all requests
	ready       *atomic.Bool                    // false once shutdown has begun
	storeReady  func(ctx context.Context) error // why the store cannot take writes now, or nil
	metrics     *httpMetrics                    // what was served; GET /metrics reports it
	moreMetrics func(w io.Writer)               // the process's own metrics, written after the HTTP layer's
}

// resources are the collections the API serves, one per resource. A second
// resource is a field here, its lines in addRoutes, and its store in serve.
type resources struct {
	book *Collection[Entry]
}

// newHandler returns the whole API with its middleware.
func newHandler(log *slog.Logger, res resources, cfg handlerConfig) http.Handler {
	mux := http.NewServeMux()
	addRoutes(routeTable{mux, cfg.metrics}, log, res, cfg)
	return withMiddleware(log, cfg.metrics, mux)
}

// addRoutes is the whole API in one table; openapi.json describes it. Each
// resource has the same five lines, with its collection and its parse
// function. mux is an *http.ServeMux, or in a test anything that records the
// patterns.
func addRoutes(mux interface{ Handle(string, http.Handler) }, log *slog.Logger, res resources, cfg handlerConfig) {
	mux.Handle("POST /addresses", handle(log, createItem(res.book, ParseEntry, cfg)))
	mux.Handle("GET /addresses", handle(log, listItems(res.book, cfg)))
	mux.Handle("GET /addresses/{id}", handle(log, getItem(res.book)))
	mux.Handle("PUT /addresses/{id}", handle(log, replaceItem(res.book, ParseEntry, cfg)))
	mux.Handle("DELETE /addresses/{id}", handle(log, deleteItem(res.book)))
	mux.Handle("GET /healthz", handle(log, healthz()))
	mux.Handle("GET /readyz", handle(log, readyz(log, cfg)))
	mux.Handle("GET /openapi.json", handle(log, openAPI()))
	mux.Handle("GET /metrics", handle(log, serveMetrics(cfg)))
}

// withMiddleware wraps the mux in what every request passes through,
// listed here from the innermost out.
func withMiddleware(log *slog.Logger, m *httpMetrics, mux *http.ServeMux) http.Handler {
	var h http.Handler = mux
	h = problemsFromMux(h)    // the mux's own answers (404, 405, redirects) as problems
	h = recoverPanics(log, h) // inside the log, so a panic is logged as a 500
	h = logRequests(log, m, h)
	h = withRequestID(h) // everything after it sees the id
	h = closeAfterTransferEncoding(h)
	return h
}

// ---- the handlers -------------------------------------------------------------

// apiFunc is a handler that returns its failure; handle turns it into a problem.
type apiFunc func(w http.ResponseWriter, r *http.Request) error

func handle(log *slog.Logger, fn apiFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := fn(w, r); err != nil {
			writeError(w, r, log, err)
		}
	})
}

// The handlers below serve any resource: each takes the resource's
// Collection and, where it reads a body, the function that parses it.
// Locations and links are built from the request's own path, so they name
// whichever resource was asked for.

func createItem[T any](c *Collection[T], parse func([]byte) (T, error), cfg handlerConfig) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		v, err := readJSON(w, r, cfg, parse)
		if err != nil {
			return err
		}
		id, rec, err := c.Create(r.Context(), v)
		if err != nil {
			return err
		}
		created(w, r, strings.TrimSuffix(r.URL.Path, "/")+"/"+id.String(), rec)
		return nil
	}
}

func getItem[T any](c *Collection[T]) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		rec, err := c.Get(r.Context(), id)
		if err != nil {
			return err
		}
		tag := etag(rec.Version)
		w.Header()["Etag"] = []string{tag}
		if inm := r.Header.Values("If-None-Match"); inm != nil && noneMatch(inm, rec.Version) {
			w.Header()["Vary"] = varyEncoding
			w.WriteHeader(http.StatusNotModified)
			return nil
		}
		writeBody(w, r, http.StatusOK, jsonType, rec.JSON)
		return nil
	}
}

// replaceItem replaces the entry under id; with If-None-Match: * it
// creates one there instead, under an id the client chose, so a create can
// be retried without making two.
func replaceItem[T any](c *Collection[T], parse func([]byte) (T, error), cfg handlerConfig) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, ok := ParseID(r.PathValue("id"))
		switch {
		case !ok && createOnly(r):
			return &httpError{status: http.StatusBadRequest, detail: "an id chosen by the client must be 32 lowercase hex characters"}
		case !ok:
			return ErrNotFound
		}
		v, err := readJSON(w, r, cfg, parse)
		if err != nil {
			return err
		}
		if createOnly(r) {
			rec, err := c.CreateAt(r.Context(), id, v)
			if err != nil {
				return err
			}
			created(w, r, r.URL.Path, rec)
			return nil
		}
		rec, err := c.Replace(r.Context(), id, v, ifMatch(r))
		if err != nil {
			return err
		}
		w.Header()["Etag"] = []string{etag(rec.Version)}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

// createOnly reports If-None-Match: *, a PUT that may only create.
func createOnly(r *http.Request) bool {
	return slices.Contains(entityTags(r.Header.Values("If-None-Match")), "*")
}

// created answers a create: 201, the new entry's path and ETag, and the
// entry as stored.
func created(w http.ResponseWriter, r *http.Request, location string, rec Record) {
	h := w.Header()
	h["Location"] = []string{location}
	h["Etag"] = []string{etag(rec.Version)}
	writeBody(w, r, http.StatusCreated, jsonType, rec.JSON)
}

func deleteItem[T any](c *Collection[T]) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		id, err := pathID(r)
		if err != nil {
			return err
		}
		if err := c.Delete(r.Context(), id, ifMatch(r)); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
}

func listItems[T any](c *Collection[T], cfg handlerConfig) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		limit, after, err := pageQuery(r)
		if err != nil {
			return err
		}
		page, err := c.List(r.Context(), after, limit)
		if err != nil {
			return err
		}
		// A page keeps the JSON it sends until its client has read it, even
		// once the store has let go of it (replaced, deleted). So a page is
		// at most maxBody bytes of JSON, or its first entry, with Link to
		// the rest, and those bytes are taken from the budget request bodies
		// use: one account of what clients hold in flight.
		held := 0
		for i, it := range page.Items {
			if i > 0 && int64(held+len(it.JSON)) > cfg.maxBody {
				clear(page.Items[i:]) // nothing kept of what is not sent
				page.Items, page.More = page.Items[:i], true
				break
			}
			held += len(it.JSON)
		}
		if !cfg.bodies.take(int64(held)) {
			return busy("sending as many pages")
		}
		defer cfg.bodies.give(int64(held))
		if page.More {
			last := page.Items[len(page.Items)-1].ID
			w.Header()["Link"] = []string{fmt.Sprintf(`<%s?limit=%d&after=%s>; rel="next"`, strings.TrimSuffix(r.URL.Path, "/"), limit, last)}
		}
		// Each entry goes out after its key, `{"<id>":` for the first and
		// `,"<id>":` for the rest; the page is `{}` when there is none.
		key := []byte(`{"00000000000000000000000000000000":`)
		size := max(len(page.Items)*len(key)+1, len("{}")) + held
		out := startBody(w, r, http.StatusOK, jsonType, size)
		defer out.Close()
		// Pieces are gathered into chunks before they go to the connection:
		// written one by one, a page of small entries costs a system call
		// per 4 KiB (net/http's buffer), twice the CPU of the whole request.
		// With no chunk buffer free, the page goes out piece by piece.
		var chunks io.Writer = out
		if bw, ok := chunkWriters.get(); ok {
			bw.Reset(out)
			chunks = bw
			defer func() {
				bw.Flush()
				bw.Reset(nil)
				chunkWriters.put(bw)
			}()
		}
		for i, it := range page.Items {
			if i > 0 {
				key[0] = ','
			}
			hex.Encode(key[2:34], it.ID[:])
			if _, err := chunks.Write(key); err != nil {
				return nil // the client has gone; the log has the status
			}
			chunks.Write(it.JSON)
		}
		if len(page.Items) == 0 {
			chunks.Write(key[:1]) // {
		}
		key[0] = '}' // the key's bytes, reused: a literal would be allocated
		chunks.Write(key[:1])
		return nil
	}
}

// healthz answers with the build, so "which build is answering?" needs
// nothing more than the health check.
func healthz() apiFunc {
	body, _ := json.Marshal(struct {
		Status string `json:"status"`
		buildInfo
	}{"ok", readBuildInfo()})
	return func(w http.ResponseWriter, r *http.Request) error {
		writeBody(w, r, http.StatusOK, jsonType, body)
		return nil
	}
}

// readyz answers 200 only while the service can do all it promises: not
// shutting down, and the store taking writes.
func readyz(log *slog.Logger, cfg handlerConfig) apiFunc {
	body := []byte(`{"status":"ready"}`)
	return func(w http.ResponseWriter, r *http.Request) error {
		if !cfg.ready.Load() {
			return &httpError{status: http.StatusServiceUnavailable, detail: "the server is shutting down"}
		}
		if err := cfg.storeReady(r.Context()); err != nil {
			// The cause may name a host, a user or a path: the log has it.
			log.WarnContext(r.Context(), "not ready", "err", err)
			return &httpError{status: http.StatusServiceUnavailable, detail: "the store cannot take writes now; the service's log says why"}
		}
		writeBody(w, r, http.StatusOK, jsonType, body)
		return nil
	}
}

// openAPIDoc is the API's contract, served as it is in the repository.
//
//go:embed openapi.json
var openAPIDoc []byte

func openAPI() apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		writeBody(w, r, http.StatusOK, jsonType, openAPIDoc)
		return nil
	}
}

// ---- reading requests -----------------------------------------------------------

// httpError is a failure that belongs to the HTTP layer, with its status.
type httpError struct {
	status     int
	detail     string
	retryAfter int // seconds, sent as Retry-After when above zero
}

func (e *httpError) Error() string { return e.detail }

// pathID reads the {id} wildcard. A malformed id cannot name an entry, so it
// is answered like an unknown one, before it reaches the service.
func pathID(r *http.Request) (ID, error) {
	id, ok := ParseID(r.PathValue("id"))
	if !ok {
		return ID{}, ErrNotFound
	}
	return id, nil
}

func pageQuery(r *http.Request) (limit int, after ID, err error) {
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return 0, ID{}, &httpError{status: http.StatusBadRequest, detail: "the query string is malformed"}
	}
	limit = DefaultPageSize
	if vs, ok := q["limit"]; ok {
		n, err := strconv.Atoi(vs[0])
		if len(vs) > 1 || err != nil || strings.TrimLeft(vs[0], "0123456789") != "" || n < 1 || n > MaxPageSize {
			return 0, ID{}, &httpError{status: http.StatusBadRequest, detail: fmt.Sprintf("limit must be a whole number from 1 to %d", MaxPageSize)}
		}
		limit = n
	}
	if vs, ok := q["after"]; ok {
		var valid bool
		if after, valid = ParseID(vs[0]); len(vs) > 1 || !valid {
			return 0, ID{}, &httpError{status: http.StatusBadRequest, detail: "after must be an id: 32 lowercase hex characters"}
		}
	}
	return limit, after, nil
}

// readJSON reads the request body and decodes it with parse (ParseEntry, or
// another resource's). The body's memory is held against the budget until
// parse is done with it.
func readJSON[T any](w http.ResponseWriter, r *http.Request, cfg handlerConfig, parse func([]byte) (T, error)) (T, error) {
	body, release, err := readBody(w, r, cfg.maxBody, cfg.bodies)
	if err != nil {
		var zero T
		return zero, err
	}
	defer release()
	return parse(body)
}

// readBody returns the decoded request body and the function that gives its
// memory back to bodies. It refuses media types other than JSON (415),
// bodies over maxBody before or after gzip decoding (413: at once when
// Content-Length says so, before any of the body is read), and bodies the
// budget has no room for (503 with Retry-After).
func readBody(w http.ResponseWriter, r *http.Request, maxBody int64, bodies *bodyBudget) ([]byte, func(), error) {
	if ct := r.Header.Get("Content-Type"); ct != "" && !isJSONType(ct) {
		return nil, nil, &httpError{status: http.StatusUnsupportedMediaType, detail: "the body must be JSON: Content-Type application/json"}
	}
	gzipped := false
	switch enc := r.Header.Values("Content-Encoding"); {
	case len(enc) == 0 || len(enc) == 1 && strings.EqualFold(enc[0], "identity"):
	case len(enc) == 1 && (strings.EqualFold(enc[0], "gzip") || strings.EqualFold(enc[0], "x-gzip")):
		gzipped = true
	default:
		return nil, nil, &httpError{status: http.StatusUnsupportedMediaType, detail: "Content-Encoding must be gzip or absent"}
	}
	if r.ContentLength > maxBody {
		return nil, nil, tooLarge(maxBody)
	}
	// The body is read as it arrives, and only then decoded, in memory: so
	// what a slow client holds is what it has sent, never what a few bytes of
	// gzip would expand to.
	body, release, err := readAll(http.MaxBytesReader(w, r.Body, maxBody), r.ContentLength, maxBody, bodies)
	if err != nil || !gzipped {
		return body, release, err
	}
	defer release()
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		return nil, nil, bodyError(err)
	}
	return readAll(zr, -1, maxBody, bodies)
}

// readAll reads src, at most maxBody bytes (413 past them), into a buffer
// that grows as the bytes come, each step taken from the budget before it
// is allocated: a reader holds at most twice what it has read, and firstRead
// before any of it, so a Content-Length promises nothing and headers alone
// cannot reserve the budget. With a known size (Content-Length) the last
// step is exactly that, so a body of up to firstRead takes one allocation.
func readAll(src io.Reader, knownSize, maxBody int64, bodies *bodyBudget) ([]byte, func(), error) {
	end := maxBody + 1 // +1: room to see the end without growing
	if knownSize >= 0 {
		end = min(end, knownSize+1)
	}
	size := min(end, firstRead)
	held := int64(0)
	release := func() { bodies.give(held) }
	var buf []byte
	for {
		if len(buf) == cap(buf) {
			if !bodies.take(size - held) {
				release()
				return nil, nil, busy("reading as many request bodies")
			}
			held = size
			grown := make([]byte, len(buf), size) // exactly size: what was taken
			copy(grown, buf)
			buf = grown
			size = min(2*size, end)
		}
		n, err := src.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > maxBody {
			release()
			return nil, nil, tooLarge(maxBody)
		}
		if err == io.EOF {
			return buf, release, nil
		}
		if err != nil {
			release()
			return nil, nil, bodyError(err)
		}
	}
}

// firstRead is what a request body may reserve before any of it arrives.
const firstRead = 4 << 10

// busy is the 503 a request gets when the budget has no room for it.
func busy(doing string) error {
	return &httpError{status: http.StatusServiceUnavailable, retryAfter: 1,
		detail: "the server is " + doing + " as its memory allows; try again shortly"}
}

// bodyBudget bounds the memory that clients make the process hold in
// flight, across all requests: request bodies being read and list pages
// being sent, so many slow or large uploads or stalled readers at once get
// a 503 rather than the process's memory. Decoding a body costs at most
// about as much again, briefly.
type bodyBudget struct {
	free atomic.Int64
	size int64 // for /metrics
}

func newBodyBudget(bytes int64) *bodyBudget {
	b := &bodyBudget{size: bytes}
	b.free.Store(bytes)
	return b
}

// take reserves n bytes if the budget has them.
func (b *bodyBudget) take(n int64) bool {
	for {
		free := b.free.Load()
		if free < n {
			return false
		}
		if b.free.CompareAndSwap(free, free-n) {
			return true
		}
	}
}

func (b *bodyBudget) give(n int64) { b.free.Add(n) }

func bodyError(err error) error {
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return tooLarge(tooBig.Limit)
	}
	if errors.Is(err, gzip.ErrHeader) || errors.Is(err, gzip.ErrChecksum) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &httpError{status: http.StatusBadRequest, detail: "the body is not valid gzip"}
	}
	return &httpError{status: http.StatusBadRequest, detail: "the body could not be read"}
}

func tooLarge(limit int64) error {
	return &httpError{status: http.StatusRequestEntityTooLarge, detail: fmt.Sprintf("the body must be at most %d bytes", limit)}
}

// isJSONType accepts application/json, in UTF-8: the one request media
// type openapi.json can list.
func isJSONType(contentType string) bool {
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return false
	}
	return mt == "application/json"
}

// ---- preconditions --------------------------------------------------------------

func etag(v Version) string {
	var tag [34]byte
	tag[0], tag[33] = '"', '"'
	hex.Encode(tag[1:33], v[:])
	return string(tag[:])
}

// ifMatch returns the If-Match precondition for the store: nil when absent.
// If-Match compares strongly, so a weak tag never matches.
func ifMatch(r *http.Request) []string {
	values := r.Header.Values("If-Match")
	if values == nil {
		return nil
	}
	tags := []string{}
	for _, tag := range entityTags(values) {
		if tag == "*" || !strings.HasPrefix(tag, "W/") {
			tags = append(tags, strings.Trim(tag, `"`))
		}
	}
	return tags
}

// noneMatch reports whether If-None-Match names version (weak comparison).
func noneMatch(values []string, version Version) bool {
	for _, tag := range entityTags(values) {
		if tag == "*" || version.matches(strings.Trim(strings.TrimPrefix(tag, "W/"), `"`)) {
			return true
		}
	}
	return false
}

func entityTags(values []string) []string {
	var tags []string
	for _, v := range values {
		for _, tag := range strings.Split(v, ",") {
			if tag = strings.TrimSpace(tag); tag != "" {
				tags = append(tags, tag)
			}
		}
	}
	return tags
}

// ---- writing responses ------------------------------------------------------------

// Response headers are set by their canonical key (Etag, X-Request-Id), as
// Header().Set would, so that Get and Set work on them in any middleware,
// without the allocation Set makes for each value. Header names are
// case-insensitive; the wire spelling is not part of the contract.
// Header values shared by every response that uses them; never modified.
var (
	jsonType     = []string{"application/json"}
	problemType  = []string{"application/problem+json"}
	varyEncoding = []string{"Accept-Encoding"}
	gzipEncoding = []string{"gzip"}
)

// gzipMinSize is the smallest body worth compressing.
const gzipMinSize = 1024

// writeBody sets the headers and writes a complete body.
func writeBody(w http.ResponseWriter, r *http.Request, status int, contentType []string, body []byte) {
	out := startBody(w, r, status, contentType, len(body))
	out.Write(body)
	out.Close()
}

// startBody sets the headers for a body of size bytes and sends them; the
// body is then written to what it returns, which must be closed. Every body
// goes out this way, so headers are always set before WriteHeader, and no
// response is ever held whole in memory: it goes to the connection as it is
// written, gzip-encoded (without Content-Length) when it is large enough,
// the client accepts gzip and one of gzipWriters is free.
func startBody(w http.ResponseWriter, r *http.Request, status int, contentType []string, size int) bodyWriter {
	h := w.Header()
	h["Content-Type"] = contentType
	h["Vary"] = varyEncoding
	if size >= gzipMinSize && acceptsGzip(r.Header.Values("Accept-Encoding")) {
		if zw, ok := gzipWriters.get(); ok {
			zw.Reset(w)
			h["Content-Encoding"] = gzipEncoding
			w.WriteHeader(status)
			return bodyWriter{zw, zw}
		} // else all in use, perhaps by slow readers: send it as it is
	}
	h["Content-Length"] = []string{strconv.Itoa(size)}
	w.WriteHeader(status)
	return bodyWriter{w, nil}
}

// bodyWriter is where a body is written: the connection, or a gzip writer
// in front of it.
type bodyWriter struct {
	io.Writer
	zw *gzip.Writer
}

// Close ends a gzip stream and frees its writer for the next response.
func (b bodyWriter) Close() {
	if b.zw != nil {
		b.zw.Close()
		b.zw.Reset(io.Discard) // holds no connection while pooled
		gzipWriters.put(b.zw)
	}
}

// acceptsGzip reads Accept-Encoding: gzip (or *) with a q-value above zero.
func acceptsGzip(values []string) bool {
	for _, v := range values {
		for _, part := range strings.Split(v, ",") {
			coding, params, _ := strings.Cut(part, ";")
			coding = strings.TrimSpace(coding)
			if !strings.EqualFold(coding, "gzip") && coding != "*" {
				continue
			}
			q := strings.TrimSpace(params)
			if q == "" {
				return true
			}
			if name, value, ok := strings.Cut(q, "="); ok && strings.EqualFold(strings.TrimSpace(name), "q") {
				f, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
				return err == nil && f > 0
			}
			return true
		}
	}
	return false
}

// scarce hands out at most a fixed number of costly values at once. A
// response may hold one for as long as its client takes to read it, up to
// the write timeout, so a few slow readers could otherwise make the process
// hold one per connection; past the limit a response does without: it goes
// out uncompressed, or unbuffered.
type scarce[T any] struct {
	slots chan struct{}
	pool  sync.Pool
}

func newScarce[T any](limit int, newValue func() T) *scarce[T] {
	return &scarce[T]{slots: make(chan struct{}, limit), pool: sync.Pool{New: func() any { return newValue() }}}
}

// get returns a value, or false when all of them are in use.
func (s *scarce[T]) get() (T, bool) {
	select {
	case s.slots <- struct{}{}:
		return s.pool.Get().(T), true
	default:
		var none T
		return none, false
	}
}

func (s *scarce[T]) put(v T) {
	s.pool.Put(v)
	<-s.slots
}

// A gzip writer holds about 1.2 MiB (measured: flate's tables): 16 keep
// both cores of a small machine busy compressing, at most 19 MiB. A list
// page gathers 64 KiB before writing (smaller chunks cost throughput and
// tail latency: docs/performance.md): 64 of those are 4 MiB.
var (
	gzipWriters = newScarce(16, func() *gzip.Writer {
		zw, _ := gzip.NewWriterLevel(io.Discard, gzip.BestSpeed)
		return zw
	})
	chunkWriters = newScarce(64, func() *bufio.Writer { return bufio.NewWriterSize(nil, 64<<10) })
)

// problem is an RFC 9457 problem details body.
type problem struct {
	Type      string       `json:"type"`
	Title     string       `json:"title"`
	Status    int          `json:"status"`
	Detail    string       `json:"detail,omitempty"`
	Instance  string       `json:"instance"`
	RequestID string       `json:"request_id"`
	Errors    []FieldError `json:"errors,omitempty"`
	More      int          `json:"more_errors,omitempty"` // errors past those listed
}

func writeProblem(w http.ResponseWriter, r *http.Request, status int, detail string, fields []FieldError, more int) {
	body, _ := json.Marshal(problem{
		Type:      "about:blank",
		Title:     http.StatusText(status),
		Status:    status,
		Detail:    detail,
		Instance:  r.URL.EscapedPath(),
		RequestID: requestID(r.Context()),
		Errors:    fields,
		More:      more,
	})
	writeBody(w, r, status, problemType, body)
}

// writeError is the one place that maps errors to statuses. Anything it does
// not recognise is a 500 whose cause goes to the log, never to the client.
func writeError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	var invalid *InvalidError
	var httpErr *httpError
	switch {
	case errors.As(err, &invalid):
		writeProblem(w, r, http.StatusBadRequest, invalid.Detail, invalid.Fields, invalid.More)
	case errors.As(err, &httpErr):
		if httpErr.retryAfter > 0 {
			w.Header()["Retry-After"] = []string{strconv.Itoa(httpErr.retryAfter)}
		}
		writeProblem(w, r, httpErr.status, httpErr.detail, nil, 0)
	case errors.Is(err, ErrNotFound):
		writeProblem(w, r, http.StatusNotFound, ErrNotFound.Error(), nil, 0)
	case errors.Is(err, ErrPreconditionFailed):
		writeProblem(w, r, http.StatusPreconditionFailed, ErrPreconditionFailed.Error(), nil, 0)
	case errors.Is(err, ErrExists):
		writeProblem(w, r, http.StatusPreconditionFailed, ErrExists.Error(), nil, 0)
	case errors.Is(err, ErrStoreFull):
		writeProblem(w, r, http.StatusInsufficientStorage, ErrStoreFull.Error(), nil, 0)
	case errors.Is(err, ErrUnavailable):
		// The sentinel's words only: the wrapped cause may name a host.
		log.WarnContext(r.Context(), "store unavailable", "err", err)
		w.Header()["Retry-After"] = []string{"1"}
		writeProblem(w, r, http.StatusServiceUnavailable, ErrUnavailable.Error(), nil, 0)
	default:
		log.ErrorContext(r.Context(), "request failed", "err", err)
		writeProblem(w, r, http.StatusInternalServerError, "the server could not complete the request", nil, 0)
	}
}

// ---- middleware ---------------------------------------------------------------

type requestIDKey struct{}

// requestID returns the id of the request that ctx belongs to, or "".
func requestID(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// withRequestID keeps a well-formed X-Request-ID or makes a new one, echoes
// it, and puts it in the request's context for the handlers and the logs.
func withRequestID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("X-Request-Id")
		if !validRequestID(id) {
			id = newRequestID()
		}
		w.Header()["X-Request-Id"] = []string{id}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), requestIDKey{}, id)))
	})
}

func validRequestID(id string) bool {
	if len(id) < 1 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// newRequestID returns 32 hex characters: 64 random bits fixed per process,
// so ids from different instances do not collide, then a counter, so each
// id costs an increment rather than a call for random bytes (which cost 5%
// of a GET's CPU; see docs/performance.md).
func newRequestID() string {
	var b [32]byte
	binary.BigEndian.PutUint64(b[16:], requestIDPrefix)
	binary.BigEndian.PutUint64(b[24:], requestIDCounter.Add(1))
	hex.Encode(b[:], b[16:])
	return string(b[:])
}

var (
	requestIDPrefix  = func() uint64 { var b [8]byte; rand.Read(b[:]); return binary.BigEndian.Uint64(b[:]) }()
	requestIDCounter atomic.Uint64
)

// closeAfterTransferEncoding closes the connection after answering a
// request framed by Transfer-Encoding. RFC 9112 (6.1) requires it when the
// request also had Content-Length, a sign of request smuggling, and net/http
// drops that header before a handler can see it; this API's clients send
// Content-Length, so closing after every chunked request costs them nothing.
func closeAfterTransferEncoding(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.TransferEncoding) > 0 {
			w.Header().Set("Connection", "close")
		}
		next.ServeHTTP(w, r)
	})
}

// statusWriter remembers what was sent, for the request log.
type statusWriter struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (w *statusWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// logRequests counts every request in m and writes one line per request
// when it ends: INFO below 400, WARN for 4xx, ERROR for 5xx. A valid W3C
// traceparent puts its trace and span ids in the line, so that it joins the
// trace of whatever called the service.
func logRequests(log *slog.Logger, m *httpMetrics, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		m.active.Add(1)
		defer m.active.Add(-1) // also when a handler aborts the response
		sw := &statusWriter{ResponseWriter: w}
		next.ServeHTTP(sw, r)
		end := time.Now()
		m.observe(r.Pattern, r.Method, sw.status, end.Sub(start), sw.bytes)
		level := slog.LevelInfo
		switch {
		case sw.status >= 500:
			level = slog.LevelError
		case sw.status >= 400:
			level = slog.LevelWarn
		}
		if !log.Enabled(r.Context(), level) {
			return
		}
		// Built by hand rather than with log.LogAttrs, which spends more
		// time finding the caller's source line than the record is worth.
		rec := slog.NewRecord(end, level, "request", 0)
		rec.AddAttrs(
			slog.String("method", r.Method),
			slog.String("path", r.URL.Path),
			slog.String("route", r.Pattern),
			slog.Int("status", sw.status),
			slog.Int64("bytes", sw.bytes),
			slog.Duration("duration", end.Sub(start)),
			slog.String("remote", r.RemoteAddr),
		)
		if trace, span, ok := parseTraceparent(r.Header["Traceparent"]); ok {
			rec.AddAttrs(slog.String("trace_id", trace), slog.String("span_id", span))
		}
		log.Handler().Handle(r.Context(), rec)
	})
}

// parseTraceparent reads a W3C Trace Context traceparent header,
// version-traceid-parentid-flags, and returns its trace id and its parent
// (the caller's span) id. It accepts a later version's longer form as the
// spec asks, reading its first four fields; anything malformed is ignored.
func parseTraceparent(values []string) (traceID, spanID string, ok bool) {
	if len(values) != 1 || len(values[0]) < 55 {
		return "", "", false
	}
	v := values[0]
	switch {
	case v[:2] == "ff", v[:2] == "00" && len(v) != 55, len(v) > 55 && v[55] != '-',
		v[2] != '-' || v[35] != '-' || v[52] != '-',
		!lowerHex(v[:2]) || !lowerHex(v[3:35]) || !lowerHex(v[36:52]) || !lowerHex(v[53:55]),
		v[3:35] == "00000000000000000000000000000000", v[36:52] == "0000000000000000":
		return "", "", false
	}
	return v[3:35], v[36:52], true
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// recoverPanics turns a panic in a handler into a 500 problem and a logged
// stack, and keeps the server serving.
func recoverPanics(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler { // the handler asked to drop the connection
				panic(v)
			}
			log.ErrorContext(r.Context(), "panic in handler", "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			if sw, ok := w.(*statusWriter); ok && sw.status != 0 {
				panic(http.ErrAbortHandler) // the response has begun; cut it off
			}
			writeProblem(w, r, http.StatusInternalServerError, "the server could not complete the request", nil, 0)
		}()
		next.ServeHTTP(w, r)
	})
}

// problemsFromMux turns every answer the mux gives by itself into a
// problem: its plain-text 404 and 405 (Allow is already set), its 400 for
// "OPTIONS *", and the redirects its path cleaning sends for a path such as
// //addresses or /addresses/./x, which become a 404: a path the contract
// does not list, and a redirect a client would follow with its POST again.
func problemsFromMux(mux http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mux.ServeHTTP(&muxErrorWriter{ResponseWriter: w, r: r}, r)
	})
}

type muxErrorWriter struct {
	http.ResponseWriter
	r        *http.Request
	replaced bool
}

func (w *muxErrorWriter) WriteHeader(status int) {
	// The mux sets r.Pattern before calling any handler; it is empty when
	// the mux answers by itself, except on a redirect, which no handler
	// here sends.
	redirect := status >= 300 && status < 400 && status != http.StatusNotModified
	if w.r.Pattern == "" || redirect {
		w.replaced = true
		h := w.Header()
		h.Del("X-Content-Type-Options")
		h.Del("Location")
		if status != http.StatusMethodNotAllowed {
			writeProblem(w.ResponseWriter, w.r, http.StatusNotFound, "no resource at this path", nil, 0)
			return
		}
		writeProblem(w.ResponseWriter, w.r, status, "this path does not support "+w.r.Method+"; see the Allow header", nil, 0)
		return
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *muxErrorWriter) Write(p []byte) (int, error) {
	if w.replaced { // the mux's own body; the problem is already written
		return len(p), nil
	}
	return w.ResponseWriter.Write(p)
}

func (w *muxErrorWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// ---- metrics --------------------------------------------------------------------

// httpMetrics counts what the service answers, by route, method and status,
// as OpenTelemetry's http.server.request.duration does. Every series exists
// before the first request, so counting one is a map read and three atomic
// adds: no lock, no allocation.
type httpMetrics struct {
	routes    map[string]*routeSeries // by mux pattern; filled by newHandler, before serving
	unmatched routeSeries             // the mux's own 404s and 405s: no http_route, as OpenTelemetry leaves it off
	active    atomic.Int64
}

func newHTTPMetrics() *httpMetrics {
	return &httpMetrics{routes: map[string]*routeSeries{}}
}

// The label values each route has series for; anything else counts as
// _OTHER, so a client cannot grow the label set.
var (
	metricMethods  = [...]string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "_OTHER"}
	metricStatuses = [...]int{200, 201, 204, 304, 400, 404, 405, 412, 413, 415, 500, 503, 507}
	// From tens of microseconds, a GET from memory, to the 30 s the
	// server's write timeout allows.
	durationBuckets = [...]time.Duration{25 * time.Microsecond, 50 * time.Microsecond, 100 * time.Microsecond,
		250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
		10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
		500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second, 30 * time.Second}
)

type routeSeries struct {
	route  string // the pattern's path, as openapi.json writes it
	series [len(metricMethods)][len(metricStatuses) + 1]requestSeries
}

type requestSeries struct {
	buckets [len(durationBuckets) + 1]atomic.Uint64 // not cumulative; the last is above every bound
	nanos   atomic.Uint64
	bytes   atomic.Uint64
}

// routeTable registers each route on the mux and its series in m.
type routeTable struct {
	mux *http.ServeMux
	m   *httpMetrics
}

func (t routeTable) Handle(pattern string, h http.Handler) {
	t.mux.Handle(pattern, h)
	_, path, _ := strings.Cut(pattern, " ")
	t.m.routes[pattern] = &routeSeries{route: path}
}

// observe counts one request; pattern is the one the mux matched, or "".
func (m *httpMetrics) observe(pattern, method string, status int, d time.Duration, bytes int64) {
	rs, ok := m.routes[pattern]
	if !ok {
		rs = &m.unmatched
	}
	mi := len(metricMethods) - 1
	for i, name := range metricMethods[:mi] {
		if name == method {
			mi = i
			break
		}
	}
	if status == 0 { // nothing written: net/http sends 200
		status = http.StatusOK
	}
	si := len(metricStatuses)
	for i, code := range metricStatuses {
		if code == status {
			si = i
			break
		}
	}
	bucket := 0
	for bucket < len(durationBuckets) && d > durationBuckets[bucket] {
		bucket++
	}
	s := &rs.series[mi][si]
	s.buckets[bucket].Add(1)
	s.nanos.Add(uint64(d))
	s.bytes.Add(uint64(bytes))
}

// writeTo writes the HTTP metrics in the Prometheus text format.
func (m *httpMetrics) writeTo(w io.Writer) {
	routes := []*routeSeries{&m.unmatched}
	for _, pattern := range slices.Sorted(maps.Keys(m.routes)) {
		routes = append(routes, m.routes[pattern])
	}
	type seen struct {
		labels string
		bytes  uint64
	}
	var written []seen
	fmt.Fprint(w, "# HELP http_server_request_duration_seconds Duration of HTTP server requests.\n# TYPE http_server_request_duration_seconds histogram\n")
	for _, rs := range routes {
		for mi, method := range metricMethods {
			for si := range rs.series[mi] {
				s := &rs.series[mi][si]
				var counts [len(durationBuckets) + 1]uint64
				var total uint64
				for i := range counts {
					counts[i] = s.buckets[i].Load()
					total += counts[i]
				}
				if total == 0 {
					continue
				}
				status := "_OTHER"
				if si < len(metricStatuses) {
					status = strconv.Itoa(metricStatuses[si])
				}
				labels := fmt.Sprintf(`http_request_method="%s",http_response_status_code="%s"`, method, status)
				if rs != &m.unmatched {
					labels += fmt.Sprintf(`,http_route="%s"`, rs.route)
				}
				var cumulative uint64
				for i, bound := range durationBuckets {
					cumulative += counts[i]
					fmt.Fprintf(w, "http_server_request_duration_seconds_bucket{%s,le=\"%s\"} %d\n", labels, formatFloat(bound.Seconds()), cumulative)
				}
				fmt.Fprintf(w, "http_server_request_duration_seconds_bucket{%s,le=\"+Inf\"} %d\n", labels, total)
				fmt.Fprintf(w, "http_server_request_duration_seconds_sum{%s} %s\n", labels, formatFloat(time.Duration(s.nanos.Load()).Seconds()))
				fmt.Fprintf(w, "http_server_request_duration_seconds_count{%s} %d\n", labels, total)
				written = append(written, seen{labels, s.bytes.Load()})
			}
		}
	}
	fmt.Fprint(w, "# HELP http_server_response_body_bytes_total Bytes of HTTP response bodies, as sent (after gzip).\n# TYPE http_server_response_body_bytes_total counter\n")
	for _, s := range written {
		fmt.Fprintf(w, "http_server_response_body_bytes_total{%s} %d\n", s.labels, s.bytes)
	}
	writeMetric(w, "http_server_active_requests", "gauge", "HTTP requests being served.", float64(m.active.Load()))
}

// writeMetric writes a metric of one series without labels, with its HELP
// and TYPE lines.
func writeMetric(w io.Writer, name, kind, help string, value float64) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %s\n", name, help, name, kind, name, formatFloat(value))
}

func formatFloat(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }

// metricsType is the Prometheus text exposition format's content type.
var metricsType = []string{"text/plain; version=0.0.4; charset=utf-8"}

// serveMetrics answers GET /metrics: the HTTP layer's metrics, the body
// budget's, then the process's own (cfg.moreMetrics).
func serveMetrics(cfg handlerConfig) apiFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		buf := new(bytes.Buffer) // a scrape every few seconds: no pool needed
		cfg.metrics.writeTo(buf)
		size, free := cfg.bodies.size, cfg.bodies.free.Load()
		writeMetric(buf, "addrservice_body_budget_used_bytes", "gauge", "Memory held by request bodies being read and pages being sent (-max-body-memory).", float64(size-free))
		writeMetric(buf, "addrservice_body_budget_limit_bytes", "gauge", "Memory request bodies and pages may hold at once (-max-body-memory).", float64(size))
		if cfg.moreMetrics != nil {
			cfg.moreMetrics(buf)
		}
		writeBody(w, r, http.StatusOK, metricsType, buf.Bytes())
		return nil
	}
}
