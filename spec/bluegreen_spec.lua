-- Blue-green through a real HAProxy (runtime API, backend declared with no
-- servers), real demo-app processes, real HTTP on 127.0.0.1.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function setup(opts)
  opts = opts or {}
  local h = fixtures.haproxy{}
  local target, dir = fixtures.target_config{ haproxy = h, instances = opts.instances or 2, health = opts.health }
  -- Blue stops right after the switch here; keeping it warm is bake_spec's.
  local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } },
                                      strategy = opts.strategy or deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  return m, h, dir
end

local function versions_served(h, n)
  local counts, failed = h:sample(n or 40)
  return counts, failed
end

local function kinds(m, id)
  local out = {}
  for _, ev in ipairs(m:events(id)) do out[#out + 1] = ev.kind end
  return out
end

describe("blue-green through HAProxy", function()
  after_each(fixtures.cleanup)

  it("puts v1 on an empty backend, then switches to v2 in one step and stops blue", function()
    local m, h = setup()
    local r1 = m:deploy("production", "v1")
    assert.is_true(r1.success, table.concat(r1.errors or {}, "\n"))
    local counts, failed = versions_served(h)
    assert.same({ v1 = 40 }, counts)
    assert.equal(0, failed)
    local blue_pids = {}
    for _, i in ipairs(m:instances("production")) do blue_pids[#blue_pids + 1] = i.pid end

    local weights_at_switch
    local r2 = m:deploy("production", "v2", { on_event = function(ev)
      if ev.kind == "traffic" then weights_at_switch = h:servers() end
    end })
    assert.is_true(r2.success, table.concat(r2.errors or {}, "\n"))
    -- one step: at the switch, blue at weight 0 and green at full weight
    assert.equal(4, #weights_at_switch)
    local by_weight = {}
    for _, s in ipairs(weights_at_switch) do by_weight[s.weight] = (by_weight[s.weight] or 0) + 1 end
    assert.same({ [0] = 2, [1] = 2 }, by_weight)
    counts, failed = versions_served(h)
    assert.same({ v2 = 40 }, counts)
    assert.equal(0, failed)
    -- blue is gone from HAProxy and its processes have stopped
    assert.equal(2, #h:servers())
    for _, pid in ipairs(blue_pids) do assert.is_false(fixtures.alive(pid)) end
    local st = m:get_status("production")
    assert.same({ target = "production", current_version = "v2", status = "deployed", health = "healthy",
                  instances = 2 }, st)
    local h2 = m:history("production")
    assert.equal("v2", h2[1].version)
    assert.equal("v1", h2[1].from_version)
    assert.same({ "started", "instance_started", "instance_started", "healthy", "traffic", "verified",
                  "promoted", "instance_stopped", "instance_stopped", "finished" }, kinds(m, h2[1].id))
  end)

  it("waits switch_delay after green is healthy before moving traffic", function()
    local m, h = setup{ strategy = deploy.BlueGreenStrategy{ switch_delay = 0.6, scale_down_delay = 0 } }
    m:deploy("production", "v1")
    local healthy_at, traffic_at
    m:deploy("production", "v2", { on_event = function(ev)
      if ev.kind == "healthy" then healthy_at = ev.ts end
      if ev.kind == "traffic" then traffic_at = ev.ts end
    end })
    assert.is_true(traffic_at - healthy_at >= 0.6)
  end)

  it("green never healthy: traffic stays on blue, green is stopped, result says why", function()
    local m, h, dir = setup{ health = { failure_threshold = 2 } }
    m:deploy("production", "v1")
    local r = m:deploy("production", "v2-bad")
    assert.is_false(r.success)
    assert.equal("v2-bad", r.version)
    assert.matches("green not switched to: new instances of v2%-bad unhealthy after 2 consecutive failed checks: " ..
                   "http://127%.0%.0%.1:%d+/healthz: status 500 %(expected 200%)", r.errors[1])
    local counts, failed = versions_served(h)
    assert.same({ v1 = 40 }, counts)
    assert.equal(0, failed)
    assert.equal(2, #h:servers())
    assert.equal(0, #fixtures.instances_of(dir, "v2-bad"))
    local st = m:get_status("production")
    assert.equal("v1", st.current_version)
    -- v1 serves: deployed; the failure is the last deployment's (issue 13)
    assert.equal("deployed", st.status)
    assert.equal("failed", m:describe("production").last_deployment.status)
  end)

  it("green healthy before but unhealthy after the switch: straight back to blue in one step", function()
    local m, h, dir = setup()
    m:deploy("production", "v1")
    local after_abort
    local r = m:deploy("production", "v2", { on_event = function(ev)
      if ev.kind == "traffic" and ev.data.pct == 100 then fixtures.set_unhealthy(dir, "v2") end
      if ev.kind == "aborted" then after_abort = ev.data end
    end })
    assert.is_false(r.success)
    assert.matches("green failed after the switch, traffic returned to blue: unhealthy after 3 consecutive failed checks", r.errors[1])
    assert.equal(100, after_abort.pct)
    local counts, failed = versions_served(h)
    assert.same({ v1 = 40 }, counts)
    assert.equal(0, failed)
    for _, s in ipairs(h:servers()) do assert.is_true(s.weight > 0) end
    assert.equal("v1", m:get_status("production").current_version)
  end)

  it("checks health_check_url too, with {host} and {port} filled in", function()
    local m, h = setup{ strategy = deploy.BlueGreenStrategy{ health_check_url = "http://{host}:{port}/nope" } }
    local r = m:deploy("production", "v1")
    assert.is_false(r.success)
    assert.matches("/nope: status 404 %(expected 200%)", r.errors[1])
    local m2 = setup{ strategy = deploy.BlueGreenStrategy{ health_check_url = "http://{host}:{port}/version" } }
    assert.is_true(m2:deploy("production", "v1").success)
  end)

  it("serves every request during a switch under load: 0 non-2xx, 0 socket errors", function()
    local m, h = setup{ instances = 2 }
    assert.is_true(m:deploy("production", "v1").success)
    local load = fixtures.load(8, h:url("/"), 4)
    fixtures.wait_until(function() return #h:servers() > 0 and (fixtures.read_file(load.log) ~= nil) end, 2, "wrk")
    fixtures.sleep(0.5)
    local r2 = m:deploy("production", "v2")
    local r3 = m:deploy("production", "v3")
    local r4 = m:rollback("production", "v2")
    local res = load:wait()
    assert.is_true(r2.success and r3.success and r4.success)
    assert.is_true(res.requests > 1000, "too few requests to mean anything: " .. res.requests)
    assert.equal(0, res.non2xx, res.output)
    assert.equal(0, res.socket_errors, res.output)
    assert.same({ v2 = 40 }, (versions_served(h)))
  end)
end)

describe("the HAProxy router", function()
  after_each(fixtures.cleanup)

  it("re-applies the desired servers after HAProxy was restarted", function()
    local m, h = setup()
    m:deploy("production", "v1")
    h:restart()
    assert.equal(0, #h:servers())  -- a restart forgets servers added at runtime
    local ok, err = m:reconcile("production")
    assert.is_true(ok, err)
    assert.equal(2, #h:servers())
    assert.same({ v1 = 40 }, (versions_served(h)))
    -- and a deployment after a restart works from what HAProxy has now
    h:restart()
    assert.is_true(m:deploy("production", "v2").success)
    assert.same({ v2 = 40 }, (versions_served(h)))
  end)

  it("a missing socket fails the deployment, says how to fix it, and leaves nothing running", function()
    local h = fixtures.haproxy{}
    local target, dir = fixtures.target_config{ haproxy = h }
    target.router.socket = h.dir .. "/nowhere.sock"
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
    local r = m:deploy("production", "v1")
    assert.is_false(r.success)
    assert.matches("cannot connect to .-/nowhere%.sock: no such file %(is HAProxy running with 'stats socket", r.errors[1])
    assert.equal(0, #fixtures.instances_of(dir, "v1"))
    assert.is_nil(m:get_status("production").current_version)
    assert.equal(0, #m:instances("production"))
  end)

  it("an unknown backend is reported with the fix", function()
    local h = fixtures.haproxy{}
    local target = fixtures.target_config{ haproxy = h }
    target.router.backend = "nosuch"
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
    local r = m:deploy("production", "v1")
    assert.is_false(r.success)
    assert.matches("no backend 'nosuch'", r.errors[1])
    assert.matches("balance roundrobin", r.errors[1])
    assert.equal(0, #m:instances("production"))
  end)

  it("HAProxy answering errors (a server it refuses) fails cleanly and keeps the old version", function()
    local m, h, dir = setup()
    m:deploy("production", "v1")
    -- Take the socket away mid-flight: the next command gets no HAProxy.
    local r = m:deploy("production", "v2", { on_event = function(ev)
      if ev.kind == "healthy" then h:stop() end
    end })
    assert.is_false(r.success)
    assert.matches("haproxy", r.errors[1])
    assert.equal(0, #fixtures.instances_of(dir, "v2"))
    assert.equal("v1", m:get_status("production").current_version)
  end)
end)
