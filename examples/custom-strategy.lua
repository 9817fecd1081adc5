-- A strategy of one's own: a dark launch to 5 % for a while, then the
-- built-in canary takes over from there.
--
--   deployctl run examples/custom-strategy.lua production 1.4.2
local deploy = require "deploy"

local target, version = arg[1] or "production", arg[2]
if not version then
  io.stderr:write("usage: deployctl run examples/custom-strategy.lua TARGET VERSION\n")
  return 2
end

local DarkLaunch = deploy.DeploymentStrategy:extend{ name = "dark-launch" }

-- Only release versions go through this strategy.
function DarkLaunch:validate(d)
  return d.version:match("^%d+%.%d+%.%d+$") ~= nil
end

function DarkLaunch:execute(d)
  d:log("dark launch of " .. d.version .. " to 5 % of the traffic")
  assert(d:start())                 -- new instances, healthy
  assert(d:set_traffic(5))
  local ok, why = d:wait(600)       -- health-gated: fails on sustained errors
  if not ok then return false, why end
  local health = d:health()
  d:log({ step = "dark launch done", health = health.state })
  -- from 5 %: +20 every 2 minutes, then promote
  return deploy.CanaryStrategy{ initial_percentage = 5, increment = 20, interval = 120 }:execute(d)
end

local manager = deploy.DeploymentManager{
  on_event = function(ev)
    if ev.kind == "traffic" then print(ev.time, ev.target, ev.data.pct .. " %") end
    if ev.kind == "log" then print(ev.time, ev.target, ev.data.message or ev.data.step) end
  end,
}
local result = manager:deploy(target, version, { strategy = DarkLaunch })
print(result.success and "promoted" or ("rolled back: " .. table.concat(result.errors, "; ")))
return result.success and 0 or 1
