-- A canary rollout with a health gate and an analysis hook.
--
--   deployctl run examples/canary.lua production 1.4.2
--   deployctl run --simulate examples/canary.lua production 1.4.2
--
-- 10 % of the traffic first, +10 every 5 minutes while the new instances
-- stay healthy; 100 % is held 5 minutes too, the old instances still
-- running, then the new version is promoted. Any failure puts all traffic
-- back on the old version in one step. Besides the hook below, the
-- strategy (or the target in the config) can declare its analysis:
--   deploy.CanaryStrategy{ ..., analysis = { interval = 60, metrics = {
--     { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 } } } } }
local deploy = require "deploy"

local target, version = arg[1] or "production", arg[2]
if not version then
  io.stderr:write("usage: deployctl run examples/canary.lua TARGET VERSION\n")
  return 2
end

local manager = deploy.DeploymentManager{
  on_event = function(ev)
    local d = ev.data or {}
    if ev.kind == "traffic" then
      print(string.format("%s  %3g %% of traffic on %s", ev.time, d.pct, version))
    elseif ev.kind == "aborted" then
      print(string.format("%s  aborted: %s", ev.time, d.reason))
    end
  end,
}

local canary = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 300 }

local result = manager:deploy(target, version, {
  strategy = canary,
  hooks = {
    -- Plug a metrics query in here (Prometheus, Datadog, ...): return false
    -- (or "fail", "why") to roll back.
    analysis = function(d)
      return true
    end,
  },
})

if result.success then
  print(string.format("%s %s is live (%.0f s)", target, version, result.duration))
  return 0
end
print(string.format("%s stayed on its old version: %s", target, table.concat(result.errors, "; ")))
return 1
