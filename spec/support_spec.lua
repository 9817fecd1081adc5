-- The fixtures themselves: if these fail, every other spec's failure is noise.
local fixtures = require "spec.support.fixtures"

describe("spec fixtures", function()
  after_each(function()
    fixtures.cleanup()
  end)

  it("hands out distinct free ports and ranges", function()
    local a, b = fixtures.free_port(), fixtures.free_port()
    assert.are_not.equal(a, b)
    local range, low, high = fixtures.port_range(5)
    assert.are.equal(low .. "-" .. high, range)
    assert.are.equal(4, high - low)
    assert.is_true(a < low or a > high)
  end)

  it("starts, finds and stops background processes", function()
    local dir = fixtures.tmpdir("proc")
    -- A duration no other process on the machine is likely to sleep for.
    local cmdline = "sleep 600." .. fixtures.free_port()
    local pid = fixtures.spawn("exec " .. cmdline, dir .. "/sleep.log")
    assert.is_true(fixtures.alive(pid))
    assert.are.same({ pid }, fixtures.pids_matching(cmdline))
    assert.is_true(fixtures.kill(pid, "TERM"))
    assert.is_true(fixtures.wait_exit(pid, 5))
    assert.is_false(fixtures.alive(pid))
    assert.are.same({}, fixtures.pids_matching(cmdline))
  end)

  it("wait_until names what it waited for", function()
    assert.has_error(function()
      fixtures.wait_until(function() return false end, 0.1, "godot")
    end, "timed out waiting for godot (0.1 s)")
  end)

  describe("demo app", function()
    it("answers with its version, health and 404", function()
      local dir = fixtures.tmpdir("demo")
      local app = fixtures.start_demo{ version = "1.4.2", dir = dir,
                                       unhealthy_file = dir .. "/unhealthy" }
      assert.are.same({ 200, "1.4.2\n" }, { fixtures.http_get(app.url .. "/") })
      assert.are.same({ 200, "1.4.2\n" }, { fixtures.http_get(app.url .. "/version") })
      assert.are.same({ 200, "ok\n" }, { fixtures.http_get(app.url .. "/healthz") })
      assert.are.equal(404, (fixtures.http_get(app.url .. "/nope")))
      fixtures.write_file(dir .. "/unhealthy", "")
      assert.are.equal(500, (fixtures.http_get(app.url .. "/healthz")))
      assert.are.equal(200, (fixtures.http_get(app.url .. "/")))
    end)

    it("fails every request when its version contains 'bad'", function()
      local app = fixtures.start_demo{ version = "2.0-bad" }
      assert.are.equal(500, (fixtures.http_get(app.url .. "/")))
      assert.are.equal(500, (fixtures.http_get(app.url .. "/healthz")))
    end)

    it("finishes an in-flight response on SIGTERM and exits 0", function()
      local dir = fixtures.tmpdir("drain")
      local app = fixtures.start_demo{ version = "slow", delay_ms = 400, dir = dir }
      local curl = fixtures.spawn("exec curl -s -o - -w ' %{http_code}' " .. app.url .. "/",
                                  dir .. "/curl.out")
      -- Readiness: the request has reached the app (its connection is open).
      fixtures.wait_until(function()
        local p = io.popen("ss -Htn state established '( sport = :" .. app.port .. " )'")
        local out = p:read("a")
        p:close()
        return out:match("%S")
      end, 2, "curl's connection to the app")
      fixtures.kill(app.pid, "TERM")
      assert.is_true(fixtures.wait_exit(curl, 5))
      assert.is_true(fixtures.wait_exit(app.pid, 5))
      assert.are.equal("slow\n 200", fixtures.read_file(dir .. "/curl.out"))
      assert.matches("demo%-app slow stopped", fixtures.read_file(app.log))
    end)

    it("serves keep-alive load without errors", function()
      local app = fixtures.start_demo{ version = "1.0.0" }
      local result = fixtures.load(16, app.url .. "/", 2):wait()
      assert.is_true(result.requests > 1000)
      assert.are.equal(0, result.non2xx)
      assert.are.equal(0, result.socket_errors)
    end)
  end)

  describe("haproxy", function()
    it("splits traffic exactly by runtime weights", function()
      local h = fixtures.haproxy{ backend = "app" }
      local dir = fixtures.tmpdir("apps")
      local ports = { fixtures.free_port(), fixtures.free_port() }
      local pids = {}
      for i, version in ipairs{ "v1", "v2" } do
        pids[i] = fixtures.spawn(string.format("exec %s --port %d --version %s",
          fixtures.demo_app(), ports[i], version), dir .. "/" .. version .. ".log")
        fixtures.wait_until(function()
          return fixtures.http_get("http://127.0.0.1:" .. ports[i] .. "/") == 200
        end, 5, "demo-app " .. version)
      end

      h:cmd_ok(string.format("add server app/dc_1 127.0.0.1:%d weight 9", ports[1]))
      h:cmd_ok(string.format("add server app/dc_2 127.0.0.1:%d weight 1", ports[2]))
      local servers = h:servers()
      assert.are.equal(2, #servers)
      assert.are.equal(1, servers[1].admin_state & 1) -- added servers start in maintenance
      h:cmd_ok("enable server app/dc_1")
      h:cmd_ok("enable server app/dc_2")

      servers = h:servers()
      assert.are.same({ name = "dc_1", addr = "127.0.0.1", port = ports[1], weight = 9,
                        iweight = 9, op_state = 2, admin_state = 0 }, servers[1])
      assert.are.same({ "dc_2", ports[2], 1 }, { servers[2].name, servers[2].port, servers[2].weight })

      local counts, failed = h:sample(200)
      assert.are.same({ v1 = 180, v2 = 20 }, counts)
      assert.are.equal(0, failed)

      h:cmd_ok("set server app/dc_1 weight 1")
      counts, failed = h:sample(100)
      assert.are.same({ v1 = 50, v2 = 50 }, counts)
      assert.are.equal(0, failed)
      local status, body = h:get("/version")
      assert.are.equal(200, status)
      assert.matches("^v[12]\n$", body)
    end)

    it("forgets runtime servers when restarted", function()
      local h = fixtures.haproxy{}
      local app = fixtures.start_demo{ version = "v1" }
      h:cmd_ok("add server app/dc_1 127.0.0.1:" .. app.port)
      h:cmd_ok("enable server app/dc_1")
      assert.are.equal(200, (h:get("/")))
      local old = h.pid
      h:restart()
      assert.are_not.equal(old, h.pid)
      assert.is_false(fixtures.alive(old))
      assert.are.same({}, h:servers())
      assert.are.equal(503, (h:get("/")))
      assert.matches("^Unknown command", h:cmd("no such command"))
    end)

    it("reports failures of requests it could not serve", function()
      local h = fixtures.haproxy{}
      local counts, failed = h:sample(5)
      assert.are.same({}, counts)
      assert.are.equal(5, failed)
    end)
  end)

  describe("nginx", function()
    it("serves a site whose include is in the router's empty form, weighs servers, and stops with its workers", function()
      local n = fixtures.nginx{}
      local site = n:site("web")
      assert.are.equal(502, (site:get("/")))   -- the placeholder is down
      assert.are.same({}, site:weights())
      local ok, out = n:test()
      assert.is_true(ok, out)
      local a, b = fixtures.start_demo{ version = "v1" }, fixtures.start_demo{ version = "v2" }
      local text = site:include_text():gsub("    server 127%.0%.0%.1:1 down;  # %(none%)\n",
        "    server 127.0.0.1:" .. a.port .. " weight=3;  # dc_1\n" ..
        "    server 127.0.0.1:" .. b.port .. " weight=1;  # dc_2\n")
      fixtures.write_file(site.include, text)
      n:reload()
      assert.are.same({ dc_1 = 3, dc_2 = 1 }, site:weights())
      assert.are.same({ v1 = 150, v2 = 50 }, (site:sample(200)))
      local workers = n:workers()
      assert.are.equal(2, #workers)
      -- kept by cleanup when asked, stopped (workers too) otherwise
      fixtures.cleanup{ keep = { n } }
      assert.is_true(fixtures.alive(n.pid))
      assert.are.equal(502, (site:get("/")))   -- its demo apps are gone
      local master = n.pid
      fixtures.cleanup()
      assert.is_false(fixtures.alive(master))
      for _, pid in ipairs(workers) do assert.is_false(fixtures.alive(pid)) end
    end)
  end)

  describe("config builders", function()
    it("build a target shaped like DESIGN.md's configuration", function()
      local h = fixtures.haproxy{ backend = "web" }
      local target, dir = fixtures.target_config{ haproxy = h, ports = "21000-21009",
                                                  health = { timeout = 2 } }
      assert.are.same({ kind = "haproxy", socket = h.socket, backend = "web" }, target.router)
      assert.are.equal(fixtures.demo_app() .. " --port {port} --version {version} --unhealthy-file "
                       .. dir .. "/unhealthy-{version}", target.provider.command)
      assert.are.same({ path = "/healthz", expect_status = 200, timeout = 2, interval = 0.05,
                        failure_threshold = 3 }, target.health)
      assert.are.equal(2, target.instances)
      assert.are.equal("21000-21009", target.provider.ports)
      assert.are.same({ kind = "none" }, (fixtures.target_config{}).router)

      local config = fixtures.config{ targets = { production = target } }
      assert.matches("^/tmp/deployctl%-state%-.*/state%.db$", config.state)
      assert.are.equal(target, config.targets.production)
    end)
  end)

  it("cleanup leaves no process and no directory behind", function()
    local h = fixtures.haproxy{}
    local target, dir = fixtures.target_config{}
    -- Stands for an instance the code under test started and leaked.
    local orphan = fixtures.start_demo{ version = "orphan", unhealthy_file = dir .. "/unhealthy-orphan" }
    local pid_of = { h.pid, orphan.pid }
    fixtures.cleanup()
    for _, pid in ipairs(pid_of) do assert.is_false(fixtures.alive(pid)) end
    assert.are.same({}, fixtures.pids_matching(dir))
    assert.is_nil(fixtures.read_file(h.config))
    assert.is_nil(io.open(dir, "r") and io.open(dir .. "/.", "r"))
    assert.is_table(target)
  end)
end)
