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
end)
