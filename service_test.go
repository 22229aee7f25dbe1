package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// validEntry is a small entry that passes every rule; cases change one thing.
const validEntry = `{"full_name":"Ada Lovelace","addresses":[{"kind":"home","street_name":"St James's Square","pincode":"SW1Y 4JH","country":"United Kingdom"}],"phone_numbers":[{"kind":"work","country_code":44,"local_number":79460000}],"emails":[{"kind":"home","email":"ada@example.org"}]}`

func TestParseEntryKeepsWhatWasSent(t *testing.T) {
	tests := []struct {
		name string
		body string
	}{
		{"only the required field", `{"full_name":"Ada"}`},
		{"empty lists stay empty", `{"full_name":"Ada","addresses":[],"phone_numbers":[],"fax_numbers":[],"emails":[]}`},
		{"numbers stay numbers", `{"full_name":"A","addresses":[{"kind":"home","unit_number":1,"street_number":7,"street_name":"s","pincode":110011,"country":"IN"}]}`},
		{"strings stay strings", `{"full_name":"A","addresses":[{"kind":"work","street_number":"7","street_name":"s","pincode":"110011","country":"IN"}]}`},
		{"empty optional strings are kept", `{"full_name":"A","addresses":[{"kind":"home","building_name":"","street_name":"s","locality":"","city":"","province":"","pincode":1,"country":"c"}]}`},
		{"largest integer a JavaScript number holds exactly", `{"full_name":"A","phone_numbers":[{"kind":"home","country_code":999,"area_code":9007199254740991,"local_number":1}]}`},
		{"256 characters, counted as characters", `{"full_name":"` + strings.Repeat("é", 256) + `"}`},
		{"64 items", `{"full_name":"A","emails":[` + strings.TrimSuffix(strings.Repeat(`{"kind":"home","email":"a@b.c"},`, 64), ",") + `]}`},
		{"the full model", validEntry},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := ParseEntry([]byte(tt.body))
			if err != nil {
				t.Fatalf("ParseEntry: %v (%+v)", err, err)
			}
			rec, err := NewRecord(e)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(rec.JSON); got != tt.body {
				t.Errorf("stored JSON differs from what was sent\n got %s\nwant %s", got, tt.body)
			}
		})
	}
}

func TestParseEntryDecodesEscapes(t *testing.T) {
	e, err := ParseEntry([]byte(`{"full_name":"A\u00e9\ud83d\ude00 \"q\" \\ \/"}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := "Aé😀 \"q\" \\ /"; e.FullName != want {
		t.Errorf("full_name = %q, want %q", e.FullName, want)
	}
}

// TestParseEntryRejectsInvalidFields checks every validation rule: each case
// must be a 400-style InvalidError naming exactly these fields.
func TestParseEntryRejectsInvalidFields(t *testing.T) {
	addr := func(fields string) string {
		return `{"full_name":"A","addresses":[{"kind":"home","street_name":"s","pincode":1,"country":"c"},{` + fields + `}]}`
	}
	goodAddr := `"kind":"home","street_name":"s","pincode":1,"country":"c"`
	phone := func(fields string) string { return `{"full_name":"A","fax_numbers":[{` + fields + `}]}` }
	email := func(value string) string { return `{"full_name":"A","emails":[{"kind":"work","email":` + value + `}]}` }
	long := strings.Repeat("x", 257)
	tests := []struct {
		name string
		body string
		want []FieldError
	}{
		{"full_name missing", `{}`, []FieldError{{"full_name", "is required"}}},
		{"full_name blank", `{"full_name":"  "}`, []FieldError{{"full_name", "must not be blank"}}},
		{"full_name empty", `{"full_name":""}`, []FieldError{{"full_name", "must not be blank"}}},
		{"full_name only a byte order mark, which ECMAScript counts as space", `{"full_name":"\ufeff"}`, []FieldError{{"full_name", "must not be blank"}}},
		{"full_name only no-break and ideographic spaces", `{"full_name":"\u00a0\u3000"}`, []FieldError{{"full_name", "must not be blank"}}},
		{"full_name too long", `{"full_name":"` + long + `"}`, []FieldError{{"full_name", "must be at most 256 characters"}}},
		{"full_name a number", `{"full_name":5}`, []FieldError{{"full_name", "must be a string"}}},
		{"full_name null", `{"full_name":null}`, []FieldError{{"full_name", "must not be null"}}},
		{"control character", `{"full_name":"A\u0000B"}`, []FieldError{{"full_name", "must not contain control characters"}}},
		{"escaped newline", `{"full_name":"A\nB"}`, []FieldError{{"full_name", "must not contain control characters"}}},
		{"C1 control character", `{"full_name":"A\u0085"}`, []FieldError{{"full_name", "must not contain control characters"}}},
		{"unknown field", `{"full_name":"A","nickname":"a"}`, []FieldError{{"nickname", "is not a known field"}}},
		{"case variant of a field", `{"full_name":"A","FULL_NAME":"B"}`, []FieldError{{"FULL_NAME", "is not a known field"}}},
		{"case variant alone", `{"Full_Name":"A"}`, []FieldError{{"Full_Name", "is not a known field"}, {"full_name", "is required"}}},
		{"duplicate key", `{"full_name":"A","full_name":"B"}`, []FieldError{{"full_name", "is given more than once"}}},
		{"unknown null field", `{"full_name":"A","x":null}`, []FieldError{{"x", "is not a known field"}}},
		{"duplicate key in a large object", `{"full_name":"A",` + manyKeys(20) + `,"full_name":"B"}`, append(unknownKeys(20), FieldError{"full_name", "is given more than once"})},
		{"list not a list", `{"full_name":"A","emails":{}}`, []FieldError{{"emails", "must be a list"}}},
		{"list null", `{"full_name":"A","addresses":null}`, []FieldError{{"addresses", "must not be null"}}},
		{"key too long to be a field", `{"full_name":"A","` + long + `":1}`, []FieldError{{"(a key of over 256 characters)", "is not a known field"}}},
		{"escaped string too long", `{"full_name":"` + strings.Repeat(`\u00e9`, 257) + `"}`, []FieldError{{"full_name", "must be at most 256 characters"}}},
		{"pincode too long", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":"`+long+`"`, 1)), []FieldError{{"addresses[1].pincode", "must be at most 256 characters"}}},
		{"list far too long", `{"full_name":"A","emails":[` + strings.Repeat(`0,`, 10000) + `0]}`, []FieldError{{"emails", "must have at most 64 items"}}},
		{"list too long", `{"full_name":"A","phone_numbers":[` + strings.TrimSuffix(strings.Repeat(`{"kind":"home","country_code":1,"local_number":1},`, 65), ",") + `]}`, []FieldError{{"phone_numbers", "must have at most 64 items"}}},
		{"item not an object", `{"full_name":"A","addresses":[1]}`, []FieldError{{"addresses[0]", "must be an object"}}},
		{"address missing everything", addr(``), []FieldError{{"addresses[1].kind", "is required"}, {"addresses[1].street_name", "is required"}, {"addresses[1].pincode", "is required"}, {"addresses[1].country", "is required"}}},
		{"address kind not an enum", addr(strings.Replace(goodAddr, `"home"`, `"holiday"`, 1)), []FieldError{{"addresses[1].kind", `must be "home" or "work"`}}},
		{"address kind in capitals", addr(strings.Replace(goodAddr, `"home"`, `"HOME"`, 1)), []FieldError{{"addresses[1].kind", `must be "home" or "work"`}}},
		{"unknown address field", addr(goodAddr + `,"zip":"1"`), []FieldError{{"addresses[1].zip", "is not a known field"}}},
		{"pincode zero", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":0`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode negative", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":-5`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode 7.0", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":7.0`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode 1e2", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":1e2`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode over 64 bits", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":9223372036854775808`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode blank", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":" "`, 1)), []FieldError{{"addresses[1].pincode", "must not be blank"}}},
		{"pincode boolean", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":true`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"pincode null", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":null`, 1)), []FieldError{{"addresses[1].pincode", "must not be null"}}},
		{"street_number blank", addr(goodAddr + `,"street_number":""`), []FieldError{{"addresses[1].street_number", "must not be blank"}}},
		{"street_number an object", addr(goodAddr + `,"street_number":{}`), []FieldError{{"addresses[1].street_number", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"unit_number text", addr(goodAddr + `,"unit_number":"12"`), []FieldError{{"addresses[1].unit_number", "must be an integer from 1 to 9007199254740991"}}},
		{"unit_number fraction", addr(goodAddr + `,"unit_number":1.5`), []FieldError{{"addresses[1].unit_number", "must be an integer from 1 to 9007199254740991"}}},
		{"street_name blank", addr(strings.Replace(goodAddr, `"street_name":"s"`, `"street_name":"\t"`, 1)), []FieldError{{"addresses[1].street_name", "must not contain control characters"}}},
		{"country blank", addr(strings.Replace(goodAddr, `"country":"c"`, `"country":"   "`, 1)), []FieldError{{"addresses[1].country", "must not be blank"}}},
		{"optional string a number", addr(goodAddr + `,"city":5`), []FieldError{{"addresses[1].city", "must be a string"}}},
		{"optional string too long", addr(goodAddr + `,"locality":"` + long + `"`), []FieldError{{"addresses[1].locality", "must be at most 256 characters"}}},
		{"optional string null", addr(goodAddr + `,"province":null`), []FieldError{{"addresses[1].province", "must not be null"}}},
		{"phone missing fields", phone(``), []FieldError{{"fax_numbers[0].kind", "is required"}, {"fax_numbers[0].country_code", "is required"}, {"fax_numbers[0].local_number", "is required"}}},
		{"country_code 1000", phone(`"kind":"home","country_code":1000,"local_number":1`), []FieldError{{"fax_numbers[0].country_code", "must be an integer from 1 to 999"}}},
		{"area_code 2^53, which a JavaScript client would read back as 2^53-1", phone(`"kind":"home","country_code":1,"area_code":9007199254740992,"local_number":1`), []FieldError{{"fax_numbers[0].area_code", "must be an integer from 1 to 9007199254740991"}}},
		{"pincode 2^53+1", addr(strings.Replace(goodAddr, `"pincode":1`, `"pincode":9007199254740993`, 1)), []FieldError{{"addresses[1].pincode", "must be an integer from 1 to 9007199254740991 or a non-blank string"}}},
		{"country_code 0", phone(`"kind":"home","country_code":0,"local_number":1`), []FieldError{{"fax_numbers[0].country_code", "must be an integer from 1 to 9007199254740991"}}},
		{"country_code text", phone(`"kind":"home","country_code":"44","local_number":1`), []FieldError{{"fax_numbers[0].country_code", "must be an integer from 1 to 9007199254740991"}}},
		{"area_code negative", phone(`"kind":"home","country_code":1,"area_code":-1,"local_number":1`), []FieldError{{"fax_numbers[0].area_code", "must be an integer from 1 to 9007199254740991"}}},
		{"local_number text", phone(`"kind":"home","country_code":1,"local_number":"555"`), []FieldError{{"fax_numbers[0].local_number", "must be an integer from 1 to 9007199254740991"}}},
		{"email with display name", email(`"Ada <ada@example.org>"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email with angle brackets", email(`"<ada@example.org>"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email without domain", email(`"ada"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email with a one-label domain", email(`"ada@localhost"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email with a non-ASCII local part", email(`"zoë@example.ch"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email with a quoted local part", email(`"\"a b\"@example.org"`), []FieldError{{"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
		{"email a number", email(`5`), []FieldError{{"emails[0].email", "must be a string"}}},
		{"email blank", email(`""`), []FieldError{{"emails[0].email", "must not be blank"}}},
		{"every bad field is reported", `{"full_name":"","addresses":[{"kind":"x","street_name":"s","pincode":1,"country":"c"}],"emails":[{"kind":"home","email":"no"}]}`,
			[]FieldError{{"full_name", "must not be blank"}, {"addresses[0].kind", `must be "home" or "work"`}, {"emails[0].email", "must be a bare e-mail address such as ada@example.org"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseEntry([]byte(tt.body))
			var inv *InvalidError
			if !errors.As(err, &inv) {
				t.Fatalf("ParseEntry error = %v, want an *InvalidError", err)
			}
			if !slices.Equal(inv.Fields, tt.want) {
				t.Errorf("fields:\n got %v\nwant %v", inv.Fields, tt.want)
			}
		})
	}
}

func manyKeys(n int) string {
	var keys []string
	for i := range n {
		keys = append(keys, fmt.Sprintf(`"k%d":1`, i))
	}
	return strings.Join(keys, ",")
}

func unknownKeys(n int) []FieldError {
	var errs []FieldError
	for i := range n {
		errs = append(errs, FieldError{fmt.Sprintf("k%d", i), "is not a known field"})
	}
	return errs
}

// TestParseEntryRejectsMalformedBodies: bodies that are not one JSON object
// are refused as a whole, with no field list.
func TestParseEntryRejectsMalformedBodies(t *testing.T) {
	tests := []struct {
		name string
		body string
	}{
		{"empty", ``},
		{"only spaces", "  \n"},
		{"null", `null`},
		{"an array", `[]`},
		{"a string", `"s"`},
		{"a number", `5`},
		{"true", `true`},
		{"truncated", `{"full_name":"A"`},
		{"truncated string", `{"full_name":"A`},
		{"truncated escape", `{"full_name":"A\u00`},
		{"trailing data", `{"full_name":"A"} x`},
		{"two objects", `{"full_name":"A"}{"full_name":"B"}`},
		{"trailing comma", `{"full_name":"A",}`},
		{"single quotes", `{'full_name':'A'}`},
		{"unquoted key", `{full_name:"A"}`},
		{"invalid UTF-8", "{\"full_name\":\"A\xff\"}"},
		{"invalid UTF-8 after an escape", "{\"full_name\":\"\\n\xc3\"}"},
		{"lone high surrogate", `{"full_name":"\ud800"}`},
		{"lone low surrogate", `{"full_name":"\udc00x"}`},
		{"raw control character", "{\"full_name\":\"A\x01\"}"},
		{"bad escape", `{"full_name":"\x41"}`},
		{"bad number", `{"full_name":"A","addresses":[{"pincode":01}]}`},
		{"bare minus", `{"full_name":-}`},
		{"NaN", `{"full_name":NaN}`},
		{"deep nesting", strings.Repeat(`[`, 100000)},
		{"nested too deep inside an object", `{"full_name":` + strings.Repeat(`[`, 40) + strings.Repeat(`]`, 40) + `}`},
		{"byte order mark", "\ufeff{\"full_name\":\"A\"}"},
		{"an object with more members than any model", `{"full_name":"A",` + manyKeys(64) + `}`},
		{"more values than any entry", `{"full_name":"A","emails":[` + strings.Repeat(`[`+strings.Repeat(`0,`, 63)+`0],`, 64) + `0]}`},
		{"invalid UTF-8 in a list's dropped items", "{\"full_name\":\"A\",\"emails\":[" + strings.Repeat(`0,`, 64) + "\"\xff\"]}"},
		{"invalid UTF-8 in an over-long string", "{\"full_name\":\"" + strings.Repeat("x", 300) + "\xff\"}"},
		{"malformed JSON in a list's dropped items", `{"full_name":"A","emails":[` + strings.Repeat(`0,`, 64) + `{"a":}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseEntry([]byte(tt.body))
			var inv *InvalidError
			if !errors.As(err, &inv) {
				t.Fatalf("ParseEntry error = %v, want an *InvalidError", err)
			}
			if len(inv.Fields) != 0 || inv.Detail == "" {
				t.Errorf("got detail %q and fields %v, want a detail and no fields", inv.Detail, inv.Fields)
			}
		})
	}
}

// TestParseEntryMemoryIsBoundedByTheBody: the decoder drops what no valid
// entry can hold while it parses, so a hostile 1 MiB body costs a small
// multiple of itself, not the ~185 MiB a full tree of it once took.
func TestParseEntryMemoryIsBoundedByTheBody(t *testing.T) {
	const size = 1 << 20
	fill := func(prefix, unit, suffix string) []byte {
		n := (size - len(prefix) - len(suffix)) / len(unit)
		return []byte(prefix + strings.Repeat(unit, n) + suffix)
	}
	tests := []struct {
		name string
		body []byte
	}{
		{"a list of tiny values", fill(`{"full_name":"A","emails":[`, `0,`, `0]}`)},
		{"a list of empty objects", fill(`{"full_name":"A","addresses":[`, `{},`, `{}]}`)},
		{"a list of lists", fill(`{"full_name":"A","emails":[`, `[0,0],`, `0]}`)},
		{"one long string", fill(`{"full_name":"`, `x`, `"}`)},
		{"one long escaped string", fill(`{"full_name":"`, `\u00e9`, `"}`)},
		{"one long key", fill(`{"`, `k`, `":1}`)},
		{"many short strings", fill(`{"full_name":"A","emails":[`, `"ab",`, `"a"]}`)},
		{"many unknown keys", fill(`{"full_name":"A",`, `"k":1,`, `"k":1}`)},
		{"many bad items", fill(`{"full_name":"A","emails":[`, `{"kind":"x","email":"y"},`, `0]}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ParseEntry(tt.body) // warm the parser pool, as a running server has
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err := ParseEntry(tt.body)
			runtime.ReadMemStats(&after)
			var inv *InvalidError
			if !errors.As(err, &inv) {
				t.Fatalf("ParseEntry error = %v, want an *InvalidError", err)
			}
			if got := after.TotalAlloc - before.TotalAlloc; got > 2*size {
				t.Errorf("parsing a %d-byte body allocated %d bytes, want at most %d", len(tt.body), got, 2*size)
			}
			if len(inv.Fields) > maxFieldErrors {
				t.Errorf("%d field errors listed, want at most %d", len(inv.Fields), maxFieldErrors)
			}
		})
	}
}

// TestParseEntryListsAtMostAHundredErrors: past maxFieldErrors, errors are
// counted, not listed, and the detail says how many there were.
func TestParseEntryListsAtMostAHundredErrors(t *testing.T) {
	body := `{"full_name":"A","emails":[` + strings.TrimSuffix(strings.Repeat(`{"kind":"x","email":"y"},`, 64), ",") + `]}`
	_, err := ParseEntry([]byte(body))
	var inv *InvalidError
	if !errors.As(err, &inv) {
		t.Fatalf("ParseEntry error = %v, want an *InvalidError", err)
	}
	if len(inv.Fields) != 100 || inv.More != 28 {
		t.Errorf("listed %d errors and counted %d more, want 100 and 28", len(inv.Fields), inv.More)
	}
	if want := (FieldError{"emails[49].email", "must be a bare e-mail address such as ada@example.org"}); inv.Fields[99] != want {
		t.Errorf("the last listed error is %v, want %v", inv.Fields[99], want)
	}
	if !strings.Contains(inv.Detail, "first 100 of 128") {
		t.Errorf("detail %q does not say how many problems there were", inv.Detail)
	}
}

// TestSampleEntriesAreValid: the samples the README's session posts obey the rules.
func TestSampleEntriesAreValid(t *testing.T) {
	for name, body := range sampleEntries(t) {
		if _, err := ParseEntry(body); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func sampleEntries(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/*.json")
	if err != nil || len(files) < 3 {
		t.Fatalf("want at least three samples in testdata, found %d (%v)", len(files), err)
	}
	samples := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		samples[f] = bytes.TrimSpace(b)
	}
	return samples
}

func TestParseID(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"0123456789abcdef0123456789abcdef", true},
		{"00000000000000000000000000000000", true},
		{"0123456789ABCDEF0123456789abcdef", false},
		{"0123456789abcdef0123456789abcde", false},
		{"0123456789abcdef0123456789abcdef0", false},
		{"0123456789abcdeg0123456789abcdef", false},
		{"../../../../../../../../etc/pass", false},
		{"", false},
		{"+123456789abcdef0123456789abcdef", false},
	}
	for _, tt := range tests {
		id, ok := ParseID(tt.in)
		if ok != tt.ok {
			t.Errorf("ParseID(%q) ok = %v, want %v", tt.in, ok, tt.ok)
		}
		if ok && id.String() != tt.in {
			t.Errorf("ParseID(%q).String() = %q", tt.in, id.String())
		}
	}
}

func TestIDsSortInCreationOrder(t *testing.T) {
	var g idGenerator
	prev := g.next().String()
	for range 10000 {
		id := g.next().String()
		if id <= prev {
			t.Fatalf("id %s does not sort after %s", id, prev)
		}
		if _, ok := ParseID(id); !ok {
			t.Fatalf("generated id %q does not parse", id)
		}
		prev = id
	}
}

// TestIDsIncreaseWhenTheClockStepsBack: a clock that stands still or goes
// back (NTP, a VM resumed) must not break the creation order.
func TestIDsIncreaseWhenTheClockStepsBack(t *testing.T) {
	g := idGenerator{last: 1 << 62} // far in the future
	a, b := g.next(), g.next()
	if compareIDs(a, b) >= 0 || binary.BigEndian.Uint64(a[:8]) != 1<<62+1 {
		t.Errorf("ids %s then %s after a clock step back", a, b)
	}
}

func TestRecordVersionFollowsContent(t *testing.T) {
	a, _ := NewRecord(Entry{FullName: "A"})
	a2, _ := NewRecord(Entry{FullName: "A"})
	b, _ := NewRecord(Entry{FullName: "B"})
	if a.Version != a2.Version {
		t.Errorf("equal content has versions %s and %s", a.Version, a2.Version)
	}
	if a.Version == b.Version {
		t.Errorf("different content shares version %s", a.Version)
	}
	if v := a.Version.String(); len(v) != 32 || !a.Version.matches(v) {
		t.Errorf("version %q is not 32 hex characters that match it", v)
	}
}

// ---- the store --------------------------------------------------------------

func newTestBook(t testing.TB) (*Collection[Entry], *MapStore) {
	t.Helper()
	store := NewMapStore(0)
	return NewCollection[Entry](store, slog.New(slog.NewTextHandler(io.Discard, nil)), time.Second), store
}

func mustCreate(t testing.TB, svc *Collection[Entry], name string) (ID, Record) {
	t.Helper()
	id, rec, err := svc.Create(context.Background(), Entry{FullName: name})
	if err != nil {
		t.Fatal(err)
	}
	return id, rec
}

func TestCollectionOperations(t *testing.T) {
	ctx := context.Background()
	svc, _ := newTestBook(t)
	id, rec := mustCreate(t, svc, "Ada")

	got, err := svc.Get(ctx, id)
	if err != nil || !bytes.Equal(got.JSON, rec.JSON) || got.Version != rec.Version {
		t.Fatalf("Get = %s %s %v, want %s %s", got.JSON, got.Version, err, rec.JSON, rec.Version)
	}
	if _, err := svc.Get(ctx, ID{1}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of an unknown id: %v, want ErrNotFound", err)
	}

	if _, err := svc.Replace(ctx, id, Entry{FullName: "B"}, []string{"stale"}); !errors.Is(err, ErrPreconditionFailed) {
		t.Errorf("Replace with a stale version: %v, want ErrPreconditionFailed", err)
	}
	rec2, err := svc.Replace(ctx, id, Entry{FullName: "B"}, []string{"other", rec.Version.String()})
	if err != nil {
		t.Fatalf("Replace with the current version among others: %v", err)
	}
	if _, err := svc.Replace(ctx, ID{1}, Entry{FullName: "B"}, []string{"*"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("Replace of an unknown id with If-Match *: %v, want ErrNotFound", err)
	}
	if _, err := svc.Replace(ctx, id, Entry{FullName: "C"}, []string{}); !errors.Is(err, ErrPreconditionFailed) {
		t.Errorf("Replace with an empty tag list: %v, want ErrPreconditionFailed", err)
	}
	if err := svc.Delete(ctx, id, []string{rec.Version.String()}); !errors.Is(err, ErrPreconditionFailed) {
		t.Errorf("Delete with the old version: %v, want ErrPreconditionFailed", err)
	}
	if err := svc.Delete(ctx, id, []string{rec2.Version.String()}); err != nil {
		t.Errorf("Delete with the current version: %v", err)
	}
	if err := svc.Delete(ctx, id, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Delete twice: %v, want ErrNotFound", err)
	}
}

func TestCollectionListPages(t *testing.T) {
	ctx := context.Background()
	svc, _ := newTestBook(t)
	var ids []ID
	for i := range 25 {
		id, _ := mustCreate(t, svc, fmt.Sprint("n", i))
		ids = append(ids, id)
	}
	svc.Delete(ctx, ids[3], nil)
	ids = slices.Delete(ids, 3, 4)

	var got []ID
	after := ID{}
	for pages := 0; ; pages++ {
		page, err := svc.List(ctx, after, 7)
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range page.Items {
			got = append(got, it.ID)
		}
		if !page.More {
			break
		}
		if pages > 10 {
			t.Fatal("paging does not end")
		}
		after = page.Items[len(page.Items)-1].ID
	}
	if !slices.Equal(got, ids) {
		t.Errorf("paging gave %d ids, want the %d live ones in order", len(got), len(ids))
	}

	for _, limit := range []int{0, -1, MaxPageSize + 1} {
		if _, err := svc.List(ctx, ID{}, limit); err == nil {
			t.Errorf("List with limit %d: no error", limit)
		}
	}
	page, _ := svc.List(ctx, ids[len(ids)-1], 5)
	if len(page.Items) != 0 || page.More {
		t.Errorf("page after the last id: %d items, more=%v", len(page.Items), page.More)
	}
}

// TestSortedItemsMatchesASortedSlice drives the chunked index with random
// sets and removes and compares it with the obvious implementation.
func TestSortedItemsMatchesASortedSlice(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var x sortedItems
	var want []Item
	randomID := func() ID {
		var id ID
		id[0], id[1] = byte(rng.IntN(256)), byte(rng.IntN(256))
		return id
	}
	for i := range 20000 {
		if i%3 == 0 && len(want) > 0 {
			id := want[rng.IntN(len(want))].ID
			x.remove(id)
			want = slices.DeleteFunc(want, func(v Item) bool { return v.ID == id })
			continue
		}
		it := Item{ID: randomID(), Record: Record{Version: Version{byte(i), byte(i >> 8)}}}
		x.set(it)
		if j, found := slices.BinarySearchFunc(want, it.ID, compareItem); found {
			want[j] = it
		} else {
			want = slices.Insert(want, j, it)
		}
	}
	var got []Item
	x.ascend(ID{}, func(it Item) bool { got = append(got, it); return true })
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("index holds %d items, want %d, or they differ", len(got), len(want))
	}
	for _, c := range x.chunks {
		if len(c) == 0 || len(c) > maxChunk {
			t.Fatalf("chunk of %d items", len(c))
		}
	}
	// ascend from a point inside the list
	start := want[len(want)/2].ID
	got = got[:0]
	x.ascend(start, func(it Item) bool { got = append(got, it); return len(got) < 10 })
	if fmt.Sprint(got) != fmt.Sprint(want[len(want)/2+1:len(want)/2+11]) {
		t.Errorf("ascend from the middle: %v", got)
	}
}

func TestClosedStoreRefusesChanges(t *testing.T) {
	ctx := context.Background()
	svc, store := newTestBook(t)
	id, _ := mustCreate(t, svc, "Ada")
	store.Close()
	if _, _, err := svc.Create(ctx, Entry{FullName: "B"}); err == nil {
		t.Error("Create after Close succeeded")
	}
	if _, err := svc.Replace(ctx, id, Entry{FullName: "B"}, nil); err == nil {
		t.Error("Replace after Close succeeded")
	}
	if err := svc.Delete(ctx, id, nil); err == nil {
		t.Error("Delete after Close succeeded")
	}
	if _, err := svc.Get(ctx, id); err != nil {
		t.Errorf("Get after Close: %v", err)
	}
}

// TestConcurrentConditionalReplaceHasOneWinner: of many writers holding the
// same version, exactly one replaces it; the rest see a failed precondition.
func TestConcurrentConditionalReplaceHasOneWinner(t *testing.T) {
	ctx := context.Background()
	svc, _ := newTestBook(t)
	id, rec := mustCreate(t, svc, "Ada")
	const writers = 32
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := svc.Replace(ctx, id, Entry{FullName: fmt.Sprint("writer ", i)}, []string{rec.Version.String()})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	wins := 0
	for err := range errs {
		switch {
		case err == nil:
			wins++
		case !errors.Is(err, ErrPreconditionFailed):
			t.Errorf("unexpected error %v", err)
		}
	}
	if wins != 1 {
		t.Errorf("%d writers won, want exactly 1", wins)
	}
}

// TestConcurrentUse mixes every operation under -race.
func TestConcurrentUse(t *testing.T) {
	ctx := context.Background()
	svc, _ := newTestBook(t)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				id, _ := mustCreate(t, svc, fmt.Sprint(w, "-", i))
				if _, err := svc.Get(ctx, id); err != nil {
					t.Error(err)
				}
				if _, err := svc.List(ctx, ID{}, 10); err != nil {
					t.Error(err)
				}
				if _, err := svc.Replace(ctx, id, Entry{FullName: "x"}, nil); err != nil {
					t.Error(err)
				}
				if i%2 == 0 {
					if err := svc.Delete(ctx, id, nil); err != nil {
						t.Error(err)
					}
				}
			}
		}()
	}
	wg.Wait()
	page, _ := svc.List(ctx, ID{}, MaxPageSize)
	if len(page.Items) != 800 {
		t.Errorf("%d entries left, want 800", len(page.Items))
	}
}

// FuzzParseEntry: whatever the input, ParseEntry does not panic, and what it
// accepts encodes to JSON that it accepts again unchanged.
func FuzzParseEntry(f *testing.F) {
	f.Add([]byte(validEntry))
	for _, b := range sampleEntries(f) {
		f.Add(b)
	}
	for _, s := range []string{``, `null`, `{}`, `{"full_name":"\ud800"}`, `{"full_name":"A","full_name":"B"}`,
		`{"FULL_NAME":"A"}`, `{"full_name":"A","addresses":[{"pincode":7.0}]}`, "{\"full_name\":\"\xff\"}", `[[[[[[`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := ParseEntry(data)
		if err != nil {
			var inv *InvalidError
			if !errors.As(err, &inv) {
				t.Fatalf("error %v is not an *InvalidError", err)
			}
			return
		}
		rec, err := NewRecord(e)
		if err != nil {
			t.Fatal(err)
		}
		e2, err := ParseEntry(rec.JSON)
		if err != nil {
			t.Fatalf("stored JSON %s does not parse again: %v", rec.JSON, err)
		}
		rec2, _ := NewRecord(e2)
		if !bytes.Equal(rec.JSON, rec2.JSON) {
			t.Fatalf("round trip changed the entry:\n%s\n%s", rec.JSON, rec2.JSON)
		}
		if !json.Valid(rec.JSON) {
			t.Fatalf("stored JSON is not valid: %s", rec.JSON)
		}
	})
}

// ---- the store on disk ----------------------------------------------------------

func openTestStore(t *testing.T, dir string) *MapStore {
	t.Helper()
	s, err := OpenMapStore(dir, 0, storedRecord(ParseEntry))
	if err != nil {
		t.Fatalf("OpenMapStore: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func record(t testing.TB, name string) Record {
	t.Helper()
	rec, err := NewRecord(Entry{FullName: name})
	if err != nil {
		t.Fatal(err)
	}
	return rec
}

// dirFiles lists the names in dir, sorted.
func dirFiles(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestDiskStoreKeepsEveryChangeAcrossARestart(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "new", "data")
	s := openTestStore(t, dir)
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("data directory: %v, mode %v; want it created 0700", err, fi.Mode())
	}
	ids := []ID{{1}, {2}, {3}}
	for i, id := range ids {
		if err := s.Insert(ctx, id, record(t, fmt.Sprint("entry ", i))); err != nil {
			t.Fatal(err)
		}
	}
	replaced := record(t, "replaced")
	if err := s.Replace(ctx, ids[1], replaced, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, ids[2], nil); err != nil {
		t.Fatal(err)
	}
	want := []string{".lock", ids[0].String() + ".json", ids[1].String() + ".json"}
	if got := dirFiles(t, dir); !slices.Equal(got, want) {
		t.Errorf("files %v, want %v", got, want)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, ids[1].String()+".json")); !bytes.Equal(b, replaced.JSON) {
		t.Errorf("file holds %s, want exactly %s", b, replaced.JSON)
	}
	before, _, _ := s.List(ctx, ID{}, 10)
	s.Close()

	s2 := openTestStore(t, dir)
	after, _, _ := s2.List(ctx, ID{}, 10)
	if fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("after a restart:\n%v\nwant\n%v", after, before)
	}
	if rec, _ := s2.Get(ctx, ids[1]); rec.Version != replaced.Version {
		t.Errorf("version after restart %s, want %s (ETags must survive restarts)", rec.Version, replaced.Version)
	}
}

func TestDiskStoreRefusesToStart(t *testing.T) {
	write := func(t *testing.T, dir, name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	const entryFile = "0123456789abcdef0123456789abcdef.json"
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) string // returns the -data path
		want  string
	}{
		{"a file, not a directory", func(t *testing.T, dir string) string {
			write(t, dir, "file", "x")
			return filepath.Join(dir, "file")
		}, "not a directory"},
		{"in use by another process", func(t *testing.T, dir string) string {
			openTestStore(t, dir)
			return dir
		}, "in use by another process"},
		{"truncated entry file", func(t *testing.T, dir string) string {
			write(t, dir, entryFile, `{"full_name":"Ada`)
			return dir
		}, entryFile},
		{"empty entry file", func(t *testing.T, dir string) string {
			write(t, dir, entryFile, ``)
			return dir
		}, entryFile},
		{"entry file that breaks a rule", func(t *testing.T, dir string) string {
			write(t, dir, entryFile, `{"full_name":"Ada","emails":[{"kind":"x","email":"a@b.c"}]}`)
			return dir
		}, "emails[0].kind"},
		{"an entry that is a symbolic link", func(t *testing.T, dir string) string {
			elsewhere := filepath.Join(t.TempDir(), "ada.json")
			write(t, filepath.Dir(elsewhere), "ada.json", `{"full_name":"Ada"}`)
			if err := os.Symlink(elsewhere, filepath.Join(dir, entryFile)); err != nil {
				t.Fatal(err)
			}
			return dir
		}, entryFile + " is not a regular file (a symbolic link)"},
		{"an entry that is a directory", func(t *testing.T, dir string) string {
			os.Mkdir(filepath.Join(dir, entryFile), 0o700)
			return dir
		}, entryFile + " is not a regular file (a directory)"},
		{".lock is a symbolic link", func(t *testing.T, dir string) string {
			target := filepath.Join(t.TempDir(), "planted")
			os.Symlink(target, filepath.Join(dir, ".lock"))
			t.Cleanup(func() {
				if _, err := os.Lstat(target); err == nil {
					t.Errorf("the service created %s through a planted .lock symlink", target)
				}
			})
			return dir
		}, ".lock: it is a symbolic link"},
		{".lock is a directory", func(t *testing.T, dir string) string {
			os.Mkdir(filepath.Join(dir, ".lock"), 0o700)
			return dir
		}, ".lock"},
		{"unwritable directory", func(t *testing.T, dir string) string {
			if os.Geteuid() == 0 {
				t.Skip("root writes to any directory")
			}
			os.Chmod(dir, 0o500)
			t.Cleanup(func() { os.Chmod(dir, 0o700) })
			return dir
		}, "not usable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.setup(t, t.TempDir())
			s, err := OpenMapStore(path, 0, storedRecord(ParseEntry))
			if err == nil {
				s.Close()
				t.Fatal("OpenMapStore succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

// TestDiskStoreRefusesADirectoryItCannotWrite: a DIR where no file can be
// created stops the start (simulated: root may write anywhere).
func TestDiskStoreRefusesADirectoryItCannotWrite(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EACCES, syscall.EROFS} {
		ops := defaultFileOps
		ops.createTemp = func(dir, pattern string) (*os.File, error) {
			return nil, &os.PathError{Op: "open", Path: dir, Err: errno}
		}
		files, err := openEntryFiles(t.TempDir(), ops)
		if err == nil {
			files.close()
			t.Errorf("%v: openEntryFiles succeeded", errno)
			continue
		}
		if !strings.Contains(err.Error(), "cannot be written") || !strings.Contains(err.Error(), errno.Error()) {
			t.Errorf("%v: error %q does not say the directory cannot be written and why", errno, err)
		}
	}
}

// TestStoreSizeLimit: creates and growing replaces past the limit are
// ErrStoreFull and change nothing; shrinking replaces and deletes make room.
func TestStoreSizeLimit(t *testing.T) {
	ctx := context.Background()
	small := record(t, "a")           // {"full_name":"a"}: 17 bytes
	large := record(t, "abcdefghijk") // 27 bytes
	for _, persist := range []bool{false, true} {
		t.Run(fmt.Sprintf("on disk %v", persist), func(t *testing.T) {
			s := NewMapStore(52)
			dir := t.TempDir()
			if persist {
				var err error
				if s, err = OpenMapStore(dir, 52, storedRecord(ParseEntry)); err != nil {
					t.Fatal(err)
				}
				defer s.Close()
			}
			steps := []struct {
				name string
				do   func() error
				want error
				size int64
			}{
				{"first create", func() error { return s.Insert(ctx, ID{1}, small) }, nil, 17},
				{"second create", func() error { return s.Insert(ctx, ID{2}, large) }, nil, 44},
				{"create past the limit", func() error { return s.Insert(ctx, ID{3}, small) }, ErrStoreFull, 44},
				{"replace that grows past the limit", func() error { return s.Replace(ctx, ID{1}, large, nil) }, ErrStoreFull, 44},
				{"replace that shrinks", func() error { return s.Replace(ctx, ID{2}, small, nil) }, nil, 34},
				{"replace that grows within the limit", func() error { return s.Replace(ctx, ID{1}, large, nil) }, nil, 44},
				{"delete makes room", func() error { return s.Delete(ctx, ID{1}, nil) }, nil, 17},
				{"create fits again", func() error { return s.Insert(ctx, ID{3}, small) }, nil, 34},
			}
			for _, step := range steps {
				if err := step.do(); !errors.Is(err, step.want) {
					t.Fatalf("%s: %v, want %v", step.name, err, step.want)
				}
				if _, got, _ := s.Size(); got != step.size {
					t.Fatalf("%s: size %d, want %d", step.name, got, step.size)
				}
			}
			if _, err := s.Get(ctx, ID{1}); !errors.Is(err, ErrNotFound) {
				t.Errorf("a refused change left a record: %v", err)
			}
			if persist {
				if got := len(dirFiles(t, dir)); got != 3 {
					t.Errorf("%d files, want .lock and two entries", got)
				}
				s.Close()
				s2, err := OpenMapStore(dir, 20, storedRecord(ParseEntry)) // already over this smaller limit
				if err != nil {
					t.Fatalf("a directory over the limit must still open: %v", err)
				}
				defer s2.Close()
				if n, got, limit := s2.Size(); n != 2 || got != 34 || limit != 20 {
					t.Errorf("reopened: %d entries, size %d of %d, want 2 entries, 34 of 20", n, got, limit)
				}
				if err := s2.Insert(ctx, ID{4}, small); !errors.Is(err, ErrStoreFull) {
					t.Errorf("create over the limit after a restart: %v, want ErrStoreFull", err)
				}
			}
		})
	}
}

// TestStoreSizeLimitHoldsUnderConcurrentCreates: writers racing for the last
// room never take the store past its limit together.
func TestStoreSizeLimitHoldsUnderConcurrentCreates(t *testing.T) {
	ctx := context.Background()
	rec := record(t, "a")
	s := NewMapStore(10 * int64(len(rec.JSON)))
	var wg sync.WaitGroup
	var created, refused atomic.Int64
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch err := s.Insert(ctx, ID{byte(i), 1}, rec); {
			case err == nil:
				created.Add(1)
			case errors.Is(err, ErrStoreFull):
				refused.Add(1)
			default:
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if created.Load() != 10 || refused.Load() != 54 {
		t.Errorf("%d created and %d refused, want 10 and 54", created.Load(), refused.Load())
	}
}

// TestDiskStoreReadinessTellsTheTruth: Ready is nil only while a write would
// work, and says why not otherwise; a transient failure is not remembered.
func TestDiskStoreReadinessTellsTheTruth(t *testing.T) {
	ctx := context.Background()
	emfile := func(dir, pattern string) (*os.File, error) {
		return nil, &os.PathError{Op: "open", Path: dir, Err: syscall.EMFILE}
	}
	t.Run("out of descriptors fails one write, then all is well", func(t *testing.T) {
		s := openTestStore(t, t.TempDir())
		if err := s.Ready(ctx); err != nil {
			t.Fatalf("Ready on a fresh store: %v", err)
		}
		s.files.createTemp = emfile
		if err := s.Insert(ctx, ID{1}, record(t, "a")); !errors.Is(err, syscall.EMFILE) {
			t.Fatalf("Insert without descriptors: %v, want EMFILE", err)
		}
		if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), "too many open files") {
			t.Errorf("Ready while out of descriptors: %v", err)
		}
		s.files.createTemp = os.CreateTemp
		if err := s.Insert(ctx, ID{1}, record(t, "a")); err != nil {
			t.Errorf("Insert once descriptors are back: %v; a transient failure must not stop writes", err)
		}
		if err := s.Ready(ctx); err != nil {
			t.Errorf("Ready once descriptors are back: %v", err)
		}
	})
	t.Run("a directory fsync that fails stops writes and readiness", func(t *testing.T) {
		dir := t.TempDir()
		s := openTestStore(t, dir)
		s.files.syncFile = func(f *os.File) error {
			if f.Name() == dir {
				return syscall.EIO
			}
			return f.Sync()
		}
		s.Insert(ctx, ID{1}, record(t, "a"))
		s.files.syncFile = (*os.File).Sync
		if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), "until a restart") {
			t.Errorf("Ready after an uncertain write: %v", err)
		}
	})
	t.Run("the directory is removed", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "data")
		s := openTestStore(t, dir)
		os.RemoveAll(dir)
		if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), "removed") {
			t.Errorf("Ready after DIR was removed: %v", err)
		}
		os.Mkdir(dir, 0o700) // a new, empty directory at the same path is not ours
		if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), "replaced") {
			t.Errorf("Ready after DIR was replaced: %v", err)
		}
	})
	t.Run("the disk is full", func(t *testing.T) {
		s := openTestStore(t, t.TempDir())
		s.files.writeFile = func(*os.File, []byte) error { return syscall.ENOSPC }
		if err := s.Ready(ctx); err == nil || !strings.Contains(err.Error(), "no space") {
			t.Errorf("Ready on a full disk: %v", err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		s := openTestStore(t, t.TempDir())
		s.Close()
		if err := s.Ready(ctx); err == nil {
			t.Error("Ready on a closed store is nil")
		}
	})
	t.Run("memory only is always ready", func(t *testing.T) {
		if err := NewMapStore(0).Ready(ctx); err != nil {
			t.Error(err)
		}
	})
}

func TestDiskStoreStartCleansUpAfterACrash(t *testing.T) {
	dir := t.TempDir()
	id := ID{7}
	good := record(t, "kept")
	os.WriteFile(filepath.Join(dir, id.String()+".json"), good.JSON, 0o600)
	os.WriteFile(filepath.Join(dir, ".tmp-"+id.String()+"-123"), []byte(`{"full_name":"tor`), 0o600)
	os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("mine"), 0o600)
	os.WriteFile(filepath.Join(dir, "0123456789ABCDEF0123456789ABCDEF.json"), []byte("not ours"), 0o600)
	os.Mkdir(filepath.Join(dir, "backup"), 0o700)

	s := openTestStore(t, dir)
	want := []string{".lock", "0123456789ABCDEF0123456789ABCDEF.json", id.String() + ".json", "backup", "notes.txt"}
	if got := dirFiles(t, dir); !slices.Equal(got, want) {
		t.Errorf("files %v, want %v: the temporary file removed, the rest left alone", got, want)
	}
	items, _, _ := s.List(context.Background(), ID{}, 10)
	if len(items) != 1 || items[0].ID != id || items[0].Version != good.Version {
		t.Errorf("loaded %v, want only %s", items, id)
	}
}

// TestDiskStoreFailedWritesChangeNothing simulates a full disk and failing
// fsyncs: the change is refused, the map and the file keep the old version,
// no temporary file stays, and once the fault clears writes work again.
func TestDiskStoreFailedWritesChangeNothing(t *testing.T) {
	ctx := context.Background()
	noSpace := func(*os.File, []byte) error { return syscall.ENOSPC }
	badSync := func(f *os.File) error {
		if strings.Contains(f.Name(), ".tmp-") {
			return syscall.EIO
		}
		return f.Sync()
	}
	tests := []struct {
		name   string
		inject func(f *entryFiles)
	}{
		{"disk full", func(f *entryFiles) { f.writeFile = noSpace }},
		{"fsync of the file fails", func(f *entryFiles) { f.syncFile = badSync }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openTestStore(t, dir)
			id := ID{1}
			old := record(t, "old")
			if err := s.Insert(ctx, id, old); err != nil {
				t.Fatal(err)
			}
			realWrite, realSync := s.files.writeFile, s.files.syncFile
			tt.inject(s.files)

			if err := s.Replace(ctx, id, record(t, "new"), nil); err == nil {
				t.Error("Replace succeeded on a failing disk")
			}
			if err := s.Insert(ctx, ID{2}, record(t, "other")); err == nil {
				t.Error("Insert succeeded on a failing disk")
			}
			if rec, _ := s.Get(ctx, id); rec.Version != old.Version {
				t.Error("the map changed after a failed write")
			}
			if _, err := s.Get(ctx, ID{2}); !errors.Is(err, ErrNotFound) {
				t.Error("a failed insert is in the map")
			}
			if b, _ := os.ReadFile(filepath.Join(dir, id.String()+".json")); !bytes.Equal(b, old.JSON) {
				t.Errorf("the file changed after a failed write: %s", b)
			}
			if got := dirFiles(t, dir); len(got) != 2 {
				t.Errorf("files after failed writes: %v, want only .lock and the entry", got)
			}

			s.files.writeFile, s.files.syncFile = realWrite, realSync
			if err := s.Replace(ctx, id, record(t, "new"), nil); err != nil {
				t.Errorf("Replace after the fault cleared: %v", err)
			}
		})
	}
}

// TestDiskStoreUncertainWriteStopsWrites: when the rename happened but the
// directory fsync failed, the disk may hold a change the map does not. The
// store must not go on as if all were well: writes fail until a restart.
func TestDiskStoreUncertainWriteStopsWrites(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openTestStore(t, dir)
	id := ID{1}
	old := record(t, "old")
	s.Insert(ctx, id, old)
	s.files.syncFile = func(f *os.File) error {
		if f.Name() == dir {
			return syscall.EIO
		}
		return f.Sync()
	}
	if err := s.Replace(ctx, id, record(t, "new"), nil); err == nil {
		t.Fatal("Replace succeeded though the directory fsync failed")
	}
	s.files.syncFile = (*os.File).Sync
	if err := s.Insert(ctx, ID{2}, record(t, "later")); err == nil || !strings.Contains(err.Error(), "restart") {
		t.Errorf("Insert after an uncertain write: %v, want a refusal until restart", err)
	}
	if rec, err := s.Get(ctx, id); err != nil || rec.Version != old.Version {
		t.Errorf("reads must go on with the acknowledged version: %v", err)
	}
}

// TestDiskStoreWritersToOtherEntriesDoNotWait: while one entry's fsync is
// stuck, another entry is written and read.
func TestDiskStoreWritersToOtherEntriesDoNotWait(t *testing.T) {
	ctx := context.Background()
	s := openTestStore(t, t.TempDir())
	slow, fast := ID{1}, ID{2}
	s.Insert(ctx, slow, record(t, "slow"))
	release, stuck := make(chan struct{}), make(chan struct{})
	s.files.syncFile = func(f *os.File) error {
		if strings.Contains(f.Name(), ".tmp-"+slow.String()) {
			close(stuck)
			<-release
		}
		return f.Sync()
	}
	done := make(chan error)
	go func() { done <- s.Replace(ctx, slow, record(t, "slow 2"), nil) }()
	<-stuck
	if err := s.Insert(ctx, fast, record(t, "fast")); err != nil {
		t.Errorf("Insert while another entry's fsync is stuck: %v", err)
	}
	if _, err := s.Get(ctx, slow); err != nil {
		t.Errorf("Get while its fsync is stuck: %v", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Error(err)
	}
}

// TestDiskStoreWritesToOneEntryStayInOrder: after concurrent replaces of one
// entry, its file holds exactly what the map serves.
func TestDiskStoreWritesToOneEntryStayInOrder(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openTestStore(t, dir)
	id := ID{1}
	s.Insert(ctx, id, record(t, "start"))
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 10 {
				if err := s.Replace(ctx, id, record(t, fmt.Sprint(w, "-", i)), nil); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	rec, _ := s.Get(ctx, id)
	if b, _ := os.ReadFile(filepath.Join(dir, id.String()+".json")); !bytes.Equal(b, rec.JSON) {
		t.Errorf("file %s, map %s", b, rec.JSON)
	}
}

// BenchmarkCreate reports creates per second in memory and with -data, one
// writer at a time and 32 at once.
func BenchmarkCreate(b *testing.B) {
	entry, err := ParseEntry(sampleEntries(b)["testdata/rajesh-kumar.json"])
	if err != nil {
		b.Fatal(err)
	}
	for _, mode := range []string{"memory", "data"} {
		for _, writers := range []int{1, 32} {
			b.Run(fmt.Sprintf("%s/writers=%d", mode, writers), func(b *testing.B) {
				store := NewMapStore(0)
				if mode == "data" {
					var err error
					if store, err = OpenMapStore(b.TempDir(), 0, storedRecord(ParseEntry)); err != nil {
						b.Fatal(err)
					}
				}
				defer store.Close()
				svc := NewCollection[Entry](store, slog.New(slog.DiscardHandler), time.Second)
				ctx := context.Background()
				create := func() {
					if _, _, err := svc.Create(ctx, entry); err != nil {
						b.Error(err)
					}
				}
				b.ReportAllocs()
				b.ResetTimer()
				if writers == 1 {
					for range b.N {
						create()
					}
				} else {
					b.SetParallelism((writers + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
					b.RunParallel(func(pb *testing.PB) {
						for pb.Next() {
							create()
						}
					})
				}
				b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "creates/s")
			})
		}
	}
}

// ---- benchmarks of the store ------------------------------------------------------

// storeSizes are the book sizes of the store benchmarks; -short keeps the smallest.
func storeSizes() []int {
	if testing.Short() {
		return []int{1000}
	}
	return []int{1000, 100000, 1000000}
}

// seededStore holds n entries, each with its own copy of a realistic entry's JSON.
func seededStore(b *testing.B, n int) (*MapStore, []ID, Record) {
	b.Helper()
	e, err := ParseEntry(sampleEntries(b)["testdata/rajesh-kumar.json"])
	if err != nil {
		b.Fatal(err)
	}
	rec, _ := NewRecord(e)
	s := NewMapStore(0)
	var g idGenerator
	ids := make([]ID, n)
	for i := range ids {
		ids[i] = g.next()
		s.Insert(context.Background(), ids[i], Record{JSON: bytes.Clone(rec.JSON), Version: rec.Version})
	}
	return s, ids, rec
}

func BenchmarkStore(b *testing.B) {
	ctx := context.Background()
	for _, n := range storeSizes() {
		s, ids, rec := seededStore(b, n)
		rng := rand.New(rand.NewPCG(1, 2))
		b.Run(fmt.Sprintf("entries=%d/get", n), func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; b.Loop(); i++ {
				if _, err := s.Get(ctx, ids[rng.IntN(len(ids))]); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("entries=%d/page100", n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() { // full pages that start anywhere in the book
				if items, _, _ := s.List(ctx, ids[rng.IntN(len(ids)-100)], 100); len(items) != 100 {
					b.Fatal("empty page")
				}
			}
		})
		b.Run(fmt.Sprintf("entries=%d/insert+delete", n), func(b *testing.B) {
			// Pairs keep the book at its size: one insert, one delete of an old id.
			b.ReportAllocs()
			var g idGenerator
			for i := 0; b.Loop(); i++ {
				id := g.next()
				s.Insert(ctx, id, rec)
				victim := ids[i%len(ids)]
				s.Delete(ctx, victim, nil)
				ids[i%len(ids)] = id
			}
		})
	}
}

// BenchmarkMemoryPerEntry reports the live heap per stored entry against the
// size of the entry's JSON (the target is at most 2x for the whole process).
func BenchmarkMemoryPerEntry(b *testing.B) {
	for _, n := range storeSizes() {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			var before, after runtime.MemStats
			var perEntry, jsonSize float64
			for b.Loop() {
				runtime.GC()
				runtime.ReadMemStats(&before)
				s, _, rec := seededStore(b, n)
				runtime.GC()
				runtime.ReadMemStats(&after)
				perEntry = float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
				jsonSize = float64(len(rec.JSON))
				runtime.KeepAlive(s)
			}
			b.ReportMetric(perEntry, "heap-B/entry")
			b.ReportMetric(perEntry/jsonSize, "x-JSON")
		})
	}
}

// BenchmarkOpenDataDir measures a start with -data holding many entries
// (100,000 unless -short): reading, validating and indexing every file.
func BenchmarkOpenDataDir(b *testing.B) {
	n := 100000
	if testing.Short() {
		n = 1000
	}
	dir := b.TempDir()
	body := sampleEntries(b)["testdata/rajesh-kumar.json"]
	var g idGenerator
	for range n {
		if err := os.WriteFile(filepath.Join(dir, g.next().String()+".json"), body, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
		for b.Loop() {
			s, err := OpenMapStore(dir, 0, storedRecord(ParseEntry))
			if err != nil {
				b.Fatal(err)
			}
			s.Close()
		}
	})
}

// BenchmarkParseEntry is the decode-and-validate step of every POST and PUT,
// and NewRecord the encoding step after it.
func BenchmarkParseEntry(b *testing.B) {
	body := sampleEntries(b)["testdata/rajesh-kumar.json"]
	b.Run("parse", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if _, err := ParseEntry(body); err != nil {
				b.Fatal(err)
			}
		}
	})
	e, _ := ParseEntry(body)
	b.Run("record", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			NewRecord(e)
		}
	})
}

// ---- the store contract -----------------------------------------------------------

func TestMemoryStoreContract(t *testing.T) {
	testStoreContract(t, func(*testing.T) Store { return NewMapStore(0) })
}

func TestDiskStoreContract(t *testing.T) {
	testStoreContract(t, func(t *testing.T) Store { return openTestStore(t, t.TempDir()) })
}

// testStoreContract checks every rule of the Store interface. open returns a
// fresh, empty store for each subtest and closes it when the subtest ends. A
// store of your own is tested by one line like TestMemoryStoreContract's.
func testStoreContract(t *testing.T, open func(t *testing.T) Store) {
	ctx := context.Background()
	var ids idGenerator
	insert := func(t *testing.T, s Store, id ID, r Record) {
		t.Helper()
		if err := s.Insert(ctx, id, r); err != nil {
			t.Fatalf("Insert: %v", err)
		}
	}
	// holds checks that Get finds r under id, or ErrNotFound when r is nil.
	holds := func(t *testing.T, s Store, id ID, r *Record) {
		t.Helper()
		got, err := s.Get(ctx, id)
		switch {
		case r == nil && !errors.Is(err, ErrNotFound):
			t.Errorf("Get = %s, %v; want ErrNotFound", got.JSON, err)
		case r != nil && (err != nil || !bytes.Equal(got.JSON, r.JSON) || got.Version != r.Version):
			t.Errorf("Get = %s %s, %v; want %s %s", got.JSON, got.Version, err, r.JSON, r.Version)
		}
	}

	t.Run("insert then get, JSON byte for byte", func(t *testing.T) {
		s := open(t)
		// Spacing, key order and escapes a jsonb column or a re-encoding would change.
		odd := Record{JSON: []byte(`{"full_name": "Zoë \u00fc 山田",  "emails":[] , "addresses":[{"kind":"home"}]}`), Version: Version{0xff, 1}}
		a, b := ids.next(), ids.next()
		insert(t, s, a, odd)
		holds(t, s, a, &odd)
		holds(t, s, b, nil)
	})

	t.Run("insert under an id in use changes nothing", func(t *testing.T) {
		s := open(t)
		id, first := ids.next(), record(t, "first")
		insert(t, s, id, first)
		if err := s.Insert(ctx, id, record(t, "second")); !errors.Is(err, ErrExists) {
			t.Errorf("second Insert: %v, want ErrExists", err)
		}
		holds(t, s, id, &first)
	})

	// Replace and Delete share the rules of ifMatch.
	stale := Version{0xde, 0xad}.String()
	preconditions := []struct {
		name    string
		ifMatch func(current Version) []string
		holds   bool
	}{
		{"none", func(Version) []string { return nil }, true},
		{"*", func(Version) []string { return []string{"*"} }, true},
		{"the current version", func(v Version) []string { return []string{v.String()} }, true},
		{"a list holding the current version", func(v Version) []string { return []string{stale, "junk", v.String()} }, true},
		{"a stale version", func(Version) []string { return []string{stale} }, false},
		{"a list of stale versions", func(Version) []string { return []string{stale, Version{1}.String()} }, false},
		{"an empty list", func(Version) []string { return []string{} }, false},
		{"the current version in capitals", func(v Version) []string { return []string{strings.ToUpper(v.String())} }, false},
		{"a tag that is not a version", func(Version) []string { return []string{"not-a-version"} }, false},
	}
	for _, op := range []string{"replace", "delete"} {
		t.Run(op, func(t *testing.T) {
			s := open(t)
			change := func(t *testing.T, id ID, ifMatch []string) (Record, error) {
				if op == "delete" {
					return Record{}, s.Delete(ctx, id, ifMatch)
				}
				next := record(t, "replaced "+id.String())
				return next, s.Replace(ctx, id, next, ifMatch)
			}
			for _, tt := range preconditions {
				t.Run(tt.name, func(t *testing.T) {
					id, old := ids.next(), record(t, "old")
					insert(t, s, id, old)
					next, err := change(t, id, tt.ifMatch(old.Version))
					switch {
					case !tt.holds:
						if !errors.Is(err, ErrPreconditionFailed) {
							t.Errorf("got %v, want ErrPreconditionFailed", err)
						}
						holds(t, s, id, &old)
					case err != nil:
						t.Errorf("got %v, want success", err)
					case op == "delete":
						holds(t, s, id, nil)
					default:
						holds(t, s, id, &next)
					}
					// A missing entry is not found, whatever the precondition.
					if _, err := change(t, ids.next(), tt.ifMatch(old.Version)); !errors.Is(err, ErrNotFound) {
						t.Errorf("on a missing entry: got %v, want ErrNotFound", err)
					}
				})
			}
		})
	}

	t.Run("list in id order, in pages, across deletes", func(t *testing.T) {
		s := open(t)
		// list walks the book from after in pages of limit and checks that it
		// finds want; each page but the last must be full and say more remain.
		list := func(t *testing.T, after ID, limit int, want []ID) {
			t.Helper()
			var got []ID
			for pages := 0; ; pages++ {
				items, more, err := s.List(ctx, after, limit)
				if err != nil {
					t.Fatalf("List: %v", err)
				}
				for _, it := range items {
					got = append(got, it.ID)
					if wantRec := record(t, it.ID.String()); !bytes.Equal(it.JSON, wantRec.JSON) || it.Version != wantRec.Version {
						t.Fatalf("item %s holds %s %s, want %s %s", it.ID, it.JSON, it.Version, wantRec.JSON, wantRec.Version)
					}
				}
				if more != (len(got) < len(want)) || (more && len(items) != limit) {
					t.Fatalf("page %d after %s: %d items, more=%v; %d of %d ids seen", pages, after, len(items), more, len(got), len(want))
				}
				if !more {
					break
				}
				after = items[len(items)-1].ID
			}
			if !slices.Equal(got, want) {
				t.Errorf("got ids %v, want %v", got, want)
			}
		}
		list(t, ID{}, 5, nil)

		book := make([]ID, 21)
		for i := range book {
			book[i] = ids.next()
		}
		// Ids can reach a store out of order (instances with their own clocks).
		for _, i := range rand.New(rand.NewPCG(3, 4)).Perm(len(book)) {
			insert(t, s, book[i], record(t, book[i].String()))
		}
		for _, limit := range []int{1, 5, 7, 21, 1000} { // 7 and 21 end on a full page
			list(t, ID{}, limit, book)
		}
		list(t, book[9], 4, book[10:])
		list(t, book[20], 3, nil)

		for _, i := range []int{20, 10, 9, 3, 0} { // from the end, so indexes stay put
			if err := s.Delete(ctx, book[i], nil); err != nil {
				t.Fatal(err)
			}
		}
		live := slices.Concat(book[1:3], book[4:9], book[11:20])
		list(t, ID{}, 4, live)
		list(t, book[9], 2, book[11:20]) // after an id that is gone
		list(t, book[19], 5, nil)        // the last live entry; the one after it is gone
	})

	t.Run("concurrent conditional changes have one winner per version", func(t *testing.T) {
		s := open(t)
		id, cur := ids.next(), record(t, "round 0")
		insert(t, s, id, cur)
		const writers = 32
		// race has every writer change the entry with If-Match of the current
		// version, at once, and returns the one writer that won and what each
		// wrote. With deleting, odd writers delete instead.
		race := func(round int, deleting bool) (winner int, recs []Record) {
			t.Helper()
			recs = make([]Record, writers)
			errs := make([]error, writers)
			var ready atomic.Int32
			var start atomic.Bool
			var wg sync.WaitGroup
			for w := range writers {
				recs[w] = record(t, fmt.Sprint("round ", round, " writer ", w))
				wg.Add(1)
				go func() {
					defer wg.Done()
					// Spin until the last writer is ready, so that writers
					// start within nanoseconds of each other on every core
					// (waking from a channel takes microseconds, longer than
					// a check-then-write race in memory lasts). The spinners
					// yield now and then so that all of them get to run.
					if ready.Add(1) == writers {
						start.Store(true)
					}
					for i := 0; !start.Load(); i++ {
						if i%100 == 99 {
							runtime.Gosched()
						}
					}
					if deleting && w%2 == 1 {
						errs[w] = s.Delete(ctx, id, []string{cur.Version.String()})
					} else {
						errs[w] = s.Replace(ctx, id, recs[w], []string{cur.Version.String()})
					}
				}()
			}
			wg.Wait()
			winner = -1
			for w, err := range errs {
				switch {
				case err == nil && winner >= 0:
					t.Fatalf("round %d: writers %d and %d both changed version %s", round, winner, w, cur.Version)
				case err == nil:
					winner = w
				case errors.Is(err, ErrPreconditionFailed), deleting && errors.Is(err, ErrNotFound):
				default:
					t.Fatalf("round %d: writer %d: %v", round, w, err)
				}
			}
			if winner < 0 {
				t.Fatalf("round %d: no writer changed version %s", round, cur.Version)
			}
			return winner, recs
		}
		// A store that checks the version, then writes without holding a lock
		// across both, lets two writers through only when they meet between
		// its check and its write: a window as wide as a round trip or an
		// fsync for a database or a disk, but a fraction of a microsecond in
		// memory. So a fast store gets as many rounds as fit in a quarter of
		// a second, a slow one at least 16.
		begin := time.Now()
		for round := 1; round <= 16 || time.Since(begin) < 250*time.Millisecond; round++ {
			w, recs := race(round, false)
			cur = recs[w]
			holds(t, s, id, &cur)
		}
		// Deletes race replaces last, since a delete may win.
		w, recs := race(0, true)
		if w%2 == 1 {
			holds(t, s, id, nil)
		} else {
			holds(t, s, id, &recs[w])
		}
	})

	t.Run("close", func(t *testing.T) {
		s := open(t)
		id, r := ids.next(), record(t, "kept")
		insert(t, s, id, r)
		if err := s.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Errorf("a second Close: %v, want nil", err)
		}
		if err := s.Insert(ctx, ids.next(), r); err == nil {
			t.Error("Insert after Close succeeded")
		}
		if err := s.Replace(ctx, id, r, nil); err == nil {
			t.Error("Replace after Close succeeded")
		}
		if err := s.Delete(ctx, id, nil); err == nil {
			t.Error("Delete after Close succeeded")
		}
	})
}
