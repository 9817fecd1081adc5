-- Does `deployctl serve` under load slow a running canary's steps?
--
--   lua5.4 bench/serve.lua [BUILD_DIR=build] [ROUNDS=3] [STEPS=10] [INTERVAL=0.2]
--
-- A real HAProxy, a target of 2 demo-app instances, and `deployctl serve`
-- on a 127.0.0.1 port. Each round runs two canaries of STEPS steps of
-- INTERVAL seconds with `deployctl deploy` (a separate process, as an
-- operator would): one with serve idle, one while two wrk clients hammer
-- serve's /metrics and /api/v1/status/production (every answer built from
-- the store and checked instances). The step time is read from the
-- deployment's own events (the time between its traffic changes); its
-- overhead is what a step takes beyond INTERVAL. Prints, per round and as
-- medians, the step time idle and under load, their ratio (target: close
-- to 1.0x), and the requests per second serve answered meanwhile.
package.path = "./?.lua;./spec/?.lua;" .. package.path

local build = arg[1] or "build"
local rounds = tonumber(arg[2]) or 3
local steps = tonumber(arg[3]) or 10
local interval = tonumber(arg[4]) or 0.2
local function abs(p) return p:sub(1, 1) == "/" and p or (io.popen("pwd"):read("l") .. "/" .. p) end
build = abs(build)
-- fixtures read the build directory from the environment: a child sees it.
if os.getenv("DEPLOY_BUILD_DIR") ~= build then
  local ok, _, code = os.execute(string.format("DEPLOY_BUILD_DIR=%q PATH=%q:$PATH lua5.4 %q %q %d %d %s", build,
                                               build, arg[0], build, rounds, steps, tostring(interval)))
  os.exit(ok and 0 or code or 1)
end
package.cpath = build .. "/?.so;" .. package.cpath

local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"
local deploy = require "deploy"

local function median(t)
  local s = { table.unpack(t) }
  table.sort(s)
  return s[(#s + 1) // 2]
end

local h = fixtures.haproxy{}
local dir = fixtures.tmpdir("bench-serve")
local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = {
  production = fixtures.target_config{ haproxy = h, instances = 2, dir = dir } } })
assert(cli.run({ "--config", config, "deploy", "production", "v0", "--quiet" }) == 0, "the first deployment failed")

local serve = cli.spawn({ "--config", config, "serve", "--listen", "127.0.0.1:0", "--quiet" })
local port = fixtures.wait_until(function()
  if serve:done() then error("serve exited: " .. serve:output() .. serve:errors()) end
  return tonumber(serve:output():match("listening on http://127%.0%.0%.1:(%d+)"))
end, 20, "serve to listen")
local base = "http://127.0.0.1:" .. port

local m = deploy.DeploymentManager{ config = config }
local version = 0

-- One canary; returns the mean seconds between its traffic changes.
local function canary()
  version = version + 1
  local pct = 100 / steps
  local code, out, err = cli.run({ "--config", config, "deploy", "production", "v" .. version, "--strategy", "canary",
    "--set", "initial_percentage=" .. pct, "--set", "increment=" .. pct, "--set", "interval=" .. interval, "--quiet" })
  assert(code == 0, "the canary failed: " .. out .. err)
  local id = m:history("production", 1)[1].id
  local ts = {}
  for _, ev in ipairs(m:events(id)) do if ev.kind == "traffic" then ts[#ts + 1] = ev.ts end end
  return (ts[#ts] - ts[1]) / (#ts - 1)
end

local function start_load(seconds)
  local runs = {}
  for i, path in ipairs{ "/metrics", "/api/v1/status/production" } do
    local log = string.format("%s/wrk-%d-%d.log", dir, version, i)
    runs[#runs + 1] = { log = log, pid = fixtures.spawn(string.format("wrk -t1 -c4 -d%ds %s", seconds,
      fixtures.shell_quote(base .. path)), log) }
  end
  return runs
end

local function load_rate(runs)
  local total = 0
  for _, r in ipairs(runs) do
    fixtures.wait_exit(r.pid, 60)
    local text = fixtures.read_file(r.log) or ""
    total = total + (tonumber(text:match("Requests/sec:%s+([%d.]+)")) or 0)
  end
  return total
end

-- wrk runs a little longer than the canary it loads.
local load_seconds = math.ceil(steps * interval + 3)
print(string.format("serve on %s; canaries of %d steps of %gs; load: 2 wrk (1 thread, 4 connections each) on "
  .. "/metrics and /api/v1/status/production", base, steps, interval))
print(string.format("%-6s %14s %14s %8s %14s", "round", "idle step s", "loaded step s", "ratio", "requests/s"))
local idle, loaded, ratios, rates = {}, {}, {}, {}
for r = 1, rounds do
  local a = canary()
  local runs = start_load(load_seconds)
  -- the load is on before the canary starts
  fixtures.wait_until(function() return (fixtures.read_file(runs[1].log) or ""):find("Running", 1, true) end, 10,
                      "wrk to start")
  local b = canary()
  local rate = load_rate(runs)
  idle[r], loaded[r], ratios[r], rates[r] = a, b, b / a, rate
  print(string.format("%-6d %14.4f %14.4f %7.3fx %14.0f", r, a, b, b / a, rate))
end
print(string.format("%-6s %14.4f %14.4f %7.3fx %14.0f", "median", median(idle), median(loaded), median(ratios),
                    median(rates)))
print(string.format("step overhead beyond the %gs interval: idle %.1f ms, loaded %.1f ms", interval,
                    (median(idle) - interval) * 1000, (median(loaded) - interval) * 1000))
fixtures.kill(serve.pid, "TERM")
serve:wait(20)
fixtures.cleanup()
