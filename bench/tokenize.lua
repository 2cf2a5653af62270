-- POST /v1/tokens with a distinct valid card per request (env TV_JWT: an edge JWT).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup = c.setup
done = c.done
delay = c.delay
local headers
function init(args)
  c.seed()
  headers = { ["Authorization"] = "Bearer " .. (os.getenv("TV_JWT") or ""), ["Content-Type"] = "application/json" }
end
function request()
  return wrk.format("POST", "/v1/tokens", headers,
    '{"pan":"' .. c.pan() .. '","exp_month":12,"exp_year":2031}')
end
