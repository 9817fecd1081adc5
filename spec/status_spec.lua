-- A status that tells the truth, with the real binary, a real HAProxy and
-- real instances: never deployed, paused waiting for promote, the old
-- version serving after an abort with the failure beside it, instances
-- counted by version, exit codes 4 (degraded) and 5 (unhealthy); short ids
-- and 'latest'; the pid of the service itself; the progress line that
-- ticks (on a terminal made by script(1)); the report page.
--
-- One HAProxy and one config for the file: the tests run in order and each
-- leaves the targets as the next expects.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local env = {}

-- status --json leaves out what is null (the API writes null): either is none.
local function none(v) return v == nil or v == cjson.null end

local function status_json(target)
  local code, out, err = cli.run({ "--config", env.config, "status", target, "--json" })
  local doc = cjson.decode(out)
  -- cjson reads every number as a float: pids made whole
  for _, i in ipairs(doc.instances or {}) do i.pid = math.tointeger(i.pid) end
  return doc.targets[1], doc, code, err
end

local function live_pids(doc)
  local pids = {}
  for _, i in ipairs(doc.instances) do if i.live and i.alive then pids[#pids + 1] = i.pid end end
  return pids
end

-- Runs deployctl on a pseudo-terminal (script(1)): what a person sees.
local function on_terminal(args)
  local words = { fixtures.shell_quote(cli.bin()) }
  for _, a in ipairs(args) do words[#words + 1] = fixtures.shell_quote(a) end
  local dir = fixtures.tmpdir("tty")
  local cmd = string.format("script -qfec %s %s >/dev/null 2>&1 </dev/null & echo $!",
    fixtures.shell_quote(table.concat(words, " ")), fixtures.shell_quote(dir .. "/typescript"))
  local p = io.popen(cmd)
  local pid = tonumber(p:read("a"):match("%d+"))
  p:close()
  return { pid = pid, text = function() return fixtures.read_file(dir .. "/typescript") or "" end }
end

describe("deployctl status", function()
  setup(function()
    env.h = fixtures.haproxy{}
    env.dir = fixtures.tmpdir("status")
    local cfg = fixtures.config{ state = env.dir .. "/state.db", targets = {
      production = fixtures.target_config{ haproxy = env.h, instances = 2, dir = env.dir },
      staging = fixtures.target_config{ instances = 1, dir = env.dir },
    } }
    env.config = cli.write_config(env.dir, cfg)
  end)
  teardown(function() fixtures.cleanup() end)

  it("says a target was never deployed (no version, no instances, no health) and exits 0", function()
    local code, out = cli.run({ "--config", env.config, "status", "staging" })
    assert.equal(0, code, out)
    assert.matches("staging%s+%-%s+never deployed%s+%-%s+0", out)
    local s = status_json("staging")
    assert.same({ "never_deployed", "never deployed", true, 0 },
                { s.state, s.summary, none(s.current_version), s.instances })
    -- a target that is not configured is a usage error, naming the known ones
    local c2, _, err = cli.run({ "--config", env.config, "status", "nope" })
    assert.equal(2, c2)
    assert.matches("nope", err)
  end)

  it("says a paused rollout waits for promote, counts instances by version, and after an abort reads as the old "
     .. "version serving healthily with the failure beside it", function()
    assert.equal(0, (cli.run({ "--config", env.config, "deploy", "production", "v1" })))
    local d = cli.spawn({ "--config", env.config, "deploy", "production", "v2", "--strategy", "canary",
                          "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0.2",
                          "--set", "pause_at=50" })
    local s = fixtures.wait_until(function()
      local st = status_json("production")
      return st.state == "paused" and st
    end, 30, "the canary to pause")
    assert.equal("paused at 50 %, waiting for promote", s.summary)
    assert.same({ 50, true }, { s.rollout.pct, s.rollout.paused })
    local by = {}
    for _, g in ipairs(s.instances_by_version) do by[g.version] = g end
    assert.same({ version = "v1", role = "live", running = 2, total = 2 }, by.v1)
    assert.same({ version = "v2", role = "new", running = 2, total = 2 }, by.v2)
    local code, out = cli.run({ "--config", env.config, "status", "production" })
    assert.equal(0, code, out)
    assert.matches("production%s+v1%s+running%s+healthy%s+4 %(2 live, 2 new%)", out)
    assert.matches("paused at 50 %%, waiting for promote", out)
    -- abort: the old version serves, healthily; the failure is beside it
    assert.equal(0, (cli.run({ "--config", env.config, "abort", "production" })))
    local rc = d:wait(60)
    assert.equal(1, rc)
    s = fixtures.wait_until(function()
      local st = status_json("production")
      return none(st.rollout) and st
    end, 20, "the rollback to end")
    assert.same({ "v1", "deployed", "healthy", "healthy", 2 },
                { s.current_version, s.status, s.health, s.state, s.instances })
    assert.equal("v2", s.last_deployment.version)
    assert.matches("^serving v1 on 2 instances, healthy; the last deployment %(v2, ", s.summary)
    code, out = cli.run({ "--config", env.config, "status", "production" })
    assert.equal(0, code, out)
    assert.matches("production%s+v1%s+deployed%s+healthy%s+2\n", out)
    assert.matches("the last deployment %(v2, ", out)
    assert.same({ v1 = 20 }, (env.h:sample(20)))
  end)

  it("exits 4 when a live instance is down (degraded), 5 when none serves (unhealthy)", function()
    local s, doc = status_json("production")
    assert.equal("healthy", s.state)
    local pids = live_pids(doc)
    assert.equal(2, #pids)
    fixtures.kill(pids[1], "KILL")
    fixtures.wait_exit(pids[1], 5)
    local code, out = cli.run({ "--config", env.config, "status", "production" })
    assert.equal(4, code, out)
    assert.equal("degraded", (status_json("production")).state)
    fixtures.kill(pids[2], "KILL")
    fixtures.wait_exit(pids[2], 5)
    code, out = cli.run({ "--config", env.config, "status", "production" })
    assert.equal(5, code, out)
    assert.equal("unhealthy", (status_json("production")).state)
    -- the table of all targets is not a verdict on one: 0
    assert.equal(0, (cli.run({ "--config", env.config, "status" })))
    assert.equal(0, (cli.run({ "--config", env.config, "reconcile", "production" })))
    assert.equal(0, (cli.run({ "--config", env.config, "status", "production" })))
  end)

  it("records the pid of the service itself, not of a shell around it", function()
    local _, doc = status_json("production")
    for _, pid in ipairs(live_pids(doc)) do
      local cmdline = fixtures.read_file("/proc/" .. pid .. "/cmdline"):gsub("%z", " ")
      assert.matches("^%S*demo%-app ", cmdline)
    end
    -- a stop by that pid stops the service: the port is free afterwards
    local inst = doc.instances[1]
    fixtures.kill(inst.pid, "TERM")
    assert.is_true(fixtures.wait_exit(inst.pid, 5))
    assert.equal(0, (cli.run({ "--config", env.config, "reconcile", "production" })))
  end)

  it("takes any unique prefix of an id and 'latest', and says what is wrong with the others", function()
    local code, out = cli.run({ "--config", env.config, "history", "production" })
    assert.equal(0, code, out)
    local short = out:match("\n(d%w+)%s")
    assert.is_truthy(short, out)
    local m = require("deploy").DeploymentManager{ config = env.config }
    local full = m:history("production", 1)[1].id
    assert.is_true(#short >= 8 and #short < #full, short)
    assert.equal(short, full:sub(1, #short))
    local c1, by_full = cli.run({ "--config", env.config, "report", full })
    local c2, by_short = cli.run({ "--config", env.config, "report", short })
    local c3, by_latest = cli.run({ "--config", env.config, "report", "latest", "production" })
    assert.same({ 0, 0, 0 }, { c1, c2, c3 })
    assert.equal(by_full, by_short)
    assert.equal(by_full, by_latest)
    for _, case in ipairs{
      { { "report", "d" }, "names more than one deployment" },
      { { "report", "dzzzzzzz" }, "no deployment 'dzzzzzzz'" },
      { { "report", "latest" }, "'latest' needs the target" },
      { { "report", "latest", "nope" }, "nope" },
      { { "report", full, "production" }, "give a TARGET only with 'latest'" },
    } do
      local args = { "--config", env.config }
      for _, a in ipairs(case[1]) do args[#args + 1] = a end
      local c, o, e = cli.run(args)
      assert.equal(2, c, table.concat(case[1], " ") .. ": " .. o .. e)
      assert.matches(case[2], e, 1, true)
    end
  end)

  it("writes a report whose data column is JSON in a stable key order, unescaped, with a legend", function()
    local _, html = cli.run({ "--config", env.config, "report", "latest", "production" })
    assert.matches('<ul class="legend">', html, 1, true)
    assert.matches("white-space: nowrap", html, 1, true)
    local datas = {}
    for code in html:gmatch('<td class="data"><code>(.-)</code></td>') do datas[#datas + 1] = code end
    assert.is_true(#datas > 3)
    for _, text in ipairs(datas) do
      assert.not_matches("\\/", text, 1, true)
      -- the keys of each object come in alphabetical order
      local keys = {}
      for k in text:gmatch("&quot;([%w_]+)&quot;:") do keys[#keys + 1] = k end
      local sorted = { table.unpack(keys) }
      table.sort(sorted)
      if text:sub(1, 1) == "{" and not text:find("{", 2, true) then assert.same(sorted, keys) end
    end
    -- the same deployment twice: the same page
    local _, again = cli.run({ "--config", env.config, "report", "latest", "production" })
    assert.equal(html, again)
  end)

  it("on a terminal, redraws the progress line every second while paused, and shows the rollback", function()
    if os.execute("command -v script >/dev/null 2>&1") ~= true then
      pending("script(1) is not installed (bsdutils, in scripts/setup)") return
    end
    local t = on_terminal({ "--config", env.config, "deploy", "production", "v3", "--strategy", "canary",
                            "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0.2",
                            "--set", "pause_at=50" })
    -- three redraws while nothing happens but the clock
    local text = fixtures.wait_until(function()
      local s = t.text()
      local seen = {}
      for e in s:gmatch("paused ([%d.hms]+): deployctl promote|abort production") do seen[e] = true end
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      return n >= 3 and s
    end, 20, "the progress line to tick while paused")
    assert.matches("production%s+%[#####%.%.%.%.%.%]%s+50 %% v3", text)
    assert.matches("elapsed", text, 1, true)
    assert.equal(0, (cli.run({ "--config", env.config, "abort", "production" })))
    text = fixtures.wait_until(function()
      local s = t.text()
      return s:find("rolled back from 50 %", 1, true) and s
    end, 30, "the rollback on the progress line")
    assert.matches("production%s+%[%.%.%.%.%.%.%.%.%.%.%]%s+0 %% v3", text)
    assert.matches("rolling back: ", text, 1, true)
    assert.is_true(fixtures.wait_exit(t.pid, 20))
    local s = status_json("production")
    assert.same({ "v1", "healthy" }, { s.current_version, s.state })
  end)
end)
