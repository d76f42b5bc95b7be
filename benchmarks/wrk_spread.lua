-- wrk script for scale.py: spread requests over `n` tenants named <prefix>00001...
-- Usage: wrk ... -s wrk_spread.lua URL -- <n> <prefix>. Reports like wrk_report.lua.
dofile("wrk_report.lua")

local n, prefix

init = function(args)
  n = tonumber(args[1])
  prefix = args[2]
  math.randomseed(os.time())
end

request = function()
  local tenant = string.format("%s%05d", prefix, math.random(n))
  return wrk.format("GET", nil, {["X-Tenant-ID"] = tenant})
end
