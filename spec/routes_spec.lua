-- Routing beyond weights, through a real HAProxy (README's lines in its
-- backend, a map deployctl owns) and a real nginx (sites that proxy to
-- $deployctl_<upstream>): sticky canaries (session_affinity) and routes for
-- testers (test_route). Real demo-app instances, curl as the clients. One
-- HAProxy and one nginx serve the whole file.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local git = require "spec.support.git"
local cli = require "spec.support.cli"

local shared_haproxy, shared_nginx

local function haproxy()
  shared_haproxy = shared_haproxy or fixtures.haproxy{ routes = { cookie = "DC_CANARY", header = "X-Canary" } }
  return shared_haproxy
end

local function nginx()
  shared_nginx = shared_nginx or fixtures.nginx{}
  return shared_nginx
end

-- What after_each leaves running for the next spec.
local function kept()
  local k = {}
  if shared_haproxy then k[#k + 1] = shared_haproxy end
  if shared_nginx then k[#k + 1] = shared_nginx end
  return k
end

local function manager_for(target)
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  return deploy.DeploymentManager{ config = cfg }
end

-- A manager for a target behind the shared HAProxy, on v1.
local function on_haproxy(h)
  h = h or haproxy()
  local target, dir = fixtures.target_config{ haproxy = h }
  target.router.map = h.map
  local m = manager_for(target)
  local r = m:deploy("production", "v1")
  assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
  return m, h, dir
end

-- The same behind a new site of the shared nginx.
local function on_nginx()
  local site = nginx():site(nil, { routes = true })
  local target, dir = fixtures.target_config{ nginx = site }
  local m = manager_for(target)
  assert.is_true(m:deploy("production", "v1").success)
  return m, site, dir
end

local function errors(r) return table.concat(r.errors or {}, "\n") end

local function count(list)
  local c = {}
  for _, v in ipairs(list) do c[v] = (c[v] or 0) + 1 end
  return c
end

local function kinds(m, id)
  local out = {}
  for _, ev in ipairs(m:events(id)) do out[#out + 1] = ev.kind end
  return out
end

local function index_of(list, value)
  for i, v in ipairs(list) do if v == value then return i end end
end

-- A client that keeps its cookies (a browser): curl with a jar.
local function browser()
  local jar = fixtures.tmpdir("jar") .. "/cookies"
  return { "-b", jar, "-c", jar }, jar
end

-- The lines of a curl cookie jar: name -> { value, expires }.
local function jar_cookies(jar)
  local c = {}
  for line in (fixtures.read_file(jar) or ""):gmatch("[^\n]+") do
    line = line:gsub("^#HttpOnly_", "")
    local expires, name, value = line:match("^[^#]%S*\t%S+\t%S+\t%S+\t(%d+)\t(%S+)\t(%S*)$")
    if name then c[name] = { value = value, expires = tonumber(expires) } end
  end
  return c
end

-- Sticky canaries, the same story through either balancer: at 20 % a
-- browser reaches v2 at its first v2 answer and stays there (100 requests
-- at 20 % and 100 at 50 %), while clients without the cookie keep
-- following the weights; promotion moves everyone.
local function sticky_rollout(m, url)
  local args, jar = browser()
  local seen = {}
  local r = m:deploy("production", "v2", {
    strategy = deploy.CanaryStrategy{ initial_percentage = 20, increment = 30, interval = 0.2,
                                      session_affinity = { cookie = "DC_CANARY", max_age = 600 } },
    on_event = function(ev)
      if ev.kind ~= "traffic" then return end
      if ev.data.pct == 20 then
        seen.first = fixtures.sequence(url, 100, args)
        seen.plain = count(fixtures.sequence(url, 100))
      elseif ev.data.pct == 50 then
        seen.later = count(fixtures.sequence(url, 100, args))
        seen.plain_later = count(fixtures.sequence(url, 100))
      end
    end })
  return r, seen, args, jar
end

local function assert_sticky(r, seen, jar)
  assert.is_true(r.success, errors(r))
  local first = index_of(seen.first, "v2")
  assert.is_not_nil(first, "the browser never reached v2: " .. table.concat(seen.first, " "))
  for i = first, 100 do assert.equal("v2", seen.first[i], "request " .. i .. " after the first v2") end
  for i = 1, first - 1 do assert.equal("v1", seen.first[i]) end
  assert.same({ v2 = 100 }, seen.later)
  -- clients without the cookie follow the weights (within 5 of 100)
  assert.is_true(math.abs((seen.plain.v2 or 0) - 20) <= 5, "at 20 %: " .. (seen.plain.v2 or 0))
  assert.is_true(math.abs((seen.plain_later.v2 or 0) - 50) <= 5, "at 50 %: " .. (seen.plain_later.v2 or 0))
  local cookie = jar_cookies(jar).DC_CANARY
  assert.is_not_nil(cookie, fixtures.read_file(jar))
  assert.is_true(cookie.expires > os.time() + 500 and cookie.expires <= os.time() + 601,
    "Max-Age=600 gives an expiry 600 s from now, got " .. (cookie.expires - os.time()))
end

describe("sticky canaries (session_affinity)", function()
  after_each(function()
    fixtures.cleanup{ keep = kept() }
    collectgarbage()
  end)
  teardown(function()
    fixtures.cleanup()
    shared_haproxy, shared_nginx = nil, nil
  end)

  describe("through HAProxy", function()
    it("a client that reached v2 stays on v2 across 100 requests while the others follow the weights", function()
      local m, h = on_haproxy()
      local r, seen, args, jar = sticky_rollout(m, h:url("/"))
      assert_sticky(r, seen, jar)
      -- at promotion everyone moves: the map holds no sticky cookie any more
      assert.same({ v2 = 100 }, (h:sample(100, nil, args)))
      assert.same({ v2 = 100 }, (h:sample(100)))
      assert.equal("", (h:cmd("show map " .. h.map):gsub("%s", "")))
    end)

    it("at abort everyone goes back, the sticky clients too", function()
      local m, h, dir = on_haproxy()
      local args = browser()
      local pinned
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 25, interval = 0.3,
                                          session_affinity = { cookie = "DC_CANARY" } },
        on_event = function(ev)
          if ev.kind == "traffic" and ev.data.pct == 50 then
            local seq = fixtures.sequence(h:url("/"), 30, args)
            pinned = seq[#seq]
            fixtures.set_unhealthy(dir, "v2")
          end
        end })
      assert.is_false(r.success)
      assert.equal("v2", pinned)
      assert.same({ v1 = 100 }, (h:sample(100, nil, args)))
      assert.equal("", (h:cmd("show map " .. h.map):gsub("%s", "")))
    end)

    it("a cookie of another rollout or of an old server pins nobody", function()
      local m, h = on_haproxy()
      local stale = {}
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.2,
                                          session_affinity = { cookie = "DC_CANARY" } },
        on_event = function(ev)
          if ev.kind == "traffic" and ev.data.pct == 50 then
            stale = count(fixtures.sequence(h:url("/"), 40, { "-H", "Cookie: DC_CANARY=0123456789abcdef" }))
          end
        end })
      assert.is_true(r.success, errors(r))
      assert.is_true(math.abs((stale.v2 or 0) - 20) <= 2, "a stale cookie followed the weights: " .. (stale.v2 or 0))
    end)

    it("a backend whose cookie is not the strategy's fails the step with both names", function()
      local m = on_haproxy()
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0,
                                          session_affinity = { cookie = "OTHER" } } })
      assert.is_false(r.success)
      assert.matches("haproxy: backend app persists with cookie 'DC_CANARY', the strategy's " ..
                     "session_affinity%.cookie is 'OTHER': make them the same", errors(r))
      assert.same({ v1 = 20 }, (haproxy():sample(20)))
    end)
  end)

  describe("through nginx", function()
    it("a client that reached v2 stays on v2 across 100 requests while the others follow the weights", function()
      local m, site = on_nginx()
      local r, seen, args, jar = sticky_rollout(m, site:url("/"))
      assert_sticky(r, seen, jar)
      assert.same({ v2 = 100 }, (site:sample(100, nil, args)))
      -- the sticky maps are gone from the include with the rollout
      assert.is_nil(site:include_text():find("__deployctl_new", 1, true))
    end)

    it("at abort everyone goes back, the sticky clients too", function()
      local m, site, dir = on_nginx()
      local args = browser()
      local pinned
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 25, interval = 0.3,
                                          session_affinity = { cookie = "DC_CANARY", max_age = 60 } },
        on_event = function(ev)
          if ev.kind == "traffic" and ev.data.pct == 50 then
            local seq = fixtures.sequence(site:url("/"), 30, args)
            pinned = seq[#seq]
            fixtures.set_unhealthy(dir, "v2")
          end
        end })
      assert.is_false(r.success)
      assert.equal("v2", pinned)
      assert.same({ v1 = 100 }, (site:sample(100, nil, args)))
    end)
  end)
end)

describe("routes for testers (test_route)", function()
  after_each(function()
    fixtures.cleanup{ keep = kept() }
    collectgarbage()
  end)
  teardown(function()
    fixtures.cleanup()
    shared_haproxy, shared_nginx = nil, nil
  end)

  -- Samples, in the before_step hook of the first step (the share still
  -- 0), requests with the tester's header or cookie and without.
  local function first_step_samples(m, url, strategy, tester_args)
    local seen = {}
    local r = m:deploy("production", "v2", { strategy = strategy, hooks = {
      before_step = function(d)
        if seen.tester then return true end
        seen.tester = count(fixtures.sequence(url, 20, tester_args))
        seen.others = count(fixtures.sequence(url, 20))
        seen.wrong = count(fixtures.sequence(url, 20, { "-H", "X-Canary: never", "-b", "canary=never" }))
        return true
      end } })
    return r, seen
  end

  it("HAProxy: a request with X-Canary: always reaches v2 while the share is still 0", function()
    local m, h = on_haproxy()
    local r, seen = first_step_samples(m, h:url("/"),
      deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0, test_route = { header = "X-Canary" } },
      { "-H", "X-Canary: always" })
    assert.is_true(r.success, errors(r))
    assert.same({ v2 = 20 }, seen.tester)
    assert.same({ v1 = 20 }, seen.others)
    assert.same({ v1 = 20 }, seen.wrong)
    local k = kinds(m, m:history("production", 1)[1].id)
    assert.is_true(index_of(k, "test_route") < index_of(k, "traffic"), table.concat(k, " "))
    -- after the rollout the testers' server is back in maintenance, the map empty
    for _, s in ipairs(h:servers()) do
      if s.name == "deployctl-test" then assert.equal(1, s.admin_state & 1) end
    end
    assert.equal("", (h:cmd("show map " .. h.map):gsub("%s", "")))
  end)

  it("HAProxy: by cookie, with the value haproxy.cfg's line reads from the map", function()
    local h = fixtures.haproxy{ routes = { cookie = "DC_CANARY", test_cookie = "canary" } }
    local m = on_haproxy(h)
    local r, seen = first_step_samples(m, h:url("/"),
      deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0,
                             test_route = { cookie = "canary", value = "yes" } },
      { "-b", "canary=yes" })
    assert.is_true(r.success, errors(r))
    assert.same({ v2 = 20 }, seen.tester)
    assert.same({ v1 = 20 }, seen.others)
  end)

  it("HAProxy without the testers' server fails the step with the line to add", function()
    local h = fixtures.haproxy{ routes = { cookie = "DC_CANARY" } }
    local m = on_haproxy(h)
    local r = m:deploy("production", "v2", {
      strategy = deploy.CanaryStrategy{ initial_percentage = 50, test_route = { header = "X-Canary" } } })
    assert.is_false(r.success)
    assert.matches("cannot route testers to v2: haproxy: backend app has no server 'deployctl%-test' for " ..
                   "testers' requests: add 'server deployctl%-test 127%.0%.0%.1:1 weight 0 disabled'", errors(r))
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("nginx: a request with the tester's cookie reaches v2 while the share is still 0", function()
    local m, site = on_nginx()
    local r, seen = first_step_samples(m, site:url("/"),
      deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0,
                             test_route = { cookie = "canary", value = "yes" } },
      { "-b", "canary=yes" })
    assert.is_true(r.success, errors(r))
    assert.same({ v2 = 20 }, seen.tester)
    assert.same({ v1 = 20 }, seen.others)
    assert.same({ v1 = 20 }, seen.wrong)
  end)

  it("nginx, blue-green: testers reach green during switch_delay, everyone else stays on blue", function()
    local m, site = on_nginx()
    local seen = {}
    local r = m:deploy("production", "v2", {
      strategy = deploy.BlueGreenStrategy{ switch_delay = 0.3, test_route = { header = "X-Canary" } },
      on_event = function(ev)
        if ev.kind == "test_route" then
          seen.tester = count(fixtures.sequence(site:url("/"), 20, { "-H", "X-Canary: always" }))
          seen.others = count(fixtures.sequence(site:url("/"), 20))
        end
      end })
    assert.is_true(r.success, errors(r))
    assert.same({ v2 = 20 }, seen.tester)
    assert.same({ v1 = 20 }, seen.others)
    assert.same({ v2 = 20 }, (site:sample(20)))
  end)
end)

describe("bad routes", function()
  after_each(function() fixtures.cleanup{ keep = kept() } end)
  teardown(function()
    fixtures.cleanup()
    shared_haproxy, shared_nginx = nil, nil
  end)

  local function canary_error(opts)
    local ok, err = pcall(deploy.CanaryStrategy, opts)
    assert.is_false(ok)
    return err
  end

  it("refuses bad session_affinity and test_route with the field and what is accepted", function()
    assert.matches("CanaryStrategy session_affinity must be a table such as { cookie = 'canary', max_age = 3600 }, " ..
                   "got string", canary_error{ session_affinity = "canary" })
    assert.matches("CanaryStrategy session_affinity needs a cookie name", canary_error{ session_affinity = {} })
    assert.matches("CanaryStrategy session_affinity has no field 'ttl' %(known: cookie, max_age%)",
                   canary_error{ session_affinity = { cookie = "c", ttl = 5 } })
    assert.matches("CanaryStrategy session_affinity%.cookie 'my%-cookie' is not valid: 1 to 63 letters, digits or '_'",
                   canary_error{ session_affinity = { cookie = "my-cookie" } })
    assert.matches("CanaryStrategy session_affinity%.cookie must be a string, got number",
                   canary_error{ session_affinity = { cookie = 5 } })
    for _, age in ipairs({ 0, 1.5, -3, 1e9 }) do
      assert.matches("CanaryStrategy session_affinity%.max_age must be a whole number of seconds from 1 to 31536000",
                     canary_error{ session_affinity = { cookie = "c", max_age = age } })
    end
    assert.matches("session_affinity%.max_age must be a number of seconds, got string",
                   canary_error{ session_affinity = { cookie = "c", max_age = "1h" } })
    assert.matches("CanaryStrategy test_route must be a table such as { header = 'X%-Canary', value = 'always' }",
                   canary_error{ test_route = true })
    assert.matches("CanaryStrategy test_route must name a header or a cookie %(one of them%)",
                   canary_error{ test_route = {} })
    assert.matches("CanaryStrategy test_route must name a header or a cookie %(one of them%)",
                   canary_error{ test_route = { header = "X-Canary", cookie = "canary" } })
    assert.matches("CanaryStrategy test_route%.header 'X_Canary' is not valid: 1 to 63 letters, digits or '%-'",
                   canary_error{ test_route = { header = "X_Canary" } })
    assert.matches("CanaryStrategy test_route%.value 'a b' is not valid",
                   canary_error{ test_route = { header = "X-Canary", value = "a b" } })
    assert.matches("test_route%.value 'maintenance' is a key deployctl keeps in HAProxy's map",
                   canary_error{ test_route = { header = "X-Canary", value = "maintenance" } })
    assert.matches("CanaryStrategy test_route has no field 'values' %(known: header, cookie, value%)",
                   canary_error{ test_route = { header = "X-Canary", values = "x" } })
    local ok, err = pcall(deploy.BlueGreenStrategy, { session_affinity = { cookie = "c" } })
    assert.is_false(ok)
    assert.matches("BlueGreenStrategy has no parameter 'session_affinity'", err)
    -- what was accepted reads back
    local c = deploy.CanaryStrategy{ session_affinity = { cookie = "sid" }, test_route = { cookie = "t" } }
    assert.same({ cookie = "sid", max_age = 86400 }, c.session_affinity)
    assert.same({ cookie = "t", value = "always" }, c.test_route)
  end)

  it("deployctl deploy --set table.field=value gives session_affinity and test_route; bad ones exit 2", function()
    local h = haproxy()
    local target = fixtures.target_config{ haproxy = h }
    target.router.map = h.map
    local cfg = fixtures.config{ targets = { production = target } }
    cfg.clock = "real"
    local config = cli.write_config(fixtures.tmpdir("cli-config"), cfg)
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v1", "--quiet" })
    assert.equal(0, code, out .. err)
    code, out, err = cli.run({ "--config", config, "deploy", "production", "v2", "--quiet", "--strategy", "canary",
                               "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0",
                               "--set", "session_affinity.cookie=DC_CANARY", "--set", "session_affinity.max_age=60",
                               "--set", "test_route.header=X-Canary" })
    assert.equal(0, code, out .. err)
    local m = deploy.DeploymentManager{ config = config }
    local d = m:history("production", 1)[1]
    assert.equal("v2", d.version)
    assert.is_truthy(index_of(kinds(m, d.id), "test_route"))
    assert.same({ v2 = 20 }, (h:sample(20)))
    local function bad(...)
      local c, o, e = cli.run({ "--config", config, "deploy", "production", "v3", "--strategy", "canary", ... })
      assert.equal(2, c, o .. e)
      return e
    end
    assert.matches("test_route has no field 'values' %(known: header, cookie, value%)",
                   bad("--set", "test_route.values=x"))
    assert.matches("session_affinity%.cookie 'my%-cookie' is not valid", bad("--set", "session_affinity.cookie=my-cookie"))
    assert.matches("session_affinity%.max_age must be a number of seconds, got string",
                   bad("--set", "session_affinity.cookie=c", "--set", "session_affinity.max_age=1h"))
    assert.matches("%-%-set test_route=x: test_route takes fields, e%.g%. %-%-set test_route%.NAME=VALUE",
                   bad("--set", "test_route.header=X-Canary", "--set", "test_route=x"))
    assert.matches("%-%-set test_route%.header: test_route is given a value of its own too",
                   bad("--set", "test_route=x", "--set", "test_route.header=X-Canary"))
    assert.matches("%-%-set 'test_route%.a%.b=1' is not key=value or table%.field=value", bad("--set", "test_route.a.b=1"))
    assert.equal("v2", m:get_status("production").current_version)
  end)

  it("a router that cannot route is refused before anything starts, with the fix", function()
    local target = fixtures.target_config{}
    local m = manager_for(target)
    local r = m:deploy("production", "v1", { strategy = deploy.CanaryStrategy{ session_affinity = { cookie = "c" } } })
    assert.is_false(r.success)
    assert.matches("router none cannot do sticky canaries %(session_affinity%): it needs an nginx router, or an " ..
                   "haproxy router with router%.map", errors(r))
    assert.same({}, m:history("production"))
    local h = haproxy()
    target = fixtures.target_config{ haproxy = h }  -- no map
    m = manager_for(target)
    r = m:deploy("production", "v1", { strategy = deploy.BlueGreenStrategy{ test_route = { header = "X-Canary" } } })
    assert.is_false(r.success)
    assert.matches("router haproxy .-admin%.sock %(backend app%) cannot do routes for testers %(test_route%)", errors(r))
    assert.same({}, m:history("production"))
  end)

  it("router.map: a bad name is refused by the config, a map HAProxy does not have fails the step naming it", function()
    local h = haproxy()
    local target = fixtures.target_config{ haproxy = h }
    target.router.map = "/etc/haproxy/my map"
    local ok, err = pcall(manager_for, target)
    assert.is_false(ok)
    assert.matches("haproxy: router%.map '/etc/haproxy/my map' is not a usable map file name", err)
    target.router.map = 42
    ok, err = pcall(manager_for, target)
    assert.matches("config targets%.production%.router%.map must be a string, got number", err)
    target.router.map = h.dir .. "/other.map"
    local m = manager_for(target)
    local r = m:deploy("production", "v1")
    assert.is_false(r.success)
    assert.matches("haproxy: the HAProxy behind .- has no map '" .. h.dir:gsub("%p", "%%%0") .. "/other%.map': " ..
                   "router%.map must name the map file", errors(r))
  end)

  it("a GitOps manifest's strategy takes session_affinity and test_route, checked field by field", function()
    local repo = git.repo()
    local daemon = git.daemon(repo.base)
    local m = manager_for(fixtures.target_config{ instances = 1 })
    repo:write("a.json", '{"target": "production", "version": "1.0.0", "strategy": {"kind": "canary", ' ..
                         '"session_affinity": {"cookie": "a b"}}}')
    repo:commit("bad cookie")
    local sync = deploy.GitOpsSynchronizer{ repo_url = daemon.url(repo.name), manager = m }
    local function first_error()
      local r = sync:sync()
      assert.is_false(r.success)
      return r.errors[1]
    end
    assert.matches("a%.json: field 'strategy': CanaryStrategy session_affinity%.cookie 'a b' is not valid", first_error())
    repo:write("a.json", '{"target": "production", "version": "1.0.0", "strategy": {"kind": "canary", ' ..
                         '"session_affinity": {"cookie": "sid", "max_age": "long"}}}')
    repo:commit("bad age")
    assert.matches("CanaryStrategy session_affinity%.max_age must be a number, got a string", first_error())
    repo:write("a.json", '{"target": "production", "version": "1.0.0", "strategy": {"kind": "blue-green", ' ..
                         '"test_route": {"header": "X-Canary", "colour": "red"}}}')
    repo:commit("unknown field")
    assert.matches("BlueGreenStrategy test_route has no field 'colour' %(known: header, cookie, value%)", first_error())
    repo:write("a.json", '{"target": "production", "version": "1.0.0", "strategy": {"kind": "blue-green", ' ..
                         '"test_route": ["X-Canary"]}}')
    repo:commit("a list")
    assert.matches("BlueGreenStrategy test_route must be an object such as", first_error())
    -- well formed: parsed, then refused by the target's router (none)
    repo:write("a.json", '{"target": "production", "version": "1.0.0", "strategy": {"kind": "canary", ' ..
                         '"session_affinity": {"cookie": "sid", "max_age": 60}, ' ..
                         '"test_route": {"cookie": "tester", "value": "yes"}}}')
    repo:commit("good")
    assert.matches("router none cannot do sticky canaries", first_error())
  end)
end)
