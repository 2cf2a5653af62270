-- GET /v1/tokens/{token} over stored tokens (env TV_JWT: a crm JWT; TV_TOKENS: a file of tokens).
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup, done, delay = c.setup, c.done, c.delay
local tokens, auth
function init(args) tokens, auth = c.init_tokens() end
function request()
  return wrk.format("GET", "/v1/tokens/" .. tokens[math.random(#tokens)], { ["Authorization"] = auth })
end
