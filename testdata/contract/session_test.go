package contract

import (
	"bytes"
	"context"
	"encoding/json"
	"net/url"
	"os"
	"strings"
	"testing"

	"addrservice/contract/client"
)

// TestGeneratedClientRunsTheREADMESession runs the README's curl session
// with the Go client oapi-codegen generates from openapi.json (./check.sh
// contract generates it into client/), with no hand-written workaround:
// typed bodies in and out, typed problems, headers, and paging by the
// Link header's after.
func TestGeneratedClientRunsTheREADMESession(t *testing.T) {
	base := startBinary(t)
	c, err := client.NewClientWithResponses(base)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	sample := func(name string) (client.Entry, []byte) {
		b, err := os.ReadFile("../" + name + ".json")
		if err != nil {
			t.Fatal(err)
		}
		var e client.Entry
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		return e, bytes.TrimSpace(b)
	}
	status := func(what string, got, want int) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: status %d, want %d", what, got, want)
		}
	}

	health, err := c.HealthzWithResponse(ctx, nil)
	if err != nil || health.JSON200 == nil || health.JSON200.Status != client.Ok {
		t.Fatalf("healthz: %v %+v", err, health)
	}

	ada, adaJSON := sample("ada-lovelace")
	created, err := c.CreateEntryWithResponse(ctx, nil, ada)
	if err != nil {
		t.Fatal(err)
	}
	status("create Ada", created.StatusCode(), 201)
	if !bytes.Equal(created.Body, adaJSON) {
		t.Errorf("create Ada: the client sent, and got back,\n%s\nnot the sample\n%s", created.Body, adaJSON)
	}

	rajesh, _ := sample("rajesh-kumar")
	created, err = c.CreateEntryWithResponse(ctx, nil, rajesh)
	if err != nil {
		t.Fatal(err)
	}
	status("create Rajesh", created.StatusCode(), 201)
	id := strings.TrimPrefix(created.Headers201.Location, "/addresses/")

	got, err := c.GetEntryWithResponse(ctx, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	status("get", got.StatusCode(), 200)
	if got.JSON200.FullName != "Rajesh Kumar" || len(*got.JSON200.Addresses) != 2 {
		t.Errorf("get: %+v", got.JSON200)
	}
	etag := got.Headers200.ETag
	notModified, err := c.GetEntryWithResponse(ctx, id, &client.GetEntryParams{IfNoneMatch: &etag})
	if err != nil {
		t.Fatal(err)
	}
	status("get If-None-Match", notModified.StatusCode(), 304)

	// Paging: the next page's after is the Link header's; every entry once.
	limit := 1
	params := &client.ListEntriesParams{Limit: &limit}
	var seen []string
	for pages := 0; params != nil; pages++ {
		page, err := c.ListEntriesWithResponse(ctx, params)
		if err != nil {
			t.Fatal(err)
		}
		status("list", page.StatusCode(), 200)
		for id := range *page.JSON200 {
			seen = append(seen, id)
		}
		params = nil
		if link := page.Headers200.Link; link != nil {
			after, err := nextAfter(*link)
			if err != nil {
				t.Fatalf("Link %q: %v", *link, err)
			}
			params = &client.ListEntriesParams{Limit: &limit, After: &after}
		}
		if pages > 3 {
			t.Fatal("paging does not end")
		}
	}
	if len(seen) != 2 || seen[1] != id {
		t.Errorf("pages gave %v, want two entries, the second %s", seen, id)
	}

	zoe, _ := sample("zoe-muller")
	replaced, err := c.ReplaceEntryWithResponse(ctx, id, &client.ReplaceEntryParams{IfMatch: &etag}, zoe)
	if err != nil {
		t.Fatal(err)
	}
	status("replace If-Match", replaced.StatusCode(), 204)
	stale, err := c.ReplaceEntryWithResponse(ctx, id, &client.ReplaceEntryParams{IfMatch: &etag}, zoe)
	if err != nil {
		t.Fatal(err)
	}
	status("replace with a stale If-Match", stale.StatusCode(), 412)
	if stale.ApplicationproblemJSON412 == nil || stale.ApplicationproblemJSON412.RequestId == "" {
		t.Errorf("412: no typed problem: %s", stale.Body)
	}

	kind := client.Kind("x")
	invalid, err := c.CreateEntryWithResponse(ctx, nil, client.Entry{FullName: "", Emails: &[]client.Email{{Kind: kind}}})
	if err != nil {
		t.Fatal(err)
	}
	status("create invalid", invalid.StatusCode(), 400)
	if p := invalid.ApplicationproblemJSON400; p == nil || p.Errors == nil || len(*p.Errors) != 3 {
		t.Errorf("400: want a typed problem naming three fields: %s", invalid.Body)
	}

	plain, err := c.CreateEntryWithBodyWithResponse(ctx, nil, "text/plain", strings.NewReader("Ada"))
	if err != nil {
		t.Fatal(err)
	}
	status("create text/plain", plain.StatusCode(), 415)
	if plain.ApplicationproblemJSON415 == nil {
		t.Errorf("415: no typed problem: %s", plain.Body)
	}

	// The transport asks for gzip and decodes it: nothing to do here.
	page, err := c.ListEntriesWithResponse(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	status("list all", page.StatusCode(), 200)

	deleted, err := c.DeleteEntryWithResponse(ctx, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	status("delete", deleted.StatusCode(), 204)
	gone, err := c.GetEntryWithResponse(ctx, id, nil)
	if err != nil {
		t.Fatal(err)
	}
	status("get after delete", gone.StatusCode(), 404)
	if gone.ApplicationproblemJSON404 == nil {
		t.Errorf("404: no typed problem: %s", gone.Body)
	}

	ready, err := c.ReadyzWithResponse(ctx, nil)
	if err != nil || ready.JSON200 == nil || ready.JSON200.Status != client.ReadyStatusReady {
		t.Fatalf("readyz: %v %+v", err, ready)
	}
}

// nextAfter reads the after of a Link: <...?limit=N&after=ID>; rel="next".
// docs/api.md shows the same in TypeScript.
func nextAfter(link string) (string, error) {
	target, _, _ := strings.Cut(strings.TrimPrefix(link, "<"), ">")
	u, err := url.Parse(target)
	if err != nil {
		return "", err
	}
	return u.Query().Get("after"), nil
}
