-- Cycles through a few values of one header (a warm verdict cache): arguments are the header name,
-- then the values. Requests are pre-formatted once per thread.
local reqs = {}
local n = 0
local i = 0

function init(args)
   local name = args[1]
   for k = 2, #args do
      local headers = {}
      headers[name] = args[k]
      n = n + 1
      reqs[n] = wrk.format(nil, nil, headers)
   end
   i = id or 0  -- threads start at different offsets
end

function request()
   i = i % n + 1
   return reqs[i]
end
