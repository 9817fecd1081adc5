-- The store: where it lives, what it refuses, and that it is durable
-- (SQLite in WAL mode with every transition one transaction). What deployctl
-- promises of its history, locks, operator commands, crash recovery and
-- events runs against both backends: a SQLite file and PostgreSQL (one
-- throwaway cluster for the file, a database per spec).
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"
local pg = require "spec.support.pg"

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

describe("the store", function()
  after_each(fixtures.cleanup)

  it("lives in .deploy/state.db by default, config.state when given, $DEPLOY_STATE above both", function()
    local dir = fixtures.tmpdir("where")
    local target = fixtures.target_config{ instances = 1 }
    local cfg = { targets = { staging = target } }
    local config = cli.write_config(dir, cfg)
    -- default: relative to the working directory
    os.execute("cd " .. fixtures.shell_quote(dir) .. " && " .. fixtures.shell_quote(cli.bin()) ..
               " --config deployctl.lua status >/dev/null 2>&1")
    assert.is_true(exists(dir .. "/.deploy/state.db"))
    -- config.state
    cfg.state = dir .. "/custom/state.db"
    config = cli.write_config(dir, cfg)
    local code, _, err = cli.run({ "--config", config, "deploy", "staging", "1.0" })
    assert.equal(0, code, err)
    assert.is_true(exists(dir .. "/custom/state.db"))
    -- bytes 19 and 20 of a SQLite header are 2 in WAL mode (1 in rollback mode)
    local header = fixtures.read_file(dir .. "/custom/state.db"):sub(1, 20)
    assert.equal("SQLite format 3\0", header:sub(1, 16))
    assert.equal(2, header:byte(19))
    assert.equal(2, header:byte(20))
    -- $DEPLOY_STATE wins
    code, _, err = cli.run({ "--config", config, "status", "staging" }, { DEPLOY_STATE = dir .. "/env.db" })
    assert.equal(0, code, err)
    assert.is_true(exists(dir .. "/env.db"))
    local m = deploy.DeploymentManager{ config = config }
    assert.equal(dir .. "/custom/state.db", m:state_path())
    assert.equal("1.0", m:get_status("staging").current_version)
  end)

  it("refuses a file that is not a deployctl store, and leaves it untouched", function()
    local dir = fixtures.tmpdir("notstore")
    local path = dir .. "/state.db"
    fixtures.write_file(path, "this is a text file, not a database\n")
    local cfg = fixtures.config{ state = path, targets = { staging = fixtures.target_config{} } }
    local ok, err = pcall(deploy.DeploymentManager, { config = cfg })
    assert.is_false(ok)
    assert.matches("state file .-state%.db is not a SQLite database: move it away or point config%.state elsewhere", err)
    assert.equal("this is a text file, not a database\n", fixtures.read_file(path))
  end)

  it("refuses a store written by a newer deployctl", function()
    local dir = fixtures.tmpdir("newer")
    local path = dir .. "/state.db"
    local cfg = fixtures.config{ state = path, targets = { staging = fixtures.target_config{} } }
    local m = deploy.DeploymentManager{ config = cfg }
    m:close()
    -- a later deployctl bumps the schema version (sqlite3 is installed by setup)
    assert.is_true(os.execute("sqlite3 " .. fixtures.shell_quote(path) ..
                              " \"UPDATE meta SET value='99' WHERE key='schema_version'\""))
    local ok, err = pcall(deploy.DeploymentManager, { config = cfg })
    assert.is_false(ok)
    assert.matches("was written by a newer deployctl %(schema 99, this build knows 3%)", err)
  end)
end)

local pg_available, pg_why = pg.available()

for _, backend in ipairs{ "sqlite", "postgresql" } do
  describe("the store behind deployctl (" .. backend .. ")", function()
    if backend == "postgresql" and not pg_available then
      pending(pg_why)
      return
    end
    local cluster, databases = nil, 0
    setup(function()
      if backend == "postgresql" then cluster = pg.cluster() end
    end)
    teardown(function()
      pg.cleanup()
      pg.teardown()
      fixtures.cleanup()
    end)
    after_each(function() fixtures.cleanup{ keep = { cluster } } end)

    -- A fresh store: a file in dir, or a database of its own (lease 2 s, so
    -- a dead runner's lock runs out within a spec).
    local function state(dir)
      if backend == "sqlite" then return dir .. "/state.db" end
      databases = databases + 1
      return cluster:url{ db = cluster:create_db("spec" .. databases), lease = 2, timeout = 5 }
    end

    local function config_with(targets)
      local dir = fixtures.tmpdir("both")
      return cli.write_config(dir, fixtures.config{ state = state(dir), targets = targets })
    end

    it("keeps every deployment and event across processes, in order", function()
      local config = config_with{ staging = fixtures.target_config{} }
      for _, v in ipairs{ "1", "2", "3-bad", "4" } do
        cli.run({ "--config", config, "deploy", "staging", v, "--set", "scale_down_delay=0" })
      end
      local m = deploy.DeploymentManager{ config = config }
      local h = m:history("staging")
      local seen = {}
      for i, d in ipairs(h) do seen[i] = d.version .. ":" .. d.status end
      assert.same({ "4:succeeded", "3-bad:failed", "2:succeeded", "1:succeeded" }, seen)
      local last = m:history("staging", 1)
      assert.equal(1, #last)
      assert.equal("4:succeeded", last[1].version .. ":" .. last[1].status)
      assert.equal("2", h[1].from_version)
      assert.equal("3-bad", h[2].version)
      assert.matches("health", h[2].errors[1])
      local kinds, last_ts = {}, 0
      for _, ev in ipairs(m:events(h[1].id)) do
        assert.is_true(ev.ts >= last_ts)
        last_ts = ev.ts
        kinds[#kinds + 1] = ev.kind
      end
      assert.equal("started", kinds[1])
      assert.equal("finished", kinds[#kinds])
      assert.is_true(m:integrity_check())
    end)

    it("locks a target against a second process, and promote and abort reach the one that holds it", function()
      local h = fixtures.haproxy{}
      local config = config_with{ production = fixtures.target_config{ haproxy = h, instances = 1 } }
      assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
      local function paused_canary(version)
        local p = cli.spawn({ "--config", config, "deploy", "production", version, "--strategy", "canary",
                              "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0.05",
                              "--set", "pause_at=50" })
        fixtures.wait_until(function() return p:output():find("paused") end, 30, "the pause at 50 %")
        return p
      end
      local first = paused_canary("v2")
      local code, out, err = cli.run({ "--config", config, "deploy", "production", "v3" })
      assert.equal(3, code, out .. err)
      assert.matches("target locked: 'production' is being deployed by deployment d%x+ %(pid " .. first.pid, err)
      code, out = cli.run({ "--config", config, "status", "production" })
      assert.equal(0, code)
      assert.matches("locked by deployment d%x+, pid " .. first.pid, out)
      assert.equal(0, (cli.run({ "--config", config, "promote", "production" })))
      local rc, fout, ferr = first:wait(30)
      assert.equal(0, rc, fout .. ferr)
      assert.same({ v2 = 20 }, (h:sample(20)))
      local second = paused_canary("v3")
      assert.equal(0, (cli.run({ "--config", config, "abort", "production" })))
      rc, fout, ferr = second:wait(30)
      assert.equal(1, rc, fout .. ferr)
      assert.matches("aborted by the operator", ferr)
      assert.same({ v2 = 20 }, (h:sample(20)))
      local m = deploy.DeploymentManager{ config = config }
      assert.is_nil(m:lock("production"))
      local seen = {}
      for i, d in ipairs(m:history("production")) do seen[i] = d.version .. ":" .. d.status end
      assert.same({ "v3:failed", "v2:succeeded", "v1:succeeded" }, seen)
    end)

    it("recovers a rollout whose process was killed: the target back on one version, the row interrupted", function()
      local h = fixtures.haproxy{}
      local target, tdir = fixtures.target_config{ haproxy = h, instances = 1 }
      local config = config_with{ production = target }
      assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
      local p = cli.spawn({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                            "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=30" })
      fixtures.wait_until(function() return p:output():find("new version at 50 %%") end, 30, "the canary at 50 %")
      fixtures.kill(p.pid, "KILL")
      p:wait(10)
      -- SQLite sees the dead pid at once; PostgreSQL waits out the lease
      fixtures.wait_until(function()
        local code = cli.run({ "--config", config, "status", "production" })
        return code == 0 and #fixtures.instances_of(tdir, "v2") == 0
      end, 30, "the target to be recovered")
      assert.same({ v1 = 20 }, (h:sample(20)))
      local m = deploy.DeploymentManager{ config = config }
      local d = m:history("production", 1)[1]
      assert.equal("v2", d.version)
      assert.equal("interrupted", d.status)
      assert.equal("v1", m:get_status("production").current_version)
      assert.is_nil(m:lock("production"))
      assert.is_true(m:integrity_check())
    end)
  end)
end
