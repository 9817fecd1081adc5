-- Strategies written in Lua, composing the built-in ones, and hooks.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function setup(opts)
  opts = opts or {}
  local h = fixtures.haproxy{}
  local target, dir = fixtures.target_config{ haproxy = h, instances = 1 }
  local cfg = fixtures.config{ targets = { production = target } }
  local m = deploy.DeploymentManager{ config = cfg, strategies = opts.strategies,
                                      strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  assert.is_true(m:deploy("production", "v1").success)
  return m, h, dir
end

local function events(m, kind)
  local d = m:history("production", 1)[1]
  local out = {}
  for _, ev in ipairs(m:events(d.id)) do
    if not kind or ev.kind == kind then out[#out + 1] = ev end
  end
  return out, d
end

local fast_canary = function() return deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.05 } end

describe("a strategy written in Lua", function()
  after_each(fixtures.cleanup)

  it("sees the Deployment's fields and drives the rollout with d:start, d:set_traffic, d:wait, d:health", function()
    local m, h = setup()
    local Ring = deploy.DeploymentStrategy:extend{ name = "ring" }
    local seen = {}
    function Ring:validate(d) return d.version:match("^v%d") ~= nil end
    function Ring:execute(d)
      seen.fields = { id = d.id, target = d.target, version = d.version, strategy = d.strategy,
                      created_at = d.created_at, metadata = d.metadata }
      assert(d:start())
      seen.health = d:health()
      assert(d:set_traffic(25))
      seen.split = h:sample(40)
      assert(d:wait(0.05))
      d:log({ ring = 1, note = "internal users first" })
      assert(d:set_traffic(100))
      return true
    end
    local r = m:deploy("production", "v2", { strategy = Ring, metadata = { ticket = "OPS-9" } })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal("ring", r.strategy)
    assert.matches("^d%x+$", seen.fields.id)
    assert.equal("production", seen.fields.target)
    assert.equal("v2", seen.fields.version)
    assert.equal(Ring, seen.fields.strategy)
    assert.matches("Z$", seen.fields.created_at)
    assert.same({ ticket = "OPS-9" }, seen.fields.metadata)
    assert.equal("healthy", seen.health.state)
    assert.equal(10, seen.split.v2)
    assert.equal(30, seen.split.v1)
    local logs = events(m, "log")
    assert.same({ ring = 1, note = "internal users first" }, logs[1].data)
    assert.same({ v2 = 20 }, (h:sample(20)))
    -- validate(d) refuses a version it does not like, and nothing runs
    local r2 = m:deploy("production", "x3", { strategy = Ring })
    assert.is_false(r2.success)
    assert.matches("validate%(d%) returned false", r2.errors[1])
    assert.equal("v2", m:get_status("production").current_version)
  end)

  it("extends and composes canary: steps of its own, then canary:execute(d)", function()
    local m, h = setup()
    local Composed = deploy.DeploymentStrategy:extend{ name = "dark-then-canary" }
    function Composed:execute(d)
      assert(d:start())
      assert(d:set_traffic(5))
      assert(d:wait(0.05))
      return fast_canary():execute(d)
    end
    local r = m:deploy("production", "v2", { strategy = Composed })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local pcts = {}
    for _, ev in ipairs(events(m, "traffic")) do pcts[#pcts + 1] = ev.data.pct end
    assert.same({ 5, 15, 25, 35, 45, 55, 65, 75, 85, 95, 100 }, pcts)
    assert.equal(1, #events(m, "instance_started"))
    assert.same({ v2 = 20 }, (h:sample(20)))
  end)

  it("a delegated canary continues from the share the rollout is at: max(initial_percentage, now + increment)", function()
    local m = setup()
    local DarkLaunch = deploy.DeploymentStrategy:extend{ name = "dark-launch" }
    function DarkLaunch:execute(d)
      assert(d:start())
      assert(d:set_traffic(5))
      assert(d:wait(0.05))
      return deploy.CanaryStrategy{ initial_percentage = 50, increment = 10, interval = 0.05 }:execute(d)
    end
    local r = m:deploy("production", "v2", { strategy = DarkLaunch })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local pcts, steps = {}, {}
    for _, ev in ipairs(events(m, "traffic")) do
      pcts[#pcts + 1] = ev.data.pct
      steps[#steps + 1] = ev.data.step .. "/" .. ev.data.steps
    end
    assert.same({ 5, 50, 60, 70, 80, 90, 100 }, pcts)
    -- the canary's own steps: 50 .. 100 is six of them
    assert.same({ "1/6", "2/6", "3/6", "4/6", "5/6", "6/6" }, { table.unpack(steps, 2) })
  end)

  it("a delegated canary returns to its caller: canary, then a hold of its own, then promotion", function()
    local m, h = setup()
    local seen = {}
    local Held = deploy.DeploymentStrategy:extend{ name = "canary-then-hold" }
    function Held:execute(d)
      local ok, why = fast_canary():execute(d)
      if not ok then return false, why end
      seen.after_canary = m:get_status("production").current_version
      d:log("holding at 100 %")
      assert(d:wait(0.1))
      seen.after_hold = m:get_status("production").current_version
      return true
    end
    local r = m:deploy("production", "v2", { strategy = Held })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    -- not promoted when the canary ended, nor during the hold: when execute returned
    assert.equal("v1", seen.after_canary)
    assert.equal("v1", seen.after_hold)
    assert.equal("v2", m:get_status("production").current_version)
    local kinds = {}
    for _, ev in ipairs(events(m)) do
      if ev.kind == "log" or ev.kind == "promoted" then kinds[#kinds + 1] = ev.kind end
    end
    assert.same({ "log", "promoted" }, kinds)
    assert.same({ v2 = 10 }, (h:sample(10)))
  end)

  it("a delegated blue-green is followed by d:promote() from the caller", function()
    local m = setup()
    local S = deploy.DeploymentStrategy:extend{ name = "bg-then-promote" }
    local promoted_after
    function S:execute(d)
      assert(deploy.BlueGreenStrategy{}:execute(d))
      assert(d:promote())
      promoted_after = m:get_status("production").current_version
    end
    local r = m:deploy("production", "v2", { strategy = S })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal("v2", promoted_after)
    assert.equal(1, #events(m, "promoted"))
  end)

  it("a delegated canary that fails hands false and the reason back; the caller's false rolls back", function()
    local m, h = setup()
    local S = deploy.DeploymentStrategy:extend{ name = "caller" }
    local got
    function S:execute(d)
      local ok, why = fast_canary():execute(d)
      got = { ok, why }
      return ok, why
    end
    local r = m:deploy("production", "v2", { strategy = S, hooks = {
      analysis = function(d) return "fail", "error rate 7 %" end } })
    assert.is_false(r.success)
    assert.is_false(got[1])
    assert.matches("error rate 7 %%", got[2])
    assert.same({ v1 = 10 }, (h:sample(10)))
  end)

  it("aborts when execute raises, with the traceback, and the old version keeps serving", function()
    local m, h = setup()
    local Broken = deploy.DeploymentStrategy:extend{ name = "broken" }
    function Broken:execute(d)
      d:start()
      d:set_traffic(50)
      error("no metrics backend configured")
    end
    local r = m:deploy("production", "v2", { strategy = Broken })
    assert.is_false(r.success)
    assert.matches("strategy execute%(d%) raised: .-no metrics backend configured", r.errors[1])
    assert.matches("stack traceback", r.errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("d:abort(reason) returns the target to the old version", function()
    local m, h = setup()
    local S = deploy.DeploymentStrategy:extend{ name = "quitter" }
    function S:execute(d)
      d:start()
      d:set_traffic(50)
      d:abort("changed my mind")
    end
    local r = m:deploy("production", "v2", { strategy = S })
    assert.is_false(r.success)
    assert.equal("changed my mind", r.errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("returning without starting anything promotes nothing, and says so", function()
    local m, h = setup()
    local Lazy = deploy.DeploymentStrategy:extend{ name = "lazy" }
    function Lazy:execute(d) return true end
    local r = m:deploy("production", "v2", { strategy = Lazy })
    assert.is_false(r.success)
    assert.equal("nothing to promote: no instance of the new version was started", r.errors[1])
    assert.same({ v1 = 10 }, (h:sample(10)))
  end)

  it("hooks may look at the deployment but not steer it", function()
    local m, h = setup()
    local r = m:deploy("production", "v2", { strategy = fast_canary(), hooks = {
      analysis = function(d) d:set_traffic(100) end } })
    assert.is_false(r.success)
    assert.matches("d:set_traffic%(%) can only be called from the strategy's execute%(d%), not from a hook", r.errors[1])
    local seen
    r = m:deploy("production", "v3", { strategy = fast_canary(), hooks = {
      after_step = function(pct, health, d) seen = d:health().state end } })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal("healthy", seen)
    assert.same({ v3 = 10 }, (h:sample(10)))
  end)

  it("an event handler runs between loop turns: it may wait, and sees the deployment as it stands", function()
    local m = setup()
    local seen, order = nil, {}
    local r = m:deploy("production", "v2", { on_event = function(ev)
      order[#order + 1] = ev.kind
      if ev.kind == "promoted" and not seen then
        seen = m:get_status("production") -- waits for a health check
      end
    end })
    assert.is_true(r.success)
    assert.equal("v2", seen.current_version)
    assert.equal("running", seen.status)
    -- events reach the handler in order, every one before deploy() returns
    assert.equal("started", order[1])
    assert.equal("finished", order[#order])
    assert.equal("v2", m:get_status("production").current_version)
  end)

  it("d:* methods outside execute or after the end raise a clear error", function()
    local m = setup()
    local kept
    local S = deploy.DeploymentStrategy:extend{ name = "keeper" }
    function S:execute(d) kept = d return d:start() end
    assert.is_true(m:deploy("production", "v2", { strategy = S }).success)
    assert.has_error(function() kept:wait(1) end, "deploy: d:wait(): this deployment has already ended")
    local Bad = deploy.DeploymentStrategy:extend{ name = "bad" }
    function Bad:execute(d) d:set_traffic(200) end
    local r = m:deploy("production", "v3", { strategy = Bad })
    assert.is_false(r.success)
    assert.matches("pct must be in 0%.%.100, got 200", r.errors[1])
  end)

  it("can be registered by name with the manager", function()
    local Ring = deploy.DeploymentStrategy:extend{ name = "ring" }
    function Ring:execute(d) d:start() d:set_traffic(100) end
    local m = setup{ strategies = { ring = Ring } }
    local r = m:deploy("production", "v2", { strategy = "ring" })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.has_error(function() m:deploy("production", "v3", { strategy = "nope" }) end)
  end)
end)

describe("hooks", function()
  after_each(fixtures.cleanup)

  it("run in order at each step: before_deploy, before_step, after_step, analysis, on_promote", function()
    local m = setup()
    local calls = {}
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.05 },
      hooks = {
        before_deploy = function(d) calls[#calls + 1] = "before_deploy " .. d.version end,
        before_step = function(pct) calls[#calls + 1] = "before_step " .. pct end,
        after_step = function(pct, health) calls[#calls + 1] = "after_step " .. pct .. " " .. health.state end,
        analysis = function(d) calls[#calls + 1] = "analysis" return true end,
        on_promote = function(d) calls[#calls + 1] = "on_promote" end,
        on_abort = function() calls[#calls + 1] = "on_abort" end,
      } })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.same({ "before_deploy v2", "before_step 50", "after_step 50 healthy", "analysis",
                  "before_step 100", "after_step 100 healthy", "analysis", "on_promote" }, calls)
  end)

  it("an analysis hook that fails at 30 % aborts there", function()
    local m, h = setup()
    local aborted_with
    local r = m:deploy("production", "v2", {
      strategy = fast_canary(),
      hooks = {
        analysis = function(d)
          local pct = d.metadata.pct_seen
          return "fail", "error rate 7 % above 1 %"
        end,
        before_step = function(pct) if pct < 30 then return true end end,
        on_abort = function(reason) aborted_with = reason end,
      },
      hook_timeout = 5 })
    assert.is_false(r.success)
    -- analysis runs after the first step's wait: fails at 10 %
    assert.matches("canary aborted at 10 %%: analysis failed: hook analysis said fail: error rate 7 %% above 1 %%", r.errors[1])
    assert.equal(r.errors[1], aborted_with)
    -- and one that passes until 30 %
    local n = 0
    r = m:deploy("production", "v3", { strategy = fast_canary(), hooks = {
      analysis = function(d) n = n + 1 return n < 3 end } })
    assert.is_false(r.success)
    assert.matches("^canary aborted at 30 %%: analysis failed: hook analysis returned false", r.errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("a hook that raises aborts safely, with the hook's traceback", function()
    local m, h = setup()
    local r = m:deploy("production", "v2", { strategy = fast_canary(), hooks = {
      before_step = function(pct) if pct >= 20 then error("pager is on fire") end end } })
    assert.is_false(r.success)
    assert.matches("canary aborted at 10 %%: before_step hook failed at 20 %%: hook before_step raised: .-pager is on fire", r.errors[1])
    assert.matches("stack traceback", r.errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
    assert.equal("v1", m:get_status("production").current_version)
  end)

  it("a hook that waits past its timeout aborts the rollout", function()
    local m, h = setup()
    local t0 = fixtures.now()
    local r = m:deploy("production", "v2", { strategy = fast_canary(), hook_timeout = 0.3, hooks = {
      analysis = function() deploy.sleep(30) return true end } })
    assert.is_false(r.success)
    assert.matches("hook analysis timed out after 0%.3 s", r.errors[1])
    assert.is_true(fixtures.now() - t0 < 10)
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("a hook stuck in a loop that never yields is stopped too", function()
    local m = setup()
    local r = m:deploy("production", "v2", { strategy = fast_canary(), hook_timeout = 0.2, hooks = {
      before_step = function() while true do end end } })
    assert.is_false(r.success)
    assert.matches("before_step hook failed at 10 %%: hook before_step timed out: still running after 0%.2 s", r.errors[1])
  end)

  it("hooks given on a strategy apply, options override them", function()
    local m = setup()
    local calls = {}
    local s = deploy.CanaryStrategy{ initial_percentage = 100, interval = 0, hooks = {
      before_deploy = function() calls[#calls + 1] = "strategy before_deploy" end,
      on_promote = function() calls[#calls + 1] = "strategy on_promote" end } }
    local r = m:deploy("production", "v2", { strategy = s, hooks = {
      on_promote = function() calls[#calls + 1] = "options on_promote" end } })
    assert.is_true(r.success)
    assert.same({ "strategy before_deploy", "options on_promote" }, calls)
  end)

  it("refuses unknown hook names and non-functions", function()
    local m = setup()
    assert.has_error(function() m:deploy("production", "v2", { hooks = { before_stpe = function() end } }) end,
      "deploy: options.hooks.before_stpe is not a hook (known: before_deploy, before_step, after_step, analysis, before_promote, on_promote, on_abort, on_rollback)")
    assert.has_error(function() m:deploy("production", "v2", { hooks = { analysis = true } }) end,
      "deploy: options.hooks.analysis must be a function, got boolean")
    assert.equal("v1", m:get_status("production").current_version)
  end)
end)
