-- Fills the vault: tokenizes cards and writes every TV_KEEP-th token to
-- TV_OUT.<thread>; bench/run.py stops it (SIGINT) once the vault holds enough.
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup = c.setup
done = c.done
local headers, got, keep, out
function init(args)
  c.seed()
  headers = { ["Authorization"] = "Bearer " .. (os.getenv("TV_JWT") or ""), ["Content-Type"] = "application/json" }
  keep = tonumber(os.getenv("TV_KEEP") or "1")
  got = 0
  out = assert(io.open(os.getenv("TV_OUT") .. "." .. tid, "w"))
end
function request()
  return wrk.format("POST", "/v1/tokens", headers,
    '{"pan":"' .. c.pan() .. '","exp_month":12,"exp_year":2031}')
end
function response(status, hdrs, body)
  if status == 201 then
    got = got + 1
    if got % keep == 0 then
      local t = body:match('"token":"(%d+)"')
      if t then
        out:write(t, "\n")
        out:flush()
      end
    end
  end
end
