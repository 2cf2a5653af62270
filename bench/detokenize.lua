-- POST /v1/detokenize over stored tokens (env TV_JWT: a psp JWT; TV_TOKENS: a file of tokens).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup = c.setup
done = c.done
delay = c.delay
local headers, tokens
function init(args)
  c.seed()
  tokens = c.lines(os.getenv("TV_TOKENS"))
  headers = { ["Authorization"] = "Bearer " .. (os.getenv("TV_JWT") or ""), ["Content-Type"] = "application/json" }
end
function request()
  return wrk.format("POST", "/v1/detokenize", headers, '{"token":"' .. tokens[math.random(#tokens)] .. '"}')
end
