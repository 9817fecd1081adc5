-- The specification's classes, methods, fields and defaults, and what each
-- does with bad input. Real demo-app processes, router "none".
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local function manager_for(opts)
  opts = opts or {}
  local target, dir = fixtures.target_config{ instances = opts.instances or 1, health = opts.health }
  local cfg = fixtures.config{ targets = { staging = target, production = fixtures.target_config{ instances = 1 } } }
  cfg.clock = opts.clock -- virtual: a default blue-green's 30 s with blue warm pass at once
  return deploy.DeploymentManager{ config = cfg, strategy = opts.strategy }, cfg, dir
end

-- Everything a bad call could have touched: it must be the same afterwards.
local function snapshot(m)
  local s = {}
  for _, t in ipairs(m:targets()) do
    local st = m:get_status(t)
    s[t] = { status = st, history = #m:history(t), instances = #m:instances(t) }
  end
  return s
end

describe("data models", function()
  after_each(fixtures.cleanup)

  it("DeploymentResult has exactly success, version, target, strategy, duration, errors", function()
    local m = manager_for()
    local r = m:deploy("staging", "1.0.0")
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local keys = {}
    for k in pairs(r) do keys[#keys + 1] = k end
    table.sort(keys)
    assert.same({ "duration", "strategy", "success", "target", "version" }, keys)
    assert.equal("1.0.0", r.version)
    assert.equal("staging", r.target)
    assert.equal("blue-green", r.strategy)
    assert.equal("number", type(r.duration))
    assert.is_true(r.duration >= 0)
    assert.is_nil(r.errors)
  end)

  it("DeploymentStatus has target, current_version, status, health, instances", function()
    local m = manager_for{ instances = 2 }
    -- the specification's five fields; beside them the view (issue 13):
    -- state, summary, instances_by_version, rollout, last_deployment, ...
    local function spec_fields(st)
      return { target = st.target, current_version = st.current_version, status = st.status, health = st.health,
               instances = st.instances }
    end
    local before = m:get_status("staging")
    assert.same({ target = "staging", status = "deployed", health = "unhealthy", instances = 0 }, spec_fields(before))
    -- exactly the specification's fields; the whole view is describe()'s
    assert.same({ target = "staging", status = "deployed", health = "unhealthy", instances = 0 }, before)
    local view = m:describe("staging")
    assert.same({ "never_deployed", "never deployed" }, { view.state, view.summary })
    m:deploy("staging", "1.0.0")
    local s = m:get_status("staging")
    assert.same({ target = "staging", current_version = "1.0.0", status = "deployed",
                  health = "healthy", instances = 2 }, spec_fields(s))
    assert.same({ { version = "1.0.0", role = "live", running = 2, total = 2 } }, m:describe("staging").instances_by_version)
    assert.equal("integer", math.type(s.instances))
  end)

  it("Deployment carries id, target, version, strategy, created_at (ISO-8601 UTC) and metadata", function()
    local seen
    local S = deploy.DeploymentStrategy:extend{ name = "inspect" }
    function S:validate(d) seen = d return false end
    local m = manager_for()
    -- validate(d) sees the Deployment the manager built; refusing it runs
    -- nothing and leaves the store unchanged
    local before = snapshot(m)
    local r = m:deploy("staging", "3.0.0", { strategy = S, metadata = { ticket = "OPS-1" } })
    assert.is_false(r.success)
    assert.equal("strategy refused the deployment: validate(d) returned false", r.errors[1])
    assert.matches("^d%x+$", seen.id)
    assert.equal("staging", seen.target)
    assert.equal("3.0.0", seen.version)
    assert.equal(S, seen.strategy)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", seen.created_at)
    assert.same({ ticket = "OPS-1" }, seen.metadata)
    assert.same(before, snapshot(m))
    -- a built-in strategy's validate checks the deployment's version and target
    local bg = deploy.BlueGreenStrategy{}
    assert.is_true(bg:validate({ target = "staging", version = "2.0.0" }))
    assert.is_false(bg:validate({ target = "staging", version = "" }))
    assert.is_false(bg:validate({ target = "no such/target", version = "2.0.0" }))
  end)

  it("records created_at as an ISO-8601 UTC timestamp in the history", function()
    local m = manager_for()
    m:deploy("staging", "1.0.0", { metadata = { ticket = "OPS-7", n = 3 } })
    local h = m:history("staging")
    assert.equal(1, #h)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", h[1].created_at)
    assert.same({ ticket = "OPS-7", n = 3 }, h[1].metadata)
    assert.matches("^d%x+$", h[1].id)
  end)
end)

describe("strategies", function()
  it("CanaryStrategy defaults to 10 %, +10, every 300 s, no URL", function()
    local c = deploy.CanaryStrategy{}
    assert.equal(10, c.initial_percentage)
    assert.equal(10, c.increment)
    assert.equal(300, c.interval)
    assert.is_nil(c.health_check_url)
    assert.equal("canary", c.name)
    assert.equal(300, deploy.CanaryStrategy().interval)  -- no arguments is fine too
  end)

  it("CanaryStrategy reads its parameters back", function()
    local c = deploy.CanaryStrategy{ initial_percentage = 25.5, increment = 12.5, interval = 0,
                                     health_check_url = "http://{host}:{port}/ready" }
    assert.equal(25.5, c.initial_percentage)
    assert.equal(12.5, c.increment)
    assert.equal(0, c.interval)
    assert.equal("http://{host}:{port}/ready", c.health_check_url)
  end)

  it("BlueGreenStrategy defaults to switch_delay 0 and reads parameters back", function()
    local b = deploy.BlueGreenStrategy{}
    assert.equal(0, b.switch_delay)
    assert.is_nil(b.health_check_url)
    assert.equal("blue-green", b.name)
    local b2 = deploy.BlueGreenStrategy{ switch_delay = 5, health_check_url = "http://127.0.0.1:9/x" }
    assert.equal(5, b2.switch_delay)
    assert.equal("http://127.0.0.1:9/x", b2.health_check_url)
  end)

  it("refuses bad parameters with an error naming the parameter", function()
    local cases = {
      { deploy.CanaryStrategy, { initial_percentage = 0 }, "initial_percentage must be in %(0, 100%]" },
      { deploy.CanaryStrategy, { initial_percentage = 101 }, "initial_percentage" },
      { deploy.CanaryStrategy, { initial_percentage = 0/0 }, "initial_percentage" },
      { deploy.CanaryStrategy, { increment = -5 }, "increment must be in" },
      { deploy.CanaryStrategy, { increment = "ten" }, "increment must be a number, got string" },
      { deploy.CanaryStrategy, { interval = -1 }, "interval must be a number of seconds >= 0" },
      { deploy.CanaryStrategy, { health_check_url = "not a url" }, "health_check_url 'not a url' is not a URL" },
      { deploy.CanaryStrategy, { health_check_url = 42 }, "health_check_url must be a string" },
      { deploy.CanaryStrategy, { initial_percent = 5 }, "has no parameter 'initial_percent' %(known: initial_percentage" },
      { deploy.CanaryStrategy, "fast", "expects a table of parameters, got string" },
      { deploy.BlueGreenStrategy, { switch_delay = -2 }, "switch_delay must be a number of seconds >= 0" },
      { deploy.BlueGreenStrategy, { health_check_url = "ftp://x/y" }, "is not a URL" },
      { deploy.BlueGreenStrategy, { delay = 1 }, "has no parameter 'delay'" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(case[1], case[2])
      assert.is_false(ok)
      assert.matches(case[3], err)
    end
  end)

  it("DeploymentStrategy:extend needs a name", function()
    assert.has_error(function() deploy.DeploymentStrategy:extend{} end,
      'deploy: DeploymentStrategy:extend needs name = "..." (a non-empty string)')
    local R = deploy.DeploymentStrategy:extend{ name = "ring" }
    assert.equal("ring", R.name)
    assert.is_true(R:validate({ version = "1" }))
  end)
end)

describe("DeploymentManager", function()
  after_each(fixtures.cleanup)

  it("defaults to blue-green and deploys, then rolls back to the previous version", function()
    local m = manager_for{ instances = 2, clock = "virtual" }
    assert.is_true(m:deploy("staging", "1.0.0").success)
    assert.is_true(m:deploy("staging", "1.1.0").success)
    local r = m:rollback("staging")
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal("1.0.0", r.version)
    local st = m:get_status("staging")
    assert.equal("1.0.0", st.current_version)
    assert.equal(2, st.instances)
    local h = m:history("staging")
    assert.equal("rollback", h[1].kind)
    assert.equal("1.0.0", h[1].version)
    -- every instance of 1.1.0 is gone
    for _, i in ipairs(m:instances("staging")) do assert.equal("1.0.0", i.version) end
  end)

  it("rolls back to a named version from the history", function()
    local m = manager_for{ clock = "virtual" }
    for _, v in ipairs{ "1.0.0", "1.1.0", "1.2.0" } do assert.is_true(m:deploy("staging", v).success) end
    local r = m:rollback("staging", "1.0.0")
    assert.is_true(r.success)
    assert.equal("1.0.0", m:get_status("staging").current_version)
  end)

  it("uses the strategy given to the constructor", function()
    local m = manager_for{ strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0 } }
    local r = m:deploy("staging", "1.0.0")
    assert.is_true(r.success)
    assert.equal("canary", r.strategy)
  end)

  it("keeps targets apart: deploying one leaves the other alone", function()
    local m = manager_for()
    m:deploy("staging", "1.0.0")
    assert.is_nil(m:get_status("production").current_version)
    assert.equal(0, m:get_status("production").instances)
  end)

  it("a version whose instances never turn healthy fails and leaves the old one serving", function()
    local m, _, dir = manager_for{ health = { failure_threshold = 2 } }
    assert.is_true(m:deploy("staging", "1.0.0").success)
    local r = m:deploy("staging", "2.0.0-bad")
    assert.is_false(r.success)
    assert.matches("not switched to: new instances of 2.0.0%-bad unhealthy after 2 consecutive failed checks", r.errors[1])
    local st = m:get_status("staging")
    assert.equal("1.0.0", st.current_version)
    -- the old version serves: deployed, healthy; the failure is the last
    -- deployment's (issue 13: not "failed" while 1.0.0 serves)
    assert.equal("deployed", st.status)
    assert.equal("healthy", st.health)
    local view = m:describe("staging")
    assert.same({ "2.0.0-bad", "failed" }, { view.last_deployment.version, view.last_deployment.status })
    assert.matches("the last deployment %(2%.0%.0%-bad, ", view.summary)
    assert.equal(0, #fixtures.instances_of(dir, "2.0.0-bad"))
  end)
end)

describe("bad input", function()
  after_each(fixtures.cleanup)

  it("unknown target: the message lists the known ones, nothing changes", function()
    local m = manager_for()
    local before = snapshot(m)
    assert.has_error(function() m:deploy("prod", "1.0.0") end,
      "deploy: unknown target 'prod' (known: production, staging)")
    assert.has_error(function() m:rollback("prod") end, "deploy: unknown target 'prod' (known: production, staging)")
    assert.has_error(function() m:get_status("prod") end, "deploy: unknown target 'prod' (known: production, staging)")
    assert.same(before, snapshot(m))
  end)

  it("empty, overlong and garbage versions are refused, nothing changes", function()
    local m = manager_for()
    local before = snapshot(m)
    assert.has_error(function() m:deploy("staging", "") end,
      "deploy: manager:deploy(): version is empty: give a version such as '1.4.2'")
    local ok, err = pcall(m.deploy, m, "staging", string.rep("1", 129))
    assert.is_false(ok)
    assert.matches("version is 129 bytes long: at most 128 are allowed", err)
    for _, v in ipairs{ "1.0 beta", "../../etc", "v1;rm -rf /", "1.0\n", "v\0x", "ü1" } do
      ok, err = pcall(m.deploy, m, "staging", v)
      assert.is_false(ok, v)
      if v:find("\0", 1, true) then
        -- a NUL byte would cut the string short in C: refused as such
        assert.matches("version holds a NUL byte", err)
      else
        assert.matches("has a character not allowed at byte %d+ .-: use only A%-Z a%-z 0%-9 %. _ %+ %-", err)
      end
    end
    -- 128 bytes is fine as far as validation goes (the rollout then runs)
    assert.same(before, snapshot(m))
  end)

  it("wrong argument types name the argument", function()
    local m = manager_for()
    assert.has_error(function() m:deploy(nil, "1") end, "deploy: manager:deploy(): target must be a string, got nil")
    assert.has_error(function() m:deploy("staging", 1.5) end, "deploy: manager:deploy(): version must be a string, got number")
    assert.has_error(function() m:deploy("staging", "1", "fast") end, "deploy: manager:deploy(): options must be a table, got string")
    assert.has_error(function() m:deploy("staging", "1", { strategy = "canary" }) end)
    assert.has_error(function() m:deploy("staging", "1", { strateg = 1 }) end,
      "deploy: manager:deploy(): unknown option 'strateg' (known: strategy, metadata, on_event, hooks, hook_timeout)")
    assert.has_error(function() m:deploy("staging", "1", { metadata = "x" }) end,
      "deploy: manager:deploy(): options.metadata must be a table, got string")
    assert.has_error(function() m:rollback({}) end, "deploy: manager:rollback(): target must be a string, got table")
    assert.has_error(function() m:rollback("staging", 3) end, "deploy: manager:rollback(): version must be a string, got number")
    assert.has_error(function() m:get_status(7) end, "deploy: manager:get_status(): target must be a string, got number")
    assert.has_error(function() m:describe(7) end, "deploy: manager:describe(): target must be a string, got number")
    assert.has_error(function() m:describe("prod") end, "deploy: unknown target 'prod' (known: production, staging)")
    assert.has_error(function() m.deploy({}, "staging", "1") end)
  end)

  it("rollback to a version never deployed names the known ones; with no previous version it fails cleanly", function()
    local m = manager_for()
    local r = m:rollback("staging")
    assert.is_false(r.success)
    assert.matches("'staging' has no previous version to roll back to", r.errors[1])
    m:deploy("staging", "1.0.0")
    local before = snapshot(m)
    assert.has_error(function() m:rollback("staging", "0.9.0") end,
      "deploy: rollback: version '0.9.0' was never deployed successfully to 'staging' (known: 1.0.0)")
    assert.same(before, snapshot(m))
  end)

  it("missing or malformed config gives an error naming the field", function()
    local dir = fixtures.tmpdir("cfg")
    local t = fixtures.target_config{}
    local function cfg(mut)
      local c = fixtures.config{ targets = { production = fixtures.target_config{} } }
      mut(c, c.targets.production)
      return c
    end
    local cases = {
      { 42, "must be a table or the path of a Lua file" },
      { { targets = {} }, "config %.targets is empty" },
      { { state = dir .. "/s.db" }, "config %.targets is missing" },
      { { targets = { production = t }, colour = "blue" }, "config %(top level%) has an unknown field 'colour' %(known: state, clock, targets, retain, simulate, gitops, serve%)" },
      { cfg(function(_, p) p.instances = 0 end), "config targets%.production%.instances must be between 1 and 64" },
      { cfg(function(_, p) p.instances = "two" end), "targets%.production%.instances must be a number, got string" },
      { cfg(function(_, p) p.provider = nil end), "targets%.production%.provider is missing" },
      { cfg(function(_, p) p.provider.kind = "docker" end), "provider kind 'docker' is not known %(known: process, ssh, test%)" },
      { cfg(function(_, p) p.provider.command = nil end), "provider%.command is missing" },
      { cfg(function(_, p) p.provider.ports = "30000-20000" end), "is not a usable range" },
      { cfg(function(_, p) p.provider.ports = "lots" end), "'lots' is not a port range: write 'LOW%-HIGH'" },
      { cfg(function(_, p) p.router = { kind = "f5" } end), "router kind 'f5' is not known %(known: haproxy, nginx, none, test%)" },
      { cfg(function(_, p) p.router = { kind = "haproxy", backend = "app" } end), "router%.socket is missing" },
      { cfg(function(_, p) p.health.interval = 0 end), "health%.interval must be between" },
      { cfg(function(_, p) p.health.path = "healthz" end), "path 'healthz' must start with '/'" },
      { cfg(function(_, p) p.health.retries = 3 end), "health has an unknown field 'retries'" },
      { cfg(function(c) c.targets["bad name"] = c.targets.production end), "target name 'bad name' has a character not allowed" },
      { cfg(function(c) c.clock = "fast" end), "'fast' is not known: use 'real' or 'virtual'" },
      { cfg(function(_, p) p.router = { kind = "haproxy", socket = "/x.sock", backend = "${DEPLOYCTL_SPEC_NOPE}" } end),
        "router%.backend environment variable DEPLOYCTL_SPEC_NOPE is not set" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(deploy.DeploymentManager, { config = case[1] })
      assert.is_false(ok, case[2])
      assert.matches(case[2], err)
    end
  end)

  it("config files: unreadable, broken, or not returning a table", function()
    local dir = fixtures.tmpdir("cfgfile")
    local ok, err = pcall(deploy.DeploymentManager, { config = dir .. "/missing.lua" })
    assert.is_false(ok)
    assert.matches("cannot read config file '.-missing%.lua'", err)
    fixtures.write_file(dir .. "/broken.lua", "return {")
    ok, err = pcall(deploy.DeploymentManager, { config = dir .. "/broken.lua" })
    assert.matches("config file '.-broken%.lua' failed to load", err)
    fixtures.write_file(dir .. "/num.lua", "return 5")
    ok, err = pcall(deploy.DeploymentManager, { config = dir .. "/num.lua" })
    assert.matches("must return a table %(it returned number%)", err)
    ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { a = fixtures.target_config{} } },
                                                strategy = "canary" })
    assert.matches("strategy must be a strategy", err)
    ok, err = pcall(deploy.DeploymentManager, { confg = {} })
    assert.matches("has no option 'confg'", err)
  end)

  it("a port range that is exhausted fails the deployment cleanly", function()
    local range = fixtures.port_range(1)
    local target = fixtures.target_config{ instances = 2, ports = range }
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { staging = target } } }
    local r = m:deploy("staging", "1.0.0")
    assert.is_false(r.success)
    assert.matches("no free port in " .. range:gsub("%-", "%%-") .. " for target 'staging'", r.errors[1])
    assert.matches("widen provider%.ports", r.errors[1])
    local st = m:get_status("staging")
    assert.is_nil(st.current_version)
    assert.equal(0, st.instances)
    assert.equal(0, #m:instances("staging"))
  end)

  it("a command that needs a missing ${VAR} fails with the variable's name and never leaks values", function()
    local target = fixtures.target_config{ instances = 1 }
    target.provider.command = target.provider.command .. " --token ${DEPLOYCTL_SPEC_UNSET_VAR}"
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { staging = target } } }
    local r = m:deploy("staging", "1.0.0")
    assert.is_false(r.success)
    assert.matches("DEPLOYCTL_SPEC_UNSET_VAR is not set", r.errors[1])
  end)
end)
