-- GitOpsSynchronizer{ repo_url, branch, path } alone, as the specification
-- constructs it: the manager comes from manager = ..., or at the first
-- call that needs one from the default config (./deployctl.lua,
-- $DEPLOY_CONFIG); without either, an error that names the synchronizer
-- and both ways. A real repository over file://, test targets.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local git = require "spec.support.git"

local q = fixtures.shell_quote

-- Runs a Lua script with lua5.4 in dir (this build's deploy.so): output, ok.
local function lua_in(dir, script, env)
  fixtures.write_file(dir .. "/probe.lua", script)
  local build = fixtures.build_dir()
  if build:sub(1, 1) ~= "/" then build = fixtures.root() .. "/" .. build end
  local prefix = "env -u DEPLOY_CONFIG " .. fixtures.lua_child_env() .. "LUA_CPATH=" .. q(build .. "/?.so;;") .. " "
  for k, v in pairs(env or {}) do prefix = prefix .. k .. "=" .. q(v) .. " " end
  local p = io.popen("cd " .. q(dir) .. " && " .. prefix .. "lua5.4 probe.lua 2>&1; echo \"rc=$?\"")
  local out = p:read("a")
  p:close()
  return out
end

local function repo_with(version)
  local repo = git.repo()
  repo:manifest("staging.json", { target = "staging", version = version })
  git.sh(string.format("git -C %s add -A && git -C %s commit -q -m m && git -C %s push -q %s main",
                       q(repo.work), q(repo.work), q(repo.work), q(repo.bare)))
  return repo
end

local CONFIG = [[return { state = %q, clock = "virtual",
  targets = { staging = { instances = 1, provider = { kind = "test" }, router = { kind = "test" } } } }
]]

describe("GitOpsSynchronizer{ repo_url } without a manager", function()
  after_each(fixtures.cleanup)

  it("takes the default config's manager at the first call that needs one", function()
    local repo = repo_with("1.0.0")
    local dir = fixtures.tmpdir("gitdefault")
    fixtures.write_file(dir .. "/deployctl.lua", string.format(CONFIG, dir .. "/state.db"))
    local out = lua_in(dir, string.format([[
      local deploy = require "deploy"
      local s = deploy.GitOpsSynchronizer{ repo_url = %q, branch = "main", path = "/" }
      print(s.repo_url, s.branch, s.path, s.manager)
      local changes = assert(s:get_diff())
      print(#changes, changes[1].target, changes[1].kind, changes[1].to)
      local r = s:sync()
      print(r.success, s.manager:get_status("staging").current_version)
    ]], repo:file_url()))
    assert.matches("file://.-deploy%.git\tmain\t/\tnil\n", out)
    assert.matches("1\tstaging\tcreate\t1%.0%.0\n", out)
    assert.matches("true\t1%.0%.0\n", out)
    assert.matches("rc=0", out)
  end)

  it("finds $DEPLOY_CONFIG too", function()
    local repo = repo_with("2.0.0")
    local dir = fixtures.tmpdir("gitdefault")
    fixtures.write_file(dir .. "/elsewhere.lua", string.format(CONFIG, dir .. "/state.db"))
    local out = lua_in(dir, string.format([[
      local deploy = require "deploy"
      local s = deploy.GitOpsSynchronizer{ repo_url = %q }
      print(#assert(s:get_diff()))
    ]], repo:file_url()), { DEPLOY_CONFIG = dir .. "/elsewhere.lua" })
    assert.matches("^1\nrc=0", out)
  end)

  it("constructs without a config, and the first call says what is missing and how to give it", function()
    local dir = fixtures.tmpdir("gitdefault")
    local out = lua_in(dir, [[
      local deploy = require "deploy"
      local s = deploy.GitOpsSynchronizer{ repo_url = "https://bob:s3cret-token@127.0.0.1:9/x.git" }
      print(s.repo_url, tostring(s))
      local ok, err = pcall(s.get_diff, s)
      print(ok, err)
      ok, err = pcall(s.sync, s)
      print(ok, err)
    ]])
    assert.matches("https://bob:%*%*%*@127%.0%.0%.1:9/x%.git\tGitOpsSynchronizer%(https://bob:%*%*%*@", out)
    assert.not_matches("s3cret", out)
    assert.matches("false\tdeploy: GitOpsSynchronizer needs a DeploymentManager and found none: give manager = " ..
                   "deploy%.DeploymentManager{ config = %.%.%. } to it, or write a config file %(%-%-config FILE, " ..
                   "%$DEPLOY_CONFIG, or %./deployctl%.lua%)", out)
    local _, n = out:gsub("needs a DeploymentManager", "")
    assert.equal(2, n)
  end)

  it("refuses a manager = that is not a DeploymentManager, and a closed synchronizer", function()
    assert.error_matches(function() deploy.GitOpsSynchronizer{ repo_url = "file:///nowhere", manager = {} } end,
                         "DeploymentManager")
    local s = deploy.GitOpsSynchronizer{ repo_url = "file:///nowhere" }
    s:close()
    assert.error_matches(function() s:get_diff() end, "this GitOpsSynchronizer was closed")
  end)
end)
