-- Several runners, one truth: deployctl processes sharing one PostgreSQL
-- database (as CI runners, a laptop and an agent would) against a real
-- HAProxy and real instances. One cluster for the file; each spec has its
-- own database.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"
local pg = require "spec.support.pg"

local available, why = pg.available()

describe("several runners on one PostgreSQL store", function()
  if not available then
    pending(why)
    return
  end

  local shared, cluster, n = nil, nil, 0
  setup(function() shared = pg.cluster() end)
  teardown(function()
    pg.cleanup()
    pg.teardown()
    fixtures.cleanup()
  end)
  before_each(function()
    n = n + 1
    cluster = shared:database("runners" .. n)
  end)
  after_each(function()
    pg.end_probes()
    if not shared.running then shared:start() end
    fixtures.cleanup{ keep = { shared } }
  end)

  -- A config on the cluster's database (lease in seconds), and HAProxy.
  local function runner_config(lease)
    local h = fixtures.haproxy{}
    local target, tdir = fixtures.target_config{ haproxy = h, instances = 2 }
    local dir = fixtures.tmpdir("runner")
    local state = cluster:url{ lease = lease or 15, timeout = 5 }
    local config = cli.write_config(dir, fixtures.config{ state = state, targets = { production = target } })
    return config, h, tdir, state
  end

  local function canary(config, extra)
    local args = { "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                   "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=30" }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    return cli.spawn(args)
  end

  it("8 runners deploying one target at once: exactly one runs, the others exit 3, nothing corrupt", function()
    local config, h = runner_config()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    -- Eight runners, each ready (store open, recovery done) and waiting at
    -- a gate; the gate opens once for all: the locks are taken at once.
    local dir = fixtures.tmpdir("gate")
    local script = dir .. "/race.lua"
    fixtures.write_file(script, [[
local deploy = require "deploy"
local m = deploy.DeploymentManager{ config = arg[1], strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
print("ready") io.stdout:flush()
while not io.open(arg[2]) do deploy.sleep(0.005) end
local r = m:deploy("production", "v2")
for _, e in ipairs(r.errors or {}) do io.stderr:write(e, "\n") end
return r.success and 0 or (r.locked and 3 or 1)
]])
    local procs = {}
    for i = 1, 8 do
      procs[i] = cli.spawn({ "run", script, config, dir .. "/open" })
    end
    for i = 1, 8 do
      fixtures.wait_until(function() return procs[i]:output():find("ready") end, 60, "runner " .. i .. " ready")
    end
    fixtures.write_file(dir .. "/open", "")
    local codes = {}
    for i = 1, 8 do
      local code, out, err = procs[i]:wait(60)
      codes[code] = (codes[code] or 0) + 1
      if code == 3 then assert.matches("target locked: 'production' is being deployed by deployment d%x+", err) end
    end
    assert.same({ [0] = 1, [3] = 7 }, codes)
    local m = deploy.DeploymentManager{ config = config }
    local hist = m:history("production")
    assert.equal(2, #hist)
    assert.equal("succeeded", hist[1].status)
    assert.same({ v2 = 40 }, (h:sample(40)))
    assert.is_true(m:integrity_check())
  end)

  it("a runner killed mid-rollout: a second runner takes over once the lease expires and recovers one version",
     function()
    local config, h, tdir, state = runner_config(2)
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local first = canary(config)
    fixtures.wait_until(function() return first:output():find("new version at 50 %%") end, 30, "the canary at 50 %")
    fixtures.kill(first.pid, "KILL")
    first:wait(10)
    -- the lease still runs: another runner is refused, and told until when
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v3", "--set", "scale_down_delay=0" })
    assert.equal(3, code, out .. err)
    assert.matches("target locked: 'production' is being deployed by deployment d%x+ %(pid %d+ on .-, since .-, until ", err)
    -- once it expires, any command of a second runner recovers the target
    fixtures.wait_until(function()
      local c = cli.run({ "--config", config, "status", "production" })
      return c == 0 and (#fixtures.instances_of(tdir, "v2") == 0)
    end, 30, "the lease to expire and the target to be recovered")
    assert.same({ v1 = 40 }, (h:sample(40)))
    local m = deploy.DeploymentManager{ config = config }
    local d = m:history("production", 1)[1]
    assert.equal("interrupted", d.status)
    assert.equal("v2", d.version)
    assert.equal("v1", m:get_status("production").current_version)
    -- and the second runner deploys
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v3", "--set", "scale_down_delay=0" })))
    assert.same({ v3 = 40 }, (h:sample(40)))
    assert.is_string(state)
  end)

  it("abort from a second runner stops the rollout the first drives; status shows who holds the lock", function()
    local config, h, tdir = runner_config()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local first = canary(config)
    fixtures.wait_until(function() return first:output():find("new version at 50 %%") end, 30, "the canary at 50 %")
    local code, out = cli.run({ "--config", config, "status", "production" })
    assert.equal(0, code)
    assert.matches("locked by deployment d%x+, pid %d+ on .-, since .-, until .- unless renewed", out)
    code, out = cli.run({ "--config", config, "abort", "production" })
    assert.equal(0, code, out)
    local rc, fout, ferr = first:wait(30)
    assert.equal(1, rc, fout .. ferr)
    assert.matches("aborted by the operator %(deployctl abort%)", ferr)
    assert.same({ v1 = 40 }, (h:sample(40)))
    assert.same({}, fixtures.instances_of(tdir, "v2"))
    -- nobody holds the target any more
    code, out = cli.run({ "--config", config, "status", "production" })
    assert.is_nil(out:find("locked by", 1, true))
  end)

  it("PostgreSQL stopped mid-rollout and started again: the rollout ends resumed or cleanly aborted, never split",
     function()
    local config, h, tdir = runner_config()
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local first = cli.spawn({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                              "--set", "initial_percentage=25", "--set", "increment=25", "--set", "interval=1" })
    fixtures.wait_until(function() return first:output():find("new version at 25 %%") end, 30, "the canary at 25 %")
    cluster:stop("fast")
    local down_for = fixtures.now()
    fixtures.wait_until(function() return fixtures.now() - down_for > 2 end, 5, "two seconds of outage")
    cluster:start()
    local rc, out, err = first:wait(60)
    local m = deploy.DeploymentManager{ config = config }
    local d = m:history("production", 1)[1]
    local served = h:sample(40)
    if rc == 0 then
      -- resumed: the store caught up and the canary went on to the end
      assert.equal("succeeded", d.status)
      assert.same({ v2 = 40 }, served)
      assert.same({}, fixtures.instances_of(tdir, "v1"))
    else
      -- aborted: back on v1, the error says the store could not record a step
      assert.equal(1, rc, out .. err)
      assert.is_truthy(err:find("could not be recorded", 1, true) or err:find("store", 1, true), err)
      assert.same({ v1 = 40 }, served)
      assert.same({}, fixtures.instances_of(tdir, "v2"))
      assert.is_true(d.status == "failed" or d.status == "interrupted", d.status)
    end
    -- either way one version serves, and what the store says matches it
    local live = m:get_status("production").current_version
    assert.same({ [live] = 40 }, served)
    assert.is_true(m:integrity_check())
  end)
end)
