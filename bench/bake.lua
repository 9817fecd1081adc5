-- A version that fails at 100 %: how long until the old version serves
-- again, with the old set warm (the canary's hold at 100 %, one router
-- change) against the way before holds (promoted, old set stopped, then a
-- rollback that starts the old version again).
--
--   lua5.4 bench/bake.lua [BUILD_DIR=build] [ROUNDS=5] [INSTANCES=2]
--
-- A Lua script, like bench/hosts.lua: it drives a real HAProxy and real
-- demo-app instances through the fixtures of the specs. Both paths are
-- timed on the engine clock from the moment going back is decided to the
-- moment the router has the old version's servers at full weight:
--   warm     the canary holds 100 % (interval 300 s); the new version is
--            made unhealthy; from the `aborted` event to `rolled_back`;
--   restart  the same canary with interval 0 promotes at once (the old
--            set stops, as every canary did before holds); then
--            manager:rollback(); from the rollback's `started` event to its
--            `traffic` event (old instances started and healthy, switch).
-- The health detection before `aborted` is the same in both and is not
-- counted (after a promotion nothing detects the failure: an operator
-- or a pipeline decides). Prints the median of each and their ratio.
package.path = "./?.lua;./spec/?.lua;" .. package.path

local build = arg[1] or "build"
local rounds = tonumber(arg[2]) or 5
local instances = tonumber(arg[3]) or 2
local function abs(p) return p:sub(1, 1) == "/" and p or (io.popen("pwd"):read("l") .. "/" .. p) end
build = abs(build)
if os.getenv("DEPLOY_BUILD_DIR") ~= build then
  local ok, _, code = os.execute(string.format("DEPLOY_BUILD_DIR=%q lua5.4 %q %q %d %d", build, arg[0], build, rounds,
                                               instances))
  os.exit(ok and 0 or code or 1)
end
package.cpath = build .. "/?.so;" .. package.cpath

local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function ts_of(m, id, kind)
  for _, ev in ipairs(m:events(id)) do if ev.kind == kind then return ev.ts end end
  error("bench/bake: no '" .. kind .. "' event in deployment " .. id)
end

local function median(v)
  table.sort(v)
  local n = #v
  return n % 2 == 1 and v[(n + 1) // 2] or (v[n // 2] + v[n // 2 + 1]) / 2
end

local function setup()
  local h = fixtures.haproxy{}
  local target, dir = fixtures.target_config{ haproxy = h, instances = instances }
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  local m = deploy.DeploymentManager{ config = cfg, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  assert(m:deploy("production", "v1").success)
  return m, h, dir
end

local function warm_once()
  local m, _, dir = setup()
  local full
  local results = deploy.parallel{
    function()
      return m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 100, interval = 300 },
        on_event = function(ev) if ev.kind == "bake" then full = true end end })
    end,
    function()
      while not full do deploy.sleep(0.01) end
      fixtures.set_unhealthy(dir, "v2")
    end,
  }
  assert(not results[1].success, "the failing version was promoted")
  local id = m:history("production", 1)[1].id
  local t = ts_of(m, id, "rolled_back") - ts_of(m, id, "aborted")
  m:close()
  fixtures.cleanup()
  return t
end

local function restart_once()
  local m = setup()
  assert(m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{ initial_percentage = 100, interval = 0 } })
           .success)
  local r = m:rollback("production")
  assert(r.success, table.concat(r.errors or {}, "\n"))
  local id = m:history("production", 1)[1].id
  local t = ts_of(m, id, "traffic") - ts_of(m, id, "started")
  m:close()
  fixtures.cleanup()
  return t
end

local warm, restart = {}, {}
for i = 1, rounds do
  warm[i] = warm_once()
  restart[i] = restart_once()
end
local w, r = median(warm), median(restart)
print(string.format("bench/bake: %d rounds, %d instances per version, HAProxy router", rounds, instances))
print(string.format("  warm old set (hold at 100 %%): back on the old version in %.1f ms (median; %.1f..%.1f)", w * 1000,
                    math.min(table.unpack(warm)) * 1000, math.max(table.unpack(warm)) * 1000))
print(string.format("  old set stopped, rollback:     back on the old version in %.1f ms (median; %.1f..%.1f)",
                    r * 1000, math.min(table.unpack(restart)) * 1000, math.max(table.unpack(restart)) * 1000))
print(string.format("  ratio restart / warm: %.1fx", r / w))
