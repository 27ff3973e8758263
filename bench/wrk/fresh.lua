-- A credential never seen before on every request. Argument 1 is a file prefix: thread `id` reads
-- PREFIX<id>.txt (one "Header-Value" per line; the slices of different threads are disjoint) and
-- argument 2 is the header name. Running past the end wraps around and counts `wrapped`, which the
-- report shows (a wrapped run no longer measures only new credentials).
local values = {}
local n = 0
local i = 0
local name = "Authorization"
wrapped = 0

function init(args)
   local prefix = args[1]
   name = args[2] or name
   local f = assert(io.open(prefix .. tostring(id or 0) .. ".txt", "r"))
   for line in f:lines() do
      if #line > 0 then
         n = n + 1
         values[n] = line
      end
   end
   f:close()
   assert(n > 0, "no credentials in " .. prefix .. tostring(id or 0) .. ".txt")
end

function request()
   i = i + 1
   if i > n then
      i = 1
      wrapped = wrapped + 1
   end
   local headers = {}
   headers[name] = values[i]
   return wrk.format(nil, nil, headers)
end
