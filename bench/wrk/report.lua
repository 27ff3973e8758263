-- Appended to every case script by bench/wrk.py: numbers each thread (global `id`, 0-based) and,
-- at the end, prints one JSON line with exact percentiles from wrk's latency histogram (microseconds).
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local wrapped = 0
   for _, t in ipairs(threads) do
      local w = t:get("wrapped")
      if type(w) == "number" then wrapped = wrapped + w end
   end
   local e = summary.errors
   local p = function(q) return latency:percentile(q) end
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency_us":{"min":%d,"mean":%.3f,"stdev":%.3f,"max":%d,' ..
      '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99.9":%d},"wrapped":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.stdev, latency.max,
      p(50), p(75), p(90), p(99), p(99.9), wrapped))
end
