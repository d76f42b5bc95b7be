-- wrk script for overhead.py: print one machine-readable line when the run ends.
-- Latencies are in microseconds.

-- Paced runs (BENCH_PACE_MS set): each connection waits a random time, exponential with
-- that mean in milliseconds, before each request, so the server runs at a fixed load
-- below saturation and latency is the request's own, not time spent queueing.
local pace_ms = tonumber(os.getenv("BENCH_PACE_MS") or "")
if pace_ms then
  delay = function()
    return math.floor(-pace_ms * math.log(1 - math.random()))
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,' ..
    '"lat_mean_us":%.1f,"lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
