-- The example pipelines in examples/, run as a user would against a real
-- HAProxy and real instances, on the virtual clock (config.clock) so
-- 5-minute steps take no time; and run --simulate, which changes nothing.
-- examples/*_spec.lua are the same pipelines' own specs, on deploy.testing.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup(n)
  local h = fixtures.haproxy{}
  local dir = fixtures.tmpdir("examples")
  local targets = { production = fixtures.target_config{ haproxy = h, instances = 1 } }
  for i = 2, n or 1 do targets["edge" .. i] = fixtures.target_config{ instances = 1 } end
  local cfg = fixtures.config{ state = dir .. "/state.db", targets = targets }
  cfg.clock = "virtual"
  local config = cli.write_config(dir, cfg)
  for name in pairs(targets) do
    assert.equal(0, (cli.run({ "--config", config, "deploy", name, "1.0.0" })))
  end
  return h, config
end

local function example(name) return fixtures.root() .. "/examples/" .. name end

describe("examples", function()
  after_each(fixtures.cleanup)

  it("canary.lua rolls a version out in 10 % steps", function()
    local h, config = setup()
    local t0 = fixtures.now()
    local code, out, err = cli.run({ "--config", config, "run", example("canary.lua"), "production", "1.1.0" })
    assert.equal(0, code, out .. err)
    for pct = 10, 100, 10 do assert.matches(" " .. pct .. " %% of traffic on 1%.1%.0", out) end
    -- 10 holds of 300 s (100 % included), plus the virtual time the new instance took to answer
    local took = tonumber(out:match("production 1%.1%.0 is live %((%d+) s%)"))
    assert.is_true(took >= 3000 and took < 3060, out)
    assert.is_true(fixtures.now() - t0 < 10)
    assert.same({ ["1.1.0"] = 10 }, (h:sample(10)))
    local code2, out2 = cli.run({ "--config", config, "run", example("canary.lua"), "production", "1.2.0-bad" })
    assert.equal(1, code2)
    assert.matches("production stayed on its old version", out2)
  end)

  it("custom-strategy.lua dark-launches to 5 % and hands over to canary", function()
    local h, config = setup()
    local code, out, err = cli.run({ "--config", config, "run", example("custom-strategy.lua"), "production", "1.1.0" })
    assert.equal(0, code, out .. err)
    assert.matches("dark launch of 1%.1%.0 to 5 %%", out)
    assert.matches("production\t5 %%", out)
    assert.matches("production\t25 %%", out)
    assert.matches("production\t100 %%", out)
    assert.matches("promoted", out)
    -- its validate() refuses anything but a release version
    local code2, out2 = cli.run({ "--config", config, "run", example("custom-strategy.lua"), "production", "nightly" })
    assert.equal(1, code2)
    assert.matches("validate%(d%) returned false", out2)
  end)

  it("parallel.lua deploys every target at once", function()
    local _, config = setup(3)
    local code, out, err = cli.run({ "--config", config, "run", example("parallel.lua"), "2.0.0" })
    assert.equal(0, code, out .. err)
    for _, t in ipairs{ "production", "edge2", "edge3" } do
      local took = tonumber(out:match(t .. "%s+2%.0%.0%s+promoted %((%d+) s%)"))
      assert.is_true(took >= 240 and took < 300, out) -- 4 holds of 60 s, 100 % included
    end
    local m = deploy.DeploymentManager{ config = config }
    for _, t in ipairs(m:targets()) do assert.equal("2.0.0", m:get_status(t).current_version) end
  end)

  it("run --simulate prints the timeline and changes nothing: no instance, no HAProxy change, no store write", function()
    local h, config = setup()
    local m = deploy.DeploymentManager{ config = config }
    local before = #m:history("production", 100)
    local live = m:instances("production")
    m:close()
    local dir = fixtures.tmpdir("sim")
    local code, out, err = cli.run({ "--config", config, "run", "--simulate", example("canary.lua"), "production", "1.1.0" })
    assert.equal(0, code, out .. err)
    for pct = 10, 100, 10 do assert.matches(" " .. pct .. " %% of traffic on 1%.1%.0", out) end
    assert.matches("%[simulated%] simulated on a copy of .*state%.db.*no instance was started", err)
    -- nothing of 1.1.0 ever ran; HAProxy still serves only 1.0.0; the store has no new row
    assert.same({}, fixtures.pids_matching("unhealthy%-1%.1%.0"))
    assert.same({ ["1.0.0"] = 10 }, (h:sample(10)))
    m = deploy.DeploymentManager{ config = config }
    assert.equal(before, #m:history("production", 100))
    assert.equal("1.0.0", m:get_status("production").current_version)
    assert.same(live, m:instances("production"))
    -- the same through deployctl deploy --simulate, marked line by line
    code, out = cli.run({ "--config", config, "deploy", "production", "1.2.0", "--simulate", "--strategy", "canary",
                          "--set", "interval=60" })
    assert.equal(0, code, out)
    for line in out:gmatch("[^\n]+") do
      if not line:match("would be deployed") then assert.matches("^%[simulated%] ", line) end
    end
    assert.matches("traffic +new version at 50 %%", out)
    assert.matches("production: 1%.2%.0 would be deployed in 10m0%ds %(canary%), simulated", out) -- 9 steps of 60 s, 60 s held at 100 %
    assert.equal(before, #m:history("production", 100))
    assert.same({ ["1.0.0"] = 10 }, (h:sample(10)))
    m:close()
  end)

  it("--simulate scripts the simulated instances from the config's simulate section", function()
    local h, config = setup()
    local text = fixtures.read_file(config)
    fixtures.write_file(config, (text:gsub("^return {", [[return {
  simulate = { start_time = 5, versions = { ["1.3.0"] = { unhealthy_after = 150 } } },]])))
    local code, out = cli.run({ "--config", config, "deploy", "production", "1.3.0", "--simulate", "--strategy",
                                "canary", "--set", "interval=60" })
    assert.equal(1, code, out)
    assert.matches("%[simulated%] .* health_failed", out)
    assert.matches("%[simulated%] .* rolled_back", out)
    assert.matches("traffic +new version at 30 %%", out)
    assert.not_matches("traffic +new version at 40 %%", out)
    assert.same({ ["1.0.0"] = 10 }, (h:sample(10)))
    -- bad simulate sections are refused, naming the field
    for _, case in ipairs({ { "simulate = 3", "config %.simulate must be a table" },
                            { "simulate = { start = 1 }", "unknown field 'start'" },
                            { "simulate = { error_rate = 2 }", "error_rate must be between 0 and 1" },
                            { "simulate = { versions = { ['1.0'] = 5 } }", "must map versions to scripts" } }) do
      fixtures.write_file(config, (text:gsub("^return {", "return { " .. case[1] .. ",")))
      local c, _, err = cli.run({ "--config", config, "deploy", "production", "1.3.0", "--simulate" })
      assert.equal(2, c, case[1])
      assert.matches(case[2], err, 1, false)
    end
  end)

  it("each example refuses to run without its arguments", function()
    for _, name in ipairs{ "canary.lua", "custom-strategy.lua", "parallel.lua" } do
      local code, _, err = cli.run({ "run", example(name) })
      assert.equal(2, code)
      assert.matches("usage: deployctl run examples/" .. name:gsub("%-", "%%-"), err)
    end
  end)
end)
