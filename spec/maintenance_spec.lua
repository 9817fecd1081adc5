-- Maintenance mode through a real HAProxy (README's lines, deployctl's map)
-- and a real nginx (the include's 503 server): the load balancer answers
-- 503 with a page and Retry-After while the instances stay as they are;
-- it lasts through reconcile, crash recovery and deployments, and shows in
-- status. wrk keeps load on while it is switched. One HAProxy and one
-- nginx serve the whole file.
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local shared_haproxy, shared_nginx

local function haproxy()
  shared_haproxy = shared_haproxy or fixtures.haproxy{ routes = {} }
  return shared_haproxy
end

local function nginx()
  shared_nginx = shared_nginx or fixtures.nginx{}
  return shared_nginx
end

local function kept()
  local k = {}
  if shared_haproxy then k[#k + 1] = shared_haproxy end
  if shared_nginx then k[#k + 1] = shared_nginx end
  return k
end

local function errors(r) return table.concat(r.errors or {}, "\n") end
local function lit(s) return (s:gsub("%p", "%%%0")) end

-- A manager (and its config, for the CLI) for a target behind router, on v1.
local function setup(router, opts)
  opts = opts or {}
  local target, dir = fixtures.target_config{ instances = 2 }
  target.router = router
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  local m = deploy.DeploymentManager{ config = cfg }
  if not opts.empty then
    local r = m:deploy("production", "v1")
    assert.is_true(r.success, errors(r))
  end
  return m, cli.write_config(fixtures.tmpdir("config"), cfg), dir
end

local function on_haproxy(h)
  h = h or haproxy()
  local m, config, dir = setup({ kind = "haproxy", socket = h.socket, backend = h.backend, map = h.map })
  return m, h, config, dir
end

local function on_nginx()
  local site = nginx():site()
  local m, config, dir = setup(site:router())
  return m, site, config, dir
end

-- One GET with its headers: status, headers (lower-case names), body.
local function get(url)
  local out = io.popen("curl -s -i -m 5 " .. fixtures.shell_quote(url)):read("a")
  local head, body = out:match("^(.-)\r\n\r\n(.*)$")
  local status = tonumber((head or ""):match("^HTTP/%S+ (%d+)"))
  local headers = {}
  for name, value in (head or ""):gmatch("\r\n([^:\r\n]+): ([^\r\n]*)") do headers[name:lower()] = value end
  return status, headers, body
end

-- The maintenance page's promise: 503, Retry-After, the message escaped.
local function assert_page(url, message_html, retry_after)
  local status, headers, body = get(url)
  assert.equal(503, status, body)
  assert.equal(tostring(retry_after or 300), headers["retry-after"])
  assert.matches("^text/html", headers["content-type"])
  assert.matches("<h1>Down for maintenance</h1><p>" .. lit(message_html) .. "</p>", body)
end

-- On, then off, under wrk load through frontend: every request answered
-- (503 while on), none failed at the connection.
local function switch_under_load(m, frontend, load_opts)
  local load = fixtures.load(8, frontend:url("/"), 30, load_opts)
  fixtures.wait_until(function() return fixtures.alive(load.pid) end, 5, "wrk")
  local ok, why = m:maintenance("production", true, "Back at 10:00 <sharp> & \"soon\"")
  assert.is_true(ok, why)
  assert_page(frontend:url("/"), "Back at 10:00 &#60;sharp&#62; &#38; &#34;soon&#34;")
  local counts, failed = frontend:sample(20)
  assert.same({}, counts)
  assert.equal(20, failed)
  ok, why = m:maintenance("production", false)
  assert.is_true(ok, why)
  assert.same({ v1 = 20 }, (frontend:sample(20)))
  local res = load:finish()
  assert.is_true(res.requests > 100, res.output)
  assert.is_true(res.non2xx > 0, "no 503 while in maintenance: " .. res.output)
  assert.equal(0, res.socket_errors, res.output)
end

describe("maintenance", function()
  after_each(function()
    fixtures.cleanup{ keep = kept() }
    collectgarbage()
  end)
  teardown(function()
    fixtures.cleanup()
    shared_haproxy, shared_nginx = nil, nil
  end)

  describe("under load", function()
    it("HAProxy answers 503 with the page while on, 200 after, no connection error", function()
      local m, h = on_haproxy()
      switch_under_load(m, h)
      assert.equal("", (h:cmd("show map " .. h.map):gsub("%s", "")))
    end)

    it("nginx answers 503 with the page while on, 200 after, no connection error", function()
      local m, site = on_nginx()
      switch_under_load(m, site, { headers = { "Connection: close" } })
      assert.is_nil(site:include_text():find("maint.sock", 1, true))
    end)
  end)

  describe("lasts until turned off", function()
    it("through reconcile, also of an HAProxy that restarted and forgot it", function()
      local m, h = on_haproxy()
      assert.is_true(m:maintenance("production", true, "", 60))
      assert.is_true(m:reconcile("production"))
      assert_page(h:url("/"), "This service is down for maintenance and will be back shortly.", 60)
      h:restart()
      local _, _, body = get(h:url("/"))   -- forgotten: no server, no page of ours
      assert.is_nil(body:find("Down for maintenance", 1, true))
      assert.is_true(m:reconcile("production"))
      assert_page(h:url("/"), "This service is down for maintenance and will be back shortly.", 60)
      assert.equal(2, #h:servers())
      assert.is_true(m:maintenance("production", false))
      assert.same({ v1 = 20 }, (h:sample(20)))
    end)

    it("through nginx's reconcile, which rewrites the include with the page", function()
      local m, site = on_nginx()
      assert.is_true(m:maintenance("production", true, "soon"))
      fixtures.write_file(site.include, fixtures.nginx_empty_include(site.upstream, site.nginx.dir .. "/upstreams"))
      assert.is_true(m:reconcile("production"))
      assert_page(site:url("/"), "soon")
      local live = m:live_instances("production")
      for _, i in ipairs(live) do assert.equal(1, i.router_weight) end   -- weights kept behind the page
      assert.is_true(m:maintenance("production", false))
      assert.same({ v1 = 20 }, (site:sample(20)))
    end)

    it("through crash recovery: a rollout killed in maintenance, HAProxy restarted", function()
      local m, h, config, dir = on_haproxy()
      assert.is_true(m:maintenance("production", true, "upgrading"))
      local script = fixtures.tmpdir("pipeline") .. "/pipeline.lua"
      fixtures.write_file(script, [[
local deploy = require "deploy"
local m = deploy.DeploymentManager{ config = arg[1] }
m:deploy("production", "v2", {
  strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 30 },
  on_event = function(ev)
    if ev.kind == "traffic" then
      local f = io.open("/proc/self/stat")
      local pid = f:read("n")
      f:close()
      os.execute("kill -9 " .. pid)
    end
  end })
]])
      cli.run({ "--config", config, "run", script, config })
      assert_page(h:url("/"), "upgrading")           -- the rollout kept the page up
      h:restart()
      local code, out, err = cli.run({ "--config", config, "status", "production" })  -- recovers
      assert.equal(0, code, err)
      assert.matches("production: in maintenance since %S+ %(%S+%), Retry%-After 300 s: upgrading", out)
      assert_page(h:url("/"), "upgrading")
      assert.equal(2, #h:servers())
      assert.same({}, fixtures.instances_of(dir, "v2"))
      assert.is_true(m:maintenance("production", false))
      assert.same({ v1 = 20 }, (h:sample(20)))
    end)

    it("through a deployment, which rolls out behind the page", function()
      local m, h = on_haproxy()
      assert.is_true(m:maintenance("production", true, "new release"))
      local during
      local r = m:deploy("production", "v2", { on_event = function(ev)
        if ev.kind == "traffic" then during = (get(h:url("/"))) end
      end })
      assert.is_true(r.success, errors(r))
      assert.equal(503, during)
      assert_page(h:url("/"), "new release")
      assert.is_true(m:maintenance("production", false))
      assert.same({ v2 = 20 }, (h:sample(20)))
    end)
  end)

  describe("status and the command line", function()
    it("status shows it, and deployctl maintenance switches it", function()
      local m, h, config = on_haproxy()
      local code, out, err = cli.run({ "--config", config, "maintenance", "production", "on", "--message", "db upgrade",
                                       "--retry-after", "60" })
      assert.equal(0, code, err)
      assert.equal("production: in maintenance: its load balancers answer 503 with \"db upgrade\"\n", out)
      assert_page(h:url("/"), "db upgrade", 60)
      local st = m:get_status("production")
      assert.equal("db upgrade", st.maintenance.message)
      assert.equal(60, st.maintenance.retry_after)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", st.maintenance.since)
      assert.matches("@", st.maintenance.by)
      code, out = cli.run({ "--config", config, "status", "production" })
      assert.equal(0, code)
      assert.matches("production: in maintenance since " .. lit(st.maintenance.since) .. " %(" .. lit(st.maintenance.by) ..
                     "%), Retry%-After 60 s: db upgrade", out)
      code, out = cli.run({ "--config", config, "status", "--json" })
      assert.equal("db upgrade", cjson.decode(out).targets[1].maintenance.message)
      code, out, err = cli.run({ "--config", config, "maintenance", "production", "off" })
      assert.equal(0, code, err)
      assert.equal("production: out of maintenance: its load balancers serve it again\n", out)
      assert.is_nil(m:get_status("production").maintenance)
      assert.same({ v1 = 20 }, (h:sample(20)))
    end)

    it("is refused while a deployment runs (target locked, exit 3)", function()
      local m, h, config = on_haproxy()
      local seen = {}
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.05, pause_at = { 50 } },
        on_event = function(ev)
          if ev.kind ~= "paused" then return end
          seen.ok, seen.why, seen.locked = m:maintenance("production", true)
          seen.code, seen.out, seen.err = cli.run({ "--config", config, "maintenance", "production", "on" })
          m:promote("production")
        end })
      assert.is_true(r.success, errors(r))
      assert.is_false(seen.ok)
      assert.is_true(seen.locked)
      assert.matches("target locked: 'production' is being deployed by deployment", seen.why)
      assert.equal(3, seen.code)
      assert.matches("target locked", seen.err)
      assert.same({ v2 = 20 }, (h:sample(20)))
    end)

    it("refuses bad arguments and flags with the fix", function()
      local m, _, config = on_haproxy()
      local function lua_error(...)
        local ok, err = pcall(m.maintenance, m, ...)
        assert.is_false(ok)
        return err
      end
      assert.matches("manager:maintenance%(%): on must be true or false, got string", lua_error("production", "on"))
      assert.matches("manager:maintenance%(%): message must be a string, got number", lua_error("production", true, 5))
      assert.matches("a message goes with on %(true%), not with off", lua_error("production", false, "x"))
      assert.matches("maintenance message holds a control character or bytes that are not UTF%-8 at byte 5",
                     lua_error("production", true, "line\nbreak"))
      assert.matches("not UTF%-8 at byte 2", lua_error("production", true, "a\255b"))
      assert.matches("maintenance message is 600 bytes long: at most 511", lua_error("production", true, string.rep("x", 600)))
      assert.matches("retry_after must be a whole number of seconds from 0 to 604800", lua_error("production", true, "x", -1))
      assert.matches("retry_after must be a whole number of seconds", lua_error("production", true, "x", 1.5))
      assert.matches("retry_after must be a number of seconds, got string", lua_error("production", true, "x", "60"))
      assert.matches("unknown target 'nowhere'", lua_error("nowhere", true))
      assert.is_nil(m:get_status("production").maintenance)
      local function cli_error(...)
        local code, out, err = cli.run({ "--config", config, "maintenance", ... })
        assert.equal(2, code, out)
        return err
      end
      assert.matches("maintenance: needs TARGET and on or off", cli_error("production"))
      assert.matches("maintenance: needs TARGET and on or off", cli_error("production", "maybe"))
      assert.matches("%-%-retry%-after must be whole seconds from 0 to 604800, got 'soon'",
                     cli_error("production", "on", "--retry-after", "soon"))
      assert.matches("%-%-message and %-%-retry%-after go with 'on'", cli_error("production", "off", "--message", "x"))
      assert.matches("unknown flag %-%-colour", cli_error("production", "on", "--colour", "red"))
      assert.matches("unknown target 'nowhere'", cli_error("nowhere", "on"))
      assert.matches("maintenance message holds a control character",
                     cli_error("production", "on", "--message", "a\tb"))
    end)

    it("a router that cannot answer 503 is refused with the fix; a map HAProxy lacks fails and changes nothing", function()
      local m = setup({ kind = "none" })
      local ok, err = pcall(m.maintenance, m, "production", true)
      assert.is_false(ok)
      assert.matches("router none cannot do maintenance %(a 503 page%): it needs an nginx router, or an haproxy " ..
                     "router with router%.map", err)
      assert.is_true(m:maintenance("production", false))   -- off is always possible
      local h = haproxy()
      m = setup({ kind = "haproxy", socket = h.socket, backend = h.backend })
      ok, err = pcall(m.maintenance, m, "production", true)
      assert.matches("cannot do maintenance", err)
      -- a map HAProxy has not loaded: the first deployment already says so, changing nothing
      m = setup({ kind = "haproxy", socket = h.socket, backend = h.backend, map = h.dir .. "/nope.map" }, { empty = true })
      local r = m:deploy("production", "v1")
      assert.is_false(r.success)
      assert.matches("has no map '" .. lit(h.dir) .. "/nope%.map': router%.map must name the map file", errors(r))
      assert.same({ v1 = 20 }, (h:sample(20)))
      local why
      ok, why = m:maintenance("production", true)
      assert.is_false(ok)
      assert.matches("maintenance of 'production' not turned on: haproxy: the HAProxy behind .- has no map", why)
      assert.is_nil(m:get_status("production").maintenance)
      assert.same({ v1 = 20 }, (h:sample(20)))
    end)
  end)

  describe("behind several load balancers", function()
    it("every one answers 503; one that fails puts all back and names it", function()
      local a, b = haproxy(), fixtures.haproxy{ routes = {} }
      local function r(h) return { kind = "haproxy", socket = h.socket, backend = h.backend, map = h.map } end
      local target = fixtures.target_config{ instances = 2 }
      target.router = nil
      target.routers = { r(a), r(b) }
      local cfg = fixtures.config{ targets = { production = target } }
      cfg.clock = "real"
      local m = deploy.DeploymentManager{ config = cfg }
      assert.is_true(m:deploy("production", "v1").success)
      assert.is_true(m:maintenance("production", true, "both"))
      assert_page(a:url("/"), "both")
      assert_page(b:url("/"), "both")
      assert.is_true(m:maintenance("production", false))
      assert(os.rename(b.socket, b.socket .. ".off"))
      local ok, why = m:maintenance("production", true, "half")
      assert(os.rename(b.socket .. ".off", b.socket))
      assert.is_false(ok)
      assert.matches("not turned on: haproxy " .. lit(b.socket) .. " %(backend app%): haproxy: cannot connect", why)
      assert.same({ v1 = 20 }, (a:sample(20)))   -- a was put back
      assert.same({ v1 = 20 }, (b:sample(20)))
      assert.is_nil(m:get_status("production").maintenance)
    end)
  end)
end)
