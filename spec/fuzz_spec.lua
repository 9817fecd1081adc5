-- Inputs the fuzzers of fuzz/ found, each fed through the real code path
-- it came in by. Every reproducer is also a seed of its fuzz target
-- (fuzz/corpus/<target>/), so scripts/fuzz runs it again too.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local git = require "spec.support.git"

local function reproducer(target, name)
  local path = "fuzz/corpus/" .. target .. "/" .. name
  return assert(fixtures.read_file(path), "missing reproducer " .. path)
end

-- A repository to commit manifests to (file://) and a manager whose
-- targets run the demo app, router "none".
local function gitops_env()
  local repo = git.repo()
  local dir = fixtures.tmpdir("targets")
  local cfg = fixtures.config{ targets = { staging = fixtures.target_config{ instances = 1, dir = dir } } }
  local m = deploy.DeploymentManager{ config = cfg }
  return { repo = repo, m = m,
           sync = deploy.GitOpsSynchronizer{ repo_url = repo:file_url(), manager = m } }
end

-- A stand-in for HAProxy's stats socket, for answers a real HAProxy cannot
-- give: socat runs a small responder per connection (one command, one
-- answer, then the end, as HAProxy's non-interactive CLI does). It answers
-- "show servers state" with the given text, "add server" with HAProxy's
-- sentence and everything else with the empty line of success, and logs
-- every command it gets.
local function fake_stats_socket(state)
  local dir = fixtures.tmpdir("fake-haproxy")
  fixtures.write_file(dir .. "/state", state)
  fixtures.write_file(dir .. "/respond", table.concat({
    "#!/bin/bash",
    "IFS= read -r cmd",
    "printf '%s\\n' \"$cmd\" >> " .. fixtures.shell_quote(dir .. "/commands.log"),
    "case \"$cmd\" in",
    "  'show servers state '*) cat " .. fixtures.shell_quote(dir .. "/state") .. " ;;",
    "  'add server '*) printf 'New server registered.\\n\\n' ;;",
    "  *) printf '\\n' ;;",
    "esac",
  }, "\n") .. "\n")
  os.execute("chmod +x " .. fixtures.shell_quote(dir .. "/respond"))
  local sock = dir .. "/admin.sock"
  fixtures.spawn(string.format("exec socat UNIX-LISTEN:%s,fork EXEC:%s", fixtures.shell_quote(sock),
                               fixtures.shell_quote(dir .. "/respond")), dir .. "/socat.log")
  fixtures.wait_until(function() return os.execute("test -S " .. fixtures.shell_quote(sock)) end, 5, "the fake socket")
  return {
    socket = sock, backend = "app",
    commands = function()
      local list = {}
      for line in (fixtures.read_file(dir .. "/commands.log") or ""):gmatch("[^\n]+") do list[#list + 1] = line end
      return list
    end,
  }
end

describe("inputs found by fuzzing", function()
  after_each(fixtures.cleanup)

  describe("GitOps manifests (fuzz/json.c)", function()
    it("refuses a manifest with bytes after a NUL instead of reading it up to the NUL", function()
      local env = gitops_env()
      local text = reproducer("manifest", "nul-after-value.json")
      assert.truthy(text:find("\0", 1, true))
      env.repo:write("staging.json", text)
      env.repo:commit("a manifest with a NUL byte")
      local r = env.sync:sync()
      assert.is_false(r.success)
      assert.same({}, r.applied)
      assert.same({ "staging.json: not valid JSON: line 1, column 36: a NUL byte (JSON is text; nothing after it "
                    .. "is read): fix the syntax" }, r.errors)
      assert.same({}, env.m:history("staging"))
    end)
  end)

  describe("GitOps manifests (fuzz/manifest.c)", function()
    -- With an increment of 1e-300 the share never moves (10 + 1e-300 is 10)
    -- and the count of steps overflowed an int (UBSan), so the canary it
    -- described could never finish: it is refused where it is made.
    it("refuses a canary whose increment would take more than 1,000 steps", function()
      local env = gitops_env()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("first")
      local r = env.sync:sync()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      env.repo:write("staging.json", reproducer("manifest", "tiny-increment.json"))
      env.repo:commit("a canary that never ends")
      local diff, msg, errors = env.sync:get_diff()
      assert.is_nil(diff)
      assert.truthy(msg)
      assert.same({ "staging.json: field 'strategy': CanaryStrategy increment 1e-300 takes 9.8e+301 steps from "
                    .. "initial_percentage 2 to 100 %: at most 1000 are allowed (raise increment)" }, errors)
      r = env.sync:sync()
      assert.is_false(r.success)
      assert.same({}, r.applied)
      assert.equal("1.0.0", env.m:get_status("staging").current_version)
      assert.error_matches(function() deploy.CanaryStrategy{ increment = 0.05 } end,
        "CanaryStrategy increment 0.05 takes 1801 steps from initial_percentage 10 to 100 %%: at most 1000")
      assert.has_no.errors(function() deploy.CanaryStrategy{ increment = 0.1 } end)
    end)
  end)

  describe("config files (fuzz/config.c)", function()
    it("refuses a targets table that grows while it is read, instead of writing past the array", function()
      -- The file as a config file is loaded; only the store moves to a
      -- temporary directory.
      local cfg = dofile("fuzz/corpus/config/targets-grown-while-read.lua")
      cfg.state = fixtures.tmpdir("state") .. "/state.db"
      assert.has_error(function() deploy.DeploymentManager{ config = cfg } end,
        "deploy: config .targets changed while it was read (a metamethod added to it: build the table first)")
    end)

    it("says a count of 1e308 is out of range, without converting it to an integer first", function()
      local cfg = dofile("fuzz/corpus/config/instances-1e308.lua")
      cfg.state = fixtures.tmpdir("state") .. "/state.db"
      assert.has_error(function() deploy.DeploymentManager{ config = cfg } end,
        "deploy: config targets.b.instances must be between 1 and 64")
      cfg.targets.b.instances = 0 / 0
      assert.error_matches(function() deploy.DeploymentManager{ config = cfg } end,
        "^deploy: config targets%.b%.instances must be a whole number, got %-?nan$")
    end)
  end)

  describe("HAProxy answers (fuzz/haproxy.c)", function()
    -- A real HAProxy cannot produce this answer: its CLI splits commands at
    -- ';' and server names allow only letters, digits and "_-.:". So the
    -- answer comes from a stand-in socket. The reproducer is HAProxy
    -- 2.6's own answer with one line added.
    it("never sends back a server name that HAProxy's CLI would read as more than one command", function()
      local state = reproducer("haproxy", "injected-name"):match("^[^%z]*")
      assert.truthy(state:find("dc_9;disable\tfrontend\tfe", 1, true))
      local fake = fake_stats_socket(state)
      local cfg = fixtures.config{ targets = { web = fixtures.target_config{ instances = 1, haproxy = fake } } }
      local m = deploy.DeploymentManager{ config = cfg }
      local r = m:deploy("web", "1.0.0")
      assert.is_false(r.success)
      local commands = fake.commands()
      assert.is_true(#commands > 0)
      for _, c in ipairs(commands) do assert.equal("show servers state app", c) end
      assert.truthy(table.concat(r.errors, "\n"):find("'show servers state app' answered a server "
        .. "'dc_9;disable?frontend?fe' whose name HAProxy does not allow", 1, true), table.concat(r.errors, "\n"))
    end)
  end)
end)
