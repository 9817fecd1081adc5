-- One deployment per target at a time, across processes: the loser gets
-- "target locked" (exit 3) and changes nothing.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup()
  local h = fixtures.haproxy{}
  local prod, tdir = fixtures.target_config{ haproxy = h, instances = 1 }
  local cfg = fixtures.config{ targets = { production = prod, staging = fixtures.target_config{ instances = 1 } } }
  return h, cli.write_config(fixtures.tmpdir("race"), cfg), tdir
end

describe("two deployments racing on one target", function()
  after_each(fixtures.cleanup)

  it("started at the same moment: exactly one runs, the other gets 'target locked' and changes nothing", function()
    local h, config, tdir = setup()
    for round = 1, 3 do
      local a = cli.spawn({ "--config", config, "deploy", "production", "a" .. round, "--set", "switch_delay=1", "--set", "scale_down_delay=0" })
      local b = cli.spawn({ "--config", config, "deploy", "production", "b" .. round, "--set", "switch_delay=1", "--set", "scale_down_delay=0" })
      local ca, _, ea = a:wait(30)
      local cb, _, eb = b:wait(30)
      local codes = { ca, cb }
      table.sort(codes)
      assert.same({ 0, 3 }, codes, ea .. eb)
      local winner = ca == 0 and ("a" .. round) or ("b" .. round)
      local loser = ca == 0 and ("b" .. round) or ("a" .. round)
      local loser_err = ca == 0 and eb or ea
      assert.matches("target locked: 'production' is being deployed by deployment d%x+ %(pid %d+ on .-, since ", loser_err)
      local m = deploy.DeploymentManager{ config = config }
      assert.equal(winner, m:get_status("production").current_version)
      for _, d in ipairs(m:history("production")) do assert.not_equal(loser, d.version) end
      for _, i in ipairs(m:instances("production")) do assert.equal(winner, i.version) end
      assert.same({}, fixtures.instances_of(tdir, loser))
      assert.same({ [winner] = 20 }, (h:sample(20)))
    end
  end)

  it("a deployment of another target is not blocked", function()
    local _, config = setup()
    local a = cli.spawn({ "--config", config, "deploy", "production", "v1", "--set", "switch_delay=1", "--set", "scale_down_delay=0" })
    fixtures.wait_until(function() return a:output():find("healthy") end, 10, "the first deployment to hold its lock")
    local code, _, err = cli.run({ "--config", config, "deploy", "staging", "v1" })
    assert.equal(0, code, err)
    local code_a = a:wait(30)
    assert.equal(0, code_a)
  end)

  it("inside one process, a locked target comes back as success = false with the holder named", function()
    local _, config = setup()
    local a = cli.spawn({ "--config", config, "deploy", "production", "v1", "--set", "switch_delay=1", "--set", "scale_down_delay=0" })
    fixtures.wait_until(function() return a:output():find("healthy") end, 10, "the first deployment to hold its lock")
    local m = deploy.DeploymentManager{ config = config }
    local r = m:deploy("production", "v2")
    assert.is_false(r.success)
    assert.matches("^target locked: 'production' is being deployed by deployment", r.errors[1])
    assert.equal(0, (a:wait(30)))
    assert.equal("v1", m:get_status("production").current_version)
  end)
end)
