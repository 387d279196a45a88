-- wrk script for bench/harness.py: POST one JSON body (env WRK_BODY) to the URL's path (/v1/generate, or
-- /v1/edit with an edit request's body), then print the run's
-- figures as one JSON line (WRK_JSON ...) that harness.finish_wrk parses: requests, errors, latency percentiles.
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY") or '{"n": 1, "steps": 1}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("WRK_API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean, latency.max))
end
