-- POST /v1/charges (MOTO) over stored tokens against the mock PSP, a fresh
-- Idempotency-Key per request (env TV_JWT: a psp JWT; TV_TOKENS: a file of tokens).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup, done, delay, response = c.setup, c.done, c.delay, c.count
local tokens, auth
function init(args) tokens, auth = c.init_tokens() end
function request()
  local key = "bench-" .. c.word(16)
  local headers = { ["Authorization"] = auth, ["Content-Type"] = "application/json", ["Idempotency-Key"] = key }
  return wrk.format("POST", "/v1/charges", headers,
    '{"token":"' .. tokens[math.random(#tokens)] .. '","amount":{"value":1000,"currency":"EUR"},' ..
    '"reference":"' .. key .. '","shopper_interaction":"moto"}')
end
