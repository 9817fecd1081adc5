-- A user's busted spec of a rollout, on deploy.testing: no HAProxy, no
-- processes, no waiting. Run it from anywhere once deployctl is installed:
--
--   busted rollout_spec.lua
--
-- Each test runs a real rollout (the same strategies, store, health checks
-- and router interface as production) against instances inside the test
-- process, on the virtual clock: ten canary steps of 5 minutes take a
-- fraction of a second.
local deploy = require "deploy"
local testing = require "deploy.testing"

describe("the production rollout", function()
  local kit

  before_each(function()
    kit = testing.setup{
      targets = {
        production = {
          instances = 2,
          start_time = 2,                                  -- seconds before an instance answers
          versions = {
            ["1.1.0"] = { unhealthy_after = 30 },          -- breaks half a minute after it starts
            ["1.2.0"] = { error_rate = 0.2 },              -- one answer in five is a 500
            ["1.3.0"] = { start_time = 600 },              -- never ready within start_timeout
          },
        },
      },
    }
    assert.is_true(kit:deploy("production", "1.0.0").success)
  end)

  after_each(function() kit:close() end)                   -- stops every test instance

  local canary = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 300 }

  it("a healthy version goes to 100 % in ten steps, then is promoted", function()
    local r = kit:deploy("production", "1.0.1", { strategy = canary })
    assert.is_true(r.success)
    assert.same({ 10, 20, 30, 40, 50, 60, 70, 80, 90, 100 }, kit:shares("production"))
    assert.equal("1.0.1", kit:status("production").current_version)
    -- what the router was asked for, apply by apply: the old version's share
    -- shrinking, then 0 at 100 %, then the old servers gone at promotion
    assert.same({ 90, 80, 70, 60, 50, 40, 30, 20, 10, 0, 0 }, kit:router_shares("production", "1.0.0"))
  end)

  it("a broken version is rolled back", function()
    local r = kit:deploy("production", "1.1.0", { strategy = canary })
    assert.is_false(r.success)
    assert.matches("unhealthy after 3 consecutive failed checks", r.errors[1])
    assert.same({ 10, 0 }, kit:shares("production"))       -- back to the old version in one step
    assert.equal("1.0.0", kit:status("production").current_version)
    local kinds = kit:kinds("production")
    assert.equal("rolled_back", kinds[#kinds - 3])
  end)

  it("an analysis hook reading the 5xx share rolls a noisy version back", function()
    local r = kit:deploy("production", "1.2.0", { strategy = canary, hooks = {
      analysis = function(d)
        local requests, errors = kit:stats("production", d.version)
        if errors / requests > 0.05 then return "fail", string.format("%d of %d answers were 5xx", errors, requests) end
        return true
      end,
    } })
    assert.is_false(r.success)
    assert.matches("analysis failed: hook analysis said fail: %d+ of %d+ answers were 5xx", r.errors[1])
    assert.same({ 10, 0 }, kit:shares("production"))
  end)

  it("a version that never comes up never gets traffic", function()
    local r = kit:deploy("production", "1.3.0", { strategy = canary })
    assert.is_false(r.success)
    assert.matches("not healthy after 60 s", r.errors[1])
    assert.same({}, kit:shares("production"))
  end)
end)
