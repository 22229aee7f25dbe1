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
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
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
	return newTestServerOn(t, NewMapStore())
}

// newTestServerOn is newTestServer with the given store.
func newTestServerOn(t *testing.T, store Store) *testServer {
	t.Helper()
	logs := &syncBuffer{}
	log := newLogger(logs, "json", slog.LevelDebug)
	ready := new(atomic.Bool)
	ready.Store(true)
	svc := NewService(store, log)
	srv := httptest.NewServer(newHandler(log, svc, handlerConfig{maxBody: testMaxBody, ready: ready}))
	t.Cleanup(srv.Close)
	return &testServer{Server: srv, logs: logs, ready: ready}
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
		RequestID: res.header.Get("X-Request-ID"), Detail: p.Detail, Errors: p.Errors}
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
		{"a +json type", map[string]string{"Content-Type": "application/vnd.addrservice+json"}, validEntry},
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

	// /addresses/ answers as /addresses; after need not exist; the default limit is 100.
	res := s.do(t, request{method: "GET", path: "/addresses/?after=00000000000000000000000000000000"})
	if res.status != 200 || strings.Count(string(res.body), `"full_name"`) != 7 || res.header.Get("Link") != "" {
		t.Errorf("GET /addresses/: %d %s Link %q", res.status, res.body, res.header.Get("Link"))
	}
	for i := 7; i < 101; i++ {
		s.create(t, `{"full_name":"more"}`)
	}
	res = s.do(t, request{method: "GET", path: "/addresses"})
	if n := strings.Count(string(res.body), `"full_name"`); n != 100 || !strings.Contains(res.header.Get("Link"), "limit=100&after=") {
		t.Errorf("default page: %d entries, Link %q", n, res.header.Get("Link"))
	}
	res = s.do(t, request{method: "POST", path: "/addresses/", body: validEntry})
	if res.status != http.StatusCreated {
		t.Errorf("POST /addresses/: %d", res.status)
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
	for _, path := range []string{"/addresses/" + id, "/addresses", "/addresses/", "/healthz", "/readyz"} {
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
	if res := s.do(t, request{method: "GET", path: "/healthz"}); res.status != 200 || string(res.body) != `{"status":"ok"}` {
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
		{"unknown flag", []string{"-verbose"}, nil, "-verbose"},
		{"a stray argument", []string{"serve"}, nil, `"serve"`},
		{"bad variable", nil, map[string]string{"ADDRSERVICE_MAX_BODY": "lots"}, "ADDRSERVICE_MAX_BODY"},
		{"bad level variable", nil, map[string]string{"ADDRSERVICE_LOG_LEVEL": "loud"}, "ADDRSERVICE_LOG_LEVEL"},
		{"bad timeout variable", nil, map[string]string{"ADDRSERVICE_SHUTDOWN_TIMEOUT": "1"}, "ADDRSERVICE_SHUTDOWN_TIMEOUT"},
		{"bad addr variable", nil, map[string]string{"ADDRSERVICE_ADDR": "nowhere"}, "-addr"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs, stderr bytes.Buffer
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, &logs, &stderr)
			var usage *usageError
			if !errors.As(err, &usage) {
				t.Fatalf("run = %v, want a usage error (exit status 2)", err)
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

// secretURL is a database URL whose password must never be printed or logged.
const secretURL = "postgres://addrservice:s3cret@db.example/addrservice"

func TestRunRefusesADatabaseURLItCannotUse(t *testing.T) {
	saved := openDatabase
	t.Cleanup(func() { openDatabase = saved })
	opened := func(context.Context, string, string) (Store, error) {
		t.Error("the database was opened")
		return NewMapStore(), nil
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
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			openDatabase = tt.openDatabase
			var logs, stderr bytes.Buffer
			err := run(context.Background(), tt.args, func(k string) string { return tt.env[k] }, &logs, &stderr)
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
	var gotURL, gotTable string
	openDatabase = func(_ context.Context, url, table string) (Store, error) {
		gotURL, gotTable = url, table
		return NewMapStore(), nil
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
	if gotURL != secretURL || gotTable != "addresses" {
		t.Errorf("openDatabase(%q, %q), want (%q, %q)", gotURL, gotTable, secretURL, "addresses")
	}
	if strings.Contains(p.logs.String(), "s3cret") {
		t.Errorf("the password is in the logs:\n%s", p.logs.String())
	}

	openDatabase = func(context.Context, string, string) (Store, error) { return nil, errors.New("connection refused") }
	var logs, stderr bytes.Buffer
	err = run(context.Background(), []string{"-addr", "127.0.0.1:0", "-database-url", secretURL}, func(string) string { return "" }, &logs, &stderr)
	var usage *usageError
	if err == nil || errors.As(err, &usage) || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("with a database that refuses: run = %v, want its error (exit status 1)", err)
	}
}

func TestRunHelpPrintsUsage(t *testing.T) {
	var logs, stderr bytes.Buffer
	if err := run(context.Background(), []string{"-h"}, func(string) string { return "" }, &logs, &stderr); err != nil {
		t.Fatalf("run -h = %v, want nil", err)
	}
	for _, want := range []string{"-addr", "-data", "-database-url", "-log-level", "-log-format", "-max-body", "-shutdown-timeout", "ADDRSERVICE_", "1048576", ":8080", "10s"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("usage lacks %q:\n%s", want, stderr.String())
		}
	}
}

func TestGCPercentKeepsHeadroomNearConstant(t *testing.T) {
	tests := []struct {
		live uint64
		want int
	}{
		{0, 100}, {4 << 20, 100}, {32 << 20, 100}, {64 << 20, 50}, {100 << 20, 32}, {128 << 20, 25}, {8 << 30, 25},
	}
	for _, tt := range tests {
		if got := gcPercentFor(tt.live); got != tt.want {
			t.Errorf("gcPercentFor(%d MiB) = %d, want %d", tt.live>>20, got, tt.want)
		}
	}
}

func TestRunFailsWhenThePortIsTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	err = run(context.Background(), []string{"-addr", ln.Addr().String()}, func(string) string { return "" }, io.Discard, io.Discard)
	var usage *usageError
	if err == nil || errors.As(err, &usage) {
		t.Fatalf("run on a taken port = %v, want a start error (exit status 1)", err)
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
	addRoutes(mux, log, NewService(NewMapStore(), log), handlerConfig{maxBody: testMaxBody, ready: ready})
	mux.HandleFunc("GET /panic", func(w http.ResponseWriter, r *http.Request) { panic("boom at the handler") })
	mux.HandleFunc("GET /panic-late", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("partial"))
		panic("boom after the response began")
	})
	srv := httptest.NewServer(withMiddleware(log, mux))
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
	pattern := `^time=\S+ level=INFO msg=request method=GET path=/healthz route="GET /healthz" status=200 bytes=15 duration=\S+ remote=127\.0\.0\.1:\d+ request_id=abc-123$`
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
		if rec["msg"] == "entry created" {
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
	p := startProgram(t, func(ctx context.Context, logs, _ io.Writer) error { return serve(ctx, cfg, logs) })

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
	store, err := OpenMapStore(dir)
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
	store, err := OpenMapStore(t.TempDir())
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
	err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-log-format", "json"}, os.Getenv, os.Stdout, os.Stderr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// crashChild is the server running in a child process on a data directory.
type crashChild struct {
	cmd  *exec.Cmd
	base string
}

func startCrashChild(t *testing.T, dir string) *crashChild {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
	cmd.Env = append(os.Environ(), "ADDRSERVICE_CRASH_HELPER=1", "ADDRSERVICE_DATA="+dir)
	cmd.Stderr = os.Stderr
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
			go io.Copy(io.Discard, out) // keep the child's log pipe flowing
			return &crashChild{cmd: cmd, base: "http://" + rec["addr"].(string)}
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Fatalf("the child did not start")
	return nil
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
	b.Cleanup(logs.Close)
	log := newLogger(logs, "text", slog.LevelInfo)
	svc := NewService(NewMapStore(), log)
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
	book.handler = newHandler(log, svc, handlerConfig{maxBody: 1 << 20, ready: ready})
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
		w.Header()["X-Request-Id"] = []string{strconv.FormatUint(n.Add(1), 16)}
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
	fetch := func(method, path string, body []byte) canned {
		req, _ := http.NewRequest(method, from+path, bytes.NewReader(body))
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		res, err := noDecompression.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		res.Header.Del("Date")
		return canned{res.StatusCode, res.Header, b}
	}
	get := fetch("GET", "/addresses/"+id, nil)
	list := fetch("GET", "/addresses?limit=100", nil)
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
		case r.URL.RawQuery != "":
			c = list
		}
		for k, v := range c.header {
			w.Header()[k] = v
		}
		w.Header()["X-Request-Id"] = []string{strconv.FormatUint(n.Add(1), 16)}
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
