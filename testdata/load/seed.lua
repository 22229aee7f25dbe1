-- POST the entry in ENTRY_FILE (as post.lua does) until SEED_COUNT have
-- been created, then stop sending.
dofile("testdata/load/post.lua")
local want = tonumber(os.getenv("SEED_COUNT"))
local created = 0

response = function(status)
  if status == 201 then created = created + 1 end
  if created >= want then wrk.thread:stop() end
end
