-- POST the entry in ENTRY_FILE until SEED_COUNT have been created, then stop.
local f = assert(io.open(os.getenv("ENTRY_FILE")))
local body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.path = "/addresses"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local want = tonumber(os.getenv("SEED_COUNT"))
local created = 0

response = function(status)
  if status == 201 then created = created + 1 end
  if created >= want then wrk.thread:stop() end
end
