-- What an adversarial review found, each reproduced against real HAProxy,
-- real instances and real processes, and each fixed at its root:
--   1. a late abort must not reach the next deployment
--   2. reconcile respects the target lock
--   3. a strategy that yields what the scheduler does not know fails cleanly
--   4. a strategy that never yields is stopped: by hook_timeout, by Ctrl-C
--   5. watch closes what it opens (descriptors, packs) -- in gitops_spec
--   6. a secret never reaches an instance's command line
--   7. names, numbers and messages: refused with the fix named
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup(opts)
  opts = opts or {}
  local h = fixtures.haproxy{}
  local target, tdir = fixtures.target_config{ haproxy = h, instances = 1, dir = opts.dir, provider = opts.provider }
  local dir = fixtures.tmpdir("hard")
  local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
  local code, out, err = cli.run({ "--config", config, "deploy", "production", "v1" }, opts.env)
  assert.equal(0, code, out .. err)
  local m = deploy.DeploymentManager{ config = config, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  return m, h, tdir, config, dir
end

local function fast_canary()
  return deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.05 }
end

-- The target is whole on `version`: the store says so, HAProxy serves only
-- it, no other instance runs, and nobody holds the lock.
local function whole_on(m, h, tdir, version)
  local st = m:get_status("production")
  assert.equal(version, st.current_version)
  assert.same({ [version] = 20 }, (h:sample(20)))
  for _, v in ipairs{ "v1", "v2", "v3" } do
    if v ~= version then assert.same({}, fixtures.instances_of(tdir, v), v .. " still runs") end
  end
  assert.is_nil(m:lock("production"))
  assert.is_true(m:integrity_check())
end

describe("hardening", function()
  after_each(fixtures.cleanup)

  it("1. an abort given as a rollout ends never reaches the next deployment", function()
    local m, h, tdir, config = setup()
    -- a second process's manager, as `deployctl abort` would be
    local other = deploy.DeploymentManager{ config = config }
    local sent = {}
    local watcher = deploy.DeploymentManager{ config = config, on_event = function(ev)
      -- at promotion the rollout is still running and holds the lock; the
      -- abort is for this deployment, and must die with it
      if ev.kind == "promoted" then sent[#sent + 1] = { other:abort("production") } end
    end }
    local r = watcher:deploy("production", "v2", { strategy = fast_canary() })
    assert.equal(1, #sent)
    -- whatever the abort did to this rollout, it ended with it
    local first = r.success and "v2" or "v1"
    whole_on(m, h, tdir, first)
    -- the next deployment, from another process, is not aborted
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v3", "--strategy", "canary",
                                     "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0.05" })
    assert.equal(0, code, out .. err)
    whole_on(m, h, tdir, "v3")
    -- and an abort with nothing running is refused, not kept
    local ok, why = other:abort("production")
    assert.is_false(ok)
    assert.matches("nothing to abort", why)
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    whole_on(m, h, tdir, "v1")
  end)

  it("2. reconcile refuses, exit 3, while a canary holds the target, and changes nothing", function()
    local m, h, tdir, config = setup()
    local p = cli.spawn({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                          "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0.05",
                          "--set", "pause_at=50" })
    fixtures.wait_until(function() return p:output():find("paused") end, 30, "the pause at 50 %")
    local code, out, err = cli.run({ "--config", config, "reconcile", "production" })
    assert.equal(3, code, out .. err)
    assert.matches("target locked: 'production' is being deployed by deployment d%x+", err)
    -- the canary still stands at 50 %, its new instance alive
    assert.same({ v1 = 10, v2 = 10 }, (h:sample(20)))
    assert.is_true(#fixtures.instances_of(tdir, "v2") >= 1)
    assert.equal(0, (cli.run({ "--config", config, "promote", "production" })))
    local rc, pout, perr = p:wait(30)
    assert.equal(0, rc, pout .. perr)
    whole_on(m, h, tdir, "v2")
  end)

  it("3. a strategy that yields values of its own ends aborted, the lock released, the new instance gone", function()
    local m, h, tdir = setup()
    local Odd = deploy.DeploymentStrategy:extend{ name = "odd" }
    function Odd:execute(d)
      assert(d:start())
      assert(d:set_traffic(50))
      coroutine.yield("x", 1, 2)
      return true
    end
    local r = m:deploy("production", "v2", { strategy = Odd{} })
    assert.is_false(r.success)
    assert.matches("^strategy execute%(d%) yielded outside a deploy action %(coroutine%.yield%?%): wait with d:wait%(%)",
      r.errors[1])
    assert.equal("failed", m:history("production", 1)[1].status)
    whole_on(m, h, tdir, "v1")
    -- the target is not wedged: the next deployment runs
    assert.is_true(m:deploy("production", "v3").success)
    whole_on(m, h, tdir, "v3")
  end)

  it("3b. a bare coroutine.yield() in a hook fails the hook at once, not after its timeout", function()
    local m, h, tdir = setup()
    local t0 = fixtures.now()
    local r = m:deploy("production", "v2", { strategy = fast_canary(), hook_timeout = 30, hooks = {
      before_step = function() coroutine.yield() end } })
    assert.is_false(r.success)
    assert.matches("before_step hook failed at 50 %%: hook before_step yielded outside a deploy action", r.errors[1])
    assert.is_true(fixtures.now() - t0 < 10, "the hook waited for its timeout")
    whole_on(m, h, tdir, "v1")
  end)

  it("4. a strategy that never yields is aborted after hook_timeout; the process stays usable", function()
    local m, h, tdir = setup()
    local Spin = deploy.DeploymentStrategy:extend{ name = "spin" }
    function Spin:execute(d)
      assert(d:start())
      assert(d:set_traffic(50))
      while true do end
    end
    local t0 = fixtures.now()
    local r = m:deploy("production", "v2", { strategy = Spin{}, hook_timeout = 0.3 })
    assert.is_false(r.success)
    assert.matches("^strategy execute%(d%) ran 0%.3 s without waiting %(a loop that never yields%?%): it is stopped",
      r.errors[1])
    assert.is_true(fixtures.now() - t0 < 20)
    whole_on(m, h, tdir, "v1")
    assert.is_true(m:deploy("production", "v2").success)
  end)

  it("4b. Ctrl-C while a strategy is busy in Lua aborts the rollout safely, exit 1", function()
    local _, h, tdir, config, dir = setup()
    fixtures.write_file(dir .. "/spin.lua", [[
local deploy = require "deploy"
local m = deploy.DeploymentManager{ config = arg[1] }
local Spin = deploy.DeploymentStrategy:extend{ name = "spin" }
function Spin:execute(d)
  assert(d:start())
  assert(d:set_traffic(50))
  print("spinning") io.stdout:flush()
  while true do end
end
local r = m:deploy("production", "v2", { strategy = Spin{}, hook_timeout = 3600 })
io.stderr:write(r.errors and r.errors[1] or "", "\n")
return r.success and 0 or 1
]])
    local p = cli.spawn({ "run", dir .. "/spin.lua", config })
    fixtures.wait_until(function() return p:output():find("spinning") end, 30, "the strategy to spin")
    assert.same({ v1 = 10, v2 = 10 }, (h:sample(20)))
    fixtures.kill(p.pid, "INT")
    local code, out, err = p:wait(20)
    assert.equal(1, code, out .. err)
    assert.matches("interrupted by the operator %(SIGINT/SIGTERM%)", err)
    local m = deploy.DeploymentManager{ config = config }
    assert.equal("failed", m:history("production", 1)[1].status)
    whole_on(m, h, tdir, "v1")
  end)

  it("6. a ${SECRET} reaches the instance through its environment only, never a command line", function()
    local secret = string.format("tok-%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
    local tdir = fixtures.tmpdir("target")
    -- not exec'd: the shell that runs the command stays, and is checked too
    local m, _, _, config = setup{ dir = tdir, env = { HARDENING_TOKEN = secret }, provider = {
      command = "APP_SECRET_COPY=${HARDENING_TOKEN} " .. fixtures.demo_app() .. " --port {port} --version {version}"
        .. " --unhealthy-file " .. tdir .. "/unhealthy-{version}; true" } }
    local pids = fixtures.instances_of(tdir, "v1")
    assert.is_true(#pids >= 1)
    local copies = 0
    for _, pid in ipairs(pids) do
      local cmdline = fixtures.read_file("/proc/" .. pid .. "/cmdline") or ""
      assert.is_nil(cmdline:find(secret, 1, true), "the secret is in /proc/" .. pid .. "/cmdline")
      local environ = fixtures.read_file("/proc/" .. pid .. "/environ") or ""
      if environ:find("APP_SECRET_COPY=" .. secret, 1, true) then copies = copies + 1 end
    end
    assert.equal(1, copies, "the application did not get the secret in its environment")
    -- nowhere in what deployctl stores or prints
    local code, out, err = cli.run({ "--config", config, "status", "production", "--json" }, { HARDENING_TOKEN = secret })
    assert.equal(0, code, err)
    assert.is_nil((out .. err):find(secret, 1, true))
    assert.is_nil((fixtures.read_file(m:state_path()) or ""):find(secret, 1, true))
  end)

  it("7. versions that are paths or flags, and fractional counts, are refused with the fix named", function()
    local m = setup()
    for _, v in ipairs{ ".", "..", "-v", "--version", "../etc", "a/b", "" } do
      local ok, err = pcall(m.deploy, m, "production", v)
      assert.is_false(ok, "accepted version '" .. v .. "'")
      assert.matches("deploy: manager:deploy%(%): version", err)
    end
    local code, _, err = cli.run({ "--config", "/dev/null", "deploy", "production", "-v" })
    assert.equal(2, code)
    local ok
    ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{
      targets = { production = fixtures.target_config{ instances = 1.5 } } } })
    assert.is_false(ok)
    assert.matches("config targets%.production%.instances must be a whole number, got 1%.5", err)
    ok, err = pcall(deploy.CanaryStrategy, { failure_threshold = 2.5 })
    assert.is_false(ok)
    assert.matches("failure_threshold", err)
  end)

  it("7b. a failed rollback reports the original cause first, then the rollback's own failure", function()
    local m, h, tdir = setup()
    -- the old version cannot come back: its instances die as soon as they
    -- start (an "unhealthy" marker makes the demo app fail its checks)
    local Fail = deploy.DeploymentStrategy:extend{ name = "fail" }
    function Fail:execute(d)
      assert(d:start())
      assert(d:set_traffic(50))
      fixtures.set_unhealthy(tdir, "v1")
      return false, "the new version answered 500 on /checkout"
    end
    local r = m:deploy("production", "v2", { strategy = Fail{} })
    fixtures.set_unhealthy(tdir, "v1", false)
    assert.is_false(r.success)
    assert.matches("the new version answered 500 on /checkout", r.errors[1])
    for _, e in ipairs(r.errors) do
      assert.is_nil(e:find("deploy: deploy:", 1, true), "a repeated prefix: " .. e)
    end
    assert.is_true(h ~= nil)
  end)
end)
