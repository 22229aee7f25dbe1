-- GET /addresses/{id} with ids drawn at random from the file named by IDS_FILE.
local ids = {}
for line in io.lines(os.getenv("IDS_FILE")) do ids[#ids + 1] = line end
math.randomseed(os.time())

request = function()
  return wrk.format("GET", "/addresses/" .. ids[math.random(#ids)])
end
