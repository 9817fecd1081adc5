-- deployctl killed with SIGKILL in the middle of a deployment, then run
-- again: HAProxy serves exactly one version, no instance is orphaned, the
-- history shows the interrupted deployment, and the store is intact.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

-- A pipeline that deploys with a canary and, if asked, SIGKILLs its own
-- process at the first event of the given kind: a crash at an exact step
-- boundary.
local PIPELINE = [[
local deploy = require "deploy"
local config, version, kill_at = arg[1], arg[2], arg[3]
local interval = tonumber(arg[4]) or 30
local function self_pid()
  local f = io.open("/proc/self/stat")
  local pid = f:read("n")
  f:close()
  return pid
end
local m = deploy.DeploymentManager{ config = config }
m:deploy("production", version, {
  strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = interval },
  on_event = function(ev)
    print(ev.kind)
    io.stdout:flush()
    if ev.kind == kill_at then os.execute("kill -9 " .. self_pid()) end
  end })
]]

local function setup()
  local h = fixtures.haproxy{}
  local target, tdir = fixtures.target_config{ haproxy = h, instances = 2 }
  local dir = fixtures.tmpdir("crash")
  local cfg = fixtures.config{ targets = { production = target } }
  local config = cli.write_config(dir, cfg)
  local script = dir .. "/pipeline.lua"
  fixtures.write_file(script, PIPELINE)
  return h, config, script, tdir
end

local function check_recovered(h, config, expect_version, killed_version, tdir)
  -- The next run (any command) recovers the store and the target.
  local code, out, err = cli.run({ "--config", config, "status", "production" })
  assert.equal(0, code, err)
  assert.matches("production%s+" .. expect_version:gsub("%-", "%%-"), out)
  local counts, failed = h:sample(40)
  assert.same({ [expect_version] = 40 }, counts)
  assert.equal(0, failed)
  assert.equal(2, #h:servers())
  if killed_version ~= expect_version then
    assert.same({}, fixtures.instances_of(tdir, killed_version))
  end
  local m = deploy.DeploymentManager{ config = config }
  local hist = m:history("production")
  assert.equal("interrupted", hist[1].status)
  assert.equal(killed_version, hist[1].version)
  assert.matches("interrupted: deployctl %(pid %d+%) stopped during the deployment", hist[1].errors[1])
  local kinds = {}
  for _, ev in ipairs(m:events(hist[1].id)) do kinds[#kinds + 1] = ev.kind end
  assert.equal("interrupted", kinds[#kinds])
  assert.is_true(m:integrity_check())
  -- every instance row left belongs to the version that serves
  for _, i in ipairs(m:instances("production")) do
    assert.equal(expect_version, i.version)
    assert.is_true(i.alive)
  end
  -- and the target takes a new deployment afterwards
  local r = m:deploy("production", "v3", { strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } })
  assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
  assert.same({ v3 = 40 }, (h:sample(40)))
  return m
end

describe("a crash in the middle of a deployment", function()
  after_each(fixtures.cleanup)

  for _, kill_at in ipairs{ "started", "instance_started", "healthy", "traffic" } do
    it("killed at '" .. kill_at .. "' recovers to the old version", function()
      local h, config, script, tdir = setup()
      assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
      local code, out = cli.run({ "--config", config, "run", script, config, "v2", kill_at })
      assert.equal(137, code, out)  -- 128 + SIGKILL
      assert.matches(kill_at, out)
      check_recovered(h, config, "v1", "v2", tdir)
    end)
  end

  it("killed while 100 % is held with the old set warm recovers to the old version", function()
    local h, config, script, tdir = setup()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local code, out = cli.run({ "--config", config, "run", script, config, "v2", "bake", "0.3" })
    assert.equal(137, code, out)
    assert.matches("bake", out)
    check_recovered(h, config, "v1", "v2", tdir)
  end)

  it("killed right after the promotion was recorded recovers to the new version", function()
    local h, config, script, tdir = setup()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local code, out = cli.run({ "--config", config, "run", script, config, "v2", "promoted", "0.05" })
    assert.equal(137, code, out)
    check_recovered(h, config, "v2", "v2", tdir)
    assert.same({}, fixtures.instances_of(tdir, "v1"))
  end)

  it("killed from outside while the canary waits at 50 %", function()
    local h, config, script, tdir = setup()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local p = cli.spawn({ "--config", config, "run", script, config, "v2", "never" })
    fixtures.wait_until(function() return p:output():find("traffic") end, 20, "the canary at 50 %")
    -- both versions serve now: the split the crash must not leave behind
    local counts = h:sample(40)
    assert.equal(20, counts.v1)
    assert.equal(20, counts.v2)
    assert.is_true(#fixtures.instances_of(tdir, "v2") >= 2)
    fixtures.kill(p.pid, "KILL")
    local code = p:wait(10)
    assert.equal(137, code)
    check_recovered(h, config, "v1", "v2", tdir)
  end)

  it("killed on a first deployment leaves nothing serving and nothing running", function()
    local h, config, script, tdir = setup()
    local code = cli.run({ "--config", config, "run", script, config, "v1", "healthy" })
    assert.equal(137, code)
    -- nothing serves and the only deployment was interrupted: unhealthy (5)
    local c2, out, err = cli.run({ "--config", config, "status", "production" })
    assert.equal(5, c2, out .. err)
    assert.matches("nothing serves: the deployment of v1 was interrupted", out)
    assert.equal(0, #h:servers())
    assert.same({}, fixtures.instances_of(tdir, "v1"))
    local m = deploy.DeploymentManager{ config = config }
    assert.equal("interrupted", m:history("production")[1].status)
    assert.is_nil(m:get_status("production").current_version)
    assert.is_true(m:deploy("production", "v2").success)
  end)
end)
