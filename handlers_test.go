package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// testMaxBody is small so that the 413 rows need only small bodies.
const testMaxBody = 4096

type testServer struct {
	*httptest.Server
	logs  *syncBuffer
	ready *atomic.Bool
}

// newTestServer serves the real handler over httptest with JSON logs kept
// for inspection.
func newTestServer(t *testing.T) *testServer {
	t.Helper()
	return newTestServerOn(t, NewMapStore(0))
}

// newTestServerOn is newTestServer with the given store.
func newTestServerOn(t *testing.T, store Store) *testServer {
	t.Helper()
	return newTestServerWith(t, store, time.Second, func(*handlerConfig) {})
}

// newTestServerWith is newTestServerOn with a store timeout of the test's
// own, and the handlers' configuration (testConfig) changed by change.
func newTestServerWith(t *testing.T, store Store, storeTimeout time.Duration, change func(*handlerConfig)) *testServer {
	t.Helper()
	logs := &syncBuffer{}
	log := newLogger(logs, "json", slog.LevelDebug)
	ready := new(atomic.Bool)
	ready.Store(true)
	cfg := testConfig(store, ready)
	change(&cfg)
	svc := NewCollection[Entry](store, log, storeTimeout)
	srv := httptest.NewServer(newHandler(log, resources{book: svc}, cfg))
	t.Cleanup(srv.Close)
	return &testServer{Server: srv, logs: logs, ready: ready}
}

// testConfig is the handlers' configuration in tests: a small -max-body, a
// budget for four such bodies at once.
func testConfig(store Store, ready *atomic.Bool) handlerConfig {
	return handlerConfig{maxBody: testMaxBody, bodies: newBodyBudget(4 * (testMaxBody + 1)), ready: ready, storeReady: readiness(0, store), metrics: newHTTPMetrics()}
}

// syncBuffer is a bytes.Buffer safe for the server's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// request is one HTTP request in a test; header values are set as given.
type request struct {
	method string
	path   string
	body   string
	header map[string]string
}

type response struct {
	status int
	header http.Header
	body   []byte
}

// noDecompression leaves gzip to the tests, which check it themselves.
var noDecompression = &http.Client{Transport: &http.Transport{DisableCompression: true}}

func (s *testServer) do(t *testing.T, req request) response {
	t.Helper()
	var body io.Reader
	if req.body != "" {
		body = strings.NewReader(req.body)
	}
	r, err := http.NewRequest(req.method, s.URL+req.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if req.body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	for k, v := range req.header {
		if v == "" {
			r.Header.Del(k)
		} else {
			r.Header.Set(k, v)
		}
	}
	res, err := noDecompression.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return response{status: res.StatusCode, header: res.Header, body: b}
}

// create posts an entry and returns its id and ETag.
func (s *testServer) create(t *testing.T, body string) (id, etag string) {
	t.Helper()
	res := s.do(t, request{method: "POST", path: "/addresses", body: body})
	if res.status != http.StatusCreated {
		t.Fatalf("POST: status %d, body %s", res.status, res.body)
	}
	return strings.TrimPrefix(res.header.Get("Location"), "/addresses/"), res.header.Get("ETag")
}

type problemBody struct {
	Type      string       `json:"type"`
	Title     string       `json:"title"`
	Status    int          `json:"status"`
	Detail    string       `json:"detail"`
	Instance  string       `json:"instance"`
	RequestID string       `json:"request_id"`
	Errors    []FieldError `json:"errors"`
	More      int          `json:"more_errors"`
}

// checkProblem asserts an RFC 9457 body that agrees with the response.
func checkProblem(t *testing.T, res response, status int, path string) problemBody {
	t.Helper()
	if res.status != status {
		t.Fatalf("status %d, want %d; body %s", res.status, status, res.body)
	}
	if ct := res.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("Content-Type %q, want application/problem+json", ct)
	}
	var p problemBody
	dec := json.NewDecoder(bytes.NewReader(res.body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		t.Fatalf("problem body %s: %v", res.body, err)
	}
	want := problemBody{Type: "about:blank", Title: http.StatusText(status), Status: status, Instance: path,
		RequestID: res.header.Get("X-Request-ID"), Detail: p.Detail, Errors: p.Errors, More: p.More}
	if fmt.Sprint(p) != fmt.Sprint(want) {
		t.Errorf("problem\n got %+v\nwant %+v", p, want)
	}
	if p.Detail == "" || p.RequestID == "" {
		t.Errorf("problem lacks detail or request_id: %s", res.body)
	}
	for _, leak := range []string{"goroutine", ".go:", "runtime.", "json:", "strconv."} {
		if bytes.Contains(res.body, []byte(leak)) {
			t.Errorf("problem leaks internals (%q): %s", leak, res.body)
		}
	}
	return p
}

// TestCRUDSession is the tutorial's end-to-end session through every endpoint.
func TestCRUDSession(t *testing.T) {
	s := newTestServer(t)

	res := s.do(t, request{method: "POST", path: "/addresses", body: validEntry})
	if res.status != http.StatusCreated {
		t.Fatalf("POST: %d %s", res.status, res.body)
	}
	loc := res.header.Get("Location")
	if !regexp.MustCompile(`^/addresses/[0-9a-f]{32}$`).MatchString(loc) {
		t.Fatalf("Location %q is not /addresses/{32 hex}", loc)
	}
	tag := res.header.Get("ETag")
	if !regexp.MustCompile(`^"[0-9a-f]{32}"$`).MatchString(tag) {
		t.Errorf("ETag %q is not a strong quoted tag", tag)
	}
	if string(res.body) != validEntry || res.header.Get("Content-Type") != "application/json" {
		t.Errorf("POST body %s (%s), want the stored entry as JSON", res.body, res.header.Get("Content-Type"))
	}

	res = s.do(t, request{method: "GET", path: loc})
	if res.status != http.StatusOK || string(res.body) != validEntry || res.header.Get("ETag") != tag {
		t.Errorf("GET: %d %s ETag %s", res.status, res.body, res.header.Get("ETag"))
	}

	id := strings.TrimPrefix(loc, "/addresses/")
	res = s.do(t, request{method: "GET", path: "/addresses"})
	if want := `{"` + id + `":` + validEntry + `}`; res.status != http.StatusOK || string(res.body) != want {
		t.Errorf("GET /addresses: %d %s, want %s", res.status, res.body, want)
	}

	updated := strings.Replace(validEntry, "Ada Lovelace", "Augusta Ada King", 1)
	res = s.do(t, request{method: "PUT", path: loc, body: updated, header: map[string]string{"If-Match": tag}})
	if res.status != http.StatusNoContent || len(res.body) != 0 {
		t.Fatalf("PUT: %d %s", res.status, res.body)
	}
	newTag := res.header.Get("ETag")
	if newTag == "" || newTag == tag {
		t.Errorf("PUT ETag %q, want a new one (old %q)", newTag, tag)
	}
	res = s.do(t, request{method: "GET", path: loc})
	if string(res.body) != updated || res.header.Get("ETag") != newTag {
		t.Errorf("GET after PUT: %s ETag %s", res.body, res.header.Get("ETag"))
	}

	res = s.do(t, request{method: "DELETE", path: loc, header: map[string]string{"If-Match": newTag}})
	if res.status != http.StatusNoContent || len(res.body) != 0 {
		t.Fatalf("DELETE: %d %s", res.status, res.body)
	}
	checkProblem(t, s.do(t, request{method: "GET", path: loc}), http.StatusNotFound, loc)
	checkProblem(t, s.do(t, request{method: "DELETE", path: loc}), http.StatusNotFound, loc)
	if res = s.do(t, request{method: "GET", path: "/addresses"}); string(res.body) != "{}" {
		t.Errorf("empty list: %s, want {}", res.body)
	}
}

// TestSampleEntriesRoundTrip: each sample in testdata comes back byte for byte.
func TestSampleEntriesRoundTrip(t *testing.T) {
	s := newTestServer(t)
	for name, body := range sampleEntries(t) {
		res := s.do(t, request{method: "POST", path: "/addresses", body: string(body)})
		if res.status != http.StatusCreated || !bytes.Equal(res.body, body) {
			t.Errorf("%s: POST %d\n got %s\nwant %s", name, res.status, res.body, body)
			continue
		}
		res = s.do(t, request{method: "GET", path: res.header.Get("Location")})
		if !bytes.Equal(res.body, body) {
			t.Errorf("%s: GET\n got %s\nwant %s", name, res.body, body)
		}
	}
}

func gzipped(s string) string {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write([]byte(s))
	zw.Close()
	return b.String()
}

// TestErrorRows drives each error row of the contract and checks the problem.
func TestErrorRows(t *testing.T) {
	s := newTestServer(t)
	id, tag := s.create(t, validEntry)
	entry := "/addresses/" + id
	unknown := "/addresses/0123456789abcdef0123456789abcdef"
	bigName := `{"full_name":"` + strings.Repeat("a", testMaxBody) + `"}`
	json := map[string]string{"Content-Type": "application/json"}
	tests := []struct {
		name       string
		req        request
		status     int
		wantFields bool
		allow      string
	}{
		{"body not JSON", request{method: "POST", path: "/addresses", body: "full_name=Ada"}, 400, false, ""},
		{"body truncated", request{method: "POST", path: "/addresses", body: `{"full_name":"Ada"`}, 400, false, ""},
		{"body null", request{method: "POST", path: "/addresses", body: `null`}, 400, false, ""},
		{"body an array", request{method: "POST", path: "/addresses", body: `[]`}, 400, false, ""},
		{"body a string", request{method: "POST", path: "/addresses", body: `"s"`}, 400, false, ""},
		{"body with trailing data", request{method: "POST", path: "/addresses", body: `{"full_name":"Ada"}{}`}, 400, false, ""},
		{"body empty", request{method: "POST", path: "/addresses", header: json}, 400, false, ""},
		{"body invalid UTF-8", request{method: "POST", path: "/addresses", body: "{\"full_name\":\"\xc0\"}"}, 400, false, ""},
		{"body fails validation", request{method: "POST", path: "/addresses", body: `{"full_name":""}`}, 400, true, ""},
		{"unknown field", request{method: "POST", path: "/addresses", body: `{"full_name":"A","id":"x"}`}, 400, true, ""},
		{"case-variant key", request{method: "POST", path: "/addresses", body: `{"FULL_NAME":"A"}`}, 400, true, ""},
		{"duplicate key", request{method: "POST", path: "/addresses", body: `{"full_name":"A","full_name":"A"}`}, 400, true, ""},
		{"PUT fails validation", request{method: "PUT", path: entry, body: `{"full_name":5}`}, 400, true, ""},
		{"body over max-body", request{method: "POST", path: "/addresses", body: bigName}, 413, false, ""},
		{"body over max-body after gzip decoding", request{method: "POST", path: "/addresses", body: gzipped(bigName), header: map[string]string{"Content-Encoding": "gzip"}}, 413, false, ""},
		{"body not gzip though it says so", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Encoding": "gzip"}}, 400, false, ""},
		{"gzip body truncated", request{method: "POST", path: "/addresses", body: gzipped(validEntry)[:30], header: map[string]string{"Content-Encoding": "gzip"}}, 400, false, ""},
		{"unsupported content coding", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Encoding": "br"}}, 415, false, ""},
		{"Content-Type text/plain", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Type": "text/plain"}}, 415, false, ""},
		{"Content-Type form", request{method: "PUT", path: entry, body: validEntry, header: map[string]string{"Content-Type": "application/x-www-form-urlencoded"}}, 415, false, ""},
		{"Content-Type JSON in Latin-1", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Type": "application/json; charset=iso-8859-1"}}, 415, false, ""},
		{"Content-Type malformed", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Type": "application/"}}, 415, false, ""},
		{"Content-Type a +json type openapi.json cannot list", request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Type": "application/vnd.addrservice+json"}}, 415, false, ""},
		{"unknown id", request{method: "GET", path: unknown}, 404, false, ""},
		{"PUT unknown id", request{method: "PUT", path: unknown, body: validEntry}, 404, false, ""},
		{"DELETE unknown id", request{method: "DELETE", path: unknown}, 404, false, ""},
		{"If-Match on unknown id", request{method: "PUT", path: unknown, body: validEntry, header: map[string]string{"If-Match": "*"}}, 404, false, ""},
		{"id in capitals", request{method: "GET", path: "/addresses/" + strings.ToUpper(id)}, 404, false, ""},
		{"id too short", request{method: "GET", path: entry[:len(entry)-1]}, 404, false, ""},
		{"id with encoded traversal", request{method: "GET", path: "/addresses/..%2F..%2Fetc%2Fpasswd"}, 404, false, ""},
		{"id of encoded dots", request{method: "DELETE", path: "/addresses/%2e%2e"}, 404, false, ""},
		{"id with encoded slash", request{method: "PUT", path: "/addresses/a%2Fb", body: validEntry}, 404, false, ""},
		{"path below an entry", request{method: "GET", path: entry + "/x"}, 404, false, ""},
		{"unknown path", request{method: "GET", path: "/nope"}, 404, false, ""},
		{"root", request{method: "GET", path: "/"}, 404, false, ""},
		// net/http's path cleaning would redirect these; a redirected POST is sent again.
		{"doubled slash, not redirected", request{method: "GET", path: "//addresses"}, 404, false, ""},
		{"doubled slash on POST, not redirected", request{method: "POST", path: "//addresses", body: validEntry}, 404, false, ""},
		{"dot segment, not redirected", request{method: "GET", path: "/addresses/./" + id}, 404, false, ""},
		{"dot-dot segment, not redirected", request{method: "GET", path: "/addresses/../healthz"}, 404, false, ""},
		{"trailing slash on the collection", request{method: "GET", path: "/addresses/"}, 404, false, ""},
		{"trailing slash on POST", request{method: "POST", path: "/addresses/", body: validEntry}, 404, false, ""},
		{"doubled trailing slash", request{method: "GET", path: "/addresses//"}, 404, false, ""},
		{"wrong method on the collection", request{method: "PATCH", path: "/addresses"}, 405, false, "GET, HEAD, POST"},
		{"wrong method on an entry", request{method: "POST", path: entry, body: validEntry}, 405, false, "DELETE, GET, HEAD, PUT"},
		{"wrong method on healthz", request{method: "DELETE", path: "/healthz"}, 405, false, "GET, HEAD"},
		{"If-Match mismatch on PUT", request{method: "PUT", path: entry, body: validEntry, header: map[string]string{"If-Match": `"0123"`}}, 412, false, ""},
		{"weak If-Match never matches", request{method: "PUT", path: entry, body: validEntry, header: map[string]string{"If-Match": "W/" + tag}}, 412, false, ""},
		{"If-Match mismatch on DELETE", request{method: "DELETE", path: entry, header: map[string]string{"If-Match": `"0123"`}}, 412, false, ""},
	}
	for _, q := range []string{"limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=+5", "limit=1.0", "limit=", "limit=%201",
		"limit=99999999999999999999", "limit=1&limit=2", "after=xyz", "after=" + strings.ToUpper(id), "after=", "after=%zz"} {
		tests = append(tests, struct {
			name       string
			req        request
			status     int
			wantFields bool
			allow      string
		}{"bad query " + q, request{method: "GET", path: "/addresses?" + q}, 400, false, ""})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := s.do(t, tt.req)
			path := tt.req.path
			if i := strings.IndexByte(path, '?'); i >= 0 {
				path = path[:i]
			}
			p := checkProblem(t, res, tt.status, path)
			if tt.wantFields != (len(p.Errors) > 0) {
				t.Errorf("errors %v, want fields: %v", p.Errors, tt.wantFields)
			}
			if got := res.header.Get("Allow"); got != tt.allow {
				t.Errorf("Allow %q, want %q", got, tt.allow)
			}
		})
	}
	// None of it changed the entry.
	if res := s.do(t, request{method: "GET", path: entry}); string(res.body) != validEntry || res.header.Get("ETag") != tag {
		t.Errorf("entry changed by failed requests: %s", res.body)
	}
}

func TestValidationProblemNamesEveryField(t *testing.T) {
	s := newTestServer(t)
	body := `{"full_name":"","addresses":[{"kind":"home","street_name":"s","pincode":1,"country":"c"},{"kind":"home","street_name":"s","country":"c"}],"emails":[{"kind":"x","email":"a@b.c"}]}`
	p := checkProblem(t, s.do(t, request{method: "POST", path: "/addresses", body: body}), 400, "/addresses")
	want := []FieldError{{"full_name", "must not be blank"}, {"addresses[1].pincode", "is required"}, {"emails[0].kind", `must be "home" or "work"`}}
	if fmt.Sprint(p.Errors) != fmt.Sprint(want) {
		t.Errorf("errors %v, want %v", p.Errors, want)
	}
}

func TestAcceptedRequestBodies(t *testing.T) {
	s := newTestServer(t)
	tests := []struct {
		name   string
		header map[string]string
		body   string
	}{
		{"no Content-Type", map[string]string{"Content-Type": ""}, validEntry},
		{"application/json with charset", map[string]string{"Content-Type": "application/json; charset=UTF-8"}, validEntry},
		{"gzip", map[string]string{"Content-Encoding": "gzip"}, gzipped(validEntry)},
		{"exactly max-body", nil, `{"full_name":"A"}` + strings.Repeat(" ", testMaxBody-17)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := s.do(t, request{method: "POST", path: "/addresses", body: tt.body, header: tt.header})
			if res.status != http.StatusCreated {
				t.Errorf("status %d, body %s", res.status, res.body)
			}
		})
	}
}

func TestListPagination(t *testing.T) {
	s := newTestServer(t)
	var ids []string
	for i := range 7 {
		id, _ := s.create(t, fmt.Sprintf(`{"full_name":"n%d"}`, i))
		ids = append(ids, id)
	}
	var got []string
	path := "/addresses?limit=3"
	for pages := 0; path != ""; pages++ {
		res := s.do(t, request{method: "GET", path: path})
		if res.status != 200 {
			t.Fatalf("GET %s: %d", path, res.status)
		}
		var page map[string]json.RawMessage
		if err := json.Unmarshal(res.body, &page); err != nil {
			t.Fatal(err)
		}
		// Keys must come in id order in the body itself.
		keys := regexp.MustCompile(`"([0-9a-f]{32})":\{`).FindAllStringSubmatch(string(res.body), -1)
		for _, k := range keys {
			got = append(got, k[1])
		}
		if len(keys) != len(page) {
			t.Fatalf("page %s: %d keys found, %d in the object", path, len(keys), len(page))
		}
		path = ""
		if link := res.header.Get("Link"); link != "" {
			m := regexp.MustCompile(`^<(/addresses\?limit=3&after=[0-9a-f]{32})>; rel="next"$`).FindStringSubmatch(link)
			if m == nil {
				t.Fatalf("Link %q", link)
			}
			path = m[1]
		}
		if pages > 5 {
			t.Fatal("pagination does not end")
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(ids) {
		t.Errorf("pages gave\n%v\nwant\n%v", got, ids)
	}

	// after need not exist; the default limit is 100.
	res := s.do(t, request{method: "GET", path: "/addresses?after=00000000000000000000000000000000"})
	if res.status != 200 || strings.Count(string(res.body), `"full_name"`) != 7 || res.header.Get("Link") != "" {
		t.Errorf("GET /addresses?after=0…0: %d %s Link %q", res.status, res.body, res.header.Get("Link"))
	}
	for i := 7; i < 101; i++ {
		s.create(t, `{"full_name":"more"}`)
	}
	res = s.do(t, request{method: "GET", path: "/addresses"})
	if n := strings.Count(string(res.body), `"full_name"`); n != 100 || !strings.Contains(res.header.Get("Link"), "limit=100&after=") {
		t.Errorf("default page: %d entries, Link %q", n, res.header.Get("Link"))
	}
}

func TestConditionalRequests(t *testing.T) {
	s := newTestServer(t)
	id, tag := s.create(t, validEntry)
	path := "/addresses/" + id
	tests := []struct {
		name   string
		req    request
		status int
	}{
		{"If-None-Match current", request{method: "GET", path: path, header: map[string]string{"If-None-Match": tag}}, 304},
		{"If-None-Match weak form of current", request{method: "GET", path: path, header: map[string]string{"If-None-Match": "W/" + tag}}, 304},
		{"If-None-Match in a list", request{method: "GET", path: path, header: map[string]string{"If-None-Match": `"x", ` + tag}}, 304},
		{"If-None-Match star", request{method: "GET", path: path, header: map[string]string{"If-None-Match": "*"}}, 304},
		{"If-None-Match other", request{method: "GET", path: path, header: map[string]string{"If-None-Match": `"other"`}}, 200},
		{"If-None-Match on HEAD", request{method: "HEAD", path: path, header: map[string]string{"If-None-Match": tag}}, 304},
		{"If-Match in a list", request{method: "PUT", path: path, body: validEntry, header: map[string]string{"If-Match": `"x", ` + tag}}, 204},
		{"If-Match star", request{method: "PUT", path: path, body: validEntry, header: map[string]string{"If-Match": "*"}}, 204},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := s.do(t, tt.req)
			if res.status != tt.status {
				t.Fatalf("status %d, want %d", res.status, tt.status)
			}
			if res.header.Get("ETag") != tag {
				t.Errorf("ETag %q, want %q", res.header.Get("ETag"), tag)
			}
			if res.status == 304 && len(res.body) != 0 {
				t.Errorf("304 with a body: %s", res.body)
			}
		})
	}
	res := s.do(t, request{method: "DELETE", path: path, header: map[string]string{"If-Match": "*"}})
	if res.status != http.StatusNoContent {
		t.Errorf("DELETE If-Match *: %d", res.status)
	}
}

// TestConcurrentPutsWithSameIfMatch: only one of many PUTs holding the same
// ETag wins; the others get 412, and the entry is the winner's.
func TestConcurrentPutsWithSameIfMatch(t *testing.T) {
	s := newTestServer(t)
	id, tag := s.create(t, validEntry)
	const writers = 16
	statuses := make([]int, writers)
	var wg sync.WaitGroup
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := s.do(t, request{method: "PUT", path: "/addresses/" + id, body: fmt.Sprintf(`{"full_name":"writer %d"}`, i),
				header: map[string]string{"If-Match": tag}})
			statuses[i] = res.status
		}()
	}
	wg.Wait()
	winner := -1
	for i, st := range statuses {
		switch st {
		case http.StatusNoContent:
			if winner >= 0 {
				t.Errorf("writers %d and %d both won", winner, i)
			}
			winner = i
		case http.StatusPreconditionFailed:
		default:
			t.Errorf("writer %d: status %d", i, st)
		}
	}
	if winner < 0 {
		t.Fatal("no writer won")
	}
	res := s.do(t, request{method: "GET", path: "/addresses/" + id})
	if want := fmt.Sprintf(`{"full_name":"writer %d"}`, winner); string(res.body) != want {
		t.Errorf("entry %s, want %s", res.body, want)
	}
}

func TestResponseCompression(t *testing.T) {
	s := newTestServer(t)
	for range 5 {
		s.create(t, validEntry)
	}
	id, _ := s.create(t, `{"full_name":"A"}`)
	tests := []struct {
		name           string
		path           string
		acceptEncoding string
		wantGzip       bool
	}{
		{"large body, gzip accepted", "/addresses", "gzip", true},
		{"large body, gzip among others", "/addresses", "br;q=1.0, gzip;q=0.5", true},
		{"large body, any coding", "/addresses", "*", true},
		{"large body, gzip refused", "/addresses", "gzip;q=0", false},
		{"large body, no Accept-Encoding", "/addresses", "", false},
		{"small body, gzip accepted", "/addresses/" + id, "gzip", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := s.do(t, request{method: "GET", path: tt.path, header: map[string]string{"Accept-Encoding": tt.acceptEncoding}})
			if res.header.Get("Vary") != "Accept-Encoding" {
				t.Errorf("Vary %q", res.header.Get("Vary"))
			}
			body := res.body
			if got := res.header.Get("Content-Encoding") == "gzip"; got != tt.wantGzip {
				t.Fatalf("gzip %v, want %v", got, tt.wantGzip)
			}
			if tt.wantGzip {
				zr, err := gzip.NewReader(bytes.NewReader(res.body))
				if err != nil {
					t.Fatal(err)
				}
				if body, err = io.ReadAll(zr); err != nil {
					t.Fatal(err)
				}
			}
			if !json.Valid(body) || (tt.path == "/addresses" && len(body) < gzipMinSize) {
				t.Errorf("body of %d bytes is not the expected JSON", len(body))
			}
		})
	}
}

// TestSlowReadersHoldNoCopyOfThePage: clients that ask for a large page
// and read nothing cost the server no copy of it, compressed or not: the
// page goes to the connection as it is written, from the stored JSON.
func TestSlowReadersHoldNoCopyOfThePage(t *testing.T) {
	store := NewMapStore(0)
	s := newTestServerOn(t, store)
	// 40 records of 190 KB, put straight into the store (past the test's
	// -max-body): a 7.6 MB page, far more than the kernel's socket buffers
	// take in before the server's writes block.
	big := `{"full_name":"` + strings.Repeat("x", 190<<10) + `"}`
	var ids idGenerator
	for range 40 {
		if err := store.Insert(context.Background(), ids.next(), Record{JSON: []byte(big)}); err != nil {
			t.Fatal(err)
		}
	}
	page := 40 * len(big)
	heap := func() uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	const readers = 8
	var conns []net.Conn
	t.Cleanup(func() { // before the server closes, which waits for their requests
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range readers {
		c, err := net.Dial("tcp", s.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		encoding := "identity"
		if i%2 == 1 {
			encoding = "gzip"
		}
		fmt.Fprintf(c, "GET /addresses?limit=1000 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: %s\r\n\r\n", encoding)
	}
	time.Sleep(500 * time.Millisecond) // the writes fill the socket buffers, then block
	grown := int64(heap()) - int64(before)
	// Each gzip reader holds its writer's tables (about 1.2 MiB); a copy of
	// the page per reader would be 8 x 7.6 MB.
	if limit := int64(page); grown > limit {
		t.Errorf("%d readers of a %d MB page that read nothing grew the heap by %d MB, want under %d MB", readers, page>>20, grown>>20, limit>>20)
	}
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 {
		t.Errorf("healthz with slow readers: %d", res.status)
	}
}

// TestPagesAreBoundedAndAccounted: a page holds at most -max-body bytes of
// JSON (or its first entry), with Link to the rest, and what a page being
// sent holds is taken from the in-flight budget: readers that stall cannot
// keep more than it, however often the store replaces what they hold.
func TestPagesAreBoundedAndAccounted(t *testing.T) {
	const maxBody = 64 << 10
	store := NewMapStore(0)
	h := newTestServerWith(t, store, time.Second, func(cfg *handlerConfig) {
		cfg.maxBody, cfg.bodies = maxBody, newBodyBudget(2*maxBody+2)
	}).Config.Handler
	entry := `{"full_name":"` + strings.Repeat("x", 16<<10-16) + `"}` // 16 KiB
	var ids idGenerator
	for range 20 {
		if err := store.Insert(context.Background(), ids.next(), Record{JSON: []byte(entry)}); err != nil {
			t.Fatal(err)
		}
	}
	get := func(path string) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", path, nil))
		return w
	}
	if w := get("/addresses?limit=1000"); w.Code != 200 || strings.Count(w.Body.String(), `"full_name"`) != 4 || !strings.Contains(w.Header().Get("Link"), `rel="next"`) {
		t.Fatalf("a page of 16 KiB entries: %d, %d entries, Link %q; want 200, 4 entries (-max-body is 64 KiB) and a Link",
			w.Code, strings.Count(w.Body.String(), `"full_name"`), w.Header().Get("Link"))
	}
	// Two readers that stall while their 64 KiB pages are being written
	// hold the whole budget; a third page finds no room.
	release := make(chan struct{})
	var writing, done sync.WaitGroup
	for range 2 {
		writing.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			h.ServeHTTP(&stalledWriter{header: http.Header{}, writing: sync.OnceFunc(writing.Done), release: release}, httptest.NewRequest("GET", "/addresses?limit=1000", nil))
		}()
	}
	writing.Wait()
	w := get("/addresses?limit=1")
	if w.Code != 503 || w.Header().Get("Retry-After") != "1" || !strings.Contains(w.Body.String(), "as many pages") {
		t.Errorf("a page while two stalled readers hold the budget: %d, Retry-After %q, %s; want 503 and Retry-After 1", w.Code, w.Header().Get("Retry-After"), w.Body)
	}
	close(release)
	done.Wait()
	if w := get("/addresses?limit=1"); w.Code != 200 {
		t.Errorf("once the stalled readers are done: %d, want 200", w.Code)
	}
}

// stalledWriter is a client that stops reading: its first Write says so
// and waits until release.
type stalledWriter struct {
	header  http.Header
	writing func()
	release chan struct{}
}

func (w *stalledWriter) Header() http.Header { return w.header }
func (w *stalledWriter) WriteHeader(int)     {}
func (w *stalledWriter) Write(p []byte) (int, error) {
	w.writing()
	<-w.release
	return len(p), nil
}

// TestScarceValuesAreBounded: past its limit, a scarce pool says no, so a
// response does without rather than the process holding one per connection.
func TestScarceValuesAreBounded(t *testing.T) {
	made := 0
	pool := newScarce(2, func() *int { made++; return new(int) })
	a, okA := pool.get()
	_, okB := pool.get()
	if _, ok := pool.get(); !okA || !okB || ok {
		t.Fatalf("get, get, get = %v, %v, %v; want true, true, false", okA, okB, ok)
	}
	pool.put(a)
	if _, ok := pool.get(); !ok {
		t.Error("get after a put: false, want true")
	}
	if made > 3 {
		t.Errorf("made %d values for 3 gets", made)
	}
}

func TestRequestID(t *testing.T) {
	s := newTestServer(t)
	tests := []struct {
		name string
		in   string
		kept bool
	}{
		{"well-formed", "abc.DEF_123-x", true},
		{"128 characters", strings.Repeat("a", 128), true},
		{"absent", "", false},
		{"129 characters", strings.Repeat("a", 129), false},
		{"a space", "abc def", false},
		{"a slash", "a/b", false},
		{"unicode", "ä", false},
	}
	for _, tt := range tests {
		for _, path := range []string{"/healthz", "/nope"} {
			t.Run(tt.name+path, func(t *testing.T) {
				res := s.do(t, request{method: "GET", path: path, header: map[string]string{"X-Request-ID": tt.in}})
				got := res.header.Get("X-Request-ID")
				if tt.kept && got != tt.in {
					t.Errorf("X-Request-ID %q, want %q kept", got, tt.in)
				}
				if !tt.kept && (got == tt.in || !validRequestID(got)) {
					t.Errorf("X-Request-ID %q, want a fresh valid id", got)
				}
				if path == "/nope" && !bytes.Contains(res.body, []byte(`"request_id":"`+got+`"`)) {
					t.Errorf("problem body lacks the request id: %s", res.body)
				}
			})
		}
	}
}

func TestHeadAnswersLikeGet(t *testing.T) {
	s := newTestServer(t)
	id, _ := s.create(t, validEntry)
	for _, path := range []string{"/addresses/" + id, "/addresses", "/healthz", "/readyz", "/openapi.json"} {
		get := s.do(t, request{method: "GET", path: path})
		head := s.do(t, request{method: "HEAD", path: path})
		if head.status != get.status || len(head.body) != 0 {
			t.Errorf("HEAD %s: %d with %d body bytes; GET %d", path, head.status, len(head.body), get.status)
		}
		for _, h := range []string{"Content-Type", "Content-Length", "ETag"} {
			if head.header.Get(h) != get.header.Get(h) {
				t.Errorf("HEAD %s: %s %q, GET has %q", path, h, head.header.Get(h), get.header.Get(h))
			}
		}
	}
}

func TestHealthAndReadiness(t *testing.T) {
	s := newTestServer(t)
	// A test binary has no version or VCS revision of its own.
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 || string(res.body) != `{"status":"ok","version":"(devel)","revision":"unknown","modified":false}` {
		t.Errorf("healthz: %d %s", res.status, res.body)
	}
	if res := s.do(t, request{method: "GET", path: "/readyz"}); res.status != 200 {
		t.Errorf("readyz while serving: %d", res.status)
	}
	s.ready.Store(false)
	checkProblem(t, s.do(t, request{method: "GET", path: "/readyz"}), 503, "/readyz")
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 {
		t.Errorf("healthz while draining: %d", res.status)
	}
}

// TestReadinessFollowsTheStore: /readyz is 503 while the store cannot take
// writes, with the reason in the log and never a path in the answer, and 200
// again once it can; /healthz stays 200.
func TestReadinessFollowsTheStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	store, err := OpenMapStore(dir, 0, storedRecord(ParseEntry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	s := newTestServerOn(t, store)
	if res := s.do(t, request{method: "GET", path: "/readyz"}); res.status != 200 {
		t.Fatalf("readyz on a healthy store: %d %s", res.status, res.body)
	}
	store.files.createTemp = func(dir, pattern string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: dir, Err: syscall.EROFS}
	}
	p := checkProblem(t, s.do(t, request{method: "GET", path: "/readyz"}), 503, "/readyz")
	if !strings.Contains(p.Detail, "cannot take writes") || strings.Contains(p.Detail, dir) {
		t.Errorf("detail %q: want the service's words, without the path", p.Detail)
	}
	if !strings.Contains(s.logs.String(), "read-only file system") {
		t.Errorf("the log does not say why:\n%s", s.logs.String())
	}
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 {
		t.Errorf("healthz while the store refuses writes: %d", res.status)
	}
	store.files.createTemp = os.CreateTemp
	if res := s.do(t, request{method: "GET", path: "/readyz"}); res.status != 200 {
		t.Errorf("readyz once the store takes writes again: %d %s", res.status, res.body)
	}
	os.RemoveAll(dir)
	checkProblem(t, s.do(t, request{method: "GET", path: "/readyz"}), 503, "/readyz")
	if !strings.Contains(s.logs.String(), "the data directory was removed") {
		t.Errorf("the log does not say the directory was removed:\n%s", s.logs.String())
	}
}

// TestFullStoreIs507: creates and growing replaces past -max-store-bytes
// are 507 problems; reads go on, and a delete makes room.
func TestFullStoreIs507(t *testing.T) {
	entry := `{"full_name":"Ada Lovelace"}`
	s := newTestServerOn(t, NewMapStore(int64(2*len(entry))))
	first, _ := s.create(t, entry)
	second, etag := s.create(t, entry)
	p := checkProblem(t, s.do(t, request{method: "POST", path: "/addresses", body: entry}), 507, "/addresses")
	if !strings.Contains(p.Detail, "size limit") {
		t.Errorf("507 detail %q does not say why", p.Detail)
	}
	checkProblem(t, s.do(t, request{method: "PUT", path: "/addresses/" + second, body: `{"full_name":"Ada Lovelace, Countess"}`}), 507, "/addresses/"+second)
	if res := s.do(t, request{method: "GET", path: "/addresses/" + second}); res.status != 200 || res.header.Get("ETag") != etag {
		t.Errorf("GET after a refused replace: %d, ETag %s, want 200 and the old %s", res.status, res.header.Get("ETag"), etag)
	}
	if res := s.do(t, request{method: "PUT", path: "/addresses/" + second, body: `{"full_name":"Ada"}`}); res.status != 204 {
		t.Errorf("a replace that shrinks: %d, want 204", res.status)
	}
	if res := s.do(t, request{method: "DELETE", path: "/addresses/" + first}); res.status != 204 {
		t.Fatalf("DELETE: %d", res.status)
	}
	s.create(t, entry)
}

// TestCreateUnderAChosenIDCanBeRetried: PUT with If-None-Match: * creates
// an entry under the id the client chose, once; sending it again changes
// nothing and says so, so a client that lost the answer can retry safely.
func TestCreateUnderAChosenIDCanBeRetried(t *testing.T) {
	s := newTestServer(t)
	const id = "0123456789abcdef0123456789abcdef"
	path := "/addresses/" + id
	createOnly := map[string]string{"If-None-Match": "*"}
	res := s.do(t, request{method: "PUT", path: path, body: validEntry, header: createOnly})
	if res.status != 201 || res.header.Get("Location") != path || res.header.Get("ETag") == "" || string(res.body) != validEntry {
		t.Fatalf("first PUT: %d, Location %q, ETag %q, body %s", res.status, res.header.Get("Location"), res.header.Get("ETag"), res.body)
	}
	etag := res.header.Get("ETag")
	p := checkProblem(t, s.do(t, request{method: "PUT", path: path, body: `{"full_name":"Someone Else"}`, header: createOnly}), 412, path)
	if !strings.Contains(p.Detail, "already stored") {
		t.Errorf("412 detail %q does not say why", p.Detail)
	}
	if res := s.do(t, request{method: "GET", path: path}); res.status != 200 || string(res.body) != validEntry || res.header.Get("ETag") != etag {
		t.Errorf("GET after the retry: %d %s, ETag %s; want the first create's", res.status, res.body, res.header.Get("ETag"))
	}
	checkProblem(t, s.do(t, request{method: "PUT", path: "/addresses/NOT-AN-ID", body: validEntry, header: createOnly}), 400, "/addresses/NOT-AN-ID")
	checkProblem(t, s.do(t, request{method: "PUT", path: "/addresses/fedcba9876543210fedcba9876543210", body: validEntry}), 404, "/addresses/fedcba9876543210fedcba9876543210")
	checkProblem(t, s.do(t, request{method: "PUT", path: "/addresses/fedcba9876543210fedcba9876543210", body: `{}`, header: createOnly}), 400, "/addresses/fedcba9876543210fedcba9876543210")
}

// stuckStore is a store whose every call waits until its context ends, as
// a paused database does.
type stuckStore struct{ *MapStore }

func (stuckStore) wait(ctx context.Context) error                     { <-ctx.Done(); return ctx.Err() }
func (s stuckStore) Insert(ctx context.Context, _ ID, _ Record) error { return s.wait(ctx) }
func (s stuckStore) Get(ctx context.Context, _ ID) (Record, error)    { return Record{}, s.wait(ctx) }
func (s stuckStore) Replace(ctx context.Context, _ ID, _ Record, _ []string) error {
	return s.wait(ctx)
}
func (s stuckStore) Delete(ctx context.Context, _ ID, _ []string) error { return s.wait(ctx) }
func (s stuckStore) List(ctx context.Context, _ ID, _ int) ([]Item, bool, error) {
	return nil, false, s.wait(ctx)
}
func (s stuckStore) Ready(ctx context.Context) error { return s.wait(ctx) }

// TestAStoreThatDoesNotAnswerIs503InTime: every store call has the
// collection's deadline, so a request on a store that hangs ends with a 503
// problem and Retry-After, not a dropped connection; /readyz answers 503
// within about a second.
func TestAStoreThatDoesNotAnswerIs503InTime(t *testing.T) {
	store := stuckStore{NewMapStore(0)}
	s := newTestServerWith(t, store, 100*time.Millisecond, func(cfg *handlerConfig) { cfg.storeReady = readiness(time.Second, store) })
	const id = "/addresses/0123456789abcdef0123456789abcdef"
	for _, req := range []request{
		{method: "POST", path: "/addresses", body: validEntry},
		{method: "GET", path: "/addresses"},
		{method: "GET", path: id},
		{method: "PUT", path: id, body: validEntry},
		{method: "PUT", path: id, body: validEntry, header: map[string]string{"If-None-Match": "*"}},
		{method: "DELETE", path: id},
	} {
		start := time.Now()
		res := s.do(t, req)
		p := checkProblem(t, res, 503, req.path)
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("%s %s took %v with a 100 ms store deadline", req.method, req.path, took)
		}
		if res.header.Get("Retry-After") == "" || !strings.Contains(p.Detail, "did not answer") {
			t.Errorf("%s %s: Retry-After %q, detail %q", req.method, req.path, res.header.Get("Retry-After"), p.Detail)
		}
	}
	start := time.Now()
	checkProblem(t, s.do(t, request{method: "GET", path: "/readyz"}), 503, "/readyz")
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("/readyz took %v on a store that does not answer", took)
	}
}

// countingReady is a store whose readiness checks are counted.
type countingReady struct {
	*MapStore
	checks atomic.Int32
}

func (s *countingReady) Ready(context.Context) error { s.checks.Add(1); return nil }

// TestReadinessProbesShareOneCheck: a flood of /readyz costs the store one
// check per interval, not one per probe.
func TestReadinessProbesShareOneCheck(t *testing.T) {
	store := &countingReady{MapStore: NewMapStore(0)}
	check := readiness(time.Hour, store)
	for range 100 {
		if err := check(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := store.checks.Load(); n != 1 {
		t.Errorf("100 probes made %d checks, want 1", n)
	}
}

// TestStoredJSONIsNoLargerThanWhatWasSent: <, > and & are kept as sent, not
// escaped as \u003c, so a record costs what its body did.
func TestStoredJSONIsNoLargerThanWhatWasSent(t *testing.T) {
	s := newTestServer(t)
	body := `{"full_name":"` + strings.Repeat("<&>", 80) + `","addresses":[{"kind":"home","street_name":"A & B","pincode":"<1>","country":"X"}]}`
	res := s.do(t, request{method: "POST", path: "/addresses", body: body})
	if res.status != 201 || string(res.body) != body {
		t.Fatalf("POST: %d, body %d bytes, want 201 and the %d bytes sent:\n%s", res.status, len(res.body), len(body), res.body)
	}
	if res := s.do(t, request{method: "GET", path: res.header.Get("Location")}); string(res.body) != body {
		t.Errorf("GET serves %d bytes, want the %d sent", len(res.body), len(body))
	}
}

// TestValidationProblemListsAtMostAHundredErrors: a body of many mistakes
// gets the first 100 and the count of the rest.
func TestValidationProblemListsAtMostAHundredErrors(t *testing.T) {
	s := newTestServer(t)
	body := `{"full_name":"A","emails":[` + strings.TrimSuffix(strings.Repeat(`{"kind":"x","email":"y"},`, 64), ",") + `]}`
	p := checkProblem(t, s.do(t, request{method: "POST", path: "/addresses", body: body}), 400, "/addresses")
	if len(p.Errors) != 100 || p.More != 28 {
		t.Errorf("%d errors listed and more_errors %d, want 100 and 28", len(p.Errors), p.More)
	}
}

// rawRequest sends head (a request line and headers) and then body on a new
// connection to the test server, and returns the connection.
func (s *testServer) dial(t *testing.T, head, body string) net.Conn {
	t.Helper()
	conn, err := net.Dial("tcp", s.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, head+body); err != nil {
		t.Fatal(err)
	}
	return conn
}

// readStatus reads one response from conn and returns its status and header.
func readStatus(t *testing.T, conn net.Conn) (int, http.Header) {
	t.Helper()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the response: %v", err)
	}
	res.Body.Close()
	return res.StatusCode, res.Header
}

// TestTransferEncodingWithContentLengthClosesTheConnection: a request with
// both (RFC 9112, 6.1: possible smuggling) is answered, then its connection
// is closed; nothing pipelined behind it is served.
func TestTransferEncodingWithContentLengthClosesTheConnection(t *testing.T) {
	s := newTestServer(t)
	chunked := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(validEntry), validEntry)
	conn := s.dial(t, "POST /addresses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+
		"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"+chunked, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	r := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	res, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	if res.StatusCode != 201 || !res.Close {
		t.Errorf("status %d, Connection: close %v; want 201 and close", res.StatusCode, res.Close)
	}
	if res, err := http.ReadResponse(r, nil); err == nil {
		t.Errorf("the request pipelined behind it was served: %d", res.StatusCode)
	}
}

// TestContentLengthOverMaxBodyIs413AtOnce: a declared size over -max-body is
// refused before any of the body is read, so Expect: 100-continue gets the
// 413 and never a 100 Continue.
func TestContentLengthOverMaxBodyIs413AtOnce(t *testing.T) {
	s := newTestServer(t)
	conn := s.dial(t, "POST /addresses HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"+
		"Expect: 100-continue\r\nContent-Length: 99999999\r\n\r\n", "")
	if status, _ := readStatus(t, conn); status != http.StatusRequestEntityTooLarge {
		t.Errorf("status %d, want 413 before the body", status)
	}
}

// TestHeadersAloneReserveLittleOfTheBodyBudget: the budget counts bytes
// that arrived, not bytes a Content-Length promised nor what a little gzip
// would expand to, so connections that send headers and no body, or a
// stalled gzip stream, cannot lock out small requests.
func TestHeadersAloneReserveLittleOfTheBodyBudget(t *testing.T) {
	const maxBody = 64 << 10
	s := newTestServerWith(t, NewMapStore(0), time.Second, func(cfg *handlerConfig) {
		cfg.maxBody, cfg.bodies = maxBody, newBodyBudget(4*(maxBody+1))
	})
	head := fmt.Sprintf("POST /addresses HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", maxBody)
	// Sixteen promises of the largest body: as reservations, four times the budget.
	for range 16 {
		s.dial(t, head, "")
	}
	// Sixteen more send a few dozen bytes of gzip that would decode to the
	// largest body, then stall: what they hold is what they sent.
	var zipped bytes.Buffer
	zw := gzip.NewWriter(&zipped)
	zw.Write([]byte(`{"full_name":"` + strings.Repeat(" ", maxBody-20)))
	zw.Flush()
	for range 16 {
		s.dial(t, fmt.Sprintf("POST /addresses HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n", zipped.Len()+1000), zipped.String())
	}
	time.Sleep(100 * time.Millisecond) // the server reads their headers
	for i := range 5 {
		if res := s.do(t, request{method: "POST", path: "/addresses", body: validEntry}); res.status != 201 {
			t.Errorf("small POST %d beside header-only connections: %d %s", i, res.status, res.body)
		}
	}
}

// TestBodyMemoryBudget: while slow uploads hold the whole budget, a further
// upload gets 503 with Retry-After at once, and healthz still answers; when
// the slow ones finish, uploads work again.
func TestBodyMemoryBudget(t *testing.T) {
	s := newTestServer(t) // budget: four bodies of testMaxBody
	entry := `{"full_name":"Slow Upload"}`
	body := entry + strings.Repeat(" ", testMaxBody-len(entry))
	head := fmt.Sprintf("POST /addresses HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", len(body))
	var slow []net.Conn
	for range 4 {
		slow = append(slow, s.dial(t, head, body[:100])) // then they stall
	}
	var res response
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(10 * time.Millisecond) {
		// the stalled uploads take their share as the server reads their headers
		if res = s.do(t, request{method: "POST", path: "/addresses", body: body}); res.status == 503 {
			break
		}
	}
	if res.status != 503 {
		t.Log(s.logs.String())
	}
	checkProblem(t, res, 503, "/addresses")
	if got := res.header.Get("Retry-After"); got != "1" {
		t.Errorf("Retry-After %q, want 1", got)
	}
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 {
		t.Errorf("healthz while the budget is spent: %d", res.status)
	}
	for _, conn := range slow {
		io.WriteString(conn, body[100:])
		if status, _ := readStatus(t, conn); status != 201 {
			t.Errorf("a slow upload that held its share: %d, want 201", status)
		}
	}
	s.create(t, body)
}

// TestResponseHeaderKeysAreCanonical: every header the service sets is
// under its canonical key, so Get and Set work on it in any middleware.
func TestResponseHeaderKeysAreCanonical(t *testing.T) {
	h := newTestServer(t).Config.Handler
	for _, req := range []*http.Request{
		httptest.NewRequest("POST", "/addresses", strings.NewReader(validEntry)),
		httptest.NewRequest("GET", "/addresses?limit=1", nil),
		httptest.NewRequest("GET", "/nope", nil),
	} {
		req.Header.Set("Content-Type", "application/json")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		for key := range w.Header() {
			if key != http.CanonicalHeaderKey(key) {
				t.Errorf("%s %s: header key %q, so w.Header().Get(%q) in a middleware finds nothing", req.Method, req.URL, key, key)
			}
		}
		if w.Header().Get("X-Request-ID") == "" {
			t.Errorf("%s %s: Get(\"X-Request-ID\") is empty", req.Method, req.URL)
		}
	}
}

// ---- the program: run() in process -------------------------------------------

// program is run() started in this process on a free port.
type program struct {
	addr   string // host:port it listens on
	logs   *syncBuffer
	stderr *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

// startProgram calls start (run or serve) and waits for its "starting" line.
func startProgram(t *testing.T, start func(ctx context.Context, logs, stderr io.Writer) error) *program {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	p := &program{logs: &syncBuffer{}, stderr: &syncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- start(ctx, p.logs, p.stderr) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Error("the program did not stop within 10s of cancel")
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, rec := range logRecords(t, p.logs.String()) {
			if rec["msg"] == "starting" {
				p.addr = rec["addr"].(string)
				return p
			}
		}
		select {
		case err := <-p.done:
			t.Fatalf("the program stopped before serving: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatal("no starting line within 10s")
	return nil
}

func startRun(t *testing.T, env map[string]string, args ...string) *program {
	t.Helper()
	args = append([]string{"-addr", "127.0.0.1:0", "-log-format", "json"}, args...)
	return startProgram(t, func(ctx context.Context, logs, stderr io.Writer) error {
		return run(ctx, args, func(k string) string { return env[k] }, logs, stderr)
	})
}

// stop cancels the program's context, as a signal would, and returns run's result.
func (p *program) stop(t *testing.T) error {
	t.Helper()
	p.cancel()
	select {
	case err := <-p.done:
		p.done <- err // for the cleanup
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("the program did not stop within 10s")
		return nil
	}
}

func (p *program) get(t *testing.T, path string) *http.Response {
	t.Helper()
	res, err := http.Get("http://" + p.addr + path)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res
}

// TestIdleConnectionsGiveWayAtTheLimit: at -max-conns, a connection kept
// alive between requests is closed to let a new client in, within a second
// or two; one in the middle of a request is never cut.
func TestIdleConnectionsGiveWayAtTheLimit(t *testing.T) {
	// The idle connection is idle before the limit is reached, or becomes
	// idle once it has been.
	for _, idleFirst := range []bool{true, false} {
		t.Run(fmt.Sprint("idle first: ", idleFirst), func(t *testing.T) {
			p := startRun(t, map[string]string{"ADDRSERVICE_MAX_CONNS": "3"})
			dial := func(t *testing.T) (net.Conn, *bufio.Reader) {
				conn, err := net.Dial("tcp", p.addr)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { conn.Close() })
				return conn, bufio.NewReader(conn)
			}
			// One request, then the connection is kept alive, idle.
			var idleReader *bufio.Reader
			keepIdle := func() {
				idle, r := dial(t)
				io.WriteString(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
				idle.SetReadDeadline(time.Now().Add(5 * time.Second))
				res, err := http.ReadResponse(r, nil)
				if err != nil || res.StatusCode != 200 {
					t.Fatalf("first request on the idle connection: %v", err)
				}
				io.Copy(io.Discard, res.Body)
				idleReader = r
			}
			if idleFirst {
				keepIdle()
			}
			// Two uploads under way: headers and half a body, then they stall.
			body := validEntry
			var busy []net.Conn
			for range 2 {
				conn, _ := dial(t)
				fmt.Fprintf(conn, "POST /addresses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body[:len(body)/2])
				busy = append(busy, conn)
			}
			if !idleFirst {
				keepIdle()
			}
			time.Sleep(100 * time.Millisecond)
			for i := range 3 { // each new client takes the place of the one before
				client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: i == 2}}
				res, err := client.Get("http://" + p.addr + "/healthz")
				if err != nil {
					t.Fatalf("new client %d at the limit: %v", i, err)
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				client.CloseIdleConnections()
			}
			if _, err := idleReader.ReadByte(); err == nil {
				t.Error("the idle connection was not closed to make room")
			}
			for i, conn := range busy {
				io.WriteString(conn, body[len(body)/2:])
				if status, _ := readStatus(t, conn); status != 201 {
					t.Errorf("upload %d, under way at the limit: %d, want 201", i, status)
				}
			}
		})
	}
}

// TestBusyKeepAliveConnectionsAreNotCutAtTheLimit: at -max-conns, clients
// that keep their connections busy lose no request to a newcomer: only a
// connection idle for a second gives way.
func TestBusyKeepAliveConnectionsAreNotCutAtTheLimit(t *testing.T) {
	p := startRun(t, map[string]string{"ADDRSERVICE_MAX_CONNS": "3"})
	deadline := time.Now().Add(1500 * time.Millisecond)
	var failures atomic.Int32
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
			defer client.CloseIdleConnections()
			for time.Now().Before(deadline) {
				res, err := client.Post("http://"+p.addr+"/addresses", "application/json", strings.NewReader(validEntry))
				if err != nil || res.StatusCode != http.StatusCreated {
					failures.Add(1)
				}
				if err == nil {
					io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
			}
		}()
	}
	time.Sleep(100 * time.Millisecond)
	newcomer := &http.Client{Timeout: 500 * time.Millisecond}
	for time.Now().Before(deadline) {
		if res, err := newcomer.Get("http://" + p.addr + "/healthz"); err == nil {
			res.Body.Close()
		}
	}
	wg.Wait()
	if n := failures.Load(); n > 0 {
		t.Errorf("%d POSTs on busy keep-alive connections failed while a newcomer waited", n)
	}
}

// logRecords parses JSON log lines; every line must be one JSON object.
func logRecords(t *testing.T, logs string) []map[string]any {
	t.Helper()
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line is not one JSON object: %q", line)
		}
		recs = append(recs, rec)
	}
	return recs
}

func TestRunServesUntilCancelled(t *testing.T) {
	p := startRun(t, nil)
	if res := p.get(t, "/healthz"); res.StatusCode != 200 {
		t.Errorf("healthz: %d", res.StatusCode)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("run returned %v after cancel, want nil (exit status 0)", err)
	}
	var msgs []string
	for _, rec := range logRecords(t, p.logs.String()) {
		msgs = append(msgs, rec["msg"].(string))
	}
	if want := "starting request shutting down stopped"; strings.Join(msgs, " ") != want {
		t.Errorf("life-cycle lines %q, want %q", msgs, want)
	}
	if _, err := net.Dial("tcp", p.addr); err == nil {
		t.Error("still accepting connections after run returned")
	}
}

// TestOptionsStarIsAProblem: "OPTIONS *" is answered by the service, as the
// server run starts it, not by net/http's own handler: a problem with an
// X-Request-ID, like every other answer.
func TestOptionsStarIsAProblem(t *testing.T) {
	p := startRun(t, nil)
	conn, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprint(conn, "OPTIONS * HTTP/1.1\r\nHost: x\r\nX-Request-ID: opt-1\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	checkProblem(t, response{status: res.StatusCode, header: res.Header, body: body}, http.StatusNotFound, "*")
	if id := res.Header.Get("X-Request-ID"); id != "opt-1" {
		t.Errorf("X-Request-ID %q, want opt-1", id)
	}
}

func TestRunRejectsBadConfiguration(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want string // what the one-line error must name
	}{
		{"max-body zero", []string{"-max-body", "0"}, nil, "-max-body"},
		{"max-body not a number", []string{"-max-body", "1MB"}, nil, "-max-body"},
		{"log-level unknown", []string{"-log-level", "loud"}, nil, "-log-level"},
		{"log-format unknown", []string{"-log-format", "xml"}, nil, "-log-format"},
		{"shutdown-timeout negative", []string{"-shutdown-timeout", "-1s"}, nil, "-shutdown-timeout"},
		{"shutdown-timeout not a duration", []string{"-shutdown-timeout", "10"}, nil, "-shutdown-timeout"},
		{"addr without a port", []string{"-addr", "localhost"}, nil, "-addr"},
		{"debug-addr without a port", []string{"-debug-addr", "localhost"}, nil, "-debug-addr"},
		{"unknown flag", []string{"-verbose"}, nil, "-verbose"},
		{"a stray argument", []string{"serve"}, nil, `"serve"`},
		{"bad variable", nil, map[string]string{"ADDRSERVICE_MAX_BODY": "lots"}, "ADDRSERVICE_MAX_BODY"},
		{"bad level variable", nil, map[string]string{"ADDRSERVICE_LOG_LEVEL": "loud"}, "ADDRSERVICE_LOG_LEVEL"},
		{"bad timeout variable", nil, map[string]string{"ADDRSERVICE_SHUTDOWN_TIMEOUT": "1"}, "ADDRSERVICE_SHUTDOWN_TIMEOUT"},
		{"bad addr variable", nil, map[string]string{"ADDRSERVICE_ADDR": "nowhere"}, "-addr"},
		{"max-body-memory not above max-body", []string{"-max-body", "2MiB", "-max-body-memory", "1MiB"}, nil, "-max-body-memory"},
		{"max-store-bytes zero", []string{"-max-store-bytes", "0"}, nil, "-max-store-bytes"},
		{"max-conns zero", []string{"-max-conns", "0"}, nil, "-max-conns"},
		{"a size with a unit it does not know", []string{"-max-body", "1MB"}, nil, "-max-body"},
		{"bad size variable", nil, map[string]string{"ADDRSERVICE_MAX_STORE_BYTES": "1TiB"}, "ADDRSERVICE_MAX_STORE_BYTES"},
	}
	// Cancelled before the start: a configuration that is wrongly accepted
	// makes run return at once instead of serving for ever.
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs, stderr bytes.Buffer
			err := run(cancelled, tt.args, func(k string) string { return tt.env[k] }, &logs, &stderr)
			var usage *usageError
			if !errors.As(err, &usage) {
				t.Fatalf("run = %v, want a usage error (exit status 2); the configuration was accepted", err)
			}
			if msg := err.Error(); !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line naming %s", msg, tt.want)
			}
			if logs.Len() != 0 {
				t.Errorf("something started: %s", logs.String())
			}
		})
	}
}

func TestRunReadsEnvironmentAndFlagsWin(t *testing.T) {
	small := map[string]string{"ADDRSERVICE_MAX_BODY": "20", "ADDRSERVICE_LOG_LEVEL": "", "ADDRSERVICE_LOG_FORMAT": "json"}
	post := func(p *program) int {
		res, err := http.Post("http://"+p.addr+"/addresses", "application/json", strings.NewReader(validEntry))
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}
	if st := post(startRun(t, small)); st != http.StatusRequestEntityTooLarge {
		t.Errorf("with ADDRSERVICE_MAX_BODY=20: status %d, want 413", st)
	}
	if st := post(startRun(t, small, "-max-body", "4096")); st != http.StatusCreated {
		t.Errorf("with -max-body 4096 over ADDRSERVICE_MAX_BODY=20: status %d, want 201", st)
	}
}

// shortly is the context for a run that should refuse its configuration:
// should it serve after all (the variables' prefix renamed in main.go but
// not here, say), it stops after 10 s, and the test fails rather than hangs.
func shortly(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// secretURL is a database URL whose password must never be printed or logged.
const secretURL = "postgres://addrservice:s3cret@db.example/addrservice"

func TestRunRefusesADatabaseURLItCannotUse(t *testing.T) {
	saved := openDatabase
	t.Cleanup(func() { openDatabase = saved })
	opened := func(context.Context, string, string) (Store, error) {
		t.Error("the database was opened")
		return NewMapStore(0), nil
	}
	tests := []struct {
		name         string
		openDatabase func(ctx context.Context, url, table string) (Store, error)
		args         []string
		env          map[string]string
		want         string // what the one-line error must name
	}{
		{"without a database store, by flag", nil, []string{"-database-url", secretURL}, nil, "testdata/postgres/postgres.go"},
		{"without a database store, by variable", nil, nil, map[string]string{"ADDRSERVICE_DATABASE_URL": secretURL}, "testdata/postgres/postgres.go"},
		{"beside -data", opened, []string{"-database-url", secretURL, "-data", t.TempDir()}, nil, "-data and -database-url"},
		{"beside ADDRSERVICE_DATA", opened, []string{"-database-url", secretURL}, map[string]string{"ADDRSERVICE_DATA": t.TempDir()}, "-data and -database-url"},
		{"beside -max-store-bytes, which it would not honour", opened, []string{"-database-url", secretURL, "-max-store-bytes", "2KiB"}, nil, "-max-store-bytes"},
		{"beside ADDRSERVICE_MAX_STORE_BYTES", opened, []string{"-database-url", secretURL}, map[string]string{"ADDRSERVICE_MAX_STORE_BYTES": "2KiB"}, "-max-store-bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			openDatabase = tt.openDatabase
			var logs, stderr bytes.Buffer
			err := run(shortly(t), tt.args, func(k string) string { return tt.env[k] }, &logs, &stderr)
			var usage *usageError
			if !errors.As(err, &usage) {
				t.Fatalf("run = %v, want a usage error (exit status 2)", err)
			}
			if msg := err.Error(); !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") || strings.Contains(msg, "s3cret") {
				t.Errorf("error %q: want one line naming %s, without the password", msg, tt.want)
			}
			if logs.Len() != 0 {
				t.Errorf("something started: %s", logs.String())
			}
		})
	}
}

func TestRunOpensTheDatabaseStore(t *testing.T) {
	saved := openDatabase
	t.Cleanup(func() { openDatabase = saved })
	var gotURL string
	var gotTables []string // one table per resource
	openDatabase = func(_ context.Context, url, table string) (Store, error) {
		gotURL, gotTables = url, append(gotTables, table)
		return NewMapStore(0), nil
	}
	p := startRun(t, map[string]string{"ADDRSERVICE_DATABASE_URL": secretURL})
	res, err := http.Post("http://"+p.addr+"/addresses", "application/json", strings.NewReader(validEntry))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusCreated {
		t.Errorf("POST: status %d, want 201", res.StatusCode)
	}
	if err := p.stop(t); err != nil {
		t.Fatalf("run = %v after cancel, want nil", err)
	}
	if gotURL != secretURL || len(gotTables) == 0 || gotTables[0] != "addresses" {
		t.Errorf("openDatabase(%q) for tables %q, want %q for addresses first", gotURL, gotTables, secretURL)
	}
	if strings.Contains(p.logs.String(), "s3cret") {
		t.Errorf("the password is in the logs:\n%s", p.logs.String())
	}
	if strings.Contains(p.logs.String(), "max_store_bytes") {
		t.Errorf("the starting line logs -max-store-bytes, which a database store does not honour:\n%s", p.logs.String())
	}

	openDatabase = func(context.Context, string, string) (Store, error) { return nil, errors.New("connection refused") }
	var logs, stderr bytes.Buffer
	err = run(shortly(t), []string{"-addr", "127.0.0.1:0", "-database-url", secretURL}, func(string) string { return "" }, &logs, &stderr)
	var usage *usageError
	if err == nil || errors.As(err, &usage) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("with a database that refuses: run = %v, want its error (exit status 1)", err)
	}
}

func TestRunHelpPrintsUsage(t *testing.T) {
	var logs, stderr bytes.Buffer
	if err := run(shortly(t), []string{"-h"}, func(string) string { return "" }, &logs, &stderr); err != nil {
		t.Fatalf("run -h = %v, want nil", err)
	}
	for _, want := range []string{"-addr", "-data", "-database-url", "-log-level", "-log-format", "-max-body", "-max-body-memory", "-max-store-bytes", "-max-conns", "-store-timeout", "-shutdown-timeout", "ADDRSERVICE_", "(default 1MiB)", "(default 128MiB)", ":8080", "10s"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("usage lacks %q:\n%s", want, stderr.String())
		}
	}
}

func TestRunFailsWhenThePortIsTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // if it serves after all, it stops
	defer cancel()
	for _, args := range [][]string{
		{"-addr", ln.Addr().String()},
		{"-addr", "127.0.0.1:0", "-debug-addr", ln.Addr().String()},
	} {
		err = run(ctx, args, func(string) string { return "" }, io.Discard, io.Discard)
		var usage *usageError
		if err == nil || errors.As(err, &usage) {
			t.Errorf("run %v on a taken port = %v, want a start error (exit status 1)", args, err)
		}
	}
}

// ---- operations: logs, panics, timeouts, shutdown ------------------------------

// newPanickyServer serves the real routes and middleware plus a route that panics.
func newPanickyServer(t *testing.T, logs io.Writer, format string) *httptest.Server {
	t.Helper()
	log := newLogger(logs, format, slog.LevelInfo)
	ready := new(atomic.Bool)
	ready.Store(true)
	mux := http.NewServeMux()
	store := NewMapStore(0)
	addRoutes(mux, log, resources{book: NewCollection[Entry](store, log, time.Second)}, testConfig(store, ready))
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) { panic("boom at the handler") })
	mux.HandleFunc("GET /panic-late", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("partial"))
		panic("boom after the response began")
	})
	srv := httptest.NewServer(withMiddleware(log, newHTTPMetrics(), mux))
	t.Cleanup(srv.Close)
	return srv
}

func TestPanicBecomesA500AndServingGoesOn(t *testing.T) {
	logs := &syncBuffer{}
	srv := newPanickyServer(t, logs, "json")
	s := &testServer{Server: srv}

	p := checkProblem(t, s.do(t, request{method: "GET", path: "/panic"}), 500, "/panic")
	if strings.Contains(p.Detail, "boom") {
		t.Errorf("the panic value leaks into the body: %q", p.Detail)
	}
	// Once the response has begun, a 500 can no longer be sent: the
	// connection is cut so the client cannot take a partial body for a whole one.
	if res, err := noDecompression.Get(srv.URL + "/panic-late"); err == nil {
		_, err = io.ReadAll(res.Body)
		res.Body.Close()
		if err == nil {
			t.Error("a panic after the response began gave the client a clean response")
		}
	}
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 {
		t.Errorf("after panics, healthz: %d", res.status)
	}

	var panics, requests int
	for _, rec := range logRecords(t, logs.String()) {
		switch rec["msg"] {
		case "panic in handler":
			panics++
			stack, _ := rec["stack"].(string)
			if !strings.Contains(stack, "goroutine") || !strings.Contains(stack, "handlers_test.go") || rec["request_id"] == nil {
				t.Errorf("panic record lacks a stack or request id: %v", rec)
			}
		case "request":
			if rec["path"] == "/panic" {
				requests++
				if rec["status"] != 500.0 || rec["level"] != "ERROR" {
					t.Errorf("panic request logged as %v at %v", rec["status"], rec["level"])
				}
			}
		}
	}
	// The client may retry the cut GET, so /panic-late can panic more than once.
	if panics < 2 || requests != 1 {
		t.Errorf("%d panic records and %d request records for /panic, want at least 2 and 1", panics, requests)
	}
}

// TestRequestLogLine checks the one canonical line per request in JSON.
func TestRequestLogLine(t *testing.T) {
	logs := &syncBuffer{}
	srv := newPanickyServer(t, logs, "json")
	s := &testServer{Server: srv}
	id, _ := s.create(t, validEntry)
	tests := []struct {
		req    request
		route  string
		status int
		level  string
	}{
		{request{method: "GET", path: "/addresses/" + id, header: map[string]string{"X-Request-ID": "req-get"}}, "GET /addresses/{id}", 200, "INFO"},
		{request{method: "GET", path: "/addresses/" + id + "x", header: map[string]string{"X-Request-ID": "req-404"}}, "GET /addresses/{id}", 404, "WARN"},
		{request{method: "PATCH", path: "/healthz", header: map[string]string{"X-Request-ID": "req-405"}}, "", 405, "WARN"},
		{request{method: "GET", path: "/panic", header: map[string]string{"X-Request-ID": "req-500"}}, "GET /panic", 500, "ERROR"},
	}
	for _, tt := range tests {
		res := s.do(t, tt.req)
		var rec map[string]any
		for _, r := range logRecords(t, logs.String()) {
			if r["msg"] == "request" && r["request_id"] == tt.req.header["X-Request-ID"] {
				rec = r
			}
		}
		if rec == nil {
			t.Errorf("%s %s: no request line", tt.req.method, tt.req.path)
			continue
		}
		want := map[string]any{"level": tt.level, "method": tt.req.method, "path": tt.req.path, "route": tt.route,
			"status": float64(tt.status), "bytes": float64(len(res.body))}
		for k, v := range want {
			if rec[k] != v {
				t.Errorf("%s %s: %s = %v, want %v", tt.req.method, tt.req.path, k, rec[k], v)
			}
		}
		if d, ok := rec["duration"].(float64); !ok || d <= 0 {
			t.Errorf("duration %v", rec["duration"])
		}
		if remote, _ := rec["remote"].(string); !strings.HasPrefix(remote, "127.0.0.1:") {
			t.Errorf("remote %q", remote)
		}
	}
}

// TestLogLinesCannotBeForged: whatever a client puts in a path, each request
// is exactly one line in either format.
func TestLogLinesCannotBeForged(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			logs := &syncBuffer{}
			s := &testServer{Server: newPanickyServer(t, logs, format)}
			paths := []string{"/x%0Alevel=ERROR%20msg=forged", "/x%0D%0A%7B%22msg%22:%22forged%22%7D", "/a%22b%5Cc"}
			for _, p := range paths {
				s.do(t, request{method: "GET", path: p})
			}
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")
			if len(lines) != len(paths) {
				t.Fatalf("%d requests made %d lines:\n%s", len(paths), len(lines), logs.String())
			}
			for _, line := range lines {
				if !strings.HasPrefix(line, "time=") && !strings.HasPrefix(line, `{"time":`) {
					t.Errorf("line does not start a record: %q", line)
				}
			}
		})
	}
}

func TestTextLogFormat(t *testing.T) {
	logs := &syncBuffer{}
	s := &testServer{Server: newPanickyServer(t, logs, "text")}
	s.do(t, request{method: "GET", path: "/healthz", header: map[string]string{"X-Request-ID": "abc-123"}})
	line := strings.TrimSpace(logs.String())
	pattern := `^time=\S+ level=INFO msg=request method=GET path=/healthz route="GET /healthz" status=200 bytes=\d+ duration=\S+ remote=127\.0\.0\.1:\d+ request_id=abc-123$`
	if !regexp.MustCompile(pattern).MatchString(line) {
		t.Errorf("text line\n%s\ndoes not match\n%s", line, pattern)
	}
}

// TestServiceLogsCarryTheRequestID: records the service logs with the
// request's context name the request.
func TestServiceLogsCarryTheRequestID(t *testing.T) {
	s := newTestServer(t) // logs at debug level
	s.do(t, request{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"X-Request-ID": "trace-me"}})
	found := false
	for _, rec := range logRecords(t, s.logs.String()) {
		if rec["msg"] == "created" {
			found = rec["request_id"] == "trace-me"
		}
	}
	if !found {
		t.Errorf("no service record with request_id trace-me:\n%s", s.logs.String())
	}
}

func TestLogLevelFiltersRequestLines(t *testing.T) {
	// At warn the starting line is not logged, so the test picks the port.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	var logs syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", addr, "-log-level", "warn", "-log-format", "json"}, func(string) string { return "" }, &logs, io.Discard)
	}()
	p := &program{addr: addr}
	for i := 0; ; i++ {
		if conn, err := net.Dial("tcp", addr); err == nil {
			conn.Close()
			break
		}
		if i == 500 {
			t.Fatal("not serving after 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.get(t, "/healthz")
	p.get(t, "/nope")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, rec := range logRecords(t, logs.String()) {
		if rec["msg"] == "request" {
			paths = append(paths, rec["path"].(string))
		}
	}
	if fmt.Sprint(paths) != "[/nope]" {
		t.Errorf("request lines at -log-level warn: %v, want only the 404", paths)
	}
}

// TestSlowHeaderClientIsCutOff: a client that never finishes its headers is
// disconnected at ReadHeaderTimeout while others are served.
func TestSlowHeaderClientIsCutOff(t *testing.T) {
	cfg, err := parseConfig([]string{"-addr", "127.0.0.1:0", "-log-format", "json"}, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	cfg.timeouts.readHeader = 300 * time.Millisecond
	p := startProgram(t, func(ctx context.Context, logs, _ io.Writer) error { return serve(ctx, cfg, logs, io.Discard) })

	conn, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	conn.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "))
	if res := p.get(t, "/healthz"); res.StatusCode != 200 {
		t.Errorf("another client: %d", res.StatusCode)
	}
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.Copy(io.Discard, conn) // returns when the server closes the connection
	if took := time.Since(start); took < 250*time.Millisecond || took > 3*time.Second {
		t.Errorf("slow client cut off after %v, want about 300ms", took)
	}
}

// TestShutdownDrainsInFlightRequests: after the signal, new connections are
// refused while a request already in flight completes.
func TestShutdownDrainsInFlightRequests(t *testing.T) {
	p := startRun(t, nil)
	body, write := io.Pipe()
	result := make(chan int, 1)
	go func() {
		res, err := http.Post("http://"+p.addr+"/addresses", "application/json", body)
		if err != nil {
			result <- 0
			return
		}
		res.Body.Close()
		result <- res.StatusCode
	}()
	write.Write([]byte(validEntry[:20]))
	time.Sleep(200 * time.Millisecond) // the request is now in its handler, reading the body

	p.cancel()
	waitRefused(t, p.addr)
	select {
	case <-p.done:
		t.Fatal("run returned with a request in flight")
	default:
	}
	write.Write([]byte(validEntry[20:]))
	write.Close()
	if st := <-result; st != http.StatusCreated {
		t.Errorf("in-flight request: status %d, want 201", st)
	}
	if err := p.stop(t); err != nil {
		t.Errorf("run = %v, want nil", err)
	}
}

// TestShutdownTimeoutCutsStragglers: a request still running at
// -shutdown-timeout is cut off and run still returns cleanly.
func TestShutdownTimeoutCutsStragglers(t *testing.T) {
	p := startRun(t, nil, "-shutdown-timeout", "200ms")
	body, write := io.Pipe()
	defer write.Close()
	go func() {
		res, err := http.Post("http://"+p.addr+"/addresses", "application/json", body)
		if err == nil {
			res.Body.Close()
		}
	}()
	write.Write([]byte(`{"full_name":`))
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	if err := p.stop(t); err != nil {
		t.Errorf("run = %v, want nil", err)
	}
	if took := time.Since(start); took < 150*time.Millisecond || took > 3*time.Second {
		t.Errorf("stopped after %v, want about the 200ms timeout", took)
	}
	if !strings.Contains(p.logs.String(), "did not finish in time") {
		t.Errorf("no warning about the cut requests:\n%s", p.logs.String())
	}
}

// waitRefused waits until addr no longer accepts connections.
func waitRefused(t *testing.T, addr string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return
		}
		conn.Close()
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("still accepting connections 5s after shutdown began")
}

// ---- durability: -data --------------------------------------------------------------

// TestIDsNeverReachTheFileSystemUnvalidated: ids that try to leave the data
// directory are answered 404 and touch nothing.
func TestIDsNeverReachTheFileSystemUnvalidated(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "data")
	store, err := OpenMapStore(dir, 0, storedRecord(ParseEntry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	s := newTestServerOn(t, store)
	victim := filepath.Join(root, "victim.json")
	os.WriteFile(victim, []byte(validEntry), 0o600)
	paths := []string{"/addresses/..%2Fvictim", "/addresses/..%2F..%2Fvictim", "/addresses/%2e%2e", "/addresses/a%2Fb",
		"/addresses/%2e%2e%2fvictim", "/addresses/..%5Cvictim", "/addresses/" + strings.Repeat("a", 31) + "%00"}
	for _, p := range paths {
		for _, method := range []string{"GET", "PUT", "DELETE"} {
			body := ""
			if method == "PUT" {
				body = validEntry
			}
			res := s.do(t, request{method: method, path: p, body: body})
			if res.status != http.StatusNotFound {
				t.Errorf("%s %s: %d, want 404", method, p, res.status)
			}
		}
	}
	if b, err := os.ReadFile(victim); err != nil || string(b) != validEntry {
		t.Errorf("the file outside the data directory changed: %v", err)
	}
	if got := dirFiles(t, dir); len(got) != 1 {
		t.Errorf("data directory holds %v, want only .lock", got)
	}
	if got := dirFiles(t, root); len(got) != 2 {
		t.Errorf("parent directory holds %v", got)
	}
}

// TestFailedDiskWriteIsA500: the client learns nothing was stored, and
// nothing internal leaks.
func TestFailedDiskWriteIsA500(t *testing.T) {
	store, err := OpenMapStore(t.TempDir(), 0, storedRecord(ParseEntry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	s := newTestServerOn(t, store)
	store.files.writeFile = func(*os.File, []byte) error { return syscall.ENOSPC }
	p := checkProblem(t, s.do(t, request{method: "POST", path: "/addresses", body: validEntry}), 500, "/addresses")
	if strings.Contains(p.Detail, "space") || strings.Contains(p.Detail, "tmp") {
		t.Errorf("detail leaks the cause: %q", p.Detail)
	}
	if !strings.Contains(s.logs.String(), "no space left on device") {
		t.Errorf("the log lacks the cause:\n%s", s.logs.String())
	}
	if res := s.do(t, request{method: "GET", path: "/addresses"}); string(res.body) != "{}" {
		t.Errorf("after a failed create the book holds %s", res.body)
	}
}

// TestHelperProcess is not a test on its own: the crash test runs the test
// binary again with ADDRSERVICE_CRASH_HELPER=1, and then this is the server,
// configured from the environment as the real binary would be.
func TestHelperProcess(t *testing.T) {
	if os.Getenv("ADDRSERVICE_CRASH_HELPER") != "1" {
		t.Skip("runs only as the crash test's child")
	}
	// As main does it: the same signals, the same exit statuses.
	ctx, stop := signalContext()
	defer stop()
	err := run(ctx, []string{"-addr", "127.0.0.1:0", "-log-format", "json"}, os.Getenv, os.Stdout, os.Stderr)
	os.Exit(exitStatus(err, os.Stderr))
}

// crashChild is the server running in a child process on a data directory.
type crashChild struct {
	cmd    *exec.Cmd
	base   string
	out    io.ReadCloser // the child's stdout, its log
	stderr *syncBuffer
}

func startCrashChild(t *testing.T, dir string) *crashChild {
	t.Helper()
	c := startChild(t, "ADDRSERVICE_DATA="+dir)
	go io.Copy(io.Discard, c.out) // keep the child's log pipe flowing
	return c
}

// startChild starts this test binary as the server, the way main runs it,
// with env added to its environment, and waits for its starting line.
func startChild(t *testing.T, env ...string) *crashChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(append(os.Environ(), "ADDRSERVICE_CRASH_HELPER=1"), env...)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	for lines.Scan() {
		var rec map[string]any
		if json.Unmarshal(lines.Bytes(), &rec) == nil && rec["msg"] == "starting" {
			return &crashChild{cmd: cmd, base: "http://" + rec["addr"].(string), out: out, stderr: stderr}
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Fatalf("the child did not start: %s", stderr)
	return nil
}

// exitCode waits for the child to end, at most 10 s, and returns its exit
// status (-1: killed by a signal).
func (c *crashChild) exitCode(t *testing.T) int {
	t.Helper()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		<-done
		t.Fatal("the child did not exit within 10 s")
	}
	return c.cmd.ProcessState.ExitCode()
}

// TestALogOutputThatTakesNothingDoesNotHoldTheExit: with stdout a pipe
// nobody reads, requests go on, and SIGTERM still ends the process at once
// with status 0, counting on stderr the log lines it could not write.
func TestALogOutputThatTakesNothingDoesNotHoldTheExit(t *testing.T) {
	c := startChild(t) // c.out is never read from here on
	client := &http.Client{Timeout: 5 * time.Second}
	for i := range 1000 { // about 250 KB of request lines: past any pipe's buffer
		res, err := client.Get(c.base + "/healthz")
		if err != nil {
			t.Fatalf("request %d with the log output full: %v", i, err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	start := time.Now()
	c.cmd.Process.Signal(syscall.SIGTERM)
	if code := c.exitCode(t); code != 0 {
		t.Errorf("exit status %d, want 0; stderr: %s", code, c.stderr)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the exit took %v", took)
	}
	if !strings.Contains(c.stderr.String(), "log lines were not written") {
		t.Errorf("stderr does not count the lost lines: %q", c.stderr)
	}
}

// TestSignalsDrain: SIGHUP, like SIGTERM and SIGINT, drains and exits 0 with
// a stopped line.
func TestSignalsDrain(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			c := startChild(t)
			logs := &syncBuffer{}
			copied := make(chan struct{})
			go func() { io.Copy(logs, c.out); close(copied) }()
			c.cmd.Process.Signal(sig)
			if code := c.exitCode(t); code != 0 {
				t.Errorf("exit status %d after %v, want 0; stderr: %s", code, sig, c.stderr)
			}
			<-copied
			if !strings.Contains(logs.String(), `"msg":"stopped"`) {
				t.Errorf("no stopped line after %v:\n%s", sig, logs)
			}
		})
	}
}

// TestLogReaderGoingAwayIsNotFatal: when the reader of the log pipe exits
// (addrservice | head -1), writes fail with EPIPE; the service must go on
// serving, say so once on stderr, and still drain and exit 0.
func TestLogReaderGoingAwayIsNotFatal(t *testing.T) {
	c := startChild(t)
	c.out.Close()
	for i := range 20 {
		res, err := http.Get(c.base + "/healthz")
		if err != nil {
			t.Fatalf("request %d after the log reader left: %v (the service died?)", i, err)
		}
		res.Body.Close()
		time.Sleep(20 * time.Millisecond) // past a log flush or two
	}
	c.cmd.Process.Signal(syscall.SIGTERM)
	if code := c.exitCode(t); code != 0 {
		t.Errorf("exit status %d, want 0; stderr: %s", code, c.stderr)
	}
	if !strings.Contains(c.stderr.String(), "writing the log failed") {
		t.Errorf("stderr does not report the failed log writes: %q", c.stderr)
	}
}

// crashEntry is what a writer knows of one entry: the body last acknowledged
// ("" once deleted) and the change in flight when the server died, if any.
type crashEntry struct {
	acked, ackedETag string
	pending          *string
}

// crashWriter owns its entries, so each has at most one change in flight.
type crashWriter struct {
	entries        map[string]*crashEntry
	pendingCreate  *string
	rng            *rand.Rand
	ops, failedOps int
}

// step makes one change and records it; it returns false once the server is gone.
func (w *crashWriter) step(client *http.Client, base string, n int) bool {
	var live []string
	for id, e := range w.entries {
		if e.acked != "" {
			live = append(live, id)
		}
	}
	slices.Sort(live)
	body := strings.Replace(validEntry, "Ada Lovelace", fmt.Sprintf("writer op %d", n), 1)
	var req *http.Request
	var target *crashEntry
	switch op := w.rng.IntN(10); {
	case len(live) < 3 || op < 4:
		w.pendingCreate = &body
		req, _ = http.NewRequest("POST", base+"/addresses", strings.NewReader(body))
	case op < 8:
		id := live[w.rng.IntN(len(live))]
		target = w.entries[id]
		target.pending = &body
		req, _ = http.NewRequest("PUT", base+"/addresses/"+id, strings.NewReader(body))
	default:
		id := live[w.rng.IntN(len(live))]
		target = w.entries[id]
		deleted := ""
		target.pending = &deleted
		req, _ = http.NewRequest("DELETE", base+"/addresses/"+id, nil)
	}
	res, err := client.Do(req)
	if err != nil {
		return false // the server died; the change is in doubt
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	switch {
	case res.StatusCode == http.StatusCreated:
		id := strings.TrimPrefix(res.Header.Get("Location"), "/addresses/")
		w.entries[id] = &crashEntry{acked: body, ackedETag: res.Header.Get("ETag")}
		w.pendingCreate = nil
	case res.StatusCode == http.StatusNoContent:
		target.acked, target.ackedETag, target.pending = *target.pending, res.Header.Get("ETag"), nil
	default:
		w.failedOps++
		return false
	}
	w.ops++
	return true
}

// TestKillNineLosesNoAcknowledgedChange kills the server with SIGKILL at
// random moments under concurrent writes, restarts it on the same directory,
// and checks that every acknowledged change is there exactly (with its ETag),
// that changes in flight are either fully there or not at all, and that no
// temporary file survives a start.
func TestKillNineLosesNoAcknowledgedChange(t *testing.T) {
	rounds := 12
	if testing.Short() {
		rounds = 3
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	dir := t.TempDir()
	writers := make([]*crashWriter, 6)
	for i := range writers {
		writers[i] = &crashWriter{entries: map[string]*crashEntry{}, rng: rand.New(rand.NewPCG(seed, uint64(i)+2))}
	}
	acknowledged := 0
	for round := 0; round <= rounds; round++ {
		child := startCrashChild(t, dir)
		for _, name := range dirFiles(t, dir) {
			if strings.HasPrefix(name, ".tmp-") {
				t.Errorf("round %d: temporary file %s survived the start", round, name)
			}
		}
		checkAfterCrash(t, round, child.base, writers)
		if round == rounds {
			child.cmd.Process.Kill()
			child.cmd.Wait()
			break
		}

		var wg sync.WaitGroup
		for i, w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				client := &http.Client{Transport: &http.Transport{}}
				for n := 0; w.step(client, child.base, round*100000+i*10000+n); n++ {
				}
			}()
		}
		time.Sleep(time.Duration(20+rng.IntN(150)) * time.Millisecond)
		child.cmd.Process.Kill() // SIGKILL: no shutdown, no flush
		child.cmd.Wait()
		wg.Wait()
		for _, w := range writers {
			if w.failedOps > 0 {
				t.Fatalf("a write was refused with a status other than success: %d", w.failedOps)
			}
			acknowledged += w.ops
			w.ops = 0
		}
	}
	t.Logf("%d rounds, %d acknowledged changes checked", rounds, acknowledged)
	if acknowledged < rounds {
		t.Errorf("only %d changes were acknowledged; the test did not exercise the store", acknowledged)
	}
}

// checkAfterCrash compares the restarted server with what the writers know,
// then settles the changes that were in doubt.
func checkAfterCrash(t *testing.T, round int, base string, writers []*crashWriter) {
	t.Helper()
	stored := map[string]string{}
	next := base + "/addresses?limit=1000"
	for next != "" {
		res, err := http.Get(next)
		if err != nil {
			t.Fatal(err)
		}
		var page map[string]json.RawMessage
		err = json.NewDecoder(res.Body).Decode(&page)
		res.Body.Close()
		if err != nil {
			t.Fatalf("round %d: listing: %v", round, err)
		}
		for id, body := range page {
			stored[id] = string(body)
		}
		next = ""
		if m := regexp.MustCompile(`<([^>]+)>`).FindStringSubmatch(res.Header.Get("Link")); m != nil {
			next = base + m[1]
		}
	}
	for wi, w := range writers {
		for id, e := range w.entries {
			got := stored[id]
			delete(stored, id)
			switch {
			case got == e.acked:
				if got != "" {
					res, err := http.Get(base + "/addresses/" + id)
					if err != nil {
						t.Fatal(err)
					}
					res.Body.Close()
					if res.Header.Get("ETag") != e.ackedETag {
						t.Errorf("round %d: %s: ETag %s after restart, was %s", round, id, res.Header.Get("ETag"), e.ackedETag)
					}
				}
			case e.pending != nil && got == *e.pending:
				e.acked = got // the change in flight made it; settle it
				e.ackedETag = ""
				if got != "" {
					res, _ := http.Get(base + "/addresses/" + id)
					res.Body.Close()
					e.ackedETag = res.Header.Get("ETag")
				}
			default:
				t.Errorf("round %d: writer %d, entry %s holds %q, want the acknowledged %q", round, wi, id, got, e.acked)
			}
			e.pending = nil
		}
	}
	for id, body := range stored { // only a create in flight may have left an entry nobody knows
		adopted := false
		for _, w := range writers {
			if w.pendingCreate != nil && *w.pendingCreate == body {
				res, _ := http.Get(base + "/addresses/" + id)
				res.Body.Close()
				w.entries[id] = &crashEntry{acked: body, ackedETag: res.Header.Get("ETag")}
				w.pendingCreate, adopted = nil, true
				break
			}
		}
		if !adopted {
			t.Errorf("round %d: entry %s = %s was never written", round, id, body)
		}
	}
	for _, w := range writers {
		w.pendingCreate = nil
	}
}

// ---- the contract: openapi.json ---------------------------------------------------

// TestOpenAPIIsServed: GET /openapi.json answers with the file in the
// repository, byte for byte, gzip-encoded for a client that accepts it.
func TestOpenAPIIsServed(t *testing.T) {
	file, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		OpenAPI string `json:"openapi"`
	}
	if err := json.Unmarshal(file, &doc); err != nil || doc.OpenAPI != "3.1.0" {
		t.Fatalf("openapi.json: openapi %q, error %v; want valid JSON with openapi 3.1.0", doc.OpenAPI, err)
	}
	s := newTestServer(t)
	for _, acceptEncoding := range []string{"", "gzip"} {
		res := s.do(t, request{method: "GET", path: "/openapi.json", header: map[string]string{"Accept-Encoding": acceptEncoding}})
		body := res.body
		if acceptEncoding == "gzip" {
			if res.header.Get("Content-Encoding") != "gzip" {
				t.Fatalf("Accept-Encoding gzip: Content-Encoding %q", res.header.Get("Content-Encoding"))
			}
			zr, err := gzip.NewReader(bytes.NewReader(res.body))
			if err != nil {
				t.Fatal(err)
			}
			if body, err = io.ReadAll(zr); err != nil {
				t.Fatal(err)
			}
		}
		if res.status != http.StatusOK || res.header.Get("Content-Type") != "application/json" || !bytes.Equal(body, file) {
			t.Errorf("Accept-Encoding %q: status %d, Content-Type %q, %d bytes; want 200, application/json and the %d bytes of openapi.json",
				acceptEncoding, res.status, res.header.Get("Content-Type"), len(body), len(file))
		}
	}
}

// apiSpec is openapi.json kept as raw JSON, so that examples keep their
// bytes and key order. Its methods follow $ref within the document.
type apiSpec struct {
	t       *testing.T
	doc     json.RawMessage
	objects map[rawSpan]map[string]json.RawMessage // each object parsed once
}

// rawSpan identifies a part of the document by where it is.
type rawSpan struct {
	start *byte
	len   int
}

func readSpec(t *testing.T) apiSpec {
	t.Helper()
	b, err := os.ReadFile("openapi.json")
	if err != nil {
		t.Fatal(err)
	}
	if !json.Valid(b) {
		t.Fatal("openapi.json is not valid JSON")
	}
	return apiSpec{t, b, map[rawSpan]map[string]json.RawMessage{}}
}

// members returns node's members: nil when node is absent or not an object.
func (s apiSpec) members(node json.RawMessage) map[string]json.RawMessage {
	if len(node) == 0 {
		return nil
	}
	span := rawSpan{&node[0], len(node)}
	m, ok := s.objects[span]
	if !ok {
		json.Unmarshal(node, &m)
		s.objects[span] = m
	}
	return m
}

// text and number read a string and an integer: "" and -1 when absent.
func (s apiSpec) text(node json.RawMessage) string {
	var v string
	json.Unmarshal(node, &v)
	return v
}

func (s apiSpec) number(node json.RawMessage) int64 {
	v := int64(-1)
	json.Unmarshal(node, &v)
	return v
}

// resolve returns what a "#/..." $ref points at, one step.
func (s apiSpec) resolve(ref string) json.RawMessage {
	s.t.Helper()
	target, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		s.t.Fatalf("$ref %q points outside openapi.json", ref)
	}
	node := s.doc
	for _, k := range strings.Split(target, "/") {
		if node, ok = s.members(node)[strings.NewReplacer("~1", "/", "~0", "~").Replace(k)]; !ok {
			s.t.Fatalf("$ref %q points at nothing", ref)
		}
	}
	return node
}

// deref follows node's $ref to the end, or returns node when it has none.
func (s apiSpec) deref(node json.RawMessage) json.RawMessage {
	s.t.Helper()
	for range 8 {
		ref := s.text(s.members(node)["$ref"])
		if ref == "" {
			return node
		}
		node = s.resolve(ref)
	}
	s.t.Fatal("openapi.json: a $ref chain of more than 8 steps")
	return nil
}

// at returns the value at keys below node, following $ref on the way and
// at the end; nil when there is none.
func (s apiSpec) at(node json.RawMessage, keys ...string) json.RawMessage {
	node = s.deref(node)
	for _, k := range keys {
		node = s.deref(s.members(node)[k])
	}
	return node
}

// operations calls fn for every operation, as "GET /addresses/{id}", with
// the parameters its path item declares for all its operations.
func (s apiSpec) operations(fn func(route string, op, pathParams json.RawMessage)) {
	paths := s.members(s.at(s.doc, "paths"))
	for _, path := range slices.Sorted(maps.Keys(paths)) {
		item := s.members(s.deref(paths[path]))
		for _, method := range []string{"get", "put", "post", "delete", "options", "head", "patch", "trace"} {
			if op, ok := item[method]; ok {
				fn(strings.ToUpper(method)+" "+path, s.deref(op), item["parameters"])
			}
		}
	}
}

// examples returns the examples of a media type, compacted, by name.
func (s apiSpec) examples(media json.RawMessage) map[string][]byte {
	s.t.Helper()
	out := map[string][]byte{}
	add := func(name string, v json.RawMessage) {
		var b bytes.Buffer
		if err := json.Compact(&b, v); err != nil {
			s.t.Fatalf("openapi.json example %s: %v", name, err)
		}
		out[name] = b.Bytes()
	}
	if v := s.members(media)["example"]; v != nil {
		add("example", v)
	}
	for name, ex := range s.members(s.at(media, "examples")) {
		add(name, s.at(ex, "value"))
	}
	return out
}

// muxResponse is the response every operation gives as its default: it
// documents the mux's own answers, a 404 for a path the route table does
// not have and a 405 for a method a path does not take.
const muxResponse = "Problem"

// routeRecorder keeps the patterns addRoutes registers.
type routeRecorder []string

func (r *routeRecorder) Handle(pattern string, _ http.Handler) { *r = append(*r, pattern) }

// TestOpenAPIPathsAreTheRoutes: openapi.json documents exactly the routes
// addRoutes registers. A {$} pattern matches only the path that ends in its
// slash, which is how openapi.json lists it.
func TestOpenAPIPathsAreTheRoutes(t *testing.T) {
	var routes routeRecorder
	addRoutes(&routes, nil, resources{}, handlerConfig{}) // the handlers are made, never called
	registered := map[string]bool{}
	for _, pattern := range routes {
		method, path, ok := strings.Cut(pattern, " ")
		if !ok || !strings.HasPrefix(path, "/") {
			t.Errorf("pattern %q: give each route one method and a path, so that it is one operation", pattern)
			continue
		}
		registered[method+" "+strings.TrimSuffix(path, "{$}")] = true
		if method == "GET" { // the mux answers HEAD wherever GET is registered
			registered["HEAD "+path] = true
		}
	}
	spec := readSpec(t)
	documented := map[string]bool{}
	spec.operations(func(route string, op, pathParams json.RawMessage) {
		documented[route] = true
		// Each {name} in the path is a path parameter, and each path parameter is in the path.
		_, path, _ := strings.Cut(route, " ")
		var inPath, declared []string
		for _, m := range regexp.MustCompile(`\{([^}]*)\}`).FindAllStringSubmatch(path, -1) {
			inPath = append(inPath, m[1])
		}
		var params, own []json.RawMessage
		json.Unmarshal(pathParams, &params)
		json.Unmarshal(spec.members(op)["parameters"], &own)
		for _, p := range append(params, own...) {
			if spec.text(spec.at(p, "in")) == "path" {
				declared = append(declared, spec.text(spec.at(p, "name")))
			}
		}
		if !slices.Equal(slices.Sorted(slices.Values(inPath)), slices.Sorted(slices.Values(declared))) {
			t.Errorf("openapi.json %s: path parameters %v, want %v", route, declared, inPath)
		}
	})
	for _, route := range slices.Sorted(maps.Keys(registered)) {
		if !documented[route] {
			t.Errorf("addRoutes registers %s, which openapi.json does not document", route)
		}
	}
	for _, route := range slices.Sorted(maps.Keys(documented)) {
		if !registered[route] {
			t.Errorf("openapi.json documents %s, which addRoutes does not register", route)
		}
	}
}

// TestOpenAPILimitsAreTheDecoders: the schema's limits are the Go constants,
// its fields the model's, and its required fields, enum and patterns what
// the decoder and ParseID enforce.
func TestOpenAPILimitsAreTheDecoders(t *testing.T) {
	spec := readSpec(t)
	schemas := spec.at(spec.doc, "components", "schemas")
	params := spec.at(spec.doc, "components", "parameters")
	limits := []struct {
		name string
		got  json.RawMessage
		want int
	}{
		{"Text maxLength", spec.at(schemas, "Text", "maxLength"), maxTextLength},
		{"Phone.country_code minimum", spec.at(schemas, "Phone", "properties", "country_code", "minimum"), 1},
		{"Phone.country_code maximum", spec.at(schemas, "Phone", "properties", "country_code", "maximum"), maxCountry},
		{"limit minimum", spec.at(params, "Limit", "schema", "minimum"), 1},
		{"limit maximum", spec.at(params, "Limit", "schema", "maximum"), MaxPageSize},
		{"limit default", spec.at(params, "Limit", "schema", "default"), DefaultPageSize},
		{"Problem.errors maxItems", spec.at(schemas, "Problem", "properties", "errors", "maxItems"), maxFieldErrors},
	}
	for _, l := range limits {
		if got := spec.number(l.got); got != int64(l.want) {
			t.Errorf("openapi.json %s is %d, want %d", l.name, got, l.want)
		}
	}

	// Every resource's schema, and every schema within it: strings and
	// lists limited, integers positive int64s, objects closed, with the
	// fields of their Go types. The resources are the fields of resources,
	// so a resource added to a copy is checked against its own type.
	var walk func(at string, schema json.RawMessage, model reflect.Type)
	walk = func(at string, schema json.RawMessage, model reflect.Type) {
		m := spec.members(schema)
		if ref := spec.text(m["$ref"]); ref != "" { // and its own keywords beside it, below
			walk(strings.TrimPrefix(ref, "#/components/schemas/"), spec.resolve(ref), model)
		}
		for model.Kind() == reflect.Pointer || model.Kind() == reflect.Slice {
			model = model.Elem()
		}
		switch spec.text(m["type"]) {
		case "string":
			if got := spec.number(m["maxLength"]); (got < 1 || got > maxTextLength) && m["enum"] == nil {
				t.Errorf("openapi.json %s: maxLength %d, want 1 to %d: the decoder refuses longer text", at, got, maxTextLength)
			}
		case "array":
			if got := spec.number(m["maxItems"]); got != maxListItems {
				t.Errorf("openapi.json %s: maxItems %d, want %d", at, got, maxListItems)
			}
			walk(at+"[]", m["items"], model)
		case "integer":
			if max := spec.number(m["maximum"]); spec.number(m["minimum"]) != 1 || max < 1 || max > maxInteger || spec.text(m["format"]) != "int64" {
				t.Errorf("openapi.json %s: want minimum 1, a maximum up to %d and format int64", at, maxInteger)
			}
		case "object":
			if string(m["additionalProperties"]) != "false" {
				t.Errorf("openapi.json %s: additionalProperties %s, want false: unknown fields are refused", at, m["additionalProperties"])
			}
			properties := spec.members(m["properties"])
			fields := map[string]reflect.Type{}
			for i := range model.NumField() {
				name, _, _ := strings.Cut(model.Field(i).Tag.Get("json"), ",")
				fields[name] = model.Field(i).Type
			}
			if got, want := slices.Sorted(maps.Keys(properties)), slices.Sorted(maps.Keys(fields)); !slices.Equal(got, want) {
				t.Errorf("openapi.json %s: properties %v, want the fields of %s: %v", at, got, model.Name(), want)
			}
			for name, p := range properties {
				if fields[name] != nil {
					walk(at+"."+name, p, fields[name])
				}
			}
		}
		var oneOf []json.RawMessage
		json.Unmarshal(m["oneOf"], &oneOf)
		for i, sub := range oneOf {
			walk(fmt.Sprintf("%s.oneOf[%d]", at, i), sub, model)
		}
	}
	resourceTypes := reflect.TypeFor[resources]()
	for i := range resourceTypes.NumField() {
		create, _ := resourceTypes.Field(i).Type.MethodByName("Create")
		model := create.Type.In(2) // Create(c, ctx, v T)
		if spec.at(schemas, model.Name()) == nil {
			t.Errorf("openapi.json has no schema %s for the resource %s", model.Name(), resourceTypes.Field(i).Name)
			continue
		}
		walk(model.Name(), spec.at(schemas, model.Name()), model)
	}

	// Required fields: what the decoder says "is required" of an empty
	// object at the top and as the item of each list.
	entry := spec.at(schemas, "Entry")
	lists := map[string]json.RawMessage{}
	var empty []string
	for name, p := range spec.members(spec.at(entry, "properties")) {
		if spec.text(spec.at(p, "type")) == "array" {
			lists[name] = spec.at(p, "items")
			empty = append(empty, fmt.Sprintf("%q:[{}]", name))
		}
	}
	_, err := ParseEntry([]byte("{" + strings.Join(empty, ",") + "}"))
	var invalid *InvalidError
	if !errors.As(err, &invalid) {
		t.Fatalf("ParseEntry of empty objects: %v, want an InvalidError", err)
	}
	decoderRequires := map[string][]string{} // by list; "" is the top level
	for _, fe := range invalid.Fields {
		if fe.Message == "is required" {
			list, field, inList := strings.Cut(fe.Field, "[0].")
			if !inList {
				list, field = "", fe.Field
			}
			decoderRequires[list] = append(decoderRequires[list], field)
		}
	}
	lists[""] = entry
	for list, schema := range lists {
		var required []string
		json.Unmarshal(spec.members(schema)["required"], &required)
		if got, want := slices.Sorted(slices.Values(required)), slices.Sorted(slices.Values(decoderRequires[list])); !slices.Equal(got, want) {
			t.Errorf("openapi.json Entry %q: required %v, the decoder requires %v", list, got, want)
		}
	}

	// Enum and patterns against the decoder and ParseID.
	var kinds []string
	json.Unmarshal(spec.at(schemas, "Kind", "enum"), &kinds)
	for _, kind := range append(kinds, "office") {
		_, err := ParseEntry([]byte(`{"full_name":"A","emails":[{"kind":"` + kind + `","email":"a@example.org"}]}`))
		if accepted, listed := err == nil, slices.Contains(kinds, kind); accepted != listed {
			t.Errorf("openapi.json Kind enum %v: kind %q listed %v, accepted by the decoder %v", kinds, kind, listed, accepted)
		}
	}
	isID := func(v string) bool { _, ok := ParseID(v); return ok }
	isText := func(v string) bool { // as an address's building_name
		b, _ := json.Marshal(v)
		_, err := ParseEntry([]byte(`{"full_name":"A","addresses":[{"kind":"home","building_name":` + string(b) + `,"street_name":"s","pincode":1,"country":"c"}]}`))
		return err == nil
	}
	ids := []string{"0123456789abcdef0123456789abcdef", "0123456789ABCDEF0123456789ABCDEF", "0123456789abcdef0123456789abcde",
		"0123456789abcdef0123456789abcdef0", "0123456789abcdeg0123456789abcdef", "..%2F..%2Fetc", ""}
	patterns := []struct {
		name    string
		pattern json.RawMessage
		samples []string
		valid   func(string) bool
	}{
		{"Id", spec.at(schemas, "Id", "pattern"), ids, isID},
		{"the id parameter", spec.at(params, "Id", "schema", "pattern"), ids, isID},
		{"the after parameter", spec.at(params, "After", "schema", "pattern"), ids, isID},
		{"Text", spec.at(schemas, "Text", "pattern"), []string{"Zoë 山田", "", "a\tb", "a\nb", "\x00", "\x7f", "\u0085", "\u009f", "\u00a0", "a\u200bb"},
			isText},
	}
	email := func(v string) bool {
		b, _ := json.Marshal(v)
		_, err := ParseEntry([]byte(`{"full_name":"A","emails":[{"kind":"home","email":` + string(b) + `}]}`))
		return err == nil
	}
	// Read beside each $ref, not through it, where the patterns are.
	emailPath := spec.members(spec.members(spec.at(schemas, "Email", "properties"))["email"])["pattern"]
	patterns = append(patterns, struct {
		name    string
		pattern json.RawMessage
		samples []string
		valid   func(string) bool
	}{"Email.email", emailPath, []string{"ada@example.org", "zoe+post@example.ch", "a.b@c.d.e", "ada@localhost", "a b@example.org",
		`"a b"@example.org`, "zoë@example.ch", "ada@exämple.ch", "a..b@example.org", ".a@example.org", "a@-b.example", "Ada <ada@example.org>"}, email})
	if got := spec.text(emailPath); got != emailPattern.String() {
		t.Errorf("openapi.json Email.email pattern %q, the server's %q", got, emailPattern)
	}
	nonBlank := spec.text(spec.members(spec.members(schemas)["NonBlankText"])["pattern"])
	if want := "[^" + blank + "]"; nonBlank != want {
		t.Errorf("openapi.json NonBlankText pattern %q, want %q: the server's blank characters", nonBlank, want)
	}
	// Each character alone as a name: accepted by the server exactly when
	// the schema's Text and NonBlankText patterns both match it.
	text, nonBlankRe := regexp.MustCompile(spec.text(spec.at(schemas, "Text", "pattern"))), regexp.MustCompile(nonBlank)
	for r := rune(0); r <= 0x10ffff; r++ {
		if r == 0x3400 {
			r = 0xfe00 // CJK, Hangul and the surrogates hold no white space
		}
		if r == 0x10000 {
			r = 0x1d400 // a sample of the supplementary planes
		}
		if r == 0x1d500 {
			break
		}
		b, _ := json.Marshal(string(r))
		_, err := ParseEntry([]byte(`{"full_name":` + string(b) + `}`))
		if schema := text.MatchString(string(r)) && nonBlankRe.MatchString(string(r)); schema != (err == nil) {
			t.Errorf("full_name %U: the schema accepts it: %v; the server: %v", r, schema, err)
		}
	}
	for _, p := range patterns {
		re, err := regexp.Compile(spec.text(p.pattern))
		if err != nil {
			t.Errorf("openapi.json %s pattern: %v", p.name, err)
			continue
		}
		for _, v := range p.samples {
			if re.MatchString(v) != p.valid(v) {
				t.Errorf("openapi.json %s pattern %q matches %q: %v, but the service accepts it: %v", p.name, re, v, re.MatchString(v), p.valid(v))
			}
		}
	}
}

// checkProblemFields asserts that a problem, an example or a real one, has
// the fields of the Problem schema and fits its status.
func checkProblemFields(t *testing.T, spec apiSpec, where string, status int, body []byte) {
	t.Helper()
	schema := spec.at(spec.doc, "components", "schemas", "Problem")
	properties := spec.members(spec.at(schema, "properties"))
	fields := spec.members(body)
	for name := range fields {
		if properties[name] == nil {
			t.Errorf("%s: field %q is not in the Problem schema", where, name)
		}
	}
	var required []string
	json.Unmarshal(spec.at(schema, "required"), &required)
	for _, name := range required {
		if fields[name] == nil {
			t.Errorf("%s: no %q, which the Problem schema requires: %s", where, name, body)
		}
	}
	if spec.number(fields["status"]) != int64(status) || spec.text(fields["title"]) != http.StatusText(status) ||
		spec.text(fields["type"]) != spec.text(spec.at(properties["type"], "const")) || !validRequestID(spec.text(fields["request_id"])) {
		t.Errorf("%s: problem %s does not fit status %d and the Problem schema", where, body, status)
	}
	var errs []map[string]json.RawMessage
	json.Unmarshal(fields["errors"], &errs)
	if errs != nil && status != http.StatusBadRequest || fields["more_errors"] != nil && errs == nil {
		t.Errorf("%s: errors (and more_errors with them) belong to a 400 for invalid fields: %s", where, body)
	}
	itemFields := slices.Sorted(maps.Keys(spec.members(spec.at(properties["errors"], "items", "properties"))))
	for _, fe := range errs {
		if got := slices.Sorted(maps.Keys(fe)); !slices.Equal(got, itemFields) {
			t.Errorf("%s: an item of errors has %v, the FieldError schema %v", where, got, itemFields)
		}
	}
}

// TestOpenAPIExamplesAreReal: request examples are the samples in testdata,
// verbatim, and the service takes them; entries in response examples are
// what the service answers for them; problem examples fit the Problem schema.
func TestOpenAPIExamplesAreReal(t *testing.T) {
	spec := readSpec(t)
	samples := map[string]bool{}
	for _, b := range sampleEntries(t) {
		samples[string(b)] = true
	}
	s := newTestServer(t)
	checkEntry := func(where string, entry []byte) {
		if res := s.do(t, request{method: "POST", path: "/addresses", body: string(entry)}); res.status != http.StatusCreated || !bytes.Equal(res.body, entry) {
			t.Errorf("%s: the service answers %d\n%s\nfor the example\n%s", where, res.status, res.body, entry)
		}
	}
	spec.operations(func(route string, op, _ json.RawMessage) {
		method, path, _ := strings.Cut(route, " ")
		responses := spec.members(spec.at(op, "responses"))
		// The address book's bodies are checked against the samples and the
		// service; a resource added to a copy of it may go without examples.
		var requests map[string][]byte
		if spec.text(spec.members(spec.members(op)["requestBody"])["$ref"]) == "#/components/requestBodies/Entry" {
			requests = spec.examples(spec.at(op, "requestBody", "content", "application/json"))
			if len(requests) == 0 {
				t.Errorf("openapi.json %s: no examples of its request body", route)
			}
		}
		for name, body := range requests {
			where := fmt.Sprintf("openapi.json %s request example %q", route, name)
			if !samples[string(body)] {
				t.Errorf("%s is not one of testdata/*.json verbatim: %s", where, body)
			}
			if _, err := ParseEntry(body); err != nil {
				t.Errorf("%s: ParseEntry: %v", where, err)
			}
			switch method {
			case "POST":
				created := spec.examples(spec.at(responses["201"], "content", "application/json"))
				res := s.do(t, request{method: method, path: path, body: string(body)})
				if res.status != http.StatusCreated || !bytes.Equal(res.body, created[name]) {
					t.Errorf("%s: the service answers %d\n%s\nthe 201 example %q is\n%s", where, res.status, res.body, name, created[name])
				}
			case "PUT":
				id, _ := s.create(t, validEntry)
				res := s.do(t, request{method: method, path: strings.Replace(path, "{id}", id, 1), body: string(body)})
				if got := s.do(t, request{method: "GET", path: "/addresses/" + id}); res.status != http.StatusNoContent || !bytes.Equal(got.body, body) {
					t.Errorf("%s: PUT answers %d, then GET %s", where, res.status, got.body)
				}
			}
		}
		for code, resp := range responses {
			status, _ := strconv.Atoi(code)
			for name, body := range spec.examples(spec.at(resp, "content", "application/problem+json")) {
				if code == "default" { // any status: the example says which
					status = int(spec.number(spec.members(body)["status"]))
				}
				checkProblemFields(t, spec, fmt.Sprintf("openapi.json %s %s example %q", route, code, name), status, body)
			}
			media := spec.at(resp, "content", "application/json")
			for name, body := range spec.examples(media) {
				where := fmt.Sprintf("openapi.json %s %s example %q", route, code, name)
				switch spec.text(spec.members(spec.members(media)["schema"])["$ref"]) {
				case "#/components/schemas/Entry":
					checkEntry(where, body)
				case "#/components/schemas/Page": // ids in order, each with an entry
					dec := json.NewDecoder(bytes.NewReader(body))
					dec.Token()
					last := ""
					for dec.More() {
						key, _ := dec.Token()
						var entry json.RawMessage
						dec.Decode(&entry)
						id, _ := key.(string)
						if _, ok := ParseID(id); !ok || id <= last {
							t.Errorf("%s: key %q is not an id after %q", where, id, last)
						}
						checkEntry(where+" "+id, entry)
						last = id
					}
				}
			}
		}
	})
}

// pathMatches reports whether path is an instance of the template: each
// {name} segment matches one segment that is not empty.
func pathMatches(template, path string) bool {
	ts, ps := strings.Split(template, "/"), strings.Split(path, "/")
	if len(ts) != len(ps) {
		return false
	}
	for i := range ts {
		if ts[i] != ps[i] && !(strings.HasPrefix(ts[i], "{") && ps[i] != "") {
			return false
		}
	}
	return true
}

// TestOpenAPIDocumentsWhatTheServerAnswers: each status openapi.json
// documents is a real one with the right kind of body, and real requests
// get statuses, headers and bodies that it documents for the operation
// that answered them.
func TestOpenAPIDocumentsWhatTheServerAnswers(t *testing.T) {
	spec := readSpec(t)
	checkDocumented := func(where string, status int, resp json.RawMessage) {
		content := spec.members(spec.at(resp, "content"))
		switch {
		case strings.HasPrefix(where, "HEAD "):
			if content != nil {
				t.Errorf("openapi.json %s: an answer to HEAD has no body", where)
			}
		case status < 100 || status > 599 || http.StatusText(status) == "":
			t.Errorf("openapi.json %s: %d is not an HTTP status", where, status)
		case status >= 400:
			if len(content) != 1 || spec.text(spec.members(spec.members(content["application/problem+json"])["schema"])["$ref"]) != "#/components/schemas/Problem" {
				t.Errorf("openapi.json %s: a %d is application/problem+json with the Problem schema", where, status)
			}
		case status == http.StatusNoContent || status == http.StatusNotModified:
			if content != nil {
				t.Errorf("openapi.json %s: a %d has no body", where, status)
			}
		case len(content) != 1 || content["application/json"] == nil && content[metricsType[0]] == nil:
			t.Errorf("openapi.json %s: a %d is application/json, or the Prometheus text format", where, status)
		}
		if spec.members(spec.at(resp, "headers"))["X-Request-ID"] == nil {
			t.Errorf("openapi.json %s: X-Request-ID is on every response", where)
		}
	}
	spec.operations(func(route string, op, _ json.RawMessage) {
		for code, resp := range spec.members(spec.at(op, "responses")) {
			status, err := strconv.Atoi(code)
			if err != nil || len(code) != 3 {
				status = 0
			}
			if code == "default" { // any status, so a problem
				status = http.StatusBadRequest
			}
			checkDocumented(route+" "+code, status, resp)
		}
		if spec.at(op, "responses", "default") == nil {
			t.Errorf("openapi.json %s: no default response, so a client has no type for the mux's 404 and 405", route)
		}
	})

	// documented returns the operation that answers method and path, or the
	// mux's response, and what openapi.json says it answers with status.
	documented := func(method, path string, status int) (string, json.RawMessage) {
		paths := spec.members(spec.at(spec.doc, "paths"))
		template := path
		if paths[path] == nil {
			template = ""
			for p := range paths {
				if pathMatches(p, path) {
					template = p
				}
			}
		}
		if method == "HEAD" { // GET's operation documents HEAD's headers and Content-Type
			method = "GET"
		}
		op := spec.members(spec.at(paths[template]))[strings.ToLower(method)]
		switch {
		case template == "" && status == http.StatusNotFound, template != "" && op == nil && status == http.StatusMethodNotAllowed:
			return "the mux", spec.at(spec.doc, "components", "responses", muxResponse)
		case op == nil:
			return "the mux", nil
		}
		return method + " " + template, spec.at(op, "responses", strconv.Itoa(status))
	}
	headers := []string{"ETag", "Location", "Link", "X-Request-ID", "Vary", "Content-Encoding", "Allow", "Retry-After"}
	s := newTestServer(t)
	seen := map[int]bool{}
	sent := map[string]bool{} // problem details, as "404 no resource at this path"
	check := func(s *testServer, req request) {
		t.Helper()
		res := s.do(t, req)
		seen[res.status] = true
		path, _, _ := strings.Cut(req.path, "?")
		op, resp := documented(req.method, path, res.status)
		where := fmt.Sprintf("%s %s answered %d", req.method, req.path, res.status)
		if resp == nil {
			t.Errorf("%s, which openapi.json does not document for %s", where, op)
			return
		}
		doc := map[string]json.RawMessage{}
		for name, h := range spec.members(spec.at(resp, "headers")) {
			doc[http.CanonicalHeaderKey(name)] = spec.deref(h)
		}
		for _, name := range headers {
			h, sent := doc[http.CanonicalHeaderKey(name)], res.header.Get(name) != ""
			if sent && h == nil {
				t.Errorf("%s with %s: %q, which openapi.json does not document for %s %d", where, name, res.header.Get(name), op, res.status)
			}
			if !sent && string(spec.members(h)["required"]) == "true" {
				t.Errorf("%s without %s, which openapi.json says %s %d always has", where, name, op, res.status)
			}
		}
		ct, content := res.header.Get("Content-Type"), spec.members(spec.at(resp, "content"))
		if (ct != "") != (content != nil) || ct != "" && content[ct] == nil {
			t.Errorf("%s with Content-Type %q; openapi.json documents %v for %s %d", where, ct, slices.Sorted(maps.Keys(content)), op, res.status)
		}
		if ct == "application/problem+json" {
			checkProblemFields(t, spec, where, res.status, res.body)
			detail := spec.text(spec.members(res.body)["detail"])
			// The examples show the default -max-body, the test server a smaller one.
			detail = strings.Replace(detail, strconv.Itoa(testMaxBody)+" bytes", strconv.Itoa(1<<20)+" bytes", 1)
			sent[fmt.Sprintf("%d %s", res.status, detail)] = true
		}
	}

	for range 5 {
		s.create(t, validEntry) // a page over 1 KiB, to be gzip-encoded
	}
	id, tag := s.create(t, validEntry)
	entry, unknown := "/addresses/"+id, "/addresses/0123456789abcdef0123456789abcdef"
	gzipOK := map[string]string{"Accept-Encoding": "gzip"}
	for _, req := range []request{
		{method: "POST", path: "/addresses", body: validEntry},
		{method: "POST", path: "/addresses", body: `{"full_name":"","emails":[{"kind":"x"}]}`},
		{method: "POST", path: "/addresses", body: `{"full_name":"A","phone_numbers":[{}` + strings.Repeat(",{}", 49) + `]}`},
		{method: "POST", path: "/addresses", body: `{"full_name":"Ada"`},
		{method: "POST", path: "/addresses", body: `{"full_name":"` + strings.Repeat("a", testMaxBody) + `"}`},
		{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Type": "text/plain"}},
		{method: "POST", path: "/addresses", body: validEntry, header: map[string]string{"Content-Encoding": "br"}},
		{method: "GET", path: "/addresses?limit=1"},
		{method: "GET", path: "/addresses", header: gzipOK},
		{method: "HEAD", path: "/addresses"},
		{method: "GET", path: "/addresses?limit=0"},
		{method: "GET", path: "/addresses?after=xyz"},
		{method: "GET", path: entry},
		{method: "HEAD", path: entry},
		{method: "GET", path: entry, header: map[string]string{"If-None-Match": tag}},
		{method: "GET", path: "/addresses/0123"},
		{method: "PUT", path: entry, body: validEntry, header: map[string]string{"If-Match": `"0123"`}},
		{method: "PUT", path: entry, body: `{"full_name":5}`},
		{method: "PUT", path: entry, body: validEntry, header: map[string]string{"If-Match": tag}},
		{method: "PUT", path: unknown, body: validEntry},
		{method: "PUT", path: unknown, body: validEntry, header: map[string]string{"If-None-Match": "*"}},
		{method: "PUT", path: unknown, body: validEntry, header: map[string]string{"If-None-Match": "*"}},
		{method: "PUT", path: "/addresses/0123", body: validEntry, header: map[string]string{"If-None-Match": "*"}},
		{method: "DELETE", path: entry, header: map[string]string{"If-Match": `"0123"`}},
		{method: "DELETE", path: entry},
		{method: "DELETE", path: entry},
		{method: "PATCH", path: "/addresses"},
		{method: "POST", path: unknown, body: validEntry},
		{method: "DELETE", path: "/healthz"},
		{method: "GET", path: "/nope"},
		{method: "GET", path: entry + "/x"},
		{method: "POST", path: "//addresses", body: validEntry},
		{method: "GET", path: "/addresses/./" + id},
		{method: "GET", path: "/addresses/"},
		{method: "POST", path: "/addresses", body: `{"full_name":"A"}`, header: map[string]string{"Content-Type": "", "Content-Encoding": "gzip"}},
		{method: "GET", path: "/healthz"},
		{method: "GET", path: "/readyz"},
		{method: "GET", path: "/openapi.json", header: gzipOK},
		{method: "HEAD", path: "/openapi.json"},
		{method: "GET", path: "/metrics", header: gzipOK},
		{method: "POST", path: "/metrics"},
	} {
		check(s, req)
	}
	s.ready.Store(false)
	check(s, request{method: "GET", path: "/readyz"})

	// A store on disk with room for almost nothing, whose writes then fail:
	// the 507, the 500 and the readiness 503 for a store that refuses writes.
	store, err := OpenMapStore(filepath.Join(t.TempDir(), "data"), 64, storedRecord(ParseEntry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	failing := newTestServerOn(t, store)
	check(failing, request{method: "POST", path: "/addresses", body: `{"full_name":"` + strings.Repeat("a", 64) + `"}`})
	store.files.createTemp = func(dir, pattern string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: dir, Err: syscall.EROFS}
	}
	check(failing, request{method: "POST", path: "/addresses", body: `{"full_name":"A"}`})
	check(failing, request{method: "GET", path: "/readyz"})
	for _, status := range []int{200, 201, 204, 304, 400, 404, 405, 412, 413, 415, 500, 503, 507} {
		if !seen[status] {
			t.Errorf("no request got a %d; the requests above should reach it", status)
		}
	}

	// Every problem example's detail is one the server sent above, word for
	// word, but the one that needs a crowd of uploads at once, which
	// TestBodyMemoryBudget reaches.
	elsewhere := map[string]bool{"503 the server is reading as many request bodies as its memory allows; try again shortly": true}
	var walk func(at string, node json.RawMessage)
	walk = func(at string, node json.RawMessage) {
		m := spec.members(node)
		if problems := m["application/problem+json"]; problems != nil {
			for name, ex := range spec.examples(problems) {
				f := spec.members(ex)
				detail := fmt.Sprintf("%d %s", spec.number(f["status"]), spec.text(f["detail"]))
				if !sent[detail] && !elsewhere[detail] {
					t.Errorf("openapi.json %s example %q: detail %q, which the server never sent above; it sent %v", at, name, detail, slices.Sorted(maps.Keys(sent)))
				}
			}
		}
		for k, v := range m {
			walk(at+"/"+k, v)
		}
	}
	walk("", spec.doc)
}

// ---- seeing inside: metrics, build, trace context, the debug listener -------------

// metricLines returns GET /metrics's series lines, checking the format on
// the way: every series belongs to the family its HELP and TYPE announced.
func metricLines(t *testing.T, body string) map[string]string {
	t.Helper()
	series := map[string]string{}
	family := ""
	for _, line := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			family, _, _ = strings.Cut(name, " ")
			continue
		}
		if strings.HasPrefix(line, "# HELP ") {
			continue
		}
		key, value, ok := strings.Cut(line, " ")
		name, _, _ := strings.Cut(key, "{")
		base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_sum"), "_count")
		if !ok || (name != family && base != family) {
			t.Errorf("series %q outside its family %q", line, family)
		}
		series[key] = value
	}
	return series
}

// TestMetricsCountRequestsByRoute: each request is counted once under its
// route pattern, method and status; the raw path never becomes a label, and
// a method or status outside the known set cannot grow the label set.
func TestMetricsCountRequestsByRoute(t *testing.T) {
	s := newTestServer(t)
	id, _ := s.create(t, validEntry)
	for _, req := range []request{
		{method: "GET", path: "/addresses/" + id},
		{method: "GET", path: "/addresses/" + id},
		{method: "HEAD", path: "/addresses/" + id},
		{method: "GET", path: "/addresses/0123456789abcdef0123456789abcdef"},
		{method: "GET", path: "/addresses/"},
		{method: "GET", path: "/secret-" + id},
		{method: "BREW", path: "/addresses"},
		{method: "POST", path: "/addresses", body: `{"full_name":"` + strings.Repeat("a", testMaxBody) + `"}`},
	} {
		s.do(t, req)
	}
	res := s.do(t, request{method: "GET", path: "/metrics"})
	if res.status != 200 || res.header.Get("Content-Type") != "text/plain; version=0.0.4; charset=utf-8" {
		t.Fatalf("GET /metrics: %d, Content-Type %q", res.status, res.header.Get("Content-Type"))
	}
	series := metricLines(t, string(res.body))
	count := func(labels string) string { return series["http_server_request_duration_seconds_count{"+labels+"}"] }
	for _, tt := range []struct{ labels, want string }{
		{`http_request_method="POST",http_response_status_code="201",http_route="/addresses"`, "1"},
		{`http_request_method="GET",http_response_status_code="200",http_route="/addresses/{id}"`, "2"},
		{`http_request_method="HEAD",http_response_status_code="200",http_route="/addresses/{id}"`, "1"},
		{`http_request_method="GET",http_response_status_code="404",http_route="/addresses/{id}"`, "1"},
		{`http_request_method="GET",http_response_status_code="404"`, "2"},    // no route matched: /addresses/ and /secret-…
		{`http_request_method="_OTHER",http_response_status_code="405"`, "1"}, // BREW
		{`http_request_method="POST",http_response_status_code="413",http_route="/addresses"`, "1"},
	} {
		if got := count(tt.labels); got != tt.want {
			t.Errorf("count{%s} = %q, want %s", tt.labels, got, tt.want)
		}
	}
	getOne := `http_request_method="GET",http_response_status_code="200",http_route="/addresses/{id}"`
	if got := series["http_server_request_duration_seconds_bucket{"+getOne+`,le="+Inf"}`]; got != "2" {
		t.Errorf("+Inf bucket %q, want the count, 2", got)
	}
	if got, _ := strconv.Atoi(series["http_server_response_body_bytes_total{"+getOne+"}"]); got != 2*len(validEntry) {
		t.Errorf("response bytes %d, want %d", got, 2*len(validEntry))
	}
	if strings.Contains(string(res.body), id) || strings.Contains(string(res.body), "secret") {
		t.Error("a raw path is in the metrics")
	}
	for _, name := range []string{"http_server_active_requests", "addrservice_body_budget_used_bytes", "addrservice_body_budget_limit_bytes"} {
		if _, ok := series[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
	if got := series["addrservice_body_budget_limit_bytes"]; got != strconv.Itoa(4*(testMaxBody+1)) {
		t.Errorf("body budget limit %s, want %d", got, 4*(testMaxBody+1))
	}
}

// TestCountingARequestCostsNoAllocation: the metrics add nothing to the
// garbage collector's work per request.
func TestCountingARequestCostsNoAllocation(t *testing.T) {
	m := newHTTPMetrics()
	routeTable{http.NewServeMux(), m}.Handle("GET /addresses/{id}", http.NotFoundHandler())
	if allocs := testing.AllocsPerRun(1000, func() {
		m.observe("GET /addresses/{id}", "GET", 200, 40*time.Microsecond, 391)
		m.observe("", "BREW", 999, time.Minute, 0)
	}); allocs != 0 {
		t.Errorf("%v allocations per request, want 0", allocs)
	}
}

// BenchmarkCountingARequest is what the metrics add to each request.
func BenchmarkCountingARequest(b *testing.B) {
	m := newHTTPMetrics()
	routeTable{http.NewServeMux(), m}.Handle("GET /addresses/{id}", http.NotFoundHandler())
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.observe("GET /addresses/{id}", "GET", 200, 40*time.Microsecond, 391)
		}
	})
}

// TestProcessMetrics: the program's /metrics reports connections, the
// store, lost log lines, the build and the Go runtime, and answers on the
// debug listener too.
func TestProcessMetrics(t *testing.T) {
	p := startRun(t, nil, "-max-store-bytes", "1MiB", "-max-conns", "7", "-debug-addr", "127.0.0.1:0")
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}} // one connection, so one is open
	defer client.CloseIdleConnections()
	res, err := client.Post("http://"+p.addr+"/addresses", "application/json", strings.NewReader(validEntry))
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body) // read to the end, or the connection is not reused
	res.Body.Close()
	read := func(addr string) map[string]string {
		res, err := client.Get("http://" + addr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		body, _ := io.ReadAll(res.Body)
		return metricLines(t, string(body))
	}
	series := read(p.addr)
	for name, want := range map[string]string{
		"addrservice_connections_open":     "1",
		"addrservice_connections_limit":    "7",
		"addrservice_store_entries":        "1",
		"addrservice_store_bytes":          strconv.Itoa(len(validEntry)),
		"addrservice_store_limit_bytes":    strconv.Itoa(1 << 20),
		"addrservice_log_lines_lost_total": "0",
		`addrservice_build_info{version="(devel)",revision="unknown",go_version="` + runtime.Version() + `"}`: "1",
	} {
		if series[name] != want {
			t.Errorf("%s = %q, want %s", name, series[name], want)
		}
	}
	for _, name := range []string{"go_goroutines", "go_gc_heap_live_bytes", "go_memory_classes_total_bytes", `go_sched_pauses_total_gc_seconds_bucket{le="+Inf"}`} {
		if _, ok := series[name]; !ok {
			t.Errorf("no %s", name)
		}
	}
	if got := read(debugAddr(t, p))["addrservice_store_entries"]; got != "1" {
		t.Errorf("debug listener's /metrics: store entries %q, want 1", got)
	}
}

// debugAddr is where the program's debug listener listens, from its
// starting line.
func debugAddr(t *testing.T, p *program) string {
	t.Helper()
	for _, rec := range logRecords(t, p.logs.String()) {
		if addr, _ := rec["debug_addr"].(string); rec["msg"] == "starting" && addr != "" {
			return addr
		}
	}
	t.Fatal("no debug_addr in the starting line")
	return ""
}

// TestDebugListener: profiles, expvar and metrics answer on -debug-addr
// only; the public listener answers /debug/ with a 404 problem, and neither
// shows the command line, which may hold a database password.
func TestDebugListener(t *testing.T) {
	p := startRun(t, nil, "-debug-addr", "127.0.0.1:0")
	debug := debugAddr(t, p)
	for _, tt := range []struct {
		addr, path string
		status     int
		contains   string
	}{
		{debug, "/debug/pprof/", 200, "goroutine"},
		{debug, "/debug/pprof/heap?debug=1", 200, "heap profile"},
		{debug, "/debug/pprof/goroutine?debug=1", 200, "goroutine profile"},
		{debug, "/debug/pprof/mutex?debug=1", 200, "mutex"},
		{debug, "/debug/pprof/block?debug=1", 200, "contention"},
		{debug, "/debug/pprof/profile?seconds=1", 200, ""},
		{debug, "/debug/pprof/trace?seconds=0.1", 200, ""},
		{debug, "/debug/pprof/cmdline", 404, ""},
		{debug, "/debug/vars", 200, `"memstats"`},
		{debug, "/metrics", 200, "addrservice_build_info"},
		{p.addr, "/debug/pprof/", 404, `"status":404`},
		{p.addr, "/debug/vars", 404, `"status":404`},
	} {
		res, err := http.Get("http://" + tt.addr + tt.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != tt.status || !strings.Contains(string(body), tt.contains) {
			t.Errorf("%s%s: %d, want %d with %q", tt.addr, tt.path, res.StatusCode, tt.status, tt.contains)
		}
		for _, arg := range os.Args[1:] { // this test binary's own command line
			if strings.HasPrefix(arg, "-test.") && strings.Contains(string(body), arg) {
				t.Errorf("%s%s shows the command line: %s", tt.addr, tt.path, arg)
			}
		}
	}
}

// TestRunVersionPrintsTheBuild: -version prints the build on stdout and
// exits 0 without serving; ADDRSERVICE_VERSION, likely a deployment's own
// variable, is not read as the flag.
func TestRunVersionPrintsTheBuild(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if err := run(context.Background(), []string{"-version"}, func(string) string { return "" }, &stdout, &stderr); err != nil {
		t.Fatalf("run -version = %v, want nil (exit status 0)", err)
	}
	if want := "addrservice (devel) revision unknown modified false " + runtime.Version() + "\n"; stdout.String() != want {
		t.Errorf("stdout %q, want %q", stdout.String(), want)
	}
	p := startRun(t, map[string]string{"ADDRSERVICE_VERSION": "1.2.3"})
	for _, rec := range logRecords(t, p.logs.String()) {
		if rec["msg"] == "starting" && (rec["version"] != "(devel)" || rec["revision"] != "unknown" || rec["modified"] != false) {
			t.Errorf("starting line: version %v, revision %v, modified %v", rec["version"], rec["revision"], rec["modified"])
		}
	}
}

// TestTraceparent: a valid W3C traceparent puts its trace and parent ids in
// the request's log line; anything the spec calls invalid is ignored.
func TestTraceparent(t *testing.T) {
	const trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	tests := []struct {
		name   string
		header []string
		valid  bool
	}{
		{"sampled", []string{"00-" + trace + "-" + span + "-01"}, true},
		{"not sampled", []string{"00-" + trace + "-" + span + "-00"}, true},
		{"a later version, longer", []string{"01-" + trace + "-" + span + "-01-what-comes-next"}, true},
		{"a later version, same length", []string{"cc-" + trace + "-" + span + "-09"}, true},
		{"absent", nil, false},
		{"empty", []string{""}, false},
		{"version ff", []string{"ff-" + trace + "-" + span + "-01"}, false},
		{"version 00, longer", []string{"00-" + trace + "-" + span + "-01-x"}, false},
		{"a later version, longer without a dash", []string{"01-" + trace + "-" + span + "-01x"}, false},
		{"uppercase hex", []string{"00-" + strings.ToUpper(trace) + "-" + span + "-01"}, false},
		{"trace id all zeros", []string{"00-00000000000000000000000000000000-" + span + "-01"}, false},
		{"parent id all zeros", []string{"00-" + trace + "-0000000000000000-01"}, false},
		{"trace id short", []string{"00-" + trace[1:] + "-" + span + "-01"}, false},
		{"wrong separator", []string{"00_" + trace + "-" + span + "-01"}, false},
		{"flags not hex", []string{"00-" + trace + "-" + span + "-0g"}, false},
		{"version not hex", []string{"0x-" + trace + "-" + span + "-01"}, false},
		{"twice", []string{"00-" + trace + "-" + span + "-01", "00-" + trace + "-" + span + "-01"}, false},
	}
	s := newTestServer(t)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reqID := fmt.Sprintf("trace-%d", i)
			req, _ := http.NewRequest("GET", s.URL+"/healthz", nil)
			req.Header["X-Request-Id"] = []string{reqID}
			req.Header["Traceparent"] = tt.header
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			var rec map[string]any
			for _, r := range logRecords(t, s.logs.String()) {
				if r["request_id"] == reqID {
					rec = r
				}
			}
			if rec == nil {
				t.Fatal("no request line")
			}
			if tt.valid && (rec["trace_id"] != trace || rec["span_id"] != span) {
				t.Errorf("trace_id %v, span_id %v; want %s, %s", rec["trace_id"], rec["span_id"], trace, span)
			}
			if _, ok := rec["trace_id"]; !tt.valid && ok {
				t.Errorf("an invalid traceparent was logged: trace_id %v", rec["trace_id"])
			}
		})
	}
}

// ---- performance: the service beside the net/http ceiling ---------------------------

// The HTTP benchmarks drive a real server over loopback keep-alive
// connections with a minimal client, for each workload twice: against the
// service, and against a "ceiling" handler that writes the same response
// bytes and headers and does nothing else. ceiling ns/op ÷ service ns/op is
// the fraction of the ceiling the service reaches; ./check.sh bench prints it.
//
// ADDRSERVICE_BENCH_ENTRIES lists the book sizes (default 1000; under -short
// only 1000): ADDRSERVICE_BENCH_ENTRIES=1000,100000,1000000 ./check.sh bench

const benchConns = 64

func benchSizes(b *testing.B) []int {
	spec := os.Getenv("ADDRSERVICE_BENCH_ENTRIES")
	if spec == "" || testing.Short() {
		spec = "1000"
	}
	var sizes []int
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			b.Fatalf("ADDRSERVICE_BENCH_ENTRIES: %q is not a list of sizes", spec)
		}
		sizes = append(sizes, n)
	}
	return sizes
}

// benchBook is a service seeded with n copies of a realistic entry.
type benchBook struct {
	handler http.Handler
	ids     []string
	entry   []byte
	logFile *os.File
}

func newBenchBook(b *testing.B, n int) *benchBook {
	b.Helper()
	entry := sampleEntries(b)["testdata/rajesh-kumar.json"]
	logFile, err := os.CreateTemp(b.TempDir(), "requests-*.log")
	if err != nil {
		b.Fatal(err)
	}
	// Logging on, into a file, buffered, as serve sets it up.
	logs := newLogBuffer(logFile, 100*time.Millisecond)
	b.Cleanup(func() { logs.Close(time.Second) })
	log := newLogger(logs, "text", slog.LevelInfo)
	store := NewMapStore(0)
	svc := NewCollection[Entry](store, log, time.Second)
	e, err := ParseEntry(entry)
	if err != nil {
		b.Fatal(err)
	}
	book := &benchBook{entry: entry, logFile: logFile}
	for range n {
		id, _, err := svc.Create(context.Background(), e)
		if err != nil {
			b.Fatal(err)
		}
		book.ids = append(book.ids, id.String())
	}
	ready := new(atomic.Bool)
	ready.Store(true)
	book.handler = newHandler(log, resources{book: svc}, handlerConfig{maxBody: 1 << 20, bodies: newBodyBudget(64 << 20), ready: ready, storeReady: readiness(0, store), metrics: newHTTPMetrics()})
	return book
}

// benchWorkload is one kind of traffic: how to make request i, and the
// ceiling handler that answers it with the service's bytes and headers.
type benchWorkload struct {
	name    string
	request func(i int) []byte
	ceiling http.Handler
}

func rawRequest(method, path string, body []byte) []byte {
	req := method + " " + path + " HTTP/1.1\r\nHost: bench\r\n"
	if body != nil {
		req += "Content-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n"
	}
	return append([]byte(req+"\r\n"), body...)
}

// ceilingFor records the service's response to req and returns a handler
// that writes those bytes and headers, with a fresh request id each time.
func ceilingFor(b *testing.B, h http.Handler, reqs ...*http.Request) http.Handler {
	b.Helper()
	type canned struct {
		status int
		header http.Header
		body   []byte
	}
	var responses []canned
	for _, req := range reqs {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		res := rec.Result()
		body, _ := io.ReadAll(res.Body)
		res.Header.Del("Date")
		responses = append(responses, canned{res.StatusCode, res.Header, body})
	}
	var n atomic.Uint64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := responses[0]
		if r.Method != "GET" && len(responses) > 1 {
			c = responses[1]
		}
		for k, v := range c.header {
			w.Header()[k] = v
		}
		w.Header()["X-Request-ID"] = []string{strconv.FormatUint(n.Add(1), 16)}
		w.WriteHeader(c.status)
		w.Write(c.body)
	})
}

func benchWorkloads(b *testing.B, book *benchBook) []benchWorkload {
	id0 := "/addresses/" + book.ids[0]
	getReqs := make([][]byte, len(book.ids))
	for i, id := range book.ids {
		getReqs[i] = rawRequest("GET", "/addresses/"+id, nil)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	order := make([]int, 1<<16) // random ids, chosen before the clock starts
	for i := range order {
		order[i] = rng.IntN(len(book.ids))
	}
	put := func(i int) []byte {
		return rawRequest("PUT", "/addresses/"+book.ids[order[i%len(order)]], book.entry)
	}
	get := func(i int) []byte { return getReqs[order[i%len(order)]] }
	list := rawRequest("GET", "/addresses?limit=100", nil)
	post := rawRequest("POST", "/addresses", book.entry)
	newReq := func(method, path string, body []byte) *http.Request {
		r := httptest.NewRequest(method, path, bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		return r
	}
	return []benchWorkload{
		{"get", get, ceilingFor(b, book.handler, newReq("GET", id0, nil))},
		{"post", func(int) []byte { return post }, ceilingFor(b, book.handler, newReq("POST", "/addresses", book.entry))},
		{"list100", func(int) []byte { return list }, ceilingFor(b, book.handler, newReq("GET", "/addresses?limit=100", nil))},
		{"mixed90get10put", func(i int) []byte {
			if i%10 == 9 {
				return put(i)
			}
			return get(i)
		}, ceilingFor(b, book.handler, newReq("GET", id0, nil), newReq("PUT", id0, book.entry))},
	}
}

// driveHTTP sends b.N requests over benchConns keep-alive connections and
// checks every status is a success.
func driveHTTP(b *testing.B, h http.Handler, request func(i int) []byte) {
	b.Helper()
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.Start()
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	conns := make([]net.Conn, benchConns)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	b.ResetTimer()
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := bufio.NewReaderSize(c, 64<<10)
			for {
				i := int(next.Add(1) - 1)
				if i >= b.N {
					return
				}
				if _, err := c.Write(request(i)); err != nil {
					failed.Store(err.Error())
					return
				}
				if status, err := readRawResponse(r); err != nil || status >= 300 && status != 304 {
					failed.Store(fmt.Sprintf("status %d, %v", status, err))
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if f := failed.Load(); f != nil {
		b.Fatal(f)
	}
}

// readRawResponse reads one HTTP/1.1 response with a Content-Length.
func readRawResponse(r *bufio.Reader) (status int, err error) {
	length := 0
	for first := true; ; first = false {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		if first {
			if len(line) < 12 {
				return 0, fmt.Errorf("bad status line %q", line)
			}
			status, _ = strconv.Atoi(string(line[9:12]))
			continue
		}
		if len(line) <= 2 {
			break
		}
		if len(line) > 16 && strings.EqualFold(string(line[:15]), "Content-Length:") {
			length, _ = strconv.Atoi(strings.TrimSpace(string(line[15:])))
		}
	}
	_, err = r.Discard(length)
	return status, err
}

func BenchmarkHTTP(b *testing.B) {
	for _, n := range benchSizes(b) {
		book := newBenchBook(b, n)
		for _, w := range benchWorkloads(b, book) {
			b.Run(fmt.Sprintf("entries=%d/%s/ceiling", n, w.name), func(b *testing.B) {
				driveHTTP(b, w.ceiling, w.request)
			})
			b.Run(fmt.Sprintf("entries=%d/%s/service", n, w.name), func(b *testing.B) {
				b.ReportAllocs()
				driveHTTP(b, book.handler, w.request)
			})
		}
	}
}

// BenchmarkHandler measures the service's own chain, middleware included,
// without the network: what the service adds to each request.
func BenchmarkHandler(b *testing.B) {
	book := newBenchBook(b, 1000)
	for _, w := range benchWorkloads(b, book) {
		b.Run(w.name, func(b *testing.B) {
			b.ReportAllocs()
			var reqs []*http.Request
			for i := range 1 << 10 {
				req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(w.request(i))))
				if err != nil {
					b.Fatal(err)
				}
				body, _ := io.ReadAll(req.Body)
				req.Body = &rewindBody{bytes.NewReader(body)}
				req.RemoteAddr = "127.0.0.1:1234"
				reqs = append(reqs, req)
			}
			rec := &discardWriter{header: http.Header{}}
			b.ResetTimer()
			for i := range b.N {
				req := reqs[i%len(reqs)]
				req.Body.(*rewindBody).Seek(0, io.SeekStart)
				clear(rec.header)
				book.handler.ServeHTTP(rec, req)
			}
		})
	}
}

// rewindBody is a request body a benchmark can read again.
type rewindBody struct{ *bytes.Reader }

func (rewindBody) Close() error { return nil }

// discardWriter is a ResponseWriter that keeps nothing but its header map.
type discardWriter struct{ header http.Header }

func (w *discardWriter) Header() http.Header         { return w.header }
func (w *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *discardWriter) WriteHeader(int)             {}

// TestCeilingServer is not a test on its own: ./check.sh load runs the test
// binary with ADDRSERVICE_CEILING_FROM set to a running service, and then
// this serves the ceiling that the service is measured against: a bare
// net/http handler writing the bytes and headers the service wrote for the
// same kind of request, and nothing else.
func TestCeilingServer(t *testing.T) {
	from, id := os.Getenv("ADDRSERVICE_CEILING_FROM"), os.Getenv("ADDRSERVICE_CEILING_ID")
	if from == "" {
		t.Skip("runs only under ./check.sh load")
	}
	entry, err := os.ReadFile(os.Getenv("ENTRY_FILE"))
	if err != nil {
		t.Fatal(err)
	}
	type canned struct {
		status int
		header http.Header
		body   []byte
	}
	fetch := func(method, path string, body []byte, header ...string) canned {
		req, _ := http.NewRequest(method, from+path, bytes.NewReader(body))
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		for i := 0; i+1 < len(header); i += 2 {
			req.Header.Set(header[i], header[i+1])
		}
		res, err := noDecompression.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		res.Header.Del("Date")
		res.Header.Del("X-Request-Id") // the ceiling makes its own, as the service does
		return canned{res.StatusCode, res.Header, b}
	}
	get := fetch("GET", "/addresses/"+id, nil)
	list := fetch("GET", "/addresses?limit=100", nil)
	listgz := fetch("GET", "/addresses?limit=100", nil, "Accept-Encoding", "gzip")
	put := fetch("PUT", "/addresses/"+id, entry)
	post := fetch("POST", "/addresses", entry)
	var n atomic.Uint64
	ceiling := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c := get
		switch {
		case r.Method == "POST":
			c = post
		case r.Method == "PUT":
			c = put
		case r.URL.RawQuery != "" && r.Header.Get("Accept-Encoding") != "":
			c = listgz
		case r.URL.RawQuery != "":
			c = list
		}
		for k, v := range c.header {
			w.Header()[k] = v
		}
		w.Header()["X-Request-ID"] = []string{strconv.FormatUint(n.Add(1), 16)}
		w.WriteHeader(c.status)
		w.Write(c.body)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("ceiling addr=%s\n", ln.Addr())
	os.Stdout.Sync()
	http.Serve(ln, ceiling)
}
