-- wrk script for bench/harness.py: like post.lua, but each request is one of the JSON bodies of WRK_BODIES (one
-- per line), drawn at random (seed WRK_SEED), so that every connection sends a mix (say, of 1- and 4-step requests)
-- instead of one body for good. The WRK_JSON line at the end is post.lua's.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")

local requests = {}

function init(args)
  math.randomseed(tonumber(os.getenv("WRK_SEED") or "1"))
  for body in (os.getenv("WRK_BODIES") or wrk.body):gmatch("[^\n]+") do
    requests[#requests + 1] = wrk.format(nil, nil, nil, body)
  end
end

function request()
  return requests[math.random(#requests)]
end
