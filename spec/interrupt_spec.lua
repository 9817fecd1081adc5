-- Ctrl-C during a rollout: the rollout aborts safely, traffic goes back to
-- the old version and the new instances stop. A second Ctrl-C does not
-- leave a split state.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup()
  local h = fixtures.haproxy{}
  local dir = fixtures.tmpdir("sigint")
  local target, tdir = fixtures.target_config{ haproxy = h, instances = 2 }
  local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
  assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
  return h, config, tdir
end

local function canary(config)
  return cli.spawn({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                     "--set", "initial_percentage=20", "--set", "increment=20", "--set", "interval=60" })
end

describe("Ctrl-C during a canary", function()
  after_each(fixtures.cleanup)

  it("halfway: HAProxy goes back to 100 % old, the new instances stop, exit 1", function()
    local h, config, tdir = setup()
    local p = canary(config)
    fixtures.wait_until(function() return p:output():find("new version at 20 %%") end, 20, "the canary at 20 %")
    local split = h:sample(20)
    assert.equal(4, split.v2)
    fixtures.kill(p.pid, "INT")
    local code, out, err = p:wait(20)
    assert.equal(1, code, out .. err)
    assert.matches("interrupted by the operator %(SIGINT/SIGTERM%)", err)
    assert.matches("aborted", out)
    assert.same({ v1 = 40 }, (h:sample(40)))
    for _, s in ipairs(h:servers()) do assert.is_true(s.weight > 0) end
    assert.equal(2, #h:servers())
    assert.same({}, fixtures.instances_of(tdir, "v2"))
    local m = deploy.DeploymentManager{ config = config }
    assert.equal("v1", m:get_status("production").current_version)
    assert.equal("failed", m:history("production", 1)[1].status)
  end)

  it("twice in a row: still one clean abort, never a split", function()
    local h, config, tdir = setup()
    local p = canary(config)
    fixtures.wait_until(function() return p:output():find("new version at 20 %%") end, 20, "the canary at 20 %")
    fixtures.kill(p.pid, "INT")
    fixtures.kill(p.pid, "INT")
    local code = p:wait(20)
    assert.equal(1, code)
    assert.same({ v1 = 40 }, (h:sample(40)))
    assert.same({}, fixtures.instances_of(tdir, "v2"))
  end)

  it("SIGTERM does the same", function()
    local h, config, tdir = setup()
    local p = canary(config)
    fixtures.wait_until(function() return p:output():find("new version at 20 %%") end, 20, "the canary at 20 %")
    fixtures.kill(p.pid, "TERM")
    assert.equal(1, (p:wait(20)))
    assert.same({ v1 = 40 }, (h:sample(40)))
  end)
end)

describe("Ctrl-C outside a rollout", function()
  after_each(fixtures.cleanup)

  it("stops a pipeline script that is busy in Lua, exit 130", function()
    local dir = fixtures.tmpdir("busy")
    fixtures.write_file(dir .. "/busy.lua", 'print("busy") io.stdout:flush() while true do end')
    local p = cli.spawn({ "run", dir .. "/busy.lua" })
    fixtures.wait_until(function() return p:output():find("busy") end, 10, "the script to start")
    fixtures.kill(p.pid, "INT")
    local code, _, err = p:wait(10)
    assert.equal(130, code)
    assert.matches("deployctl: interrupted", err)
  end)
end)
