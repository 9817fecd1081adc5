-- deploy.parallel and the virtual clock: several targets rolled out side by
-- side in one process, finishing at the (virtual) time of one.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function setup(n)
  local targets = {}
  for i = 1, n do targets["t" .. i] = fixtures.target_config{ instances = 1 } end
  local cfg = fixtures.config{ targets = targets }
  cfg.clock = "virtual"
  local m = deploy.DeploymentManager{ config = cfg }
  for i = 1, n do assert.is_true(m:deploy("t" .. i, "v1").success) end
  return m
end

describe("deploy.parallel", function()
  after_each(fixtures.cleanup)

  it("rolls 3 targets out at once: they finish at the virtual time of one", function()
    local m = setup(3)
    local canary = deploy.CanaryStrategy{ initial_percentage = 20, increment = 20, interval = 300 }
    local t0 = deploy.now()
    local results = deploy.parallel{
      function() return m:deploy("t1", "v2", { strategy = canary }) end,
      function() return m:deploy("t2", "v2", { strategy = canary }) end,
      function() return m:deploy("t3", "v2", { strategy = canary }) end,
    }
    assert.equal(3, #results)
    local finished = {}
    for i, r in ipairs(results) do
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      assert.equal("t" .. i, r.target)
      local d = m:history("t" .. i, 1)[1]
      local evs = m:events(d.id)
      finished[i] = evs[#evs].ts - t0
      -- the same steps, 300 virtual seconds apart, for every target (the
      -- first comes once the new instance answers its health check)
      local traffic = {}
      for _, ev in ipairs(evs) do
        if ev.kind == "traffic" then traffic[#traffic + 1] = ev.ts end
      end
      local steps = {}
      for k, ts in ipairs(traffic) do steps[k] = math.floor(ts - traffic[1] + 0.5) end
      assert.same({ 0, 300, 600, 900, 1200 }, steps)
    end
    -- one rollout takes 5 x 300 s (100 % is held too); three in parallel
    -- take the same, not 3 x 1500
    table.sort(finished)
    assert.is_true(finished[3] - finished[1] < 5, "finished at " .. table.concat(finished, ", "))
    assert.is_true(finished[3] >= 1500 and finished[3] < 1560, "finished at " .. finished[3])
    assert.is_true(deploy.now() - t0 < 1560)
  end)

  it("returns each function's result in order, and reports errors after all have finished", function()
    local m = setup(2)
    local ok, err = pcall(deploy.parallel, {
      function() return m:deploy("t1", "v2") end,
      function() error("boom") end,
    })
    assert.is_false(ok)
    assert.matches("deploy%.parallel: function 2: .-boom", err)
    -- the first one still ran to the end
    assert.equal("v2", m:get_status("t1").current_version)
    local res = deploy.parallel{ function() return 1 end, function() return "two" end, function() end }
    assert.same({ 1, "two", true }, res)
    assert.has_error(function() deploy.parallel{ 42 } end, "deploy.parallel: item 1 must be a function, got number")
  end)

  it("deploy.sleep yields inside parallel, so sleepers overlap", function()
    setup(1)
    local t0 = deploy.now()
    deploy.parallel{
      function() deploy.sleep(100) end,
      function() deploy.sleep(100) end,
      function() deploy.sleep(60) deploy.sleep(40) end,
    }
    assert.near(100, deploy.now() - t0, 0.001)
  end)
end)
