-- Shared by the wrk scripts: per-thread seeding and a JSON summary line that
-- bench/run.py parses (latency in microseconds).
local M = {}
local threads = {}

function M.setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function M.seed()
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919 + math.floor(os.clock() * 1e6))
end

-- 15 random digits after "4", completed with a Luhn check digit: a distinct,
-- valid card per request, spread over BINs and last fours (no enumeration pattern).
function M.pan()
  local body = "4" .. string.format("%07d%07d", math.random(0, 9999999), math.random(0, 9999999))
  local sum, double = 0, true
  for i = #body, 1, -1 do
    local d = body:byte(i) - 48
    if double then
      d = d * 2
      if d > 9 then d = d - 9 end
    end
    sum = sum + d
    double = not double
  end
  return body .. tostring((10 - sum % 10) % 10)
end

-- A random lowercase word: idempotency keys and references must not look like
-- card numbers (the vault refuses digit runs that could be one).
function M.word(n)
  local t = {}
  for i = 1, n do t[i] = string.char(96 + math.random(26)) end
  return table.concat(t)
end

-- The init of the scripts that pick stored tokens: seeds, loads TV_TOKENS,
-- returns the Authorization header value for TV_JWT.
function M.init_tokens()
  M.seed()
  return M.lines(os.getenv("TV_TOKENS")), "Bearer " .. (os.getenv("TV_JWT") or "")
end

function M.lines(path)
  local out = {}
  local f = assert(io.open(path, "r"))
  for line in f:lines() do
    if #line > 0 then table.insert(out, line) end
  end
  f:close()
  return out
end

-- Counts answers outside 2xx by status (scripts that want it set response = c.count).
function M.count(status)
  if status < 200 or status > 299 then
    bad = bad or {}
    bad[status] = (bad[status] or 0) + 1
  end
end

function M.done(summary, latency, requests)
  local e = summary.errors
  local by = {}
  local totals = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("bad") or {}) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  for status, n in pairs(totals) do
    table.insert(by, string.format('"%d":%d', status, n))
  end
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"by_status":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(by, ",")))
end

-- Optional pacing (env TV_RATE, requests/s over all connections; TV_CONNECTIONS):
-- each connection waits connections/rate between requests (dithered to whole
-- milliseconds), so the offered load is about TV_RATE while latency is low.
local rate = tonumber(os.getenv("TV_RATE") or "")
local conns = tonumber(os.getenv("TV_CONNECTIONS") or "")
if rate and conns and rate > 0 then
  local gap = conns / rate * 1000
  function M.delay()
    local whole = math.floor(gap)
    if math.random() < gap - whole then whole = whole + 1 end
    return whole
  end
end

return M
