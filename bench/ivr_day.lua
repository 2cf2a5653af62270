-- A call center's day: the IVR edge tokenizes (40%), agents and the CRM read card
-- metadata (40%), billing charges by token through the mock PSP (20%).
-- env TV_JWT_EDGE, TV_JWT_CRM, TV_JWT_PSP; TV_TOKENS: a file of stored tokens.
package.path = package.path .. ";bench/?.lua"
local c = require("common")
setup = c.setup
done = c.done
delay = c.delay
response = c.count
local tokens, edge, crm, psp
function init(args)
  c.seed()
  tokens = c.lines(os.getenv("TV_TOKENS"))
  edge = "Bearer " .. os.getenv("TV_JWT_EDGE")
  crm = "Bearer " .. os.getenv("TV_JWT_CRM")
  psp = "Bearer " .. os.getenv("TV_JWT_PSP")
end
function request()
  local r = math.random(100)
  if r <= 40 then
    return wrk.format("POST", "/v1/tokens", { ["Authorization"] = edge, ["Content-Type"] = "application/json" },
      '{"pan":"' .. c.pan() .. '","exp_month":12,"exp_year":2031}')
  elseif r <= 80 then
    return wrk.format("GET", "/v1/tokens/" .. tokens[math.random(#tokens)], { ["Authorization"] = crm })
  else
    local key = "day-" .. c.word(16)
    return wrk.format("POST", "/v1/charges",
      { ["Authorization"] = psp, ["Content-Type"] = "application/json", ["Idempotency-Key"] = key },
      '{"token":"' .. tokens[math.random(#tokens)] .. '","amount":{"value":1000,"currency":"EUR"},' ..
      '"reference":"' .. key .. '","shopper_interaction":"moto"}')
  end
end
