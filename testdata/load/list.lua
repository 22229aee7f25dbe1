-- GET /addresses?limit=100: the first page, about 65 KB, not compressed.
wrk.path = "/addresses?limit=100"
