-- wrk script: POST /lookup with bodies rotating over a workload file (one JSON body a line).
-- Usage: wrk -t1 -c8 -d10s --latency -s benchmarks/lookup.lua http://127.0.0.1:9000 -- BODIES.jsonl
-- Requests are formatted once in init(), so the load generator spends its time sending.
-- done() prints one line "WRKJSON {...}" with the figures http_bench.py reads.

local requests = {}
local next_index = 1
local thread_counter = 0

function setup(thread)
   thread:set("thread_id", thread_counter)
   thread_counter = thread_counter + 1
end

function init(args)
   local path = args[1]
   if path == nil then
      error("pass the bodies file after --")
   end
   local headers = { ["Content-Type"] = "application/json" }
   for line in io.lines(path) do
      if #line > 0 then
         requests[#requests + 1] = wrk.format("POST", "/lookup", headers, line)
      end
   end
   if #requests == 0 then
      error("no bodies in " .. path)
   end
   -- threads start at different offsets so they do not send the same request in lockstep
   local tid = thread_id or 0
   next_index = (tid * 7919) % #requests + 1
end

function request()
   local r = requests[next_index]
   next_index = next_index % #requests + 1
   return r
end

function done(summary, latency, requests_done)
   local errors = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      "WRKJSON {\"requests\": %d, \"duration_s\": %.6f, \"rps\": %.2f, " ..
      "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, \"mean_us\": %.2f, " ..
      "\"connect_errors\": %d, \"read_errors\": %d, \"write_errors\": %d, " ..
      "\"status_errors\": %d, \"timeouts\": %d}\n",
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
