// The README's session with a client generated from openapi.json by
// openapi-typescript, driven by openapi-fetch: no hand-written types.
import createClient from "openapi-fetch";
import { readFileSync } from "node:fs";
import type { components, paths } from "./schema.js";

type Entry = components["schemas"]["Entry"];
const [base, samples] = process.argv.slice(2);
const client = createClient<paths>({ baseUrl: base });

let failures = 0;
function expect(what: string, got: number, want: number): void {
  if (got === want) {
    console.log(`ok   ${want}  ${what}`);
  } else {
    console.log(`FAIL ${got} (want ${want})  ${what}`);
    failures++;
  }
}
const sample = (name: string): Entry => JSON.parse(readFileSync(`${samples}/${name}.json`, "utf8"));

// nextAfter reads the next page's after from Link: <...?after=ID>; rel="next".
function nextAfter(link: string | null): string | undefined {
  const m = link?.match(/<([^>]*)>;\s*rel="next"/);
  return m ? new URL(m[1], base).searchParams.get("after") ?? undefined : undefined;
}

const health = await client.GET("/healthz");
expect(`healthz status ${health.data?.status}`, health.response.status, 200);
const ada = await client.POST("/addresses", { body: sample("ada-lovelace") });
expect(`create Ada: ${ada.data?.full_name}`, ada.response.status, 201);
const rajesh = await client.POST("/addresses", { body: sample("rajesh-kumar") });
expect("create Rajesh", rajesh.response.status, 201);
const id = rajesh.response.headers.get("Location")!.split("/").pop()!;
const got = await client.GET("/addresses/{id}", { params: { path: { id } } });
expect(`get ${got.data?.full_name}`, got.response.status, 200);
const etag = got.response.headers.get("ETag")!;
const same = await client.GET("/addresses/{id}", { params: { path: { id }, header: { "If-None-Match": etag } } });
expect("get If-None-Match", same.response.status, 304);

const seen: string[] = [];
let after: string | undefined;
do {
  const page = await client.GET("/addresses", { params: { query: { limit: 1, after } } });
  expect(`list limit=1 after=${after ?? ""}`, page.response.status, 200);
  seen.push(...Object.keys(page.data ?? {}));
  after = nextAfter(page.response.headers.get("Link"));
} while (after);
expect(`paging saw ${seen.length} entries`, seen.length, 2);

const zoe = sample("zoe-muller");
const put = await client.PUT("/addresses/{id}", { params: { path: { id }, header: { "If-Match": etag } }, body: zoe });
expect("replace If-Match", put.response.status, 204);
const stale = await client.PUT("/addresses/{id}", { params: { path: { id }, header: { "If-Match": etag } }, body: zoe });
expect(`replace stale If-Match: ${stale.error?.detail}`, stale.response.status, 412);
const invalid = await client.POST("/addresses", { body: JSON.parse('{"full_name":"","emails":[{"kind":"x"}]}') });
expect(`create invalid: ${invalid.error?.errors?.length} errors`, invalid.response.status, 400);
const plain = await client.POST("/addresses", {
  body: JSON.parse("{}"),
  bodySerializer: () => "Ada",
  headers: { "Content-Type": "text/plain" },
});
expect(`create text/plain: ${plain.error?.detail}`, plain.response.status, 415);
await client.POST("/addresses", { body: sample("rajesh-kumar") });
const all = await client.GET("/addresses");
expect(`list all, Content-Encoding ${all.response.headers.get("Content-Encoding")}`, all.response.status, 200);
const del = await client.DELETE("/addresses/{id}", { params: { path: { id } } });
expect("delete", del.response.status, 204);
const gone = await client.GET("/addresses/{id}", { params: { path: { id } } });
expect(`get deleted: ${gone.error?.detail}`, gone.response.status, 404);
const ready = await client.GET("/readyz");
expect(`readyz status ${ready.data?.status}`, ready.response.status, 200);
process.exit(failures ? 1 : 0);
