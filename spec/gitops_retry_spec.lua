-- GitOps retries that cannot hurt: a manifest whose rollout failed on a
-- target is not applied to it again until a commit changes that manifest
-- (or sync --retry); only fetch errors back off, so a fix committed right
-- after a failure is applied at the next fetch. Real git daemon on
-- 127.0.0.1, real demo-app instances, router "none".
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local git = require "spec.support.git"
local cli = require "spec.support.cli"

local function setup(opts)
  opts = opts or {}
  local repo = git.repo()
  local daemon = git.daemon(repo.base)
  local dir = fixtures.tmpdir("targets")
  local cfg = fixtures.config{ targets = { staging = fixtures.target_config{ instances = 1, dir = dir } } }
  cfg.clock = opts.clock or "real"
  local m = deploy.DeploymentManager{ config = cfg }
  return { repo = repo, daemon = daemon, m = m, cfg = cfg, dir = dir, url = daemon.url(repo.name) }
end

local function live(m) return m:get_status("staging").current_version end

-- How many rollouts of `version` the store has for staging.
local function rollouts_of(m, version)
  local n = 0
  for _, d in ipairs(m:history("staging")) do
    if d.version == version then n = n + 1 end
  end
  return n
end

describe("GitOps retries", function()
  after_each(fixtures.cleanup)

  it("watch: a failed revision is not applied again; a fix committed right after lands within one interval", function()
    -- The virtual clock: six quiet intervals cost nothing, and when a round began is exact.
    local env = setup{ clock = "virtual" }
    env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    env.repo:commit("one")
    fixtures.set_unhealthy(env.dir, "2.0.0")
    local results, began = {}, {}
    local fix, fixed_at, rollouts_while_held
    deploy.parallel{
      function()
        deploy.GitOpsSynchronizer{ repo_url = env.url, manager = env.m, interval = 10 }:watch(function(_, result)
          results[#results + 1] = result
          began[#began + 1] = deploy.now() - result.duration
          if #results == 1 then
            env.repo:manifest("staging.json", { target = "staging", version = "2.0.0" })
            env.repo:commit("unhealthy release")
          end
          return #results < 3
        end)
      end,
      function()
        while #results < 2 do deploy.sleep(1) end
        -- six more fetches of the same revision: a held manifest is neither applied nor reported again
        deploy.sleep(60)
        rollouts_while_held = { #results, rollouts_of(env.m, "2.0.0") }
        env.repo:manifest("staging.json", { target = "staging", version = "2.0.1" })
        fix = env.repo:commit("fix")
        fixed_at = deploy.now()
      end,
    }
    assert.same({ true, false, true }, { results[1].success, results[2].success, results[3].success })
    assert.same({ "2.0.0", false }, { results[2].applied[1].version, results[2].applied[1].success })
    assert.same({ 2, 1 }, rollouts_while_held)
    assert.same({ fix, "2.0.1", true }, { results[3].revision, results[3].applied[1].version, results[3].applied[1].success })
    assert.equal("2.0.1", live(env.m))
    -- no backoff after a failed rollout: the next fetch after the fix came within one interval
    assert.is_true(began[3] - fixed_at <= 10, began[3] - fixed_at)
  end)

  it("sync reports a held manifest as an error naming the fix, and applies nothing", function()
    local env = setup()
    env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    env.repo:commit("one")
    local s = deploy.GitOpsSynchronizer{ repo_url = env.url, manager = env.m }
    assert.is_true(s:sync().success)
    fixtures.set_unhealthy(env.dir, "2.0.0")
    env.repo:manifest("staging.json", { target = "staging", version = "2.0.0" })
    local bad = env.repo:commit("two")
    assert.is_false(s:sync().success)
    local r = s:sync()
    assert.same({ false, {} }, { r.success, r.applied })
    assert.same({ "staging", "1.0.0", "2.0.0" }, { r.held[1].target, r.held[1].from, r.held[1].to })
    assert.matches("^staging: 2%.0%.0 from staging%.json not applied again: its rollout failed %(deployment [%w-]+, "
                   .. "revision " .. bad:sub(1, 12) .. "%); commit a change to staging%.json, or run "
                   .. "'deployctl sync %-%-retry'$", r.errors[1])
    assert.equal(1, rollouts_of(env.m, "2.0.0"))
  end)

  it("sync holds a failed manifest until a commit changes it, or sync{ retry = true }", function()
    local env = setup()
    env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    env.repo:commit("one")
    local s = deploy.GitOpsSynchronizer{ repo_url = env.url, manager = env.m }
    assert.is_true(s:sync().success)
    fixtures.set_unhealthy(env.dir, "2.0.0")
    env.repo:manifest("staging.json", { target = "staging", version = "2.0.0" })
    local bad = env.repo:commit("two")
    assert.is_false(s:sync().success)
    local diff = s:get_diff()
    assert.same({ "2.0.0", true, bad }, { diff[1].to, diff[1].failed, diff[1].failed_revision })
    assert.equal(env.m:history("staging")[1].id, diff[1].failed_deployment)
    local held = s:sync()
    assert.same({ false, 0, 1 }, { held.success, #held.applied, #held.held })
    assert.equal(1, rollouts_of(env.m, "2.0.0"))
    -- a commit that does not touch the manifest does not release it
    env.repo:write("README.md", "notes\n")
    env.repo:commit("docs")
    assert.same({ 0, 1 }, { #s:sync().applied, #s:sync().held })
    -- retry: applied again (and, still unhealthy, rolled back again)
    local again = s:sync{ retry = true }
    assert.same({ false, "2.0.0", false }, { again.success, again.applied[1].version, again.applied[1].success })
    assert.equal(2, rollouts_of(env.m, "2.0.0"))
    -- a healthy 2.0.0 now; retry applies it
    fixtures.set_unhealthy(env.dir, "2.0.0", false)
    local ok = s:sync{ retry = true }
    assert.is_true(ok.success, ok.errors and ok.errors[1])
    assert.equal("2.0.0", live(env.m))
    -- a commit changing the manifest to a version that failed before is applied: git changed it
    fixtures.set_unhealthy(env.dir, "3.0.0")
    env.repo:manifest("staging.json", { target = "staging", version = "3.0.0" })
    env.repo:commit("three")
    assert.is_false(s:sync().success)
    env.repo:manifest("staging.json", { target = "staging", version = "3.0.0", strategy = { kind = "canary", initial_percentage = 50, increment = 50, interval = 0 } })
    env.repo:commit("three, as a canary")
    local changed = s:sync()
    assert.same({ 1, "3.0.0" }, { #changed.applied, changed.applied[1].version })
    assert.equal(2, rollouts_of(env.m, "3.0.0"))
  end)

  it("refuses bad sync options, naming the option and the fix, and applies nothing", function()
    local env = setup()
    env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    env.repo:commit("one")
    local s = deploy.GitOpsSynchronizer{ repo_url = env.url, manager = env.m }
    for _, case in ipairs({
      { "yes", "options must be a table such as { retry = true }, got string" },
      { { retry = "yes" }, "retry must be true or false, got string" },
      { { retry = 1 }, "retry must be true or false, got number" },
      { { force = true }, "unknown option 'force' %(known: retry%)" },
    }) do
      local ok, err = pcall(s.sync, s, case[1])
      assert.is_false(ok)
      assert.matches("^deploy: sync%(options%): ", err)
      assert.matches(case[2], err)
    end
    assert.same({}, env.m:history("staging"))
  end)

  it("deployctl: diff shows the hold, sync exits 1 naming --retry, sync --retry applies it", function()
    local env = setup()
    env.m:close()
    env.config = cli.write_config(fixtures.tmpdir("cfg"), env.cfg)
    env.repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    env.repo:commit("one")
    assert.equal(0, (cli.run({ "--config", env.config, "sync", "--repo", env.url, "--quiet" })))
    fixtures.set_unhealthy(env.dir, "2.0.0")
    env.repo:manifest("staging.json", { target = "staging", version = "2.0.0" })
    local bad = env.repo:commit("two")
    assert.equal(1, (cli.run({ "--config", env.config, "sync", "--repo", env.url, "--quiet" })))
    local code, out, err = cli.run({ "--config", env.config, "diff", "--repo", env.url })
    assert.equal(0, code, err)
    assert.matches("staging%s+update%s+1%.0%.0%s+%->%s+2%.0%.0%s+staging%.json%s+%(held: its rollout failed, revision "
                   .. bad:sub(1, 12) .. "; sync %-%-retry%)", out)
    code, out, err = cli.run({ "--config", env.config, "sync", "--repo", env.url, "--quiet" })
    assert.equal(1, code)
    assert.matches("staging: held at 1%.0%.0 %(git wants 2%.0%.0%): its rollout of this manifest failed", out)
    assert.matches("sync: staging: 2%.0%.0 from staging%.json not applied again: .*'deployctl sync %-%-retry'", err)
    fixtures.set_unhealthy(env.dir, "2.0.0", false)
    code, out, err = cli.run({ "--config", env.config, "sync", "--repo", env.url, "--retry", "--quiet" })
    assert.equal(0, code, err)
    assert.matches("staging: now at 2%.0%.0", out)
    code, _, err = cli.run({ "--config", env.config, "sync", "--repo", env.url, "--retry=yes" })
    assert.equal(2, code)
    assert.matches("sync: %-%-retry takes no value", err)
    code, _, err = cli.run({ "--config", env.config, "watch", "--repo", env.url, "--retry" })
    assert.equal(2, code)
    assert.matches("watch: unknown flag %-%-retry", err)
  end)
end)
