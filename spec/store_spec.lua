-- The store: where it lives, what it refuses, and that it is durable
-- (SQLite in WAL mode with every transition one transaction).
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

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
               " --config deploy.lua status >/dev/null 2>&1")
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
    assert.matches("was written by a newer deployctl %(schema 99, this build knows 2%)", err)
  end)

  it("keeps every deployment and event across processes, in order", function()
    local dir = fixtures.tmpdir("durable")
    local cfg = fixtures.config{ state = dir .. "/state.db", targets = { staging = fixtures.target_config{} } }
    local config = cli.write_config(dir, cfg)
    for _, v in ipairs{ "1", "2", "3-bad", "4" } do cli.run({ "--config", config, "deploy", "staging", v }) end
    local m = deploy.DeploymentManager{ config = config }
    local h = m:history("staging")
    local seen = {}
    for i, d in ipairs(h) do seen[i] = d.version .. ":" .. d.status end
    assert.same({ "4:succeeded", "3-bad:failed", "2:succeeded", "1:succeeded" }, seen)
    assert.same({ "4:succeeded" }, { m:history("staging", 1)[1].version .. ":" .. m:history("staging", 1)[1].status })
    assert.equal("2", h[1].from_version)
    local last_ts = 0
    for _, ev in ipairs(m:events(h[1].id)) do
      assert.is_true(ev.ts >= last_ts)
      last_ts = ev.ts
    end
    assert.is_true(m:integrity_check())
  end)
end)
