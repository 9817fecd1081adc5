-- The nginx router through a real nginx (Debian's, as root, its own prefix
-- in a temp dir), real demo-app processes, real HTTP on 127.0.0.1, real wrk.
-- One nginx serves the whole file: each spec gets a site of its own (an
-- upstream include the router owns, and a frontend port).
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local shared
local function nginx()
  shared = shared or fixtures.nginx{}
  return shared
end

local function manager(site, opts)
  opts = opts or {}
  local target, dir = fixtures.target_config{ nginx = site, instances = opts.instances or 2,
                                              health = opts.health }
  for k, v in pairs(opts.router or {}) do target.router[k] = v end
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  -- Blue stops right after the switch unless a spec says otherwise.
  return deploy.DeploymentManager{ config = cfg,
                                   strategy = opts.strategy or deploy.BlueGreenStrategy{ scale_down_delay = 0 } }, dir
end

local function setup(opts)
  local site = nginx():site()
  local m, dir = manager(site, opts)
  return m, site, dir
end

local function kinds(m, id)
  local out = {}
  for _, ev in ipairs(m:events(id)) do out[#out + 1] = ev.kind end
  return out
end

local function generation(site)
  return tonumber(site:include_text():match("generation (%d+)%."))
end

local function sorted_weights(site)
  local w = {}
  for _, v in pairs(site:weights()) do w[#w + 1] = v end
  table.sort(w)
  return w
end

-- An on_event handler that counts, at every traffic step, which version
-- answers 200 requests, into steps[i] = { pct, counts, failed, weights }.
-- Under load they are counted with wrk paused (load:pause): each nginx
-- worker has one round-robin position per upstream, which wrk's requests
-- move too, so 200 requests taken among wrk's would be a random sample of
-- the split (a standard deviation of 3.5 points at 60 %), not the split.
-- after(ev), if given, runs after the count.
local function count_each_step(site, load, steps, after)
  return function(ev)
    if ev.kind ~= "traffic" then return end
    load:pause()
    local counts, failed = site:sample(200)
    load:resume()
    steps[#steps + 1] = { pct = ev.data.pct, counts = counts, failed = failed, weights = sorted_weights(site) }
    if after then after(ev) end
  end
end

-- Step i was at i * 10 %, and v2's share of its 200 requests is within 5
-- points of that, none failed.
local function assert_steps(steps)
  for i, s in ipairs(steps) do
    assert.equal(i * 10, s.pct)
    assert.equal(0, s.failed, "step " .. i)
    local share = (s.counts.v2 or 0) / 200 * 100
    assert.is_true(math.abs(share - s.pct) <= 5,
      string.format("step %d: %g %% of requests went to v2, the weights say %g %%", i, share, s.pct))
  end
end

local function errors(r) return table.concat(r.errors or {}, "\n") end

-- A Lua pattern that matches s literally.
local function lit(s) return (s:gsub("%p", "%%%0")) end

describe("the nginx router", function()
  after_each(function()
    fixtures.cleanup{ keep = { shared } }
    -- Managers of finished specs go now: one collected while a later
    -- spec's rollout runs keeps its store and config for good
    -- (manager_gc and config_gc skip the free then, and never retry).
    collectgarbage()
  end)
  teardown(function()
    fixtures.cleanup()
    shared = nil
  end)

  describe("blue-green", function()
    it("puts v1 on an empty upstream, then switches to v2 in one reload and stops blue", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      assert.same({ v1 = 40 }, (site:sample(40)))
      local blue = {}
      for _, i in ipairs(m:instances("production")) do blue[#blue + 1] = i.pid end
      local at_switch, gen_before = nil, generation(site)
      local r = m:deploy("production", "v2", { on_event = function(ev)
        if ev.kind == "traffic" then
          at_switch = { weights = sorted_weights(site), counts = (site:sample(200)) }
        end
      end })
      assert.is_true(r.success, errors(r))
      -- one reload moved everything: blue written `down` (weight 0), green at 1
      assert.same({ 0, 0, 1, 1 }, at_switch.weights)
      assert.same({ v2 = 200 }, at_switch.counts)
      -- then promotion left blue out of the upstream: two reloads in all
      assert.equal(gen_before + 2, generation(site))
      assert.same({ 1, 1 }, sorted_weights(site))
      for _, pid in ipairs(blue) do assert.is_false(fixtures.alive(pid)) end
      -- status reads the weights back from the include
      local live, router_err = m:live_instances("production")
      assert.is_nil(router_err)
      for _, i in ipairs(live) do assert.equal(1, i.router_weight) end
      assert.same({ "started", "instance_started", "instance_started", "healthy", "traffic", "verified",
                    "promoted", "instance_stopped", "instance_stopped", "finished" },
                  kinds(m, m:history("production", 1)[1].id))
    end)

    it("serves every request across three switches under load when clients close their connections", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local gen0 = generation(site)
      local load = fixtures.load(8, site:url("/"), 30, { headers = { "Connection: close" } })
      local shares = {}
      local function watch(ev)
        if ev.kind == "traffic" then shares[#shares + 1] = (site:sample(200)) end
      end
      local r2 = m:deploy("production", "v2", { on_event = watch })
      local r3 = m:deploy("production", "v3", { on_event = watch })
      local r4 = m:rollback("production", "v2")
      local res = load:finish()
      assert.is_true(r2.success and r3.success and r4.success, errors(r2) .. errors(r3) .. errors(r4))
      assert.same({ { v2 = 200 }, { v3 = 200 } }, { shares[1], shares[2] })
      assert.equal(6, generation(site) - gen0)  -- a switch and a promotion each
      assert.is_true(res.requests > 1000, "too few requests to mean anything: " .. res.requests)
      assert.equal(0, res.non2xx, res.output)
      assert.equal(0, res.socket_errors, res.output)
      assert.same({ v2 = 40 }, (site:sample(40)))
    end)

    -- nginx's old workers close idle keep-alive connections when a reload
    -- stops them; a request the client sent on one at that instant is
    -- reset (README, "nginx"). What nginx guarantees: no error answer, and
    -- each reload resets at most one request per idle connection it closes.
    it("keep-alive clients: no error answer, and a reload resets at most one request per connection", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local gen0 = generation(site)
      local conns = 8
      local load = fixtures.load(conns, site:url("/"), 30)
      local r2 = m:deploy("production", "v2")
      local r3 = m:deploy("production", "v3")
      local r4 = m:rollback("production", "v2")
      local res = load:finish()
      assert.is_true(r2.success and r3.success and r4.success)
      local reloads = generation(site) - gen0
      assert.equal(6, reloads)
      assert.is_true(res.requests > 1000, res.output)
      assert.equal(0, res.non2xx, res.output)
      assert.equal(0, res.connect_errors, res.output)
      assert.equal(0, res.timeouts, res.output)
      local resets = res.read_errors + res.write_errors
      assert.is_true(resets <= conns * reloads,
        string.format("%d resets over %d reloads of %d connections:\n%s", resets, reloads, conns, res.output))
      print(string.format("\n  nginx keep-alive: %d requests, %d reset over %d reloads (%d connections)",
                          res.requests, resets, reloads, conns))
    end)

    it("with keepalive_timeout 0 in nginx, keep-alive clients see no failed request either", function()
      local n = nginx()
      n.http = { "keepalive_timeout 0;" }
      n:reload()
      finally(function()
        n.http = {}
        n:reload()
      end)
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(8, site:url("/"), 30)
      local r2 = m:deploy("production", "v2")
      local r3 = m:deploy("production", "v3")
      local res = load:finish()
      assert.is_true(r2.success and r3.success)
      assert.is_true(res.requests > 1000, res.output)
      assert.equal(0, res.non2xx, res.output)
      assert.equal(0, res.socket_errors, res.output)
    end)
  end)

  describe("canary", function()
    it("splits traffic exactly at every step from 10 to 100 % under load, with 0 failed requests", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(8, site:url("/"), 30, { headers = { "Connection: close" } })
      local seen = {}
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.1 },
        on_event = count_each_step(site, load, seen) })
      local res = load:finish()
      assert.is_true(r.success, errors(r))
      assert.equal(10, #seen)
      assert_steps(seen)
      -- the weights in the file are router_split_weights' integers as they are
      assert.same({ 3, 3, 7, 7 }, seen[3].weights)
      assert.same({ 0, 0, 1, 1 }, seen[10].weights)
      assert.same({ v2 = 50 }, (site:sample(50)))
      assert.is_true(res.requests > 1000, res.output)
      assert.equal(0, res.non2xx, res.output)
      assert.equal(0, res.socket_errors, res.output)
    end)

    it("rolls back under load when the new version turns unhealthy at 30 %, 0 failed requests", function()
      local m, site, dir = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(8, site:url("/"), 30, { headers = { "Connection: close" } })
      local seen = {}
      local r = m:deploy("production", "v2", {
        strategy = deploy.CanaryStrategy{ initial_percentage = 10, increment = 10, interval = 0.3 },
        on_event = count_each_step(site, load, seen, function(ev)
          if ev.data.pct == 30 then fixtures.set_unhealthy(dir, "v2") end
        end) })
      local res = load:finish()
      assert.equal(3, #seen)
      assert_steps(seen)
      assert.is_false(r.success)
      assert.matches("^canary aborted at 30 %%: unhealthy after 3 consecutive failed checks", r.errors[1])
      assert.same({ v1 = 200 }, (site:sample(200)))
      assert.same({ 1, 1 }, sorted_weights(site))
      assert.equal(0, #fixtures.instances_of(dir, "v2"))
      assert.equal(0, res.non2xx, res.output)
      assert.equal(0, res.socket_errors, res.output)
    end)
  end)

  describe("a configuration nginx refuses", function()
    local function workers_of(n)
      local w = n:workers()
      table.sort(w)
      return w
    end

    it("fails the step cleanly: nothing applied, the include unchanged, nginx still on the old version", function()
      local m, site, dir = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local n = site.nginx
      local conf = fixtures.read_file(n.conf)
      local include = site:include_text()
      local workers = workers_of(n)
      fixtures.write_file(n.conf, conf .. "this is not nginx\n")
      finally(function() fixtures.write_file(n.conf, conf) end)
      local at_abort
      local r = m:deploy("production", "v2", { on_event = function(ev)
        if ev.kind == "aborted" then
          at_abort = { include = site:include_text(), workers = workers_of(n), counts = (site:sample(40)) }
          fixtures.write_file(n.conf, conf)   -- repaired: the rollback's own reload works
        end
      end })
      assert.is_false(r.success)
      assert.matches("cannot set traffic to 100 %%: nginx: the configuration was refused, nothing applied %(" ..
                     lit(site.include) .. " restored, nginx not signalled%): %[emerg%] " ..
                     "unexpected end of file, expecting \";\" or \"}\" in " .. lit(n.conf) .. ":%d+",
                     r.errors[1])
      assert.equal(include, at_abort.include)   -- byte for byte
      assert.same(workers, at_abort.workers)    -- never signalled
      assert.same({ v1 = 40 }, at_abort.counts)
      assert.equal(1, #r.errors)                -- the rollback went through
      assert.same({ 1, 1 }, sorted_weights(site))
      assert.same({ v1 = 40 }, (site:sample(40)))
      assert.equal(0, #fixtures.instances_of(dir, "v2"))
      assert.equal("v1", m:get_status("production").current_version)
    end)

    it("a broken file of another site is named in the error", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local include = site:include_text()
      local bad = site.nginx.dir .. "/sites/zz-broken.conf"
      fixtures.write_file(bad, "server { listen 127.0.0.1:1; proxy_pass; }\n")
      finally(function() os.remove(bad) end)
      local at_abort
      local r = m:deploy("production", "v2", { on_event = function(ev)
        if ev.kind == "aborted" then
          at_abort = site:include_text()
          os.remove(bad)
        end
      end })
      assert.is_false(r.success)
      assert.matches("%[emerg%] \"proxy_pass\" directive is not allowed here in " ..
                     lit(bad) .. ":1", r.errors[1])
      assert.equal(include, at_abort)
      assert.same({ v1 = 40 }, (site:sample(40)))
    end)

    it("a reload the master refuses although nginx -t passed is caught by the generation check", function()
      local m, site = setup({ router = { timeout = 0.5 } })
      assert.is_true(m:deploy("production", "v1").success)
      local include, gen = site:include_text(), generation(site)
      -- nginx -t does not bind, so a listen address already in use passes
      -- the test and fails only in the master at reload.
      local busy = fixtures.start_demo{ version = "squatter" }
      local clash = site.nginx.dir .. "/sites/zz-clash.conf"
      fixtures.write_file(clash, "server { listen 127.0.0.1:" .. busy.port .. "; return 204; }\n")
      finally(function() os.remove(clash) end)
      local at_abort
      local r = m:deploy("production", "v2", { on_event = function(ev)
        if ev.kind == "aborted" then
          at_abort = site:include_text()
          os.remove(clash)
        end
      end })
      assert.is_false(r.success)
      assert.matches("nginx: the reload did not take within 0%.5 s %(.-answered generation '" ..
                     gen .. "'%): nginx %-t passed, so its master refused the file", r.errors[1])
      assert.equal(include, at_abort)
      assert.same({ v1 = 40 }, (site:sample(40)))
      assert.matches("bind%(%) to 127%.0%.0%.1:" .. busy.port .. " failed", fixtures.read_file(site.nginx.log))
    end)
  end)

  describe("the include file", function()
    it("an empty server list leaves a placeholder that serves none of ours", function()
      local m, site = setup({ health = { failure_threshold = 1, start_timeout = 1 } })
      -- A first deployment that never turns healthy ends with traffic
      -- returned to the (empty) old set: the router writes no server.
      local r = m:deploy("production", "v1-bad")
      assert.is_false(r.success)
      local text = site:include_text()
      assert.matches("\n    server 127%.0%.0%.1:1 down;  # %(none%)\n", text)
      assert.same({}, site:weights())
      local ok, out = site.nginx:test()
      assert.is_true(ok, out)
      assert.equal(502, (site:get("/")))
      local live, router_err = m:live_instances("production")
      assert.same({}, live)
      assert.is_nil(router_err)
    end)

    it("status reads the servers from the include; a hand edit is an error naming the file and line", function()
      local m, site = setup()
      assert.is_true(m:deploy("production", "v1").success)
      local live, router_err = m:live_instances("production")
      assert.is_nil(router_err)
      assert.equal(2, #live)
      local text = site:include_text()
      fixtures.write_file(site.include, text:gsub("weight=1;", "weight=1 max_fails=3;", 1))
      live, router_err = m:live_instances("production")
      assert.equal(2, #live)
      assert.is_false(live[1].router_weight)
      assert.matches("nginx: " .. lit(site.include) .. " is not as the router wrote it %(line 4: " ..
                     "'    server 127%.0%.0%.1:%d+ weight=1 max_fails=3;  # dc_%d+'%)", router_err)
      -- a port no router writes (found by fuzz/nginx.c: it was read as -20001)
      fixtures.write_file(site.include, (text:gsub(":(%d+) weight=1;", ":-%1 weight=1;", 1)))
      live, router_err = m:live_instances("production")
      assert.matches("is not as the router wrote it %(line 4: '    server 127%.0%.0%.1:%-%d+ weight=1;", router_err)
      for _, i in ipairs(live) do assert.is_true(i.port > 0) end
      -- the router owns the file: the next deployment rewrites it
      assert.is_true(m:deploy("production", "v2").success)
      assert.same({ 1, 1 }, sorted_weights(site))
    end)

    it("two targets behind one nginx roll out side by side, each in its own include", function()
      local a, b = nginx():site(), nginx():site()
      local cfg = fixtures.config{ targets = { eu = fixtures.target_config{ nginx = a },
                                               us = fixtures.target_config{ nginx = b } } }
      cfg.clock = "real"
      local m = deploy.DeploymentManager{ config = cfg, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
      assert.is_true(m:deploy("eu", "v1").success)
      assert.is_true(m:deploy("us", "v1").success)
      local results = deploy.parallel{
        function() return m:deploy("eu", "v2") end,
        function() return m:deploy("us", "v3") end,
      }
      assert.is_true(results[1].success, errors(results[1]))
      assert.is_true(results[2].success, errors(results[2]))
      assert.same({ v2 = 40 }, (a:sample(40)))
      assert.same({ v3 = 40 }, (b:sample(40)))
    end)
  end)

  describe("configuration", function()
    -- Refused when the config is read: no nginx is needed for that.
    local function config_error(mut)
      local target = fixtures.target_config{}
      target.router = { kind = "nginx", include = "/etc/nginx/deployctl/app.conf", upstream = "app",
                        conf = "/etc/nginx/nginx.conf", pid = "/run/nginx.pid" }
      mut(target.router)
      local ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = target } } })
      assert.is_false(ok)
      return err
    end

    it("refuses bad router fields with the field and the fix", function()
      assert.matches("config targets%.production%.router%.include is missing: add it",
                     config_error(function(r) r.include = nil end))
      assert.matches("config targets%.production%.router has an unknown field 'socket' %(known: kind, include, " ..
                     "upstream, conf, pid, nginx, timeout, drain_timeout%)",
                     config_error(function(r) r.socket = "/run/haproxy.sock" end))
      assert.matches("config targets%.production%.router%.upstream must be a string, got number",
                     config_error(function(r) r.upstream = 42 end))
      assert.matches("router upstream is empty: name the upstream that proxy_pass uses", config_error(function(r) r.upstream = "" end))
      assert.matches("nginx: upstream name 'my app' is not valid",
                     config_error(function(r) r.upstream = "my app" end))
      assert.matches("nginx: router%.conf 'nginx%.conf' must be an absolute path",
                     config_error(function(r) r.conf = "nginx.conf" end))
      assert.matches("router kind 'ngnix' is not known %(known: haproxy, nginx, none, test%)",
                     config_error(function(r) r.kind = "ngnix" end))
      assert.matches("router%.timeout must be between 0%.01 and 600",
                     config_error(function(r) r.timeout = 0 end))
    end)

    -- The router's error when it is first used: reconcile applies the
    -- (empty) live set, so nothing starts. The include must be unchanged.
    local function router_error(mut)
      local site = nginx():site()
      local target = fixtures.target_config{ nginx = site }
      mut(target.router, site)
      local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
      local before = fixtures.read_file(target.router.include)
      local ok, err = m:reconcile("production")
      assert.is_false(ok)
      assert.equal(before, fixtures.read_file(target.router.include))
      return err
    end

    it("a deployment whose router cannot work fails cleanly and leaves nothing running", function()
      local site = nginx():site()
      local target, dir = fixtures.target_config{ nginx = site }
      target.router.pid = site.nginx.dir .. "/nope.pid"
      local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
      local include = site:include_text()
      local r = m:deploy("production", "v1")
      assert.is_false(r.success)
      assert.matches("cannot set traffic to 100 %%: nginx: cannot read the pid file .-/nope%.pid: no such file",
                     r.errors[1])
      assert.equal(include, site:include_text())
      assert.equal(0, #fixtures.instances_of(dir, "v1"))
      assert.is_nil(m:get_status("production").current_version)
    end)

    it("a pid file that is missing, empty, garbage or not nginx's fails the deployment with the fix", function()
      local dir = fixtures.tmpdir("pid")
      assert.matches("cannot restore the router of 'production': nginx: cannot read the pid file " .. lit(dir) ..
                     "/nope%.pid: no such file %(is nginx running%? " ..
                     "router%.pid must be the 'pid' file of .-/nginx%.conf%)",
                     router_error(function(r) r.pid = dir .. "/nope.pid" end))
      fixtures.write_file(dir .. "/empty.pid", "")
      assert.matches("the pid file .-/empty%.pid is empty: nginx is not running",
                     router_error(function(r) r.pid = dir .. "/empty.pid" end))
      fixtures.write_file(dir .. "/garbage.pid", "twelve\n")
      assert.matches("the pid file .-/garbage%.pid holds 'twelve%?', not a process id",
                     router_error(function(r) r.pid = dir .. "/garbage.pid" end))
      local other = fixtures.start_demo{ version = "notnginx" }
      fixtures.write_file(dir .. "/other.pid", other.pid .. "\n")
      assert.matches("process " .. other.pid .. ", the pid in .-/other%.pid, is not an nginx master",
                     router_error(function(r) r.pid = dir .. "/other.pid" end))
      assert.is_true(fixtures.alive(other.pid))  -- and it got no SIGHUP
    end)

    it("an include that nginx.conf does not include, or a missing nginx binary, fails with the fix", function()
      assert.matches("nginx: .-/nginx%.conf does not include .-/elsewhere%.conf %(nginx %-T lists every file it " ..
                     "reads%): add 'include .-/elsewhere%.conf;' inside its http block",
                     router_error(function(r, site)
                       r.include = site.nginx.dir .. "/elsewhere.conf"
                       fixtures.write_file(r.include, "")
                     end))
      assert.matches("nginx: cannot run /nonexistent/nginx: no such file or directory %(set router%.nginx",
                     router_error(function(r) r.nginx = "/nonexistent/nginx" end))
    end)
  end)
end)
