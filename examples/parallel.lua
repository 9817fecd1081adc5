-- One version to every configured target at once, each with a canary; the
-- rollouts progress side by side on one event loop.
--
--   deployctl run examples/parallel.lua 1.4.2
local deploy = require "deploy"

local version = arg[1]
if not version then
  io.stderr:write("usage: deployctl run examples/parallel.lua VERSION\n")
  return 2
end

local manager = deploy.DeploymentManager{}
local canary = deploy.CanaryStrategy{ initial_percentage = 25, increment = 25, interval = 60 }

local jobs = {}
for _, target in ipairs(manager:targets()) do
  jobs[#jobs + 1] = function() return manager:deploy(target, version, { strategy = canary }) end
end

local failed = 0
for _, r in ipairs(deploy.parallel(jobs)) do
  print(string.format("%-12s %-10s %s (%.0f s)", r.target, r.version, r.success and "promoted" or "rolled back",
                      r.duration))
  if not r.success then failed = failed + 1 end
end
return failed == 0 and 0 or 1
