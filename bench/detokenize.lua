-- POST /v1/detokenize over stored tokens (env TV_JWT: a psp JWT; TV_TOKENS: a file of tokens).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup, done, delay = c.setup, c.done, c.delay
local tokens, auth
function init(args) tokens, auth = c.init_tokens() end
function request()
  return wrk.format("POST", "/v1/detokenize", { ["Authorization"] = auth, ["Content-Type"] = "application/json" },
    '{"token":"' .. tokens[math.random(#tokens)] .. '"}')
end
