-- GET /v1/tokens/{token} over stored tokens (env TV_JWT: a crm JWT; TV_TOKENS: a file of tokens).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup = c.setup
done = c.done
delay = c.delay
local headers, tokens
function init(args)
  c.seed()
  tokens = c.lines(os.getenv("TV_TOKENS"))
  headers = { ["Authorization"] = "Bearer " .. (os.getenv("TV_JWT") or "") }
end
function request()
  return wrk.format("GET", "/v1/tokens/" .. tokens[math.random(#tokens)], headers)
end
