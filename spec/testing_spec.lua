-- deploy.testing and the test provider and router behind it: scripted
-- in-process instances answering real HTTP health checks, a router that
-- records weights, the virtual clock, teardown; and bad input for each.
local deploy = require "deploy"
local testing = require "deploy.testing"
local fixtures = require "spec.support.fixtures"

local canary = function(o)
  o = o or {}
  return deploy.CanaryStrategy{ initial_percentage = o.initial or 10, increment = o.increment or 10, interval = 300 }
end

describe("deploy.testing", function()
  local kit
  after_each(function()
    if kit then kit:close() end
    kit = nil
    pcall(deploy._clock, "real") -- managers made here with clock = "virtual" leave it on
    fixtures.cleanup()
  end)

  it("runs a ten-step canary of 5-minute steps through real health checks on the virtual clock", function()
    kit = testing.setup{ targets = { production = { instances = 3 } } }
    assert.is_true(kit:deploy("production", "1.0.0").success)
    local r = kit:deploy("production", "1.1.0", { strategy = canary() })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.is_true(r.duration >= 2700, r.duration) -- nine holds of 300 s, on the engine's clock
    assert.same({ 10, 20, 30, 40, 50, 60, 70, 80, 90, 100 }, kit:shares("production"))
    -- the router got the exact split of each step, 3 old beside 3 new
    local w = kit:weights("production")
    assert.equal(10, w[1].shares["1.1.0"])
    assert.equal(3, #w[#w].servers)
    for _, s in ipairs(w[#w].servers) do assert.equal("1.1.0", s.version) end
    -- the instances answered real HTTP: their health checks are counted
    local requests, errors = kit:stats("production", "1.1.0")
    assert.is_true(requests > 30, requests)
    assert.equal(0, errors)
    assert.equal("healthy", kit:status("production").health)
  end)

  it("scripts versions: unhealthy from the start, unhealthy after N s, crashing, slow, a 5xx share", function()
    kit = testing.setup{ targets = { production = { instances = 2, versions = {
      ["2.0.0"] = { unhealthy = true },
      ["2.1.0"] = { unhealthy_after = 650 },
      ["2.2.0"] = { crash_after = 400 },
      ["2.3.0"] = { start_time = 45 },
      ["2.4.0"] = { error_rate = 0.5 },
    } } } }
    assert.is_true(kit:deploy("production", "1.0.0").success)
    local r = kit:deploy("production", "2.0.0", { strategy = canary() })
    assert.is_false(r.success)
    assert.matches("unhealthy after 3 consecutive failed checks: .*status 500", r.errors[1])
    assert.same({}, kit:shares("production"))
    -- healthy for 650 s: 10 and 20 % pass, 30 % fails
    r = kit:deploy("production", "2.1.0", { strategy = canary() })
    assert.is_false(r.success)
    assert.same({ 10, 20, 30, 0 }, kit:shares("production"))
    -- its process is gone at 400 s: the rollout sees it dead, not merely unhealthy
    r = kit:deploy("production", "2.2.0", { strategy = canary() })
    assert.is_false(r.success)
    assert.same({ 10, 20, 0 }, kit:shares("production"))
    -- 45 s to start: healthy once it listens, then promoted
    r = kit:deploy("production", "2.3.0", { strategy = deploy.BlueGreenStrategy{} })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local started, healthy
    for _, ev in ipairs(kit:events("production")) do
      if ev.kind == "started" then started = ev.ts end
      if ev.kind == "healthy" then healthy = ev.ts end
    end
    assert.is_true(healthy - started >= 45 and healthy - started < 50, healthy - started)
    -- every other answer is a 500: never three failed checks in a row, and counted
    r = kit:deploy("production", "2.4.0", { strategy = deploy.BlueGreenStrategy{} })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local requests, errors = kit:stats("production", "2.4.0")
    assert.is_true(requests >= 2)
    assert.is_true(math.abs(errors - requests / 2) <= 2, errors .. " of " .. requests)
    assert.is_true(select(1, kit:stats("production")) >= requests)
  end)

  it("close() stops every instance the test provider started", function()
    kit = testing.setup{ targets = { production = { instances = 2 } } }
    assert.is_true(kit:deploy("production", "1.0.0").success)
    local urls = {}
    for _, i in ipairs(kit.manager:instances("production")) do
      urls[#urls + 1] = string.format("http://127.0.0.1:%d/healthz", i.port)
    end
    assert.equal(2, #urls)
    local up = deploy.health.check{ urls = urls, timeout = 1 }
    assert.equal("healthy", up.state)
    kit:close()
    kit = nil
    collectgarbage()
    local down = deploy.health.check{ urls = urls, timeout = 1 }
    assert.equal("unhealthy", down.state)
  end)

  it("the test provider and router are config kinds of their own, with logs and status", function()
    local m = deploy.DeploymentManager{ config = {
      state = fixtures.tmpdir("kit") .. "/state.db", clock = "virtual",
      targets = { web = { instances = 1, provider = testing.provider{ start_time = 1 }, router = testing.router(),
                          health = { interval = 0.5 } } } } }
    assert.is_true(m:deploy("web", "3.0").success)
    local logs = require("cjson").encode(m:logs("web", { lines = 10 }))
    assert.matches("test instance web%-3%.0%-0 on 127%.0%.0%.1:%d+ %(in deployctl's process%): %d+ requests, 0 answered 500",
                   logs)
    local live = m:live_instances("web")
    assert.equal(1, #live)
    assert.is_true(live[1].alive)
    assert.equal(1, live[1].router_weight)
    m:close()
  end)

  it("refuses bad input, naming the field", function()
    local function cfg(provider, router)
      return { state = fixtures.tmpdir("kit") .. "/s.db",
               targets = { web = { provider = provider, router = router or { kind = "test" } } } }
    end
    local cases = {
      { cfg({ kind = "test", start_time = -1 }), "targets%.web%.provider%.start_time must be between 0 and" },
      { cfg({ kind = "test", error_rate = 1.5 }), "provider%.error_rate must be between 0 and 1" },
      { cfg({ kind = "test", unhealthy = "yes" }), "provider%.unhealthy must be true or false, got string" },
      { cfg({ kind = "test", colour = 1 }), "provider has an unknown field 'colour'" },
      { cfg({ kind = "test", versions = { "1.0" } }), "must map versions to scripts" },
      { cfg({ kind = "test", versions = { ["1.0"] = { slow = 1 } } }), "versions%['1%.0'%] has an unknown field 'slow'" },
      { cfg({ kind = "test", versions = { ["1.0"] = { crash_after = "soon" } } }), "crash_after must be a number" },
      { cfg({ kind = "test" }, { kind = "test", socket = "/x" }), "router has an unknown field 'socket'" },
      { cfg({ kind = "tset" }), "kind 'tset' is not known %(known: process, ssh, test%)" },
      { cfg({ kind = "test" }, { kind = "recording" }), "kind 'recording' is not known %(known: haproxy, nginx, none, test%)" },
    }
    for _, c in ipairs(cases) do
      assert.error_matches(function() deploy.DeploymentManager{ config = c[1] } end, c[2])
    end
    assert.error_matches(function() testing.setup{ targets = { p = { colour = 1 } } } end,
                         "deploy%.testing: targets%.p has no field 'colour'")
    assert.error_matches(function() testing.setup{ color = 1 } end, "deploy%.testing: setup has no field 'color'")
    assert.error_matches(function() testing.setup("x") end, "setup{...} expects a table, got string")
    assert.error_matches(function() testing.provider{ start = 1 } end, "provider has no field 'start'")
    -- the kit's readers need test targets
    local m = deploy.DeploymentManager{ config = { state = fixtures.tmpdir("kit") .. "/s.db",
      targets = { web = { provider = { kind = "test" } } } } }
    assert.error_matches(function() testing.router_log(m, "web") end,
                         "target 'web' has router kind 'none': give it router = { kind = \"test\" }")
    assert.error_matches(function() testing.stats(m, "nope") end, "unknown target 'nope'")
    m:close()
  end)
end)

describe("the virtual clock with real instances", function()
  after_each(function()
    pcall(deploy._clock, "real")
    fixtures.cleanup()
  end)

  it("waits for an instance that takes real time to start: start_timeout counts real seconds", function()
    local target, dir = fixtures.target_config{ instances = 1, health = { start_timeout = 20, interval = 0.1 } }
    -- the application listens only after 1.5 s of real time
    target.provider.command = "sleep 1.5; exec " .. target.provider.command
    local cfg = fixtures.config{ targets = { web = target } }
    cfg.clock = "virtual"
    local m = deploy.DeploymentManager{ config = cfg }
    local r = m:deploy("web", "1.0.0")
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    -- and the virtual clock still jumps through the waits that follow
    local r2 = m:deploy("web", "1.1.0", { strategy = deploy.CanaryStrategy{ interval = 300 } })
    assert.is_true(r2.success, table.concat(r2.errors or {}, "\n"))
    assert.is_true(r2.duration >= 2700, r2.duration)
    assert.equal(1, #fixtures.instances_of(dir, "1.1.0"))
    m:close()
  end)

  it("a kit gives the process its clock back when it closes", function()
    assert.equal("real", deploy._clock())
    local kit = testing.setup{}
    assert.equal("virtual", deploy._clock())
    kit:close()
    assert.equal("real", deploy._clock())
  end)
end)
