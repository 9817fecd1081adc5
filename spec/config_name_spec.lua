-- The default config file is ./deployctl.lua: ./deploy.lua hid the deploy
-- module from require in its directory. A ./deploy.lua that is a config
-- still works for one release, with a warning; one that is not (a user's
-- module) is never loaded as a config.
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

-- deployctl ARGS run in dir, env cleared of DEPLOY_CONFIG: code, stdout, stderr.
local function run_in(dir, args, env)
  local words = {}
  for i, a in ipairs(args) do words[i] = q(a) end
  local prefix = "env -u DEPLOY_CONFIG -u DEPLOY_STATE "
  for k, v in pairs(env or {}) do prefix = prefix .. k .. "=" .. q(v) .. " " end
  local cmd = "cd " .. q(dir) .. " && " .. prefix .. q(cli.bin()) .. " " .. table.concat(words, " ") ..
              " >" .. q(dir .. "/.out") .. " 2>" .. q(dir .. "/.err") .. " </dev/null"
  local _, _, code = os.execute(cmd)
  return code, fixtures.read_file(dir .. "/.out") or "", fixtures.read_file(dir .. "/.err") or ""
end

local function config_text(dir)
  return string.format([[return {
  state = %q,
  targets = { staging = { instances = 1, provider = { kind = "test" }, router = { kind = "test" } } },
}
]], dir .. "/state.db")
end

describe("the config file's name", function()
  after_each(fixtures.cleanup)

  it("is ./deployctl.lua by default, without a warning", function()
    local dir = fixtures.tmpdir("cfgname")
    fixtures.write_file(dir .. "/deployctl.lua", config_text(dir))
    local code, out, err = run_in(dir, { "status" })
    assert.equal(0, code, err)
    assert.matches("staging", out)
    assert.equal("", err)
  end)

  it("still reads a ./deploy.lua that is a config, and says what to rename", function()
    local dir = fixtures.tmpdir("cfgname")
    fixtures.write_file(dir .. "/deploy.lua", config_text(dir))
    local code, out, err = run_in(dir, { "status" })
    assert.equal(0, code, err)
    assert.matches("staging", out)
    assert.matches("warning: reading the config from %./deploy%.lua, the old default name; rename it to %./deployctl%.lua", err)
    -- a pipeline's DeploymentManager{} finds it too, and is warned once
    fixtures.write_file(dir .. "/p.lua", [[
      local deploy = require "deploy"
      local a = deploy.DeploymentManager{}
      local b = deploy.DeploymentManager{}
      print(a:targets()[1], b:targets()[1])
    ]])
    code, out, err = run_in(dir, { "run", "p.lua" })
    assert.equal(0, code, err)
    assert.matches("staging\tstaging", out)
    local _, warnings = err:gsub("warning: reading the config", "")
    assert.equal(1, warnings)
  end)

  it("prefers ./deployctl.lua over ./deploy.lua", function()
    local dir = fixtures.tmpdir("cfgname")
    fixtures.write_file(dir .. "/deployctl.lua", config_text(dir))
    fixtures.write_file(dir .. "/deploy.lua", "return { targets = { other = {} } }\n")
    local code, out, err = run_in(dir, { "status" })
    assert.equal(0, code, err)
    assert.matches("staging", out)
    assert.not_matches("other", out)
    assert.equal("", err)
  end)

  it("never loads a ./deploy.lua that is not a config (a user's module) as one", function()
    local dir = fixtures.tmpdir("cfgname")
    -- a module with a side effect: had it run, the marker file would exist
    fixtures.write_file(dir .. "/deploy.lua", string.format([[
      local f = io.open(%q, "w") if f then f:write("ran") f:close() end
      local M = {}
      function M.now() return 0 end
      return M
    ]], dir .. "/marker"))
    local code, _, err = run_in(dir, { "status" })
    assert.equal(2, code)
    assert.matches("cannot read config file 'deployctl%.lua'", err)
    assert.matches("create %./deployctl%.lua", err)
    assert.not_matches("warning", err)
    assert.is_nil(fixtures.read_file(dir .. "/marker"))
    -- a module that returns a table without targets, or raises, is not one either
    for _, text in ipairs({ "return { now = function() end }", "error('boom')", "while true do end",
                            "return require('os').exit(3)" }) do
      fixtures.write_file(dir .. "/deploy.lua", text)
      code, _, err = run_in(dir, { "status" })
      assert.equal(2, code, text)
      assert.matches("cannot read config file 'deployctl%.lua'", err, text)
    end
  end)

  it("--config, -c and $DEPLOY_CONFIG name any file, deploy.lua included, without a warning", function()
    local dir = fixtures.tmpdir("cfgname")
    fixtures.write_file(dir .. "/deploy.lua", config_text(dir))
    for _, args in ipairs({ { "--config", "deploy.lua", "status" }, { "-c", "deploy.lua", "status" } }) do
      local code, out, err = run_in(dir, args)
      assert.equal(0, code, err)
      assert.matches("staging", out)
      assert.equal("", err)
    end
    local code, out, err = run_in(dir, { "status" }, { DEPLOY_CONFIG = dir .. "/deploy.lua" })
    assert.equal(0, code, err)
    assert.matches("staging", out)
    assert.equal("", err)
  end)

  it("lets busted's require 'deploy' find the module beside a ./deployctl.lua", function()
    local dir = fixtures.tmpdir("cfgname")
    fixtures.write_file(dir .. "/deployctl.lua", config_text(dir))
    fixtures.write_file(dir .. "/probe.lua", [[
      local deploy = require "deploy"
      io.write(type(deploy.now), " ", type(deploy.DeploymentManager{}))
    ]])
    local build = fixtures.build_dir()
    if build:sub(1, 1) ~= "/" then build = fixtures.root() .. "/" .. build end
    local out = io.popen("cd " .. q(dir) .. " && env -u DEPLOY_CONFIG " .. fixtures.lua_child_env() .. "LUA_CPATH=" .. q(build .. "/?.so;;") ..
                         " lua5.4 probe.lua 2>&1"):read("a")
    assert.equal("function userdata", out)
  end)
end)
