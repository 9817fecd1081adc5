-- A target behind several load balancers (routers = { ... }): two real
-- HAProxy, or HAProxy and a real nginx, each sampled through its own
-- frontend with curl. Every step reaches all of them; a step that fails on
-- one is undone on all; reconcile and status see each. Two HAProxy and one
-- nginx serve the whole file.
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local hap_a, hap_b, shared_nginx

local function haproxies()
  hap_a = hap_a or fixtures.haproxy{}
  hap_b = hap_b or fixtures.haproxy{}
  return hap_a, hap_b
end

local function nginx()
  shared_nginx = shared_nginx or fixtures.nginx{}
  return shared_nginx
end

local function kept()
  local k = {}
  for _, h in pairs({ hap_a, hap_b, shared_nginx }) do k[#k + 1] = h end
  return k
end

local function hap_router(h)
  return { kind = "haproxy", socket = h.socket, backend = h.backend }
end

-- A target behind the given routers (tables), with its manager on v1.
local function setup(routers, opts)
  opts = opts or {}
  local target, dir = fixtures.target_config{ instances = 2 }
  target.router = nil
  target.routers = routers
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  local m = deploy.DeploymentManager{ config = cfg }
  if not opts.empty then
    local r = m:deploy("production", "v1")
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
  end
  return m, dir, cfg
end

local function errors(r) return table.concat(r.errors or {}, "\n") end
local function lit(s) return (s:gsub("%p", "%%%0")) end

-- v2's share, in %, of 100 requests through each frontend.
local function shares(frontends)
  local out = {}
  for i, f in ipairs(frontends) do
    local counts, failed = f:sample(100)
    assert.equal(0, failed)
    out[i] = counts.v2 or 0
  end
  return out
end

-- A canary 10 % at a time, v2's share through each frontend at every
-- step: each within 5 of the step's.
local function assert_every_step(m, frontends)
  local steps = {}
  local r = m:deploy("production", "v2", {
    strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.05 },
    on_event = function(ev)
      if ev.kind == "traffic" then steps[#steps + 1] = { pct = ev.data.pct, shares = shares(frontends) } end
    end })
  assert.is_true(r.success, errors(r))
  assert.equal(10, #steps)
  for i, s in ipairs(steps) do
    assert.equal(i * 10, s.pct)
    for k, share in ipairs(s.shares) do
      assert.is_true(math.abs(share - s.pct) <= 5,
        string.format("step %d, router %d: %d %% of requests went to v2, the step is %g %%", i, k, share, s.pct))
    end
  end
end

local function rename(path, to) assert(os.rename(path, to)) end

describe("several routers", function()
  after_each(function()
    fixtures.cleanup{ keep = kept() }
    collectgarbage()
  end)
  teardown(function()
    fixtures.cleanup()
    hap_a, hap_b, shared_nginx = nil, nil, nil
  end)

  describe("every step reaches every router", function()
    it("two HAProxy follow each step of a canary; status shows each one's weights", function()
      local a, b = haproxies()
      local m = setup({ hap_router(a), hap_router(b) })
      assert_every_step(m, { a, b })
      assert.same({ v2 = 50 }, (a:sample(50)))
      assert.same({ v2 = 50 }, (b:sample(50)))
      local live, router_error, routers = m:live_instances("production")
      assert.is_nil(router_error)
      assert.same({ "haproxy " .. a.socket .. " (backend app)", "haproxy " .. b.socket .. " (backend app)" },
                  { routers[1].router, routers[2].router })
      assert.equal(2, #live)
      for _, i in ipairs(live) do assert.same({ 1, 1 }, i.router_weights) end
    end)

    it("HAProxy and nginx follow each step of a canary", function()
      local a = haproxies()
      local site = nginx():site()
      local m = setup({ hap_router(a), site:router() })
      assert_every_step(m, { a, site })
      assert.same({ v2 = 50 }, (site:sample(50)))
      local _, router_error, routers = m:live_instances("production")
      assert.is_nil(router_error)
      assert.same({ "haproxy", "nginx" }, { routers[1].kind, routers[2].kind })
    end)

    -- nginx keeps no per-upstream counters: the group reads the first
    -- member that does, here the HAProxy listed second.
    it("analysis by HAProxy's counters works behind nginx and HAProxy: 30 % 5xx aborts at the first share", function()
      local a = haproxies()
      local site = nginx():site()
      local m = setup({ site:router(), hap_router(a) })
      local load = fixtures.load(4, a:url("/"), 30)
      local r = m:deploy("production", "v2-err30", { strategy = deploy.CanaryStrategy{
        initial_percentage = 10, increment = 45, interval = 1,
        analysis = { metrics = { { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 } } } } } })
      load:finish()
      assert.is_false(r.success)
      assert.matches("^canary aborted at 10 %%: analysis failed: metric 'errors' %(haproxy%)", errors(r))
      assert.same({ v1 = 30 }, (a:sample(30)))
      assert.same({ v1 = 30 }, (site:sample(30)))
    end)
  end)

  describe("a step that fails on one router", function()
    it("is undone on every router: a Lua strategy sees each back where it was, the error names the router", function()
      local a, b = haproxies()
      local m = setup({ hap_router(a), hap_router(b) })
      local off = b.socket .. ".off"
      local seen = {}
      local Probe = deploy.DeploymentStrategy:extend{ name = "probe" }
      function Probe:execute(d)
        assert(d:start())
        assert(d:set_traffic(20))
        rename(b.socket, off)                   -- b can no longer be driven (it still serves)
        seen.ok, seen.err = d:set_traffic(60)
        seen.after = shares({ a, b })
        rename(off, b.socket)
        return false, "probe done"
      end
      local r = m:deploy("production", "v2", { strategy = Probe })
      assert.is_false(r.success)
      assert.falsy(seen.ok)
      assert.matches("^cannot set traffic to 60 %%: haproxy " .. lit(b.socket) .. " %(backend app%): haproxy: cannot " ..
                     "connect to " .. lit(b.socket) ..
                     ": no such file .-; every other router is back to what it served before$",
                     seen.err)
      -- a is back at 20 % (not 60 %), b never left it
      for k, share in ipairs(seen.after) do assert.is_true(math.abs(share - 20) <= 3, k .. ": " .. share) end
      -- then the abort took both back to v1
      assert.same({ v1 = 50 }, (a:sample(50)))
      assert.same({ v1 = 50 }, (b:sample(50)))
    end)

    it("made unreachable mid-rollout: the rollout aborts naming it, and every router goes back", function()
      local a, b = haproxies()
      local m, dir = setup({ hap_router(a), hap_router(b) })
      local off = b.socket .. ".off"
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.1 },
        on_event = function(ev)
          if ev.kind == "traffic" and ev.data.pct == 20 then rename(b.socket, off) end
          -- back before the abort's last retry: the retreat reaches b too
          if ev.kind == "aborted" then rename(off, b.socket) end
        end })
      assert.is_false(r.success)
      assert.matches("^canary aborted at 20 %%: cannot set traffic to 30 %%: haproxy " .. lit(b.socket) ..
                     " %(backend app%): haproxy: cannot connect", r.errors[1])
      assert.equal(1, #r.errors, errors(r))
      assert.same({ v1 = 50 }, (a:sample(50)))
      assert.same({ v1 = 50 }, (b:sample(50)))
      assert.equal(2, #a:servers())
      assert.equal(2, #b:servers())
      assert.same({}, fixtures.instances_of(dir, "v2"))
      assert.equal("v1", m:get_status("production").current_version)
    end)

    it("a configuration nginx refuses undoes the step on HAProxy too", function()
      local a = haproxies()
      local n = nginx()
      local site = n:site()
      local m = setup({ hap_router(a), site:router() })
      local conf = fixtures.read_file(n.conf)
      fixtures.write_file(n.conf, conf .. "this is not nginx\n")
      finally(function() fixtures.write_file(n.conf, conf) end)
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0 },
        on_event = function(ev)
          if ev.kind == "aborted" then fixtures.write_file(n.conf, conf) end
        end })
      assert.is_false(r.success)
      assert.matches("^canary aborted before any traffic moved: cannot set traffic to 50 %%: nginx " .. lit(site.include) ..
                     ": nginx: the configuration was " ..
                     "refused, nothing applied", r.errors[1])
      assert.matches("; every other router is back to what it served before$", r.errors[1])
      assert.same({ v1 = 40 }, (a:sample(40)))
      assert.same({ v1 = 40 }, (site:sample(40)))
    end)
  end)

  describe("repair and status", function()
    it("reconcile puts back what every restarted HAProxy forgot", function()
      local a, b = haproxies()
      local m = setup({ hap_router(a), hap_router(b) })
      a:restart()
      b:restart()
      assert.equal(0, #a:servers())
      local live, router_error = m:live_instances("production")
      assert.is_nil(router_error)
      for _, i in ipairs(live) do assert.same({ false, false }, i.router_weights) end
      local ok, why = m:reconcile("production")
      assert.is_true(ok, why)
      assert.same({ v1 = 40 }, (a:sample(40)))
      assert.same({ v1 = 40 }, (b:sample(40)))
    end)

    it("status says which router could not be read, and shows each one's weights", function()
      local a, b = haproxies()
      local m, _, cfg = setup({ hap_router(a), hap_router(b) })
      local config = cli.write_config(fixtures.tmpdir("cli-config"), cfg)
      rename(b.socket, b.socket .. ".off")
      finally(function() rename(b.socket .. ".off", b.socket) end)
      local live, router_error, routers = m:live_instances("production")
      assert.matches("^haproxy " .. lit(b.socket) .. " %(backend app%): haproxy: cannot connect", router_error)
      assert.is_nil(routers[1].error)
      assert.matches("cannot connect", routers[2].error)
      for _, i in ipairs(live) do assert.same({ 1, false }, i.router_weights) end
      local code, out, err = cli.run({ "--config", config, "status", "production" })
      assert.equal(0, code, err)
      assert.matches("\n%S+%s+local%s+v1%s.-%s1/absent%s", out)
      assert.matches("WEIGHT per router:\n  1  haproxy " .. lit(a.socket) .. " %(backend app%)\n  2  haproxy " ..
                     lit(b.socket) .. " %(backend app%)  %(could not be read%)", out)
      assert.matches("router: haproxy " .. lit(b.socket) .. " %(backend app%): haproxy: cannot connect", err)
      code, out = cli.run({ "--config", config, "status", "production", "--json" })
      assert.equal(0, code)
      local doc = cjson.decode(out)
      assert.equal(2, #doc.routers)
      assert.same({ 1, false }, doc.instances[1].router_weights)
      assert.matches("cannot connect", doc.routers[2].error)
    end)
  end)

  describe("configuration", function()
    local function config_error(routers, extra)
      local target = fixtures.target_config{}
      target.router = nil
      target.routers = routers
      for k, v in pairs(extra or {}) do target[k] = v end
      local ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = target } } })
      assert.is_false(ok)
      return err
    end
    local hap = { kind = "haproxy", socket = "/run/haproxy/admin.sock", backend = "app" }

    it("refuses bad routers lists with the field and the fix", function()
      assert.matches("config targets%.production has both router and routers: keep one",
                     config_error({ hap }, { router = hap }))
      assert.matches("config targets%.production%.routers must be a table, got string", config_error("haproxy"))
      assert.matches("config targets%.production%.routers must be a list of 1 to 8 router tables", config_error({}))
      assert.matches("config targets%.production%.routers must be a list of 1 to 8 router tables",
                     config_error({ hap, extra = hap }))
      local nine = {}
      for i = 1, 9 do nine[i] = hap end
      assert.matches("must be a list of 1 to 8 router tables", config_error(nine))
      assert.matches("config targets%.production%.routers%[2%] must be a table such as", config_error({ hap, "nginx" }))
      assert.matches("config targets%.production%.routers%[2%]%.kind is missing", config_error({ hap, { socket = "/x" } }))
      assert.matches("config targets%.production%.routers%[2%] kind 'none' cannot be one of several routers",
                     config_error({ hap, { kind = "none" } }))
      assert.matches("config targets%.production%.routers%[1%] has an unknown field 'include'",
                     config_error({ { kind = "haproxy", socket = "/x", backend = "app", include = "/y" }, hap }))
      assert.matches("config targets%.production%.routers%[2%]%.upstream is missing",
                     config_error({ hap, { kind = "nginx", include = "/a/b.conf", conf = "/a/n.conf", pid = "/a/p" } }))
    end)

    it("one router in a list is that router", function()
      local a = haproxies()
      local m = setup({ hap_router(a) })
      local _, _, routers = m:live_instances("production")
      assert.equal(1, #routers)
      assert.same({ v1 = 20 }, (a:sample(20)))
    end)
  end)
end)
