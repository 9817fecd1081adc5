-- Every share is held, 100 % included: a canary holds its last share for
-- `interval` and a blue-green keeps blue for `scale_down_delay`, the old
-- instances running (at weight 0) until then, so a failure there, or a
-- `deployctl rollback`, goes back in one router change and restarts
-- nothing. A real HAProxy per spec, real demo-app instances.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local h -- this spec's HAProxy

local function setup(opts)
  opts = opts or {}
  h = fixtures.haproxy{}
  local target, dir = fixtures.target_config{ haproxy = h, instances = opts.instances or 2,
                                              health = opts.health }
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = opts.clock or "real"
  local m = deploy.DeploymentManager{ config = cfg, strategy = opts.strategy }
  return m, dir, cfg
end

local function kinds(m, id)
  local out = {}
  for _, ev in ipairs(m:events(id)) do out[#out + 1] = ev.kind end
  return out
end

local function count(list, kind)
  local n = 0
  for _, k in ipairs(list) do if k == kind then n = n + 1 end end
  return n
end

-- pid -> true of the live instances of `version`
local function pids_of(m, version)
  local pids = {}
  for _, i in ipairs(m:instances("production")) do
    if i.version == version and i.alive then pids[#pids + 1] = i.pid end
  end
  table.sort(pids)
  return pids
end

local function event(m, id, kind)
  for _, ev in ipairs(m:events(id)) do if ev.kind == kind then return ev end end
end

describe("holds with the old set warm", function()
  after_each(fixtures.cleanup)

  it("the specification's defaults stay: canary 10/10/300, blue-green switch_delay 0; scale_down_delay 30", function()
    local c = deploy.CanaryStrategy{}
    assert.same({ 10, 10, 300 }, { c.initial_percentage, c.increment, c.interval })
    local b = deploy.BlueGreenStrategy{}
    assert.equal(0, b.switch_delay)
    assert.equal(30, b.scale_down_delay)
    assert.equal(0, deploy.BlueGreenStrategy{ scale_down_delay = 0 }.scale_down_delay)
  end)

  it("canary: a version that turns unhealthy 1 s after reaching 100 % is rolled back, its old set never stopped", function()
    local m, dir = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
    assert.is_true(m:deploy("production", "v1").success)
    local old = pids_of(m, "v1")
    assert.equal(2, #old)
    local at_full, weights_in_bake, failed_at
    local results = deploy.parallel{
      function()
        return m:deploy("production", "v2", {
          strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 4 },
          on_event = function(ev)
            if ev.kind == "traffic" and ev.data.pct == 100 then at_full = ev.ts end
            if ev.kind == "bake" then weights_in_bake = h:servers() end
          end })
      end,
      function()
        while not at_full do deploy.sleep(0.02) end
        deploy.sleep(1) -- the scenario: healthy for a second at 100 %, then not
        fixtures.set_unhealthy(dir, "v2")
        failed_at = deploy.now()
      end,
    }
    local r = results[1]
    assert.is_false(r.success)
    assert.matches("^canary aborted at 100 %%: unhealthy after 3 consecutive failed checks", r.errors[1])
    -- in the bake, the old servers stayed registered at weight 0
    local w = {}
    for _, s in ipairs(weights_in_bake) do w[#w + 1] = s.weight end
    table.sort(w)
    assert.same({ 0, 0, 1, 1 }, w)
    -- back on v1 in one router change: the very same processes, never restarted
    assert.same(old, pids_of(m, "v1"))
    for _, pid in ipairs(old) do assert.is_true(fixtures.alive(pid)) end
    assert.same({ v1 = 40 }, (h:sample(40)))
    local d = m:history("production", 1)[1]
    local list = kinds(m, d.id)
    assert.equal(1, count(list, "bake"))
    assert.equal(0, count(list, "promoted"))
    assert.equal(2, count(list, "instance_stopped")) -- v2's, not v1's
    for _, ev in ipairs(m:events(d.id)) do
      if ev.kind == "instance_stopped" then assert.equal("v2", ev.data.version) end
    end
    local rolled = event(m, d.id, "rolled_back")
    assert.equal(100, rolled.data.from_pct)
    assert.is_true(rolled.ts >= failed_at)
    assert.equal("v1", m:get_status("production").current_version)
  end)

  it("canary: promotes only after holding 100 % for interval, then stops the old set", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
    assert.is_true(m:deploy("production", "v1").success)
    local old = pids_of(m, "v1")
    local alive_in_bake
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.3 },
      on_event = function(ev)
        if ev.kind == "bake" then
          alive_in_bake = fixtures.alive(old[1]) and fixtures.alive(old[2])
        end
      end })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.is_true(alive_in_bake)
    local d = m:history("production", 1)[1]
    assert.same({ "started", "instance_started", "instance_started", "healthy", "traffic", "traffic", "bake",
                  "promoted", "instance_stopped", "instance_stopped", "finished" }, kinds(m, d.id))
    local bake, promoted = event(m, d.id, "bake"), event(m, d.id, "promoted")
    assert.equal(0.3, bake.data.seconds)
    assert.equal(2, bake.data.old)
    assert.is_true(promoted.ts - bake.ts >= 0.3)
    for _, pid in ipairs(old) do assert.is_true(fixtures.wait_exit(pid, 5)) end
  end)

  it("blue-green: keeps blue running for scale_down_delay after the switch, then stops it", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0.5 } }
    assert.is_true(m:deploy("production", "v1").success)
    local blue = pids_of(m, "v1")
    local in_window
    local r = m:deploy("production", "v2", { on_event = function(ev)
      if ev.kind == "bake" then
        in_window = { served = (h:sample(20)), blue_alive = fixtures.alive(blue[1]) and fixtures.alive(blue[2]),
                      status = m:get_status("production") }
      end
    end })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    -- in the window: all traffic on green, blue still up, the rollout not over
    assert.same({ v2 = 20 }, in_window.served)
    assert.is_true(in_window.blue_alive)
    assert.equal("running", in_window.status.status)
    assert.equal("v1", in_window.status.current_version)
    local d = m:history("production", 1)[1]
    assert.same({ "started", "instance_started", "instance_started", "healthy", "traffic", "verified", "bake",
                  "promoted", "instance_stopped", "instance_stopped", "finished" }, kinds(m, d.id))
    for _, pid in ipairs(blue) do assert.is_true(fixtures.wait_exit(pid, 5)) end
    assert.equal("v2", m:get_status("production").current_version)
  end)

  it("blue-green: green failing 2 s after the switch is switched back within scale_down_delay", function()
    local m, dir = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 20 } }
    assert.is_true(m:deploy("production", "v1").success)
    local blue = pids_of(m, "v1")
    local switched
    local results = deploy.parallel{
      function()
        return m:deploy("production", "v2", { on_event = function(ev)
          if ev.kind == "traffic" then switched = ev.ts end
        end })
      end,
      function()
        while not switched do deploy.sleep(0.02) end
        deploy.sleep(2) -- the scenario: green fails two seconds after the switch
        fixtures.set_unhealthy(dir, "v2")
      end,
    }
    local r = results[1]
    assert.is_false(r.success)
    assert.matches("^green failed after the switch, traffic returned to blue: unhealthy after 3 consecutive", r.errors[1])
    local d = m:history("production", 1)[1]
    local bake, rolled = event(m, d.id, "bake"), event(m, d.id, "rolled_back")
    assert.equal(20, bake.data.seconds)
    assert.is_true(rolled.ts < bake.ts + 20, "rolled back inside the window")
    assert.is_nil(event(m, d.id, "promoted"))
    assert.same(blue, pids_of(m, "v1"))
    assert.same({ v1 = 40 }, (h:sample(40)))
  end)

  it("blue-green with scale_down_delay = 0 keeps the old behaviour: blue stops right after the switch", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
    assert.is_true(m:deploy("production", "v1").success)
    assert.is_true(m:deploy("production", "v2").success)
    local d = m:history("production", 1)[1]
    assert.same({ "started", "instance_started", "instance_started", "healthy", "traffic", "verified",
                  "promoted", "instance_stopped", "instance_stopped", "finished" }, kinds(m, d.id))
  end)

  it("a first deployment has no old set to keep warm: no hold", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 3600 } }
    assert.is_true(m:deploy("production", "v1").success)
    assert.is_nil(event(m, m:history("production", 1)[1].id, "bake"))
    m:close()
    fixtures.cleanup()
    m = setup{}
    assert.is_true(m:deploy("production", "w1", { strategy = deploy.CanaryStrategy{ interval = 3600 } }).success)
    assert.is_nil(event(m, m:history("production", 1)[1].id, "bake"))
  end)

  it("deployctl rollback inside the window is a router change: the old instances are the same processes", function()
    local _, _, cfg = setup()
    local dir = fixtures.tmpdir("bake-cli")
    cfg.state = dir .. "/state.db"
    local config = cli.write_config(dir, cfg)
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local m = deploy.DeploymentManager{ config = config }
    local old = pids_of(m, "v1")
    local p = cli.spawn({ "--config", config, "deploy", "production", "v2", "--set", "scale_down_delay=300" })
    fixtures.wait_until(function() return p:output():find(" bake ") end, 20, "the warm window")
    assert.same({ v2 = 20 }, (h:sample(20)))
    local code, out, err = cli.run({ "--config", config, "rollback", "production" })
    assert.equal(0, code, err)
    assert.matches("production: back on v1 in [%d.]+s: deployment %S+ was still running with v1 warm, traffic " ..
                   "returned in one router change %(no restart%)", out)
    local rc, pout = p:wait(30)
    assert.equal(1, rc, pout)
    assert.same(old, pids_of(m, "v1"))
    assert.same({ v1 = 40 }, (h:sample(40)))
    local hist = m:history("production")
    assert.equal(2, #hist) -- no rollback deployment of its own: the running one went back
    assert.equal("failed", hist[1].status)
    assert.matches("rolled back by the operator %(deployctl rollback%) at 100 %%: the instances of v1 were " ..
                   "still running, traffic went back to them in one router change", hist[1].errors[1])
    assert.equal("v1", m:get_status("production").current_version)
  end)

  it("manager:rollback() during a canary's hold aborts it the same way, from the same process", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
    assert.is_true(m:deploy("production", "v1").success)
    local old = pids_of(m, "v1")
    local baking
    local results = deploy.parallel{
      function()
        return m:deploy("production", "v2", {
          strategy = deploy.CanaryStrategy{ initial_percentage = 100, interval = 300 },
          on_event = function(ev) if ev.kind == "bake" then baking = true end end })
      end,
      function()
        while not baking do deploy.sleep(0.02) end
        return m:rollback("production")
      end,
    }
    assert.is_false(results[1].success)
    local rb = results[2]
    assert.is_true(rb.success, table.concat(rb.errors or {}, "\n"))
    assert.equal("v1", rb.version)
    assert.equal(m:history("production", 1)[1].id, rb.rolled_back_deployment)
    assert.same(old, pids_of(m, "v1"))
    -- asking for another version than the one it came from is a deployment of its own (here: locked)
  end)

  it("outside any window, rollback is a deployment of its own, as before", function()
    local m = setup{ strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
    assert.is_true(m:deploy("production", "v1").success)
    assert.is_true(m:deploy("production", "v2").success)
    local r = m:rollback("production")
    assert.is_true(r.success)
    assert.is_nil(r.rolled_back_deployment)
    local d = m:history("production", 1)[1]
    assert.equal("rollback", d.kind)
    assert.is_nil(event(m, d.id, "bake")) -- a rollback keeps nothing warm
  end)

  it("on the virtual clock, a default blue-green holds blue for 30 s and a default canary holds 100 % for 300 s", function()
    local m = setup{ clock = "virtual" }
    assert.is_true(m:deploy("production", "v1").success)
    local r = m:deploy("production", "v2")
    assert.is_true(r.success)
    local d = m:history("production", 1)[1]
    local bake, promoted = event(m, d.id, "bake"), event(m, d.id, "promoted")
    assert.near(30, promoted.ts - bake.ts, 0.5)
    r = m:deploy("production", "v3", { strategy = deploy.CanaryStrategy{} })
    assert.is_true(r.success)
    assert.is_true(r.duration >= 3000 and r.duration < 3060, "duration " .. r.duration)
  end)

  it("refuses a bad scale_down_delay from Lua, --set and a manifest's strategy", function()
    for _, v in ipairs{ -1, "x", 1e12 } do
      assert.has_error(function() deploy.BlueGreenStrategy{ scale_down_delay = v } end)
    end
    local ok, e = pcall(deploy.BlueGreenStrategy, { scale_down_delay = -1 })
    assert.is_false(ok)
    assert.matches("BlueGreenStrategy scale_down_delay must be a number of seconds >= 0, got %-1", e)
    ok, e = pcall(deploy.BlueGreenStrategy, { scale_down_delay = "soon" })
    assert.matches("BlueGreenStrategy scale_down_delay must be a number, got string", e)
    ok, e = pcall(deploy.CanaryStrategy, { scale_down_delay = 3 })
    assert.matches("CanaryStrategy has no parameter 'scale_down_delay'", e)
    local _, _, cfg = setup()
    local dir = fixtures.tmpdir("bake-bad")
    cfg.state = dir .. "/state.db"
    local config = cli.write_config(dir, cfg)
    local code, _, err = cli.run({ "--config", config, "deploy", "production", "v1", "--set", "scale_down_delay=-5" })
    assert.equal(2, code)
    assert.matches("deploy: %-%-set: BlueGreenStrategy scale_down_delay must be a number of seconds >= 0, got %-5", err)
    code, _, err = cli.run({ "--config", config, "deploy", "production", "v1", "--set", "scale_down_delay=later" })
    assert.equal(2, code)
    assert.matches("scale_down_delay must be a number, got string", err)
  end)
end)
