-- CanaryStrategy through a real HAProxy: the split at every step, the
-- health gate, abort under load, and the instance-ratio split without a
-- router.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function setup(opts)
  opts = opts or {}
  local h = opts.router ~= "none" and fixtures.haproxy{} or nil
  local target, dir = fixtures.target_config{ haproxy = h, instances = opts.instances or 2, health = opts.health }
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = opts.clock or "real"
  local m = deploy.DeploymentManager{ config = cfg }
  return m, h, dir
end

local function kinds(m, id)
  local out = {}
  for _, ev in ipairs(m:events(id)) do out[#out + 1] = ev.kind end
  return out
end

describe("canary", function()
  after_each(fixtures.cleanup)

  it("integer weights give every whole percentage to within 1 %, for 1 to 4 servers a side", function()
    local worst = 0
    for n_old = 1, 4 do
      for n_new = 1, 4 do
        for pct = 1, 99 do
          local w_old, w_new = deploy.router_weights(pct, n_old, n_new)
          assert.is_true(w_old >= 1 and w_old <= 256 and w_new >= 1 and w_new <= 256)
          local share = 100 * n_new * w_new / (n_new * w_new + n_old * w_old)
          worst = math.max(worst, math.abs(share - pct))
        end
      end
    end
    assert.is_true(worst < 1, "worst error " .. worst .. " %")
    assert.same({ 0, 1 }, { deploy.router_weights(100, 2, 2) })
    assert.same({ 1, 0 }, { deploy.router_weights(0, 2, 2) })
    assert.same({ 9, 1 }, { deploy.router_weights(10, 1, 1) })
    assert.has_error(function() deploy.router_weights(101, 1, 1) end)
  end)

  it("splits traffic exactly as set, at every step from 10 to 100 %", function()
    local m, h = setup{ instances = 2 }
    assert.is_true(m:deploy("production", "v1").success)
    local seen = {}
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.1 },
      on_event = function(ev)
        if ev.kind == "traffic" then
          local counts, failed = h:sample(200)
          seen[#seen + 1] = { pct = ev.data.pct, new = counts.v2 or 0, failed = failed, weights = h:servers() }
        end
      end })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal(10, #seen)
    for i, s in ipairs(seen) do
      assert.equal(i * 10, s.pct)
      assert.equal(0, s.failed)
      local share = s.new / 200 * 100
      assert.is_true(math.abs(share - s.pct) <= 5,
        string.format("step %d: %g %% of requests went to v2, weight says %g %%", i, share, s.pct))
    end
    -- the weights themselves give the exact share (notes/haproxy.md)
    local w = {}
    for _, s in ipairs(seen[3].weights) do w[#w + 1] = s.weight end
    table.sort(w)
    assert.same({ 3, 3, 7, 7 }, w)
    assert.same({ v2 = 50 }, (h:sample(50)))
  end)

  it("rolls back under load when the new version turns unhealthy at 30 %: 0 failed requests, a golden event list", function()
    local m, h, dir = setup{ instances = 2 }
    assert.is_true(m:deploy("production", "v1").success)
    local load = fixtures.load(8, h:url("/"), 4)
    fixtures.sleep(0.3)
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.5 },
      on_event = function(ev)
        if ev.kind == "traffic" and ev.data.pct == 30 then fixtures.set_unhealthy(dir, "v2") end
      end })
    local res = load:wait()
    assert.is_false(r.success)
    assert.matches("^canary aborted at 30 %%: unhealthy after 3 consecutive failed checks: " ..
                   "http://127%.0%.0%.1:%d+/healthz: status 500 %(expected 200%)$", r.errors[1])
    assert.is_true(res.requests > 500, res.output)
    assert.equal(0, res.non2xx, res.output)
    assert.equal(0, res.socket_errors, res.output)
    assert.same({ v1 = 50 }, (h:sample(50)))
    -- v1 serves healthily again: the target is deployed (v1), the failure
    -- is the last deployment's (issue 13: status tells the truth)
    local st = m:get_status("production")
    assert.equal("deployed", st.status)
    assert.equal("v1", st.current_version)
    local d = m:history("production", 1)[1]
    assert.equal("failed", d.status)
    assert.same({
      "started", "instance_started", "instance_started", "healthy",
      "traffic", "traffic", "traffic",
      "health_failed", "health_failed", "health_failed",
      "aborted", "rolled_back", "instance_stopped", "instance_stopped", "finished",
    }, kinds(m, d.id))
    local pcts = {}
    for _, ev in ipairs(m:events(d.id)) do
      if ev.kind == "traffic" then pcts[#pcts + 1] = ev.data.pct end
      if ev.kind == "aborted" then assert.equal(30, ev.data.pct) end
      if ev.kind == "rolled_back" then assert.equal(30, ev.data.from_pct) end
    end
    assert.same({ 10, 20, 30 }, pcts)
  end)

  it("a first deployment has nothing to compare with: all traffic at once", function()
    local m, h = setup{}
    local r = m:deploy("production", "v1", { strategy = deploy.CanaryStrategy{ interval = 0.1 } })
    assert.is_true(r.success)
    local d = m:history("production", 1)[1]
    local pcts = {}
    for _, ev in ipairs(m:events(d.id)) do if ev.kind == "traffic" then pcts[#pcts + 1] = ev.data.pct end end
    assert.same({ 100 }, pcts)
  end)

  it("checks health_check_url with {host} and {port} on every step", function()
    local m, h = setup{}
    m:deploy("production", "v1")
    local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{
      initial_percentage = 50, increment = 50, interval = 0.1, health_check_url = "http://{host}:{port}/missing" } })
    assert.is_false(r.success)
    assert.matches("/missing: status 404", r.errors[1])
  end)

  it("without a router, the split follows the instance ratio", function()
    local m = setup{ router = "none", instances = 4 }
    assert.is_true(m:deploy("production", "v1").success)
    local steps = {}
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 25, increment = 25, interval = 0.05 },
      on_event = function(ev)
        if ev.kind == "traffic" then
          local live = 0
          for _, i in ipairs(m:instances("production")) do
            if i.version == "v2" and i.alive then live = live + 1 end
          end
          steps[#steps + 1] = { ev.data.pct, ev.data.new, ev.data.old, live }
        end
      end })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    -- 25 % of 4 instances is 1 new instance beside the 4 old ones, and so on
    assert.same({ { 25, 1, 4, 1 }, { 50, 2, 4, 2 }, { 75, 3, 4, 3 }, { 100, 4, 4, 4 } }, steps)
    assert.equal(4, m:get_status("production").instances)
  end)

  it("runs a full default canary (10 steps of 300 s) in well under a second on the virtual clock", function()
    local m = setup{ clock = "virtual" }
    assert.is_true(m:deploy("production", "v1").success)
    local t0 = fixtures.now()
    local ts = {}
    local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{}, on_event = function(ev)
      if ev.kind == "traffic" then ts[#ts + 1] = ev.ts end
    end })
    local wall = fixtures.now() - t0
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal(10, #ts)
    for i = 2, #ts do assert.near(300, ts[i] - ts[i - 1], 0.001) end
    -- 100 % is held for an interval too, the old set warm, before promotion
    local bake, promoted
    for _, ev in ipairs(m:events(m:history("production", 1)[1].id)) do
      if ev.kind == "bake" then bake = ev end
      if ev.kind == "promoted" then promoted = ev end
    end
    assert.near(ts[10], bake.ts, 0.001)
    assert.near(300, promoted.ts - bake.ts, 0.5)
    assert.is_true(r.duration >= 3000 and r.duration < 3060, "duration " .. r.duration)
    assert.is_true(wall < 1, "took " .. wall .. " s of real time")
  end)

  it("emits the same sequence of events on the virtual clock as in real time", function()
    local function run(clock, interval)
      local m = setup{ clock = clock }
      assert.is_true(m:deploy("production", "v1").success)
      assert.is_true(m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{
        initial_percentage = 25, increment = 25, interval = interval } }).success)
      return kinds(m, m:history("production", 1)[1].id)
    end
    local virtual = run("virtual", 300)
    local real = run("real", 0.05)
    assert.same(real, virtual)
    assert.equal(4, #(function() local t = {} for _, k in ipairs(real) do if k == "traffic" then t[#t + 1] = k end end return t end)())
  end)
end)
