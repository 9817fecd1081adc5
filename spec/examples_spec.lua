-- The example pipelines in scripts/examples, run as a user would, on the
-- virtual clock (deployctl run --simulate) so 5-minute steps take no time.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup(n)
  local h = fixtures.haproxy{}
  local dir = fixtures.tmpdir("examples")
  local targets = { production = fixtures.target_config{ haproxy = h, instances = 1 } }
  for i = 2, n or 1 do targets["edge" .. i] = fixtures.target_config{ instances = 1 } end
  local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = targets })
  for name in pairs(targets) do
    assert.equal(0, (cli.run({ "--config", config, "deploy", name, "1.0.0" })))
  end
  return h, config
end

local function example(name) return fixtures.root() .. "/scripts/examples/" .. name end

describe("examples", function()
  after_each(fixtures.cleanup)

  it("canary.lua rolls a version out in 10 % steps", function()
    local h, config = setup()
    local t0 = fixtures.now()
    local code, out, err = cli.run({ "--config", config, "run", "--simulate", example("canary.lua"), "production", "1.1.0" })
    assert.equal(0, code, out .. err)
    for pct = 10, 100, 10 do assert.matches(" " .. pct .. " %% of traffic on 1%.1%.0", out) end
    -- 10 holds of 300 s (100 % included), plus the virtual time the new instance took to answer
    local took = tonumber(out:match("production 1%.1%.0 is live %((%d+) s%)"))
    assert.is_true(took >= 3000 and took < 3060, out)
    assert.is_true(fixtures.now() - t0 < 10)
    assert.same({ ["1.1.0"] = 10 }, (h:sample(10)))
    local code2, out2 = cli.run({ "--config", config, "run", "--simulate", example("canary.lua"), "production", "1.2.0-bad" })
    assert.equal(1, code2)
    assert.matches("production stayed on its old version", out2)
  end)

  it("custom-strategy.lua dark-launches to 5 % and hands over to canary", function()
    local h, config = setup()
    local code, out, err = cli.run({ "--config", config, "run", "--simulate", example("custom-strategy.lua"), "production", "1.1.0" })
    assert.equal(0, code, out .. err)
    assert.matches("dark launch of 1%.1%.0 to 5 %%", out)
    assert.matches("production\t5 %%", out)
    assert.matches("production\t25 %%", out)
    assert.matches("production\t100 %%", out)
    assert.matches("promoted", out)
    -- its validate() refuses anything but a release version
    local code2, out2 = cli.run({ "--config", config, "run", "--simulate", example("custom-strategy.lua"), "production", "nightly" })
    assert.equal(1, code2)
    assert.matches("validate%(d%) returned false", out2)
  end)

  it("parallel.lua deploys every target at once", function()
    local _, config = setup(3)
    local code, out, err = cli.run({ "--config", config, "run", "--simulate", example("parallel.lua"), "2.0.0" })
    assert.equal(0, code, out .. err)
    for _, t in ipairs{ "production", "edge2", "edge3" } do
      local took = tonumber(out:match(t .. "%s+2%.0%.0%s+promoted %((%d+) s%)"))
      assert.is_true(took >= 240 and took < 300, out) -- 4 holds of 60 s, 100 % included
    end
    local m = deploy.DeploymentManager{ config = config }
    for _, t in ipairs(m:targets()) do assert.equal("2.0.0", m:get_status(t).current_version) end
  end)

  it("each example refuses to run without its arguments", function()
    for _, name in ipairs{ "canary.lua", "custom-strategy.lua", "parallel.lua" } do
      local code, _, err = cli.run({ "run", example(name) })
      assert.equal(2, code)
      assert.matches("usage: deployctl run scripts/examples/" .. name:gsub("%-", "%%-"), err)
    end
  end)
end)
