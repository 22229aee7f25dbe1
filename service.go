package main

// This file is the service layer: the address-book entry, its rules, and the
// operations on it. It knows nothing of HTTP; handlers.go translates.

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// Entry is one address-book entry, the model of the Tornado original.
// Lists are nil when the client left them out and empty when it sent [],
// so what GET returns is exactly what was stored.
type Entry struct {
	FullName     string    `json:"full_name"`
	Addresses    []Address `json:"addresses,omitzero"`
	PhoneNumbers []Phone   `json:"phone_numbers,omitzero"`
	FaxNumbers   []Phone   `json:"fax_numbers,omitzero"`
	Emails       []Email   `json:"emails,omitzero"`
}

// Address is a postal address. Optional text fields are pointers so that an
// empty string a client sent stays distinguishable from one it left out.
type Address struct {
	Kind         string    `json:"kind"`
	BuildingName *string   `json:"building_name,omitempty"`
	UnitNumber   int64     `json:"unit_number,omitzero"`
	StreetNumber IntOrText `json:"street_number,omitzero"`
	StreetName   string    `json:"street_name"`
	Locality     *string   `json:"locality,omitempty"`
	City         *string   `json:"city,omitempty"`
	Province     *string   `json:"province,omitempty"`
	Pincode      IntOrText `json:"pincode"`
	Country      string    `json:"country"`
}

// Phone is a phone or fax number.
type Phone struct {
	Kind        string `json:"kind"`
	CountryCode int64  `json:"country_code"`
	AreaCode    int64  `json:"area_code,omitzero"`
	LocalNumber int64  `json:"local_number"`
}

// Email is an e-mail address.
type Email struct {
	Kind  string `json:"kind"`
	Email string `json:"email"`
}

// IntOrText is a value clients may send either as a positive integer (110011)
// or as text ("SW1A 1AA", "7B"). It remembers which, so a number stays a
// number. The zero value means absent.
type IntOrText struct {
	Int  int64
	Text string
}

// MarshalJSON writes the value in the form the client sent it.
func (v IntOrText) MarshalJSON() ([]byte, error) {
	if v.Text != "" {
		return marshalJSON(v.Text)
	}
	return strconv.AppendInt(nil, v.Int, 10), nil
}

// Limits of the contract.
const (
	maxListItems  = 64
	maxTextLength = 256 // in Unicode characters, not bytes
	maxCountry    = 999 // largest country calling code
	// maxInteger is the largest integer a JSON number holds exactly in
	// JavaScript (2^53-1), so no client reads back a different number.
	maxInteger = 1<<53 - 1
)

// blank is what "blank" means for a text field: Go's unicode.IsSpace and
// U+FEFF, which ECMAScript's \s counts as space. The schema's NonBlankText
// pattern is built from these same characters (a test holds them equal), so
// the server and every JSON Schema validator agree.
const blank = "\t\n\v\f\r \u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"

// ---- errors -----------------------------------------------------------------

// The service's closed set of errors. The HTTP layer maps each to a status.
var (
	ErrNotFound           = errors.New("nothing is stored under this id")
	ErrPreconditionFailed = errors.New("the stored version has changed since the ETag given in If-Match")
	ErrStoreFull          = errors.New("the store has reached its size limit; delete something to make room")
	ErrExists             = errors.New("an entry is already stored under this id")
	ErrUnavailable        = errors.New("the store did not answer; a change asked for may or may not have been made: read before you retry it")
)

// InvalidError says the client's input is unusable. Fields lists the fields
// that broke a rule, up to maxFieldErrors, and More counts the rest; Fields is
// empty when the input was not a JSON object at all.
type InvalidError struct {
	Detail string
	Fields []FieldError
	More   int
}

// FieldError names one bad field by its path, such as addresses[1].pincode.
type FieldError struct {
	Field   string `json:"field"`
	Message string `json:"message"`
}

func (e *InvalidError) Error() string { return e.Detail }

func invalid(format string, args ...any) *InvalidError {
	return &InvalidError{Detail: fmt.Sprintf(format, args...)}
}

// ---- ids --------------------------------------------------------------------

// ID identifies an entry: 8 bytes of creation time, then 8 random bytes.
// Written as 32 lowercase hex characters, ids sort in creation order.
// ParseID is the only way from text to an ID, so an id that reaches the
// store, or the file system behind it, has always been validated.
type ID [16]byte

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// ParseID accepts exactly 32 lowercase hex characters.
func ParseID(s string) (ID, bool) {
	var id ID
	if len(s) != 2*len(id) {
		return id, false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return id, false
		}
	}
	_, err := hex.Decode(id[:], []byte(s))
	return id, err == nil
}

// idGenerator makes ids whose time part strictly increases within a process,
// even when the clock stands still or steps back.
type idGenerator struct {
	mu   sync.Mutex
	last uint64
}

func (g *idGenerator) next() ID {
	var id ID
	g.mu.Lock()
	t := uint64(time.Now().UnixNano())
	if t <= g.last {
		t = g.last + 1
	}
	g.last = t
	g.mu.Unlock()
	binary.BigEndian.PutUint64(id[:8], t)
	rand.Read(id[8:]) // never fails on supported platforms
	return id
}

// ---- operations -------------------------------------------------------------

// Collection is the operations on one resource, kept in a Store of its own:
// create, get, replace, delete and list, with ids, versions derived from the
// content, and preconditions. The address book is a Collection[Entry]; a
// second resource is a Collection of its own type and needs nothing new here.
type Collection[T any] struct {
	store   Store
	ids     idGenerator
	log     *slog.Logger
	timeout time.Duration // for each store call; see call
}

// NewCollection returns the operations on the resources of type T kept in
// store, each store call given at most timeout.
func NewCollection[T any](store Store, log *slog.Logger, timeout time.Duration) *Collection[T] {
	return &Collection[T]{store: store, log: log, timeout: timeout}
}

// call is the one way to the store: every call gets the collection's
// deadline, so a database that hangs costs a request at most the timeout,
// and a call that runs out of it is ErrUnavailable (503), never a dropped
// connection. A store that honours its context (a database driver) stops at
// the deadline; MapStore never waits on anything but its own disk.
func (c *Collection[T]) call(ctx context.Context, fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	err := fn(ctx)
	if errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, ErrUnavailable) { // a store may have said so itself
		return fmt.Errorf("%w (%w)", ErrUnavailable, err)
	}
	return err
}

// NewRecord turns a valid value into what a store keeps: its JSON, encoded
// once here and served as is on every read, and a version derived from that
// JSON, so equal content always has an equal ETag, also after a restart.
func NewRecord(v any) (Record, error) {
	data, err := marshalJSON(v)
	if err != nil {
		return Record{}, fmt.Errorf("encoding a record: %w", err)
	}
	sum := sha256.Sum256(data)
	return Record{JSON: data, Version: Version(sum[:16])}, nil
}

// marshalJSON is json.Marshal without HTML escaping: json.Marshal writes
// "<" as "\u003c", six bytes for one, so a record could be several times
// the body that was sent, and -max-body would not bound what it costs the
// store and every page. This API serves application/json, never HTML.
func marshalJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte{'\n'}), nil
}

// storedRecord returns how a store that persists records checks one it
// reads back: it must parse as a T, and it is served as NewRecord encodes it.
func storedRecord[T any](parse func([]byte) (T, error)) func([]byte) (Record, error) {
	return func(data []byte) (Record, error) {
		v, err := parse(data)
		if err != nil {
			return Record{}, err
		}
		return NewRecord(v)
	}
}

// Create stores v under a new id and returns the id and the stored form.
func (c *Collection[T]) Create(ctx context.Context, v T) (ID, Record, error) {
	id := c.ids.next()
	rec, err := c.CreateAt(ctx, id, v)
	return id, rec, err
}

// CreateAt stores v under id, an id the client chose, unless something is
// stored there already (ErrExists). A client that did not hear the answer
// can send the same create again: it is made once.
func (c *Collection[T]) CreateAt(ctx context.Context, id ID, v T) (Record, error) {
	rec, err := NewRecord(v)
	if err != nil {
		return Record{}, err
	}
	if err := c.call(ctx, func(ctx context.Context) error { return c.store.Insert(ctx, id, rec) }); err != nil {
		return Record{}, err
	}
	c.log.DebugContext(ctx, "created", "id", id.String())
	return rec, nil
}

// Get returns the stored form of the record under id.
func (c *Collection[T]) Get(ctx context.Context, id ID) (rec Record, err error) {
	err = c.call(ctx, func(ctx context.Context) error { rec, err = c.store.Get(ctx, id); return err })
	return rec, err
}

// Replace swaps the record under id for v when ifMatch allows it (see Store).
func (c *Collection[T]) Replace(ctx context.Context, id ID, v T, ifMatch []string) (Record, error) {
	rec, err := NewRecord(v)
	if err != nil {
		return Record{}, err
	}
	if err := c.call(ctx, func(ctx context.Context) error { return c.store.Replace(ctx, id, rec, ifMatch) }); err != nil {
		return Record{}, err
	}
	c.log.DebugContext(ctx, "replaced", "id", id.String())
	return rec, nil
}

// Delete removes the record under id when ifMatch allows it (see Store).
func (c *Collection[T]) Delete(ctx context.Context, id ID, ifMatch []string) error {
	if err := c.call(ctx, func(ctx context.Context) error { return c.store.Delete(ctx, id, ifMatch) }); err != nil {
		return err
	}
	c.log.DebugContext(ctx, "deleted", "id", id.String())
	return nil
}

// Page is one page of a collection in id order.
type Page struct {
	Items []Item
	More  bool // records remain after the last item
}

// Limits of a page.
const (
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

// List returns up to limit records whose ids come after after; the zero ID
// starts at the beginning.
func (c *Collection[T]) List(ctx context.Context, after ID, limit int) (Page, error) {
	if limit < 1 || limit > MaxPageSize {
		return Page{}, invalid("limit must be between 1 and %d", MaxPageSize)
	}
	var page Page
	err := c.call(ctx, func(ctx context.Context) (err error) {
		page.Items, page.More, err = c.store.List(ctx, after, limit)
		return err
	})
	return page, err
}

// ---- decoding and validation ------------------------------------------------

// ParseEntry decodes and validates one entry from JSON. It is stricter than
// encoding/json: the body must be exactly one object of valid UTF-8, keys
// must match a field exactly and only once, nothing may be null, numbers must
// be integer literals, and every broken rule is reported, not just the first.
func ParseEntry(data []byte) (Entry, error) {
	return decode(data, (*decoder).entry)
}

// decode parses data as one JSON object and maps it onto a T with object,
// which reports every broken rule through d. Every resource is read this way:
// a new one needs only its own object function, built from the decoder's
// methods (fields, list, text, optionalText, positive, intOrText, oneOf,
// emailAddress).
func decode[T any](data []byte, object func(d *decoder, v jsonValue) T) (T, error) {
	var zero T
	v, err := parseJSON(data)
	if err != nil {
		return zero, err
	}
	if v.kind != jsonObject {
		return zero, invalid("the body must be a JSON object, not %s", v.kind)
	}
	var d decoder
	out := object(&d, v)
	if len(d.errs) > 0 {
		detail := "the body is not valid; see errors"
		if d.more > 0 {
			detail = fmt.Sprintf("the body is not valid; errors lists the first %d of %d problems", len(d.errs), len(d.errs)+d.more)
		}
		return zero, &InvalidError{Detail: detail, Fields: d.errs, More: d.more}
	}
	return out, nil
}

// maxFieldErrors bounds the errors one response lists, so a body built of
// mistakes cannot make an answer larger than itself.
const maxFieldErrors = 100

// decoder maps a parsed JSON value onto a Go value, collecting every broken
// rule with the path of its field.
type decoder struct {
	errs []FieldError
	more int // broken rules past maxFieldErrors, counted but not listed
}

func (d *decoder) fail(at fieldPath, message string) {
	if len(d.errs) == maxFieldErrors {
		d.more++
		return
	}
	d.errs = append(d.errs, FieldError{Field: at.String(), Message: message})
}

// fieldPath names a field: a top-level key, an item of a top-level list,
// or a key inside such an item (a resource nests no deeper). It becomes text
// only when the field breaks a rule, so a valid body builds no paths.
type fieldPath struct {
	list  string // "" at the top level
	index int
	key   string // "" for the list item itself
}

func (p fieldPath) String() string {
	if p.list == "" {
		return p.key
	}
	s := p.list + "[" + strconv.Itoa(p.index) + "]"
	if p.key != "" {
		s += "." + p.key
	}
	return s
}

// fields calls field for each member of object v, reporting members that are
// unknown (field returns false), repeated, or null. Each name in required
// that the object lacks is reported as missing.
func (d *decoder) fields(v jsonValue, object fieldPath, required []string, field func(key string, v jsonValue, at fieldPath) bool) {
	if v.kind != jsonObject {
		d.fail(object, "must be an object")
		return
	}
	var seen map[string]bool // for large objects, where searching for repeats would be quadratic
	if len(v.members) > 16 {
		seen = make(map[string]bool, len(v.members))
	}
	for i, m := range v.members {
		at := object
		at.key = m.key
		repeated := false
		if seen != nil {
			repeated, seen[m.key] = seen[m.key], true
		} else {
			repeated = hasKey(v.members[:i], m.key)
		}
		switch {
		case repeated:
			d.fail(at, "is given more than once")
		case m.value.kind == jsonNull:
			if !field(m.key, jsonValue{kind: jsonUnknown}, at) {
				d.fail(at, "is not a known field")
			} else {
				d.fail(at, "must not be null")
			}
		default:
			if !field(m.key, m.value, at) {
				d.fail(at, "is not a known field")
			}
		}
	}
	for _, name := range required {
		if !hasKey(v.members, name) {
			at := object
			at.key = name
			d.fail(at, "is required")
		}
	}
}

// hasKey reports whether key is among members.
func hasKey(members []jsonMember, key string) bool {
	for _, m := range members {
		if m.key == key {
			return true
		}
	}
	return false
}

// list calls item for each element of array v and returns a non-nil slice
// (empty for []), so a list the client sent is never confused with none.
func list[T any](d *decoder, v jsonValue, at fieldPath, item func(d *decoder, v jsonValue, at fieldPath) T) []T {
	if v.kind == jsonUnknown { // null, reported by fields
		return nil
	}
	if v.kind != jsonArray {
		d.fail(at, "must be a list")
		return nil
	}
	if v.over {
		d.fail(at, fmt.Sprintf("must have at most %d items", maxListItems))
		return nil
	}
	out := make([]T, 0, len(v.items))
	for i, it := range v.items {
		out = append(out, item(d, it, fieldPath{list: at.key, index: i}))
	}
	return out
}

func (d *decoder) entry(v jsonValue) Entry {
	var e Entry
	d.fields(v, fieldPath{}, []string{"full_name"}, func(key string, v jsonValue, p fieldPath) bool {
		switch key {
		case "full_name":
			e.FullName = d.text(v, p, true)
		case "addresses":
			e.Addresses = list(d, v, p, (*decoder).address)
		case "phone_numbers":
			e.PhoneNumbers = list(d, v, p, (*decoder).phone)
		case "fax_numbers":
			e.FaxNumbers = list(d, v, p, (*decoder).phone)
		case "emails":
			e.Emails = list(d, v, p, (*decoder).email)
		default:
			return false
		}
		return true
	})
	return e
}

func (d *decoder) address(v jsonValue, item fieldPath) Address {
	var a Address
	required := []string{"kind", "street_name", "pincode", "country"}
	d.fields(v, item, required, func(key string, v jsonValue, p fieldPath) bool {
		switch key {
		case "kind":
			a.Kind = d.oneOf(v, p, "home", "work")
		case "building_name":
			a.BuildingName = d.optionalText(v, p)
		case "unit_number":
			a.UnitNumber = d.positive(v, p)
		case "street_number":
			a.StreetNumber = d.intOrText(v, p)
		case "street_name":
			a.StreetName = d.text(v, p, true)
		case "locality":
			a.Locality = d.optionalText(v, p)
		case "city":
			a.City = d.optionalText(v, p)
		case "province":
			a.Province = d.optionalText(v, p)
		case "pincode":
			a.Pincode = d.intOrText(v, p)
		case "country":
			a.Country = d.text(v, p, true)
		default:
			return false
		}
		return true
	})
	return a
}

func (d *decoder) phone(v jsonValue, item fieldPath) Phone {
	var ph Phone
	required := []string{"kind", "country_code", "local_number"}
	d.fields(v, item, required, func(key string, v jsonValue, p fieldPath) bool {
		switch key {
		case "kind":
			ph.Kind = d.oneOf(v, p, "home", "work")
		case "country_code":
			if n := d.positive(v, p); n > maxCountry {
				d.fail(p, fmt.Sprintf("must be an integer from 1 to %d", maxCountry))
			} else {
				ph.CountryCode = n
			}
		case "area_code":
			ph.AreaCode = d.positive(v, p)
		case "local_number":
			ph.LocalNumber = d.positive(v, p)
		default:
			return false
		}
		return true
	})
	return ph
}

func (d *decoder) email(v jsonValue, item fieldPath) Email {
	var em Email
	d.fields(v, item, []string{"kind", "email"}, func(key string, v jsonValue, p fieldPath) bool {
		switch key {
		case "kind":
			em.Kind = d.oneOf(v, p, "home", "work")
		case "email":
			em.Email = d.emailAddress(v, p)
		default:
			return false
		}
		return true
	})
	return em
}

// emailAddress checks an e-mail address field (whether it may be left out
// is for the required list given to fields) against emailPattern.
func (d *decoder) emailAddress(v jsonValue, path fieldPath) string {
	s := d.text(v, path, true)
	if s == "" {
		return ""
	}
	if !emailPattern.MatchString(s) {
		d.fail(path, "must be a bare e-mail address such as ada@example.org")
		return ""
	}
	return s
}

// emailPattern is what common JSON Schema validators (ajv's full "email"
// format) accept as an e-mail address: a dot-atom in ASCII, @, and a domain
// of at least two labels. It is the schema's Email pattern, character for
// character (a test holds them equal), so whatever a client's validator
// passes, the server takes.
var emailPattern = regexp.MustCompile("^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\\.)+[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$")

// oneOf checks a required string field that must be one of choices.
func (d *decoder) oneOf(v jsonValue, path fieldPath, choices ...string) string {
	s := d.text(v, path, true)
	if s != "" && !slices.Contains(choices, s) {
		d.fail(path, "must be "+quotedChoices(choices))
	}
	return s
}

// quotedChoices writes "a", "b" or "c".
func quotedChoices(choices []string) string {
	var b strings.Builder
	for i, c := range choices {
		switch {
		case i == 0:
		case i == len(choices)-1:
			b.WriteString(" or ")
		default:
			b.WriteString(", ")
		}
		b.WriteString(strconv.Quote(c))
	}
	return b.String()
}

// text checks a string field; nonBlank fields must hold more than spaces.
func (d *decoder) text(v jsonValue, path fieldPath, nonBlank bool) string {
	if v.kind == jsonUnknown {
		return ""
	}
	if v.kind != jsonString {
		d.fail(path, "must be a string")
		return ""
	}
	if msg := checkText(v, nonBlank); msg != "" {
		d.fail(path, msg)
		return ""
	}
	return v.text
}

// optionalText checks a string field that may be left out or empty; a
// pointer keeps "" apart from absent.
func (d *decoder) optionalText(v jsonValue, path fieldPath) *string {
	if v.kind != jsonString {
		d.text(v, path, false) // reports the type
		return nil
	}
	s := d.text(v, path, false)
	return &s
}

// checkText returns what is wrong with string v, or "".
func checkText(v jsonValue, nonBlank bool) string {
	if v.over {
		return fmt.Sprintf("must be at most %d characters", maxTextLength)
	}
	if strings.IndexFunc(v.text, unicode.IsControl) >= 0 {
		return "must not contain control characters"
	}
	if nonBlank && strings.Trim(v.text, blank) == "" {
		return "must not be blank"
	}
	return ""
}

// positive accepts an integer literal from 1 to maxInteger;
// 7.0 and 1e2 are numbers but not integer literals, so they are refused.
func (d *decoder) positive(v jsonValue, path fieldPath) int64 {
	if v.kind == jsonUnknown {
		return 0
	}
	n, ok := positiveInt(v)
	if !ok {
		d.fail(path, fmt.Sprintf("must be an integer from 1 to %d", maxInteger))
	}
	return n
}

func positiveInt(v jsonValue) (int64, bool) {
	if v.kind != jsonNumber || strings.ContainsAny(v.text, "-.eE") {
		return 0, false
	}
	n, err := strconv.ParseInt(v.text, 10, 64)
	return n, err == nil && n > 0 && n <= maxInteger
}

// intOrText accepts a positive integer or a non-blank string and remembers
// which it was.
func (d *decoder) intOrText(v jsonValue, path fieldPath) IntOrText {
	switch v.kind {
	case jsonUnknown:
		return IntOrText{}
	case jsonString:
		if msg := checkText(v, true); msg != "" {
			d.fail(path, msg)
			return IntOrText{}
		}
		return IntOrText{Text: v.text}
	}
	n, ok := positiveInt(v)
	if !ok {
		d.fail(path, fmt.Sprintf("must be an integer from 1 to %d or a non-blank string", maxInteger))
	}
	return IntOrText{Int: n}
}

// ---- a strict JSON parser ---------------------------------------------------

// jsonValue is a parsed JSON value that keeps what encoding/json throws away:
// every object member in order (so duplicates and case variants are seen)
// and the literal text of numbers (so 7.0 is not mistaken for 7).
type jsonValue struct {
	kind    jsonKind
	over    bool   // a string over maxTextLength characters or a list over maxListItems items: the text, or the items past the limit, were not kept
	text    string // a string's value, a number's literal
	items   []jsonValue
	members []jsonMember
}

type jsonMember struct {
	key   string
	value jsonValue
}

type jsonKind uint8

const (
	jsonUnknown jsonKind = iota // a field that was null; reported once, then skipped
	jsonNull
	jsonBool
	jsonNumber
	jsonString
	jsonArray
	jsonObject
)

func (k jsonKind) String() string {
	return [...]string{"nothing", "null", "a boolean", "a number", "a string", "an array", "an object"}[k]
}

// What the parser keeps of a body is bounded while it reads, never after:
// a list's items past maxListItems and a string's text past maxTextLength
// characters are checked and dropped, and a body with more members to an
// object or more values in all than any valid resource has is refused at
// that point. So no body costs more memory than a small multiple of itself,
// whatever it holds.
const (
	maxJSONDepth     = 32   // a resource nests 3 deep; this only stops stack abuse
	maxObjectMembers = 64   // an address, the largest object, has 10 fields
	maxJSONValues    = 4096 // an entry with every list full holds about 1,550
)

// parseJSON parses exactly one JSON value (RFC 8259) of valid UTF-8, refusing
// lone UTF-16 surrogates and nesting deeper than maxJSONDepth.
func parseJSON(data []byte) (jsonValue, error) {
	p := &jsonParser{data: data}
	p.space()
	if p.pos == len(data) {
		return jsonValue{}, invalid("the body is empty; it must be a JSON object")
	}
	v, err := p.value(0, true)
	if err != nil {
		return jsonValue{}, err
	}
	p.space()
	if p.pos != len(data) {
		return jsonValue{}, invalid("the body is not valid JSON: unexpected data after the value at byte %d", p.pos)
	}
	return v, nil
}

type jsonParser struct {
	data   []byte
	pos    int
	values int // values kept so far, against maxJSONValues
	// Members and items of the containers being parsed, shared as stacks so
	// that each container allocates once, at its exact size, when it ends.
	members []jsonMember
	items   []jsonValue
}

func (p *jsonParser) errorf(what string) error {
	if p.pos >= len(p.data) {
		return invalid("the body is not valid JSON: it ends too early")
	}
	return invalid("the body is not valid JSON: %s at byte %d", what, p.pos)
}

func (p *jsonParser) space() {
	for p.pos < len(p.data) {
		switch p.data[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

// value parses the value at p.pos. Unless keep is set it only checks it,
// and the result holds no more than its kind.
func (p *jsonParser) value(depth int, keep bool) (jsonValue, error) {
	if depth > maxJSONDepth {
		return jsonValue{}, invalid("the body is not valid JSON: nested deeper than %d levels", maxJSONDepth)
	}
	if keep {
		if p.values++; p.values > maxJSONValues {
			return jsonValue{}, invalid("the body holds more than %d JSON values, more than any valid body; refused at byte %d", maxJSONValues, p.pos)
		}
	}
	if p.pos >= len(p.data) {
		return jsonValue{}, p.errorf("")
	}
	switch c := p.data[p.pos]; {
	case c == '{':
		return p.object(depth, keep)
	case c == '[':
		return p.array(depth, keep)
	case c == '"':
		s, over, err := p.string(keep)
		return jsonValue{kind: jsonString, text: s, over: over}, err
	case c == '-' || (c >= '0' && c <= '9'):
		return p.number(keep)
	case p.literal("true"), p.literal("false"):
		return jsonValue{kind: jsonBool}, nil
	case p.literal("null"):
		return jsonValue{kind: jsonNull}, nil
	}
	return jsonValue{}, p.errorf("unexpected character")
}

func (p *jsonParser) literal(word string) bool {
	if len(p.data)-p.pos >= len(word) && string(p.data[p.pos:p.pos+len(word)]) == word {
		p.pos += len(word)
		return true
	}
	return false
}

// consume skips c if it is next.
func (p *jsonParser) consume(c byte) bool {
	if p.pos < len(p.data) && p.data[p.pos] == c {
		p.pos++
		return true
	}
	return false
}

// separator reads what follows a container's element: ',' (more to come)
// or the closing byte (done).
func (p *jsonParser) separator(closing byte) (done bool, err error) {
	p.space()
	switch {
	case p.consume(','):
		p.space()
		return false, nil
	case p.consume(closing):
		return true, nil
	}
	return false, p.errorf("expected ',' or '" + string(closing) + "'")
}

func (p *jsonParser) object(depth int, keep bool) (jsonValue, error) {
	v := jsonValue{kind: jsonObject}
	p.pos++ // {
	p.space()
	if p.consume('}') {
		return v, nil
	}
	start := len(p.members)
	defer func() { p.members = p.members[:start] }()
	for n := 1; ; n++ {
		if n > maxObjectMembers {
			return v, invalid("the body has an object with more than %d members, more than any valid body; refused at byte %d", maxObjectMembers, p.pos)
		}
		if p.pos >= len(p.data) || p.data[p.pos] != '"' {
			return v, p.errorf("expected a quoted key")
		}
		key, err := p.key(keep)
		if err != nil {
			return v, err
		}
		p.space()
		if !p.consume(':') {
			return v, p.errorf("expected ':'")
		}
		p.space()
		val, err := p.value(depth+1, keep)
		if err != nil {
			return v, err
		}
		if keep {
			p.members = append(p.members, jsonMember{key: key, value: val})
		}
		if done, err := p.separator('}'); done || err != nil {
			if keep && err == nil {
				v.members = slices.Clone(p.members[start:])
			}
			return v, err
		}
	}
}

func (p *jsonParser) array(depth int, keep bool) (jsonValue, error) {
	v := jsonValue{kind: jsonArray, items: []jsonValue{}}
	p.pos++ // [
	p.space()
	if p.consume(']') {
		return v, nil
	}
	start := len(p.items)
	defer func() { p.items = p.items[:start] }()
	for n := 0; ; n++ {
		keepItem := keep && n < maxListItems
		v.over = keep && n >= maxListItems
		item, err := p.value(depth+1, keepItem)
		if err != nil {
			return v, err
		}
		if keepItem {
			p.items = append(p.items, item)
		}
		if done, err := p.separator(']'); done || err != nil {
			if keep && err == nil {
				v.items = slices.Clone(p.items[start:])
			}
			return v, err
		}
	}
}

// key parses an object key. A key longer than any text a field may hold
// cannot name a field; it is reported by a placeholder.
func (p *jsonParser) key(keep bool) (string, error) {
	s, over, err := p.string(keep)
	if over {
		s = fmt.Sprintf("(a key of over %d characters)", maxTextLength)
	}
	return s, err
}

func (p *jsonParser) number(keep bool) (jsonValue, error) {
	start := p.pos
	digits := func() int {
		n := 0
		for p.pos < len(p.data) && p.data[p.pos] >= '0' && p.data[p.pos] <= '9' {
			p.pos++
			n++
		}
		return n
	}
	if p.data[p.pos] == '-' {
		p.pos++
	}
	if p.pos < len(p.data) && p.data[p.pos] == '0' {
		p.pos++
	} else if digits() == 0 {
		return jsonValue{}, p.errorf("malformed number")
	}
	if p.pos < len(p.data) && p.data[p.pos] == '.' {
		p.pos++
		if digits() == 0 {
			return jsonValue{}, p.errorf("malformed number")
		}
	}
	if p.pos < len(p.data) && (p.data[p.pos] == 'e' || p.data[p.pos] == 'E') {
		p.pos++
		if p.pos < len(p.data) && (p.data[p.pos] == '+' || p.data[p.pos] == '-') {
			p.pos++
		}
		if digits() == 0 {
			return jsonValue{}, p.errorf("malformed number")
		}
	}
	v := jsonValue{kind: jsonNumber}
	if keep {
		v.text = string(p.data[start:p.pos])
	}
	return v, nil
}

// string parses a quoted string at p.pos, which holds '"', checking all of
// it. It returns the text when keep is set and the text is at most
// maxTextLength characters; over reports a longer one.
func (p *jsonParser) string(keep bool) (text string, over bool, err error) {
	p.pos++
	start := p.pos
	// Fast path: no escapes, the common case; the text is a slice of the body.
	for p.pos < len(p.data) {
		c := p.data[p.pos]
		if c == '"' {
			raw := p.data[start:p.pos]
			p.pos++
			return p.keepText(raw, keep)
		}
		if c == '\\' || c < 0x20 {
			break
		}
		p.pos++
	}
	// Slow path: the text is decoded into buf. Past what any kept text can
	// be, buf is checked and emptied as it fills, so a long escaped string
	// costs no more than a short one.
	var buf []byte
	spilled := false
	spill := func() error {
		cut := len(buf) - utf8.UTFMax
		for cut > 0 && !utf8.RuneStart(buf[cut]) {
			cut--
		}
		if !utf8.Valid(buf[:cut]) {
			return invalid("the body is not valid JSON: invalid UTF-8 in a string")
		}
		buf, spilled = buf[:copy(buf, buf[cut:])], true
		return nil
	}
	for raw := p.data[start:p.pos]; len(raw) > 0; raw = raw[min(len(raw), 4096):] {
		if buf = append(buf, raw[:min(len(raw), 4096)]...); len(buf) > 4*maxTextLength {
			if err := spill(); err != nil {
				return "", false, err
			}
		}
	}
	for p.pos < len(p.data) {
		if len(buf) > 4*maxTextLength {
			if err := spill(); err != nil {
				return "", false, err
			}
		}
		c := p.data[p.pos]
		switch {
		case c == '"':
			p.pos++
			if spilled {
				_, _, err := p.keepText(buf, false)
				return "", keep, err
			}
			return p.keepText(buf, keep)
		case c < 0x20:
			return "", false, p.errorf("unescaped control character in a string")
		case c != '\\':
			buf = append(buf, c)
			p.pos++
			continue
		}
		p.pos++ // backslash
		if p.pos >= len(p.data) {
			break
		}
		esc := p.data[p.pos]
		p.pos++
		switch esc {
		case '"', '\\', '/':
			buf = append(buf, esc)
		case 'b':
			buf = append(buf, '\b')
		case 'f':
			buf = append(buf, '\f')
		case 'n':
			buf = append(buf, '\n')
		case 'r':
			buf = append(buf, '\r')
		case 't':
			buf = append(buf, '\t')
		case 'u':
			r, ok := p.hex4()
			if !ok {
				return "", false, p.errorf("malformed \\u escape")
			}
			if utf16.IsSurrogate(r) {
				var r2 rune = -1
				if p.pos+1 < len(p.data) && p.data[p.pos] == '\\' && p.data[p.pos+1] == 'u' {
					p.pos += 2
					r2, _ = p.hex4()
				}
				if r = utf16.DecodeRune(r, r2); r == utf8.RuneError {
					return "", false, p.errorf("lone UTF-16 surrogate in a string")
				}
			}
			buf = utf8.AppendRune(buf, r)
		default:
			return "", false, p.errorf("unknown escape in a string")
		}
	}
	return "", false, p.errorf("")
}

// keepText checks a string's decoded bytes and copies out what is kept.
func (p *jsonParser) keepText(b []byte, keep bool) (string, bool, error) {
	if !utf8.Valid(b) {
		return "", false, invalid("the body is not valid JSON: invalid UTF-8 in a string")
	}
	if !keep {
		return "", false, nil
	}
	if len(b) > maxTextLength && utf8.RuneCount(b) > maxTextLength {
		return "", true, nil
	}
	return string(b), false, nil
}

func (p *jsonParser) hex4() (rune, bool) {
	if p.pos+4 > len(p.data) {
		return 0, false
	}
	var r rune
	for _, c := range p.data[p.pos : p.pos+4] {
		switch {
		case '0' <= c && c <= '9':
			r = r<<4 | rune(c-'0')
		case 'a' <= c && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case 'A' <= c && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	p.pos += 4
	return r, true
}
