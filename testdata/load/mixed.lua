-- 90% GET /addresses/{id}, 10% PUT /addresses/{id}, ids at random from IDS_FILE.
local ids = {}
for line in io.lines(os.getenv("IDS_FILE")) do ids[#ids + 1] = line end
local f = assert(io.open(os.getenv("ENTRY_FILE")))
local body = f:read("*a")
f:close()
math.randomseed(os.time())
local headers = { ["Content-Type"] = "application/json" }

request = function()
  local path = "/addresses/" .. ids[math.random(#ids)]
  if math.random(10) == 10 then
    return wrk.format("PUT", path, headers, body)
  end
  return wrk.format("GET", path)
end
