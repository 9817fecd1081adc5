-- Retention: `retain = { history, versions, logs }` keeps the store and the
-- log directory from growing without end, and never takes what a rollback
-- or a running deployment needs.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

-- Blue stops right after each switch (scale_down_delay = 0): holding it
-- warm for the default 30 s is not what these specs are about.
local function manager(config)
  return deploy.DeploymentManager{ config = config, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
end

local function ls(dir)
  local p = io.popen("ls -1 " .. q(dir) .. " 2>/dev/null | sort")
  local out = {}
  for line in p:lines() do out[#out + 1] = line end
  p:close()
  return out
end

-- Makes every file in dir look an hour old (retention never deletes a log
-- written in the last seconds: another runner may have just started it).
local function age(dir)
  assert(os.execute("touch -d '1 hour ago' " .. q(dir) .. "/* 2>/dev/null; true"))
end

local function versions(m, target)
  local out = {}
  for i, d in ipairs(m:history(target)) do out[i] = d.version .. ":" .. d.status end
  return out
end

describe("retention", function()
  after_each(fixtures.cleanup)

  local function setup(retain, target_retain)
    local dir = fixtures.tmpdir("retain")
    local target = fixtures.target_config{ instances = 1 }
    target.retain = target_retain
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", retain = retain,
                                                          targets = { production = target } })
    return config, dir .. "/logs", dir
  end

  it("keeps the newest `history` deployments, and the live and previous ones whatever their age", function()
    local config = setup({ history = 2, versions = 2 })
    local m = manager(config)
    assert.is_true(m:deploy("production", "v1").success)
    local old = m:history("production")[1].id
    assert.is_true(#m:events(old) > 0)
    -- retention runs as each deployment ends, before its result is given
    for _, v in ipairs{ "v2", "v3", "v4" } do assert.is_true(m:deploy("production", v).success) end
    assert.same({ "v4:succeeded", "v3:succeeded" }, versions(m, "production"))
    assert.same({}, m:events(old))
    -- failures pile up: the live version and the one before it stay
    for _, v in ipairs{ "v5-bad", "v6-bad", "v7-bad" } do assert.is_false(m:deploy("production", v).success) end
    assert.same({ "v7-bad:failed", "v6-bad:failed", "v4:succeeded", "v3:succeeded" }, versions(m, "production"))
    local r = m:prune("production")
    assert.is_nil(r.error)
    assert.equal(0, r.deployments)
    assert.equal("v4", m:get_status("production").current_version)
    -- and a rollback still goes back to the previous version
    local code, out, err = cli.run({ "--config", config, "rollback", "production" })
    assert.equal(0, code, out .. err)
    assert.equal("v3", m:get_status("production").current_version)
    assert.is_true(m:integrity_check())
  end)

  it("runs after every deployment: the CLI leaves the store within its limits", function()
    local config = setup({ history = 3, versions = 1 })
    for _, v in ipairs{ "1", "2", "3", "4", "5" } do
      assert.equal(0, (cli.run({ "--config", config, "deploy", "production", v, "--set", "scale_down_delay=0" })))
    end
    local m = manager(config)
    assert.same({ "5:succeeded", "4:succeeded", "3:succeeded" }, versions(m, "production"))
  end)

  it("deletes old versions' logs, never the live or previous version's, nor a log written a moment ago", function()
    local config, logs = setup({ history = 10, versions = 2 })
    local m = manager(config)
    for _, v in ipairs{ "v1", "v2", "v3" } do assert.is_true(m:deploy("production", v).success) end
    age(logs)
    -- v2's log was written a moment ago (as by an instance another runner
    -- just started): when v4 makes v1 and v2 old, it stays this time
    assert(os.execute("touch " .. q(logs .. "/production-v2-0.log")))
    assert.is_true(m:deploy("production", "v4").success)
    assert.same({ "production-v2-0.log", "production-v3-0.log", "production-v4-0.log" }, ls(logs))
    age(logs)
    local r = m:prune("production")
    assert.is_nil(r.error)
    assert.equal(1, r.logs_removed)
    assert.is_true(r.bytes_freed > 0)
    assert.same({ "production-v3-0.log", "production-v4-0.log" }, ls(logs))
    -- versions below the limit, but kept: the live one and the previous one
    local config1, logs1 = setup({ history = 10, versions = 1 })
    local m1 = manager(config1)
    for _, v in ipairs{ "a1", "a2", "a3-bad" } do m1:deploy("production", v) end
    age(logs1)
    m1:prune()
    assert.same({ "production-a1-0.log", "production-a2-0.log", "production-a3-bad-0.log" }, ls(logs1))
  end)

  it("rotates a log past `logs` MiB, and the instance goes on writing to it", function()
    local config, logs = setup({ logs = 0.001 }) -- 1,048 bytes
    local m = manager(config)
    assert.is_true(m:deploy("production", "v1").success)
    local log = logs .. "/production-v1-0.log"
    local f = assert(io.open(log, "a"))
    f:write(string.rep("request served\n", 100)) -- 1,500 bytes
    f:close()
    local r = m:prune("production")
    assert.equal(1, r.logs_rotated)
    assert.equal(string.rep("request served\n", 100), fixtures.read_file(log .. ".1"):sub(-1500))
    assert.matches("^%-%-%- deployctl .-\ndemo%-app v1 listening", fixtures.read_file(log .. ".1")) -- what came before
    assert.equal("", fixtures.read_file(log))
    -- the instance's next output lands at the start of the emptied file
    assert.is_true(m:deploy("production", "v2").success) -- v1 drains
    fixtures.wait_until(function() return (fixtures.read_file(log) or ""):find("draining") end, 10, "v1's output")
    assert.matches("^demo%-app v1 draining", fixtures.read_file(log))
    assert.is_nil(fixtures.read_file(log):find("\0", 1, true))
  end)

  it("`deployctl prune` says what went; a per-target retain overrides the top level", function()
    local config = setup({ history = 50 }, { history = 1, versions = 1 })
    for _, v in ipairs{ "1", "2", "3" } do
      assert.equal(0, (cli.run({ "--config", config, "deploy", "production", v, "--set", "scale_down_delay=0" })))
    end
    local code, out, err = cli.run({ "--config", config, "prune" })
    assert.equal(0, code, err)
    assert.matches("production: 0 deployment%(s%) and %d+ log file%(s%) %(.-%) removed, 0 log%(s%) rotated", out)
    local m = manager(config)
    assert.same({ "3:succeeded", "2:succeeded" }, versions(m, "production"))
    code, _, err = cli.run({ "--config", config, "prune", "nowhere" })
    assert.equal(2, code)
    assert.matches("unknown target 'nowhere'", err)
  end)

  it("refuses bad retain settings with the field and the fix", function()
    local cases = {
      { { history = 0 }, "config %.retain%.history must be" },
      { { history = 2.5 }, "config %.retain%.history must be a whole number, got 2%.5" },
      { { versions = "ten" }, "config %.retain%.versions must be a number, got string" },
      { { logs = -1 }, "config %.retain%.logs must be between 0 and" },
      { { history = 5, versions = 6 }, "versions %(6%) is more than history %(5%).-raise history to at least 6" },
      { { keep = 3 }, "config %.retain has an unknown field 'keep' %(known: history, versions, logs%)" },
      { "all", "config %.retain must be a table, got string" },
    }
    for _, c in ipairs(cases) do
      local cfg = fixtures.config{ retain = c[1], targets = { production = fixtures.target_config{} } }
      local ok, err = pcall(deploy.DeploymentManager, { config = cfg })
      assert.is_false(ok, c[2])
      assert.matches(c[2], err)
    end
    local t = fixtures.target_config{}
    t.retain = { history = 1, versions = 2 }
    local ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = t } } })
    assert.is_false(ok)
    assert.matches("config targets%.production%.retain versions %(2%) is more than history %(1%)", err)
  end)
end)
