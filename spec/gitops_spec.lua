-- GitOpsSynchronizer against real repositories: git daemon on 127.0.0.1,
-- git http-backend behind nginx (TLS, basic auth), sshd with a throwaway
-- key, and file://. Real demo-app processes, router "none".
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local git = require "spec.support.git"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

-- A repository served by git daemon, and a manager with targets staging,
-- production and qa (one instance each; dir holds their unhealthy-* files).
local function setup(opts)
  opts = opts or {}
  local repo = git.repo()
  local daemon = git.daemon(repo.base)
  local dir = fixtures.tmpdir("targets")
  local targets = {}
  for _, name in ipairs(opts.targets or { "staging", "production", "qa" }) do
    targets[name] = fixtures.target_config{ instances = 1, dir = dir }
  end
  local cfg = fixtures.config{ targets = targets }
  cfg.clock = opts.clock or "real"
  -- Manifests without a strategy get the manager's: blue-green, blue
  -- stopped at once (the warm window is bake_spec's).
  local m = deploy.DeploymentManager{ config = cfg, strategies = opts.strategies,
                                      strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  return { repo = repo, daemon = daemon, m = m, cfg = cfg, dir = dir, url = daemon.url(repo.name) }
end

local function synchronizer(env, extra)
  local o = { repo_url = env.url, manager = env.m }
  for k, v in pairs(extra or {}) do o[k] = v end
  return deploy.GitOpsSynchronizer(o)
end

local function by_target(list)
  local t = {}
  for _, c in ipairs(list) do t[c.target] = c end
  return t
end

local function live(m, target)
  return m:get_status(target).current_version
end

local function read_tree(dir)
  return git.sh("find " .. q(dir) .. " -type f -exec cat {} + 2>/dev/null; true")
end

describe("GitOpsSynchronizer", function()
  after_each(fixtures.cleanup)

  describe("construction", function()
    it("needs repo_url, and reads its fields back with the URL's token redacted", function()
      local env = setup()
      assert.has_error(function() deploy.GitOpsSynchronizer{ manager = env.m } end,
        'deploy: GitOpsSynchronizer needs repo_url = "https://host/repo.git" (or git://, ssh://, file://)')
      assert.error_matches(function() deploy.GitOpsSynchronizer{ repo_url = env.url, manager = env.m, colour = 1 } end,
        "has no option 'colour' %(known: repo_url, branch, path, manager, interval, prune%)")
      assert.error_matches(function() synchronizer(env, { branch = "a b" }) end, "branch 'a b' is not a valid branch name")
      assert.error_matches(function() synchronizer(env, { interval = 0 }) end, "interval must be > 0 seconds")
      assert.error_matches(function() synchronizer(env, { prune = "yes" }) end, "prune must be true or false, got string")
      local s = synchronizer(env)
      assert.same({ env.url, "main", "/", 60, false },
                  { s.repo_url, s.branch, s.path, s.interval, s.prune })
      local t = deploy.GitOpsSynchronizer{ repo_url = "https://alice:tok-SECRET-1@127.0.0.1:9/x.git", manager = env.m,
                                           branch = "release", path = "deploy/prod", interval = 5, prune = true }
      assert.same({ "https://alice:***@127.0.0.1:9/x.git", "release", "deploy/prod", 5, true },
                  { t.repo_url, t.branch, t.path, t.interval, t.prune })
      assert.equal("https://***@127.0.0.1:9/x.git",
                   deploy.GitOpsSynchronizer{ repo_url = "https://tok-SECRET-2@127.0.0.1:9/x.git", manager = env.m }.repo_url)
      assert.is_nil(tostring(t):find("tok-SECRET-1", 1, true))
    end)

    it("keeps a bare cache next to the store and reads manifests without a work tree", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local head = env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_table(s:get_diff())
      local state_dir = env.cfg.state:match("^(.*)/[^/]+$")
      assert.matches("^" .. state_dir:gsub("%p", "%%%0") .. "/git/%x+$", s.cache)
      assert.equal("true\n", git.sh("git -C " .. q(s.cache) .. " rev-parse --is-bare-repository"))
      assert.equal(head .. "\n", git.sh("git -C " .. q(s.cache) .. " rev-parse refs/remotes/origin/main"))
      assert.is_nil(fixtures.read_file(s.cache .. "/staging.json"))
      assert.equal(head, s.revision)
    end)
  end)

  describe("get_diff against git daemon", function()
    it("lists create, update and delete changes with from, to, revision and file", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:manifest("production.json", { target = "production", version = "2.0.0" })
      local rev1 = env.repo:commit("first")
      local s = synchronizer(env)
      local d = s:get_diff()
      assert.same({
        { target = "production", kind = "create", to = "2.0.0", revision = rev1, file = "production.json" },
        { target = "staging", kind = "create", to = "1.0.0", revision = rev1, file = "staging.json" },
      }, d)
      assert.is_true(s:sync().success)
      assert.same({}, s:get_diff())

      env.repo:manifest("staging.json", { target = "staging", version = "1.1.0" })
      env.repo:remove("production.json")
      local rev2 = env.repo:commit("second")
      assert.same({
        { target = "production", kind = "delete", from = "2.0.0", revision = rev2, file = "production.json" },
        { target = "staging", kind = "update", from = "1.0.0", to = "1.1.0", revision = rev2, file = "staging.json" },
      }, s:get_diff())
    end)

    it("shows a target deployed by hand to another version as an update (drift)", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_true(s:sync().success)
      assert.is_true(env.m:deploy("staging", "9.9.9").success)
      local d = s:get_diff()
      assert.equal(1, #d)
      assert.same({ "staging", "update", "9.9.9", "1.0.0" }, { d[1].target, d[1].kind, d[1].from, d[1].to })
      assert.is_nil(d[1].pinned)
      local r = s:sync()
      assert.is_true(r.success)
      assert.equal("1.0.0", live(env.m, "staging"))
    end)

    it("reads only *.json directly under path; other files and subdirectories are ignored", function()
      local env = setup()
      env.repo:manifest("envs/prod/staging.json", { target = "staging", version = "1.0.0" })
      env.repo:write("envs/prod/README.md", "not a manifest")
      env.repo:write("envs/prod/old/qa.json", "{ not even json")
      env.repo:write("staging.json", "{ outside path: never read")
      env.repo:commit("layout")
      local d = assert(synchronizer(env, { path = "/envs/prod/" }):get_diff())
      assert.same({ { target = "staging", kind = "create", to = "1.0.0", revision = env.repo:head(),
                      file = "envs/prod/staging.json" } }, d)
    end)
  end)

  describe("sync", function()
    it("applies every change with its manifest's strategy, side by side, and records the commit", function()
      local env = setup{ strategies = { fast = deploy.BlueGreenStrategy{ switch_delay = 0 } } }
      env.repo:manifest("production.json", { target = "production", version = "2.0.0",
        strategy = { kind = "canary", initial_percentage = 50, increment = 50, interval = 0 },
        metadata = { ticket = "OPS-42" } })
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:manifest("qa.json", { target = "qa", version = "3.0.0", strategy = { kind = "fast" } })
      local rev = env.repo:commit("release")
      local r = synchronizer(env):sync()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      assert.equal(rev, r.revision)
      assert.is_nil(r.errors)
      assert.equal("number", type(r.duration))
      local applied = by_target(r.applied)
      assert.same({ true, "canary", "2.0.0", "create" },
                  { applied.production.success, applied.production.strategy, applied.production.version, applied.production.kind })
      assert.equal("blue-green", applied.staging.strategy) -- the manager's default
      assert.equal("blue-green", applied.qa.strategy)      -- registered as "fast"
      for _, t in ipairs({ "production", "staging", "qa" }) do assert.equal(applied[t].version, live(env.m, t)) end
      -- side by side: every rollout started before any of them ended
      local rows = {}
      for _, t in ipairs({ "production", "staging", "qa" }) do rows[#rows + 1] = env.m:history(t)[1] end
      for _, a in ipairs(rows) do
        for _, b in ipairs(rows) do assert.is_true(a.started < b.started + b.duration) end
      end
      local h = env.m:history("production")[1]
      assert.same({ revision = rev, file = "production.json", repo = env.url, branch = "main", path = "/",
                    blob = git.sh("git -C " .. q(env.repo.bare) .. " rev-parse " .. rev .. ":production.json"):gsub("%s+$", "") },
                  h.metadata.gitops)
      assert.equal("OPS-42", h.metadata.ticket)
      assert.equal(applied.production.deployment_id, h.id)
    end)

    it("applies nothing from a revision with one invalid manifest, then the fixed one", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_true(s:sync().success)
      env.repo:manifest("staging.json", { target = "staging", version = "1.1.0" })
      env.repo:manifest("production.json", { target = "production", version = "2.0.0", replicas = 3 })
      local bad = env.repo:commit("bad")
      local r = s:sync()
      assert.is_false(r.success)
      assert.equal(bad, r.revision)
      assert.same({}, r.applied)
      assert.same({ "production.json: unknown field 'replicas' (known: target, version, strategy, metadata): remove it" }, r.errors)
      assert.equal("1.0.0", live(env.m, "staging"))
      assert.is_nil(live(env.m, "production"))
      assert.equal(1, #env.m:history("staging"))
      local d, msg, errs = s:get_diff()
      assert.is_nil(d)
      assert.matches("production.json: unknown field 'replicas'", msg)
      assert.equal(1, #errs)

      env.repo:manifest("production.json", { target = "production", version = "2.0.0" })
      local good = env.repo:commit("fix")
      r = s:sync()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      assert.equal(good, r.revision)
      assert.same({ "1.1.0", "2.0.0" }, { live(env.m, "staging"), live(env.m, "production") })
    end)

    it("refuses bad manifests with an error naming the file and the field", function()
      local env = setup()
      env.repo:write("a.json", '{"target": "staging", "version": "1.0.0", "colour": "blue"}')
      env.repo:write("b.json", '{"target": "production", "version": 2}')
      env.repo:write("c.json", '{"version": "1.0.0"}')
      env.repo:write("d.json", '{"target": "nowhere", "version": "1.0.0"}')
      env.repo:write("dup-1.json", '{"target": "qa", "version": "1.0.0"}')
      env.repo:write("dup-2.json", '{"target": "qa", "version": "1.0.1"}')
      env.repo:write("e.json", '{"target": "staging", "version": "1.0.0", "metadata": {"pad": "'
                               .. string.rep("x", 1024 * 1024) .. '"}}')
      env.repo:write("f.json", '{"target": "staging", "version": "1.0.0", "strategy": {"kind": "canary", "increment": -5}}')
      env.repo:write("g.json", '{"target": "staging", ')
      env.repo:write("h.json", '{"target": "staging", "version": "1.0.0", "strategy": {"kind": "ring"}}')
      env.repo:write("i.json", '{"target": "staging", "version": "1 0", "strategy": "canary"}')
      env.repo:write("j.json", '{"target": "staging", "version": "1.0.0", "metadata": {"gitops": {}}}')
      env.repo:write("k.json", '[1, 2]')
      env.repo:commit("all wrong")
      local r = synchronizer(env):sync()
      assert.is_false(r.success)
      assert.same({}, r.applied)
      local all = table.concat(r.errors, "\n")
      local expected = {
        "a.json: unknown field 'colour'",
        "b.json: field 'version' must be a string, got number",
        "c.json: field 'target' is missing",
        "d.json: field 'target': 'nowhere' is not a target of the manager's config (known: production, qa, staging)",
        "dup-2.json: field 'target': 'qa' is also the target of dup-1.json",
        "e.json: is larger than 1 MiB: refused unread",
        "f.json: field 'strategy': CanaryStrategy increment must be in",
        "g.json: not valid JSON",
        "h.json: field 'strategy.kind': 'ring' is not canary, blue-green or a strategy registered with the manager",
        "i.json: field 'version' has a character not allowed at byte 2",
        "i.json: field 'strategy' must be an object",
        "j.json: field 'metadata.gitops' is reserved",
        "k.json: must be a JSON object",
      }
      for _, e in ipairs(expected) do assert.is_truthy(all:find(e, 1, true), "missing: " .. e .. "\nin:\n" .. all) end
      assert.equal(#expected, #r.errors, all)
      for _, t in ipairs({ "staging", "production", "qa" }) do assert.same({}, env.m:history(t)) end
    end)

    it("refuses what a JSON reader might read two ways: duplicate keys, a NUL, bad UTF-8, huge integers", function()
      local env = setup()
      env.repo:write("dup.json", '{"target": "staging", "version": "1.0.0", "version": "6.6.6"}')
      env.repo:write("nul.json", '{"target": "staging", "version": "g7"}\0{"target": "production", "version": "x"}')
      env.repo:write("utf.json", '{"target": "qa", "version": "1.0.0", "metadata": {"by": "caf\xe9"}}')
      env.repo:write("big.json", '{"target": "production", "version": "1.0.0", "metadata": {"n": 9007199254740993}}')
      env.repo:commit("ambiguous")
      local r = synchronizer(env):sync()
      assert.is_false(r.success)
      assert.same({}, r.applied)
      local all = table.concat(r.errors, "\n")
      local expected = {
        "dup.json: not valid JSON: line 1, column 51: duplicate object key near '\"version\"'",
        "nul.json: not valid JSON: ",
        "utf.json: not valid JSON: line 1, column 60: unable to decode byte 0xe9",
        "big.json: not valid JSON: the integer 9007199254740993 is beyond 2^53 and would lose precision: write it as a string",
      }
      for _, e in ipairs(expected) do assert.is_truthy(all:find(e, 1, true), "missing: " .. e .. "\nin:\n" .. all) end
      -- every error is one line: a file name cannot forge another
      assert.equal(#expected, #r.errors, all)
      for _, e in ipairs(r.errors) do assert.is_nil(e:find("\n", 1, true), e) end
      for _, t in ipairs({ "staging", "production", "qa" }) do assert.same({}, env.m:history(t)) end
      -- and the result, as JSON, is valid UTF-8 that reads back
      assert.same(r.errors, cjson.decode(cjson.encode(r)).errors)
    end)

    it("leaves the other targets as they are when one rollout fails, and reports it", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:manifest("production.json", { target = "production", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_true(s:sync().success)
      fixtures.set_unhealthy(env.dir, "2.0.0")
      env.repo:manifest("staging.json", { target = "staging", version = "1.1.0" })
      env.repo:manifest("production.json", { target = "production", version = "2.0.0" })
      env.repo:commit("two")
      local r = s:sync()
      assert.is_false(r.success)
      local applied = by_target(r.applied)
      assert.is_true(applied.staging.success)
      assert.is_false(applied.production.success)
      assert.is_truthy(applied.production.errors[1])
      assert.matches("^production: ", r.errors[1])
      assert.equal(#applied.production.errors, #r.errors)
      assert.same({ "1.1.0", "1.0.0" }, { live(env.m, "staging"), live(env.m, "production") })
      assert.equal("failed", env.m:history("production")[1].status)
    end)

    it("stops a target whose manifest is gone only with prune = true", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:manifest("qa.json", { target = "qa", version = "1.0.0" })
      env.repo:commit("one")
      assert.is_true(synchronizer(env):sync().success)
      env.m:deploy("production", "5.0.0") -- by hand: not this repository's, never deleted
      local pid = env.m:instances("qa")[1].pid
      env.repo:remove("qa.json")
      local rev = env.repo:commit("retire qa")
      local r = synchronizer(env):sync()
      assert.is_true(r.success)
      assert.same({}, r.applied)
      assert.same({ "qa", "delete", "1.0.0" }, { r.skipped[1].target, r.skipped[1].kind, r.skipped[1].from })
      assert.matches("prune = true", r.skipped[1].reason)
      assert.is_true(fixtures.alive(pid))

      r = synchronizer(env, { prune = true }):sync()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      assert.same({ { target = "qa", kind = "delete", from = "1.0.0", file = "qa.json", strategy = "prune",
                      success = true } }, r.applied)
      assert.is_true(fixtures.wait_exit(pid, 5))
      assert.same({ target = "qa", status = "deployed", health = "unhealthy", instances = 0 }, env.m:get_status("qa"))
      local st = env.m:describe("qa")
      -- stopped on purpose, not failed (issue 13's view)
      assert.equal("stopped", st.state)
      assert.matches("^stopped %(prune, d%w+%): nothing serves, as asked$", st.summary)
      assert.same({}, env.m:instances("qa"))
      local h = env.m:history("qa")[1]
      assert.same({ "prune", "", "1.0.0", rev }, { h.strategy, h.version, h.from_version, h.metadata.gitops.revision })
      assert.same({}, synchronizer(env, { prune = true }):get_diff())
      assert.equal("5.0.0", live(env.m, "production"))
      -- a rollback brings it back
      assert.is_true(env.m:rollback("qa").success)
      assert.equal("1.0.0", live(env.m, "qa"))
    end)

    it("does not fight a manual rollback: the target stays pinned until git changes its manifest", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:manifest("production.json", { target = "production", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_true(s:sync().success)
      env.repo:manifest("staging.json", { target = "staging", version = "2.0.0", metadata = { a = 1, ticket = "OPS-9" } })
      local bad = env.repo:commit("bad release")
      assert.is_true(s:sync().success)
      assert.is_true(env.m:rollback("staging").success) -- the operator knows better
      assert.equal("1.0.0", live(env.m, "staging"))

      local d = s:get_diff()
      assert.same({ target = "staging", kind = "update", from = "1.0.0", to = "2.0.0", revision = bad,
                    file = "staging.json", pinned = true, pinned_revision = bad }, d[1])
      local r = s:sync()
      assert.is_true(r.success)
      assert.same({}, r.applied)
      assert.same({ "staging", "1.0.0", "2.0.0" }, { r.pinned[1].target, r.pinned[1].from, r.pinned[1].to })
      assert.equal("1.0.0", live(env.m, "staging"))

      -- git moves on elsewhere: still pinned
      env.repo:manifest("production.json", { target = "production", version = "1.1.0" })
      env.repo:commit("other target")
      r = s:sync()
      assert.same({ "production" }, { r.applied[1].target, r.applied[2] })
      assert.equal("staging", r.pinned[1].target)
      assert.equal("1.0.0", live(env.m, "staging"))

      -- git changes staging's manifest: applied again
      env.repo:manifest("staging.json", { target = "staging", version = "2.0.1" })
      env.repo:commit("fixed release")
      r = s:sync()
      assert.is_true(r.success)
      assert.same({}, r.pinned)
      assert.equal("2.0.1", live(env.m, "staging"))
    end)

    it("reads only the changed manifests after the first fetch, and nothing when the commit has not moved", function()
      local env = setup()
      env.repo:manifest("qa.json", { target = "qa", version = "1.0.0" })
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:write("sub/other.json", "{}")
      env.repo:commit("one")
      local s = synchronizer(env)
      assert.is_table(s:get_diff())
      assert.same({ downloaded = true, tree_diffed = false, blobs_read = 2 }, s.last_fetch)
      assert.is_table(s:get_diff())
      assert.same({ downloaded = false, tree_diffed = false, blobs_read = 0 }, s.last_fetch)
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.1" })
      env.repo:commit("two")
      assert.equal("1.0.1", by_target(s:get_diff()).staging.to)
      assert.same({ downloaded = true, tree_diffed = true, blobs_read = 1 }, s.last_fetch)
      env.repo:write("sub/other.json", "{ }")
      env.repo:commit("outside")
      assert.is_table(s:get_diff())
      assert.same({ downloaded = true, tree_diffed = true, blobs_read = 0 }, s.last_fetch)
    end)
  end)

  describe("errors", function()
    it("gives a clear error for an unreachable repository", function()
      local env = setup()
      local port = fixtures.free_port()
      local url = string.format("git://127.0.0.1:%d/gone.git", port)
      local s = deploy.GitOpsSynchronizer{ repo_url = url, manager = env.m }
      local d, msg, errs = s:get_diff()
      assert.is_nil(d)
      assert.matches("^deploy: gitops: cannot reach " .. url:gsub("%p", "%%%0") .. " %(branch main%): .*: check the URL", msg)
      assert.same({ msg }, errs)
      local r = s:sync()
      assert.same({ false, { msg }, {} }, { r.success, r.errors, r.applied })
      assert.is_nil(r.revision)
    end)

    it("gives a clear error for a missing branch, naming the branches there are", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      env.repo:commit("on dev", "dev")
      local d, msg = synchronizer(env, { branch = "nope" }):get_diff()
      assert.is_nil(d)
      assert.equal(string.format("deploy: gitops: branch not found in %s (branch nope): no branch 'nope' (branches: "
                                 .. "dev, main): set branch to an existing one, or push it", env.url), msg)
    end)

    it("refuses a symbolic link, naming it, and applies nothing", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:symlink("production.json", "../../../../etc/passwd")
      env.repo:commit("link")
      local r = synchronizer(env):sync()
      assert.is_false(r.success)
      assert.same({ "production.json: is a symbolic link: refused (a link could point outside path; commit the "
                    .. "manifest itself)" }, r.errors)
      assert.same({}, env.m:history("staging"))
      -- a path that is itself a link is refused too
      env.repo:manifest("envs/staging.json", { target = "staging", version = "1.0.0" })
      env.repo:symlink("current", "envs")
      env.repo:commit("linked dir")
      local d, msg = synchronizer(env, { path = "current" }):get_diff()
      assert.is_nil(d)
      assert.matches("path 'current' is a symbolic link in revision %x+: refused", msg)
    end)

    it("refuses '../' paths: in the path option and as a tree entry", function()
      local env = setup()
      assert.error_matches(function() synchronizer(env, { path = "envs/../../etc" }) end,
                           "path 'envs/%.%./%.%./etc' leaves the repository's tree")
      env.repo:manifest("envs/staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env, { path = "envs" })
      assert.equal(1, #s:get_diff())
      env.repo:commit_raw_entry("envs", "../escape.json", '{"target": "production", "version": "6.6.6"}')
      local r = s:sync() -- found by the tree diff
      assert.same({ false, {} }, { r.success, r.applied })
      assert.same({ "envs/../escape.json: has a name that leaves path ('/' or '..' in a tree entry): refused" }, r.errors)
      local _, msg = synchronizer(env, { path = "envs" }):get_diff() -- and by a full read
      assert.equal(r.errors[1], msg)
      assert.same({}, env.m:history("production"))
    end)

    it("never lets a token in the URL reach errors, results, the store or the cache", function()
      local env = setup()
      local token = "tok-" .. tostring(math.random(1e9)) .. "-SECRET"
      local port = fixtures.free_port()
      local urls = { string.format("https://deployer:%s@127.0.0.1:%d/x.git", token, port),
                     string.format("https://%s@127.0.0.1:%d/x.git", token, port) }
      local seen = {}
      for _, url in ipairs(urls) do
        local s = deploy.GitOpsSynchronizer{ repo_url = url, manager = env.m }
        local _, msg = s:get_diff()
        local r = s:sync()
        seen[#seen + 1] = table.concat({ s.repo_url, tostring(s), msg, cjson.encode(r) }, "\n")
        assert.matches("cannot reach https://", msg)
        seen[#seen + 1] = read_tree(s.cache)
      end
      seen[#seen + 1] = fixtures.read_file(env.cfg.state) or ""
      for _, text in ipairs(seen) do assert.is_nil(text:find(token, 1, true), text) end
    end)
  end)

  describe("watch", function()
    it("sees a push made while it runs, and stops when the callback returns false", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local rev1 = env.repo:commit("one")
      local s = synchronizer(env, { interval = 0.05 })
      local calls, rev2 = {}, nil
      local why = s:watch(function(changes, result)
        calls[#calls + 1] = { changes = changes, result = result }
        if #calls == 1 then
          env.repo:manifest("staging.json", { target = "staging", version = "1.1.0" })
          rev2 = env.repo:commit("pushed while watching")
          return true
        end
        return false
      end)
      assert.equal("stopped", why)
      assert.equal(2, #calls)
      assert.same({ rev1, true, "create" }, { calls[1].result.revision, calls[1].result.success, calls[1].changes[1].kind })
      assert.same({ rev2, true, "update", "1.1.0" },
                  { calls[2].result.revision, calls[2].result.success, calls[2].changes[1].kind, calls[2].result.applied[1].version })
      assert.equal("1.1.0", live(env.m, "staging"))
    end)

    it("keeps descriptors and pack files bounded over 40 fetches", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local s = synchronizer(env, { interval = 0.01 })
      local function fds()
        -- the shell's parent is this process
        return tonumber(git.sh("ls /proc/$PPID/fd | wc -l"):match("%d+"))
      end
      local function packs()
        return tonumber(git.sh("ls " .. q(s.cache) .. "/objects/pack/ | grep -c '%.pack$'; true"):match("%d+"))
      end
      local rounds, after5, most_packs = 0, nil, 0
      s:watch(function(_, result)
        assert.is_true(result.success, result.errors and result.errors[1])
        rounds = rounds + 1
        if rounds == 5 then after5 = fds() end
        most_packs = math.max(most_packs, packs())
        -- a commit that changes no manifest: one fetch, one pack, no rollout
        if rounds == 40 then return false end
        env.repo:write("notes-" .. rounds .. ".txt", "round " .. rounds)
        env.repo:commit("round " .. rounds)
        return true
      end)
      assert.equal(40, rounds)
      local after40 = fds()
      assert.is_true(after40 <= after5 + 2, "descriptors grew from " .. after5 .. " to " .. after40)
      assert.is_true(most_packs <= 9, most_packs .. " packs in the cache")
      assert.equal(env.repo:head(), s.revision)
    end)

    it("repairs drift: a target deployed by hand is put back", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local calls = 0
      synchronizer(env, { interval = 0.05 }):watch(function(changes, result)
        calls = calls + 1
        if calls == 1 then
          assert.is_true(env.m:deploy("staging", "7.7.7").success)
          return
        end
        assert.same({ "update", "7.7.7", "1.0.0" }, { changes[1].kind, changes[1].from, changes[1].to })
        assert.is_true(result.success)
        return false
      end)
      assert.equal(2, calls)
      assert.equal("1.0.0", live(env.m, "staging"))
    end)

    it("hands fetch failures to the callback and retries them with backoff, never ending", function()
      local env = setup{ clock = "virtual" }
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      local times, ends, errors, revs = {}, {}, {}, {}
      local rev2
      synchronizer(env, { interval = 10 }):watch(function(_, result)
        times[#times + 1] = deploy.now() - result.duration -- when the round began
        ends[#ends + 1] = deploy.now()
        revs[#revs + 1] = result.revision
        if not result.success then errors[#errors + 1] = result.errors[1] end
        if #times == 1 then env.daemon.stop() end
        if #times == 4 then
          env.repo:manifest("staging.json", { target = "staging", version = "2.0.0" })
          rev2 = env.repo:commit("while the server was down")
          env.daemon = git.daemon(env.repo.base, env.daemon.port)
        end
        return #times < 5
      end)
      assert.equal(5, #times)
      assert.equal(3, #errors)
      for _, e in ipairs(errors) do assert.matches("cannot reach git://127%.0%.0%.1:%d+/deploy%.git %(branch main%)", e) end
      local gaps = {}
      for i = 2, #times do gaps[#gaps + 1] = math.floor(times[i] - ends[i - 1] + 0.5) end
      assert.same({ 10, 20, 40, 80 }, gaps)
      assert.equal(rev2, revs[5])
      assert.equal("2.0.0", live(env.m, "staging"))
    end)

    it("lets a newer commit supersede a broken one and a failed rollout", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      fixtures.set_unhealthy(env.dir, "3.0.0")
      local results = {}
      synchronizer(env, { interval = 0.05 }):watch(function(_, result)
        results[#results + 1] = result
        local n = #results
        if n == 1 then
          env.repo:write("staging.json", '{"target": "staging", "version": "2.0.0",}')
          env.repo:commit("broken")
        elseif n == 2 then
          env.repo:manifest("staging.json", { target = "staging", version = "3.0.0" })
          env.repo:commit("unhealthy")
        elseif n == 3 then
          env.repo:manifest("staging.json", { target = "staging", version = "3.0.1" })
          env.repo:commit("fixed")
        end
        return n < 4
      end)
      assert.same({ true, false, false, true }, { results[1].success, results[2].success, results[3].success, results[4].success })
      assert.matches("^staging.json: not valid JSON", results[2].errors[1])
      assert.matches("^staging: ", results[3].errors[1])
      assert.equal("3.0.1", results[4].applied[1].version)
      assert.equal("3.0.1", live(env.m, "staging"))
    end)
  end)

  describe("deployctl diff | sync | watch", function()
    local function cli_setup()
      local env = setup()
      env.m:close()
      env.config = cli.write_config(fixtures.tmpdir("cfg"), env.cfg)
      return env
    end

    it("prints a manifest file name with a newline or escape in it escaped, one change per line", function()
      local env = cli_setup()
      env.repo:write("new\nline\27[2J.json", '{"target": "qa", "version": "1.0.0"}')
      env.repo:commit("odd name")
      local code, out, err = cli.run({ "--config", env.config, "diff", "--repo", env.url })
      assert.equal(0, code, err)
      assert.matches("qa%s+create%s+%-%s+%->%s+1%.0%.0%s+new\\nline\\x1b%[2J%.json\n", out)
      assert.is_nil(out:find("\27", 1, true))
      code, out, err = cli.run({ "--config", env.config, "sync", "--repo", env.url })
      assert.equal(0, code, err)
      assert.matches("qa: now at 1%.0%.0 %(blue%-green, new\\nline\\x1b%[2J%.json%)", out)
    end)

    it("diff and sync --repo URL, with the config's targets, exit codes and redacted output", function()
      local env = cli_setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local rev = env.repo:commit("one")
      local code, out, err = cli.run({ "--config", env.config, "diff", "--repo", env.url })
      assert.equal(0, code, err)
      assert.matches(env.url:gsub("%p", "%%%0") .. " main:/ at " .. rev:sub(1, 12), out)
      assert.matches("staging%s+create%s+%-%s+%->%s+1%.0%.0%s+staging%.json", out)
      code, out, err = cli.run({ "--config", env.config, "sync", "--repo", env.url })
      assert.equal(0, code, err)
      assert.matches("staging: now at 1%.0%.0 %(blue%-green, staging%.json%)", out)
      assert.matches("sync " .. rev:sub(1, 12) .. ": in sync %(1 applied", out)
      assert.matches("promoted", out) -- live event lines
      code, out = cli.run({ "--config", env.config, "diff", "--repo", env.url })
      assert.equal(0, code)
      assert.matches("no changes", out)

      env.repo:manifest("production.json", { target = "production", version = "2.0.0", replicas = 2 })
      env.repo:commit("bad")
      code, out, err = cli.run({ "--config", env.config, "sync", "--repo", env.url, "--quiet" })
      assert.equal(1, code)
      assert.matches("sync: production%.json: unknown field 'replicas'", err)
      assert.matches("FAILED", out)

      local token = "tok-" .. tostring(math.random(1e9))
      local gone = string.format("https://bob:%s@127.0.0.1:%d/x.git", token, fixtures.free_port())
      code, out, err = cli.run({ "--config", env.config, "diff", "--repo", gone })
      assert.equal(1, code)
      assert.matches("diff: deploy: gitops: cannot reach https://bob:%*%*%*@127%.0%.0%.1", err)
      assert.is_nil((out .. err):find(token, 1, true))

      code, _, err = cli.run({ "--config", env.config, "diff" })
      assert.equal(2, code)
      assert.matches("diff: %-%-repo URL is required", err)
      code, _, err = cli.run({ "--config", env.config, "watch", "--repo", env.url, "--interval", "-1" })
      assert.equal(2, code)
      assert.matches("watch: %-%-interval must be a number of seconds > 0, got '%-1'", err)
      code, out = cli.run({ "sync", "--help" })
      assert.equal(0, code)
      assert.matches("Usage: deployctl sync %-%-repo URL", out)
    end)

    it("watch syncs a push made while it runs and stops cleanly on SIGTERM and on SIGINT", function()
      local env = cli_setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      env.repo:commit("one")
      for _, sig in ipairs({ "TERM", "INT" }) do
        local h = cli.spawn({ "--config", env.config, "watch", "--repo", env.url, "--interval", "0.1" })
        fixtures.wait_until(function() return h:output():find("in sync", 1, true) end, 20, "the first sync")
        local version = sig == "TERM" and "1.1.0" or "1.2.0"
        env.repo:manifest("staging.json", { target = "staging", version = version,
                                            strategy = { kind = "blue-green", scale_down_delay = 0 } })
        env.repo:commit("push " .. version)
        fixtures.wait_until(function() return h:output():find("now at " .. version, 1, true) end, 20, "the push")
        fixtures.kill(h.pid, sig)
        local code, out, err = h:wait(20)
        assert.equal(0, code, err)
        assert.matches("watch: stopped %(interrupted%)\n$", out)
      end
    end)
  end)

  describe("protocols and credentials", function()
    -- Credentials and trusted CAs come from the environment, read by a
    -- fresh process: each case runs a small Lua program.
    -- Under the sanitizer build: libgit2 1.5.1's own ssh known_hosts check
    -- leaks a little in every connection (inside git_remote_connect, not
    -- ours), so ssh children get full stacks and that one suppression.
    local function sanitizer_env(env_vars, ssh)
      env_vars.LD_PRELOAD = os.getenv("LD_PRELOAD")
      if not (ssh and env_vars.LD_PRELOAD) then return end
      local supp = fixtures.tmpdir("lsan") .. "/lsan.supp"
      fixtures.write_file(supp, (fixtures.read_file(fixtures.root() .. "/scripts/lsan.supp") or "")
                                .. "\nleak:git_remote_connect_ext\n")
      env_vars.LSAN_OPTIONS = "suppressions=" .. supp .. ":print_suppressions=0"
      env_vars.ASAN_OPTIONS = (os.getenv("ASAN_OPTIONS") or "") .. ":fast_unwind_on_malloc=0"
    end

    local function child(env_vars, url, config_path)
      local dir = fixtures.tmpdir("child")
      local build = fixtures.build_dir()
      if build:sub(1, 1) ~= "/" then build = fixtures.root() .. "/" .. build end
      fixtures.write_file(dir .. "/child.lua", [[
        package.cpath = arg[3] .. "/?.so;" .. package.cpath
        local deploy = require "deploy"
        local cjson = require "cjson"
        local m = deploy.DeploymentManager{ config = arg[2] }
        local s = deploy.GitOpsSynchronizer{ repo_url = arg[1], manager = m }
        local r = s:sync()
        print(cjson.encode({ repo_url = s.repo_url, success = r.success, errors = r.errors or {},
                             applied = #r.applied, revision = r.revision or "", live = m:get_status("staging").current_version }))
      ]])
      local parts = {}
      sanitizer_env(env_vars, url:find("ssh://", 1, true) or not url:find("://", 1, true))
      for k, v in pairs(env_vars) do parts[#parts + 1] = k .. "=" .. q(v) end
      local out = git.sh(string.format("cd %s && env %s lua5.4 %s %s %s %s", q(fixtures.root()), table.concat(parts, " "),
                                       q(dir .. "/child.lua"), q(url), q(config_path), q(build)))
      local line
      for l in out:gmatch("[^\n]+") do
        if l:sub(1, 1) == "{" then line = l end
      end
      assert(line, out)
      return cjson.decode(line), out
    end

    local function config_file(env)
      return cli.write_config(fixtures.tmpdir("cfg"), env.cfg)
    end

    it("https: git http-backend behind nginx with TLS, token from the environment or the URL", function()
      local env = setup()
      env.m:close()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local head = env.repo:commit("one")
      local token = "s3cr3t-" .. tostring(math.random(1e9))
      local https = git.https(env.repo.base, "alice", token)
      local cfg = config_file(env)
      local url = https.url(env.repo.name)

      local r, out = child({ GIT_SSL_CAINFO = https.ca }, url, cfg)
      assert.is_false(r.success)
      assert.matches("cannot reach " .. url:gsub("%p", "%%%0") .. ": it asks for credentials: set DEPLOY_GIT_USERNAME and DEPLOY_GIT_TOKEN", r.errors[1])

      r, out = child({ GIT_SSL_CAINFO = https.ca, DEPLOY_GIT_USERNAME = "alice", DEPLOY_GIT_TOKEN = "wrong" }, url, cfg)
      assert.matches("it refused the credentials: check DEPLOY_GIT_USERNAME and DEPLOY_GIT_TOKEN", r.errors[1])

      r, out = child({ DEPLOY_GIT_USERNAME = "alice", DEPLOY_GIT_TOKEN = token }, url, cfg)
      assert.matches("the TLS certificate of 127%.0%.0%.1 is not trusted: set GIT_SSL_CAINFO", r.errors[1])
      assert.is_nil(out:find(token, 1, true))

      r, out = child({ GIT_SSL_CAINFO = https.ca, DEPLOY_GIT_USERNAME = "alice", DEPLOY_GIT_TOKEN = token }, url, cfg)
      assert.same({ true, head, 1, "1.0.0" }, { r.success, r.revision, r.applied, r.live })
      assert.is_nil(out:find(token, 1, true))

      -- the token inside the URL: used, and redacted everywhere
      env.repo:manifest("staging.json", { target = "staging", version = "1.1.0" })
      env.repo:commit("two")
      local with_token = https.url(env.repo.name, "alice:" .. token)
      r, out = child({ GIT_SSL_CAINFO = https.ca }, with_token, cfg)
      assert.same({ true, "1.1.0", https.url(env.repo.name, "alice:***") }, { r.success, r.live, r.repo_url })
      local bad = https.url(env.repo.name, "alice:" .. token .. "x")
      r, out = child({ GIT_SSL_CAINFO = https.ca }, bad, cfg)
      assert.matches("cannot reach https://alice:%*%*%*@127%.0%.0%.1:%d+/deploy%.git: it refused the credentials", r.errors[1])
      assert.is_nil(out:find(token, 1, true))
      local state = fixtures.read_file(env.cfg.state) .. (fixtures.read_file(env.cfg.state .. "-wal") or "")
      assert.is_nil(state:find(token, 1, true))
      local rows = git.sh("sqlite3 " .. q(env.cfg.state) .. " 'select metadata from deployments order by seq'")
      local last = cjson.decode(rows:match("([^\n]+)\n$"))
      assert.equal(https.url(env.repo.name, "alice:***"), last.gitops.repo)
      assert.is_nil(read_tree(env.cfg.state:match("^(.*)/") .. "/git"):find(token, 1, true))
    end)

    it("ssh: sshd on a loopback port, key from DEPLOY_GIT_SSH_KEY, host key from known_hosts", function()
      local env = setup()
      env.m:close()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local head = env.repo:commit("one")
      local sshd = git.sshd()
      local cfg = config_file(env)
      local url = sshd.url(env.repo)

      local r = child({ HOME = sshd.home }, url, cfg)
      assert.matches("it asks for an ssh key: set DEPLOY_GIT_SSH_KEY", r.errors[1])
      r = child({ HOME = sshd.home, DEPLOY_GIT_SSH_KEY = sshd.other_key }, url, cfg)
      assert.matches("it refused the credentials: check DEPLOY_GIT_SSH_KEY", r.errors[1])
      r = child({ HOME = fixtures.tmpdir("nohome"), DEPLOY_GIT_SSH_KEY = sshd.key }, url, cfg)
      assert.matches("the ssh host key of 127%.0%.0%.1 is not in ~/%.ssh/known_hosts: add it", r.errors[1])
      r = child({ HOME = sshd.home, DEPLOY_GIT_SSH_KEY = sshd.key }, url, cfg)
      assert.same({ true, head, "1.0.0", url }, { r.success, r.revision, r.live, r.repo_url })
    end)

    it("ssh, scp-style user@host:path (port 22 only)", function()
      if git.port_open(22) then
        pending("127.0.0.1:22 is taken: scp-style URLs cannot name another port")
        return
      end
      local env = setup()
      env.m:close()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local head = env.repo:commit("one")
      local sshd = git.sshd(22)
      local r = child({ HOME = sshd.home, DEPLOY_GIT_SSH_KEY = sshd.key }, sshd.scp_url(env.repo), config_file(env))
      assert.same({ true, head, "1.0.0" }, { r.success, r.revision, r.live })
    end)

    it("file://", function()
      local env = setup()
      env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
      local head = env.repo:commit("one")
      local r = deploy.GitOpsSynchronizer{ repo_url = env.repo:file_url(), manager = env.m }:sync()
      assert.same({ true, head, "1.0.0" }, { r.success, r.revision, live(env.m, "staging") })
    end)
  end)
end)
