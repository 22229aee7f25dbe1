-- POST /addresses with the entry in the file named by ENTRY_FILE.
local f = assert(io.open(os.getenv("ENTRY_FILE")))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.path = "/addresses"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
