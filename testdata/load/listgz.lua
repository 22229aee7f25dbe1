-- GET /addresses?limit=100 as a browser or curl --compressed asks for it:
-- the same page, gzip-encoded.
wrk.path = "/addresses?limit=100"
wrk.headers["Accept-Encoding"] = "gzip"
