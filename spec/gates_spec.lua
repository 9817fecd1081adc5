-- Manual gates: a rollout paused (pause_at or d:pause()) waits for
-- `deployctl promote` or `deployctl abort` given from another process.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local PIPELINE = [[
local deploy = require "deploy"
local config, version, mode = arg[1], arg[2], arg[3]
local m = deploy.DeploymentManager{ config = config, on_event = function(ev)
  print(ev.kind, ev.data and ev.data.pct or "")
  io.stdout:flush()
end }
local strategy
if mode == "lua" then
  strategy = deploy.DeploymentStrategy:extend{ name = "gated" }
  function strategy:execute(d)
    assert(d:start())
    assert(d:set_traffic(50))
    local ok, why = d:pause()
    if not ok then return false, why end
    return true
  end
elseif mode == "wait" then
  strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 3600 }
else
  strategy = deploy.CanaryStrategy{ initial_percentage = 25, increment = 25, interval = 0.05, pause_at = { 50 } }
end
local r = m:deploy("production", version, { strategy = strategy })
print("result", r.success, r.errors and r.errors[1] or "")
return r.success and 0 or 1
]]

local function setup()
  local h = fixtures.haproxy{}
  local dir = fixtures.tmpdir("gates")
  local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db",
    targets = { production = fixtures.target_config{ haproxy = h, instances = 1 } } })
  fixtures.write_file(dir .. "/pipeline.lua", PIPELINE)
  assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
  return h, config, dir .. "/pipeline.lua"
end

describe("manual gates", function()
  after_each(fixtures.cleanup)

  it("pause_at = {50}: waits at 50 % until promote is given from another process", function()
    local h, config, script = setup()
    local p = cli.spawn({ "--config", config, "run", script, config, "v2" })
    fixtures.wait_until(function() return p:output():find("paused\t50") end, 20, "the pause at 50 %")
    -- paused: the split holds, and nothing moves on by itself
    local counts = h:sample(20)
    assert.same({ v1 = 10, v2 = 10 }, counts)
    assert.is_false(p:done())
    local code, out = cli.run({ "--config", config, "promote", "production" })
    assert.equal(0, code)
    assert.matches("production: promote requested", out)
    local rc, pout = p:wait(30)
    assert.equal(0, rc, pout)
    assert.matches("resumed\t50", pout)
    assert.matches("traffic\t75", pout)
    assert.same({ v2 = 20 }, (h:sample(20)))
  end)

  it("abort during the pause returns the target to the old version", function()
    local h, config, script = setup()
    local p = cli.spawn({ "--config", config, "run", script, config, "v2" })
    fixtures.wait_until(function() return p:output():find("paused\t50") end, 20, "the pause at 50 %")
    assert.equal(0, (cli.run({ "--config", config, "abort", "production" })))
    local rc, out = p:wait(30)
    assert.equal(1, rc)
    assert.matches("aborted by the operator %(deployctl abort%) during the pause", out)
    assert.same({ v1 = 20 }, (h:sample(20)))
    local m = deploy.DeploymentManager{ config = config }
    assert.equal("deployed", m:get_status("production").status) -- v1 serves again
    assert.equal("v1", m:get_status("production").current_version)
    assert.equal("failed", m:history("production", 1)[1].status)
  end)

  it("d:pause() in a Lua strategy, promoted from another process", function()
    local h, config, script = setup()
    local p = cli.spawn({ "--config", config, "run", script, config, "v2", "lua" })
    fixtures.wait_until(function() return p:output():find("paused\t50") end, 20, "d:pause()")
    assert.equal(0, (cli.run({ "--config", config, "promote", "production" })))
    local rc, out = p:wait(30)
    assert.equal(0, rc, out)
    assert.same({ v2 = 20 }, (h:sample(20)))
  end)

  it("abort at any moment: during a long canary wait", function()
    local h, config, script = setup()
    local p = cli.spawn({ "--config", config, "run", script, config, "v2", "wait" })
    fixtures.wait_until(function() return p:output():find("traffic\t50") end, 20, "the canary at 50 %")
    assert.equal(0, (cli.run({ "--config", config, "abort", "production" })))
    local rc, out = p:wait(30)
    assert.equal(1, rc)
    assert.matches("canary aborted at 50 %%: aborted by the operator %(deployctl abort%)", out)
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("promote or abort with nothing running says so", function()
    local _, config = setup()
    local code, _, err = cli.run({ "--config", config, "promote", "production" })
    assert.equal(1, code)
    assert.matches("no deployment of 'production' is running", err)
    code, _, err = cli.run({ "--config", config, "abort", "nope" })
    assert.equal(2, code)
    assert.matches("unknown target 'nope'", err)
  end)
end)
