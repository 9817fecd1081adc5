-- Declared analysis measured during every hold: HAProxy's own per-server
-- counters (under wrk load through a real HAProxy), probes compared old
-- against new with a Mann-Whitney U test, what status, --json and the
-- report show of it, and bad input on every path it comes in by (Lua,
-- config, --set, a GitOps manifest). Prometheus and the http source are in
-- analysis_prometheus_spec.lua.
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"
local git = require "spec.support.git"

local function setup(opts)
  opts = opts or {}
  local h = opts.router ~= "none" and fixtures.haproxy{} or nil
  local target, dir = fixtures.target_config{ haproxy = h, instances = opts.instances or 2 }
  target.analysis = opts.target_analysis
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = opts.clock or "real"
  local m = deploy.DeploymentManager{ config = cfg, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  return m, h, dir, cfg
end

local function events_of(m, kind)
  local d = m:history("production", 1)[1]
  local out = {}
  for _, ev in ipairs(m:events(d.id)) do
    if not kind or ev.kind == kind then out[#out + 1] = ev end
  end
  return out
end

local function traffic_pcts(m)
  local pcts = {}
  for _, ev in ipairs(events_of(m, "traffic")) do pcts[#pcts + 1] = ev.data.pct end
  return pcts
end

local function canary(analysis, interval)
  return deploy.CanaryStrategy{ initial_percentage = 10, increment = 45, interval = interval or 2, analysis = analysis }
end

describe("analysis", function()
  after_each(fixtures.cleanup)

  describe("haproxy: the router's own counters", function()
    it("catches a version with a healthy /healthz and 30 % 5xx on real requests at the first share, under load", function()
      local m, h = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(8, h:url("/"), 30)
      local r = m:deploy("production", "v2-err30", { strategy = canary{ interval = 1, metrics = {
        { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 } } } } })
      load:finish()
      assert.is_false(r.success)
      assert.matches("^canary aborted at 10 %%: analysis failed: metric 'errors' %(haproxy%) failed 1 time " ..
                     "%(failure_limit 0%): 5xx_ratio of the new instances: 0%.%d+ is outside the success range %(<= 0%.01%)",
                     r.errors[1])
      assert.same({ 10 }, traffic_pcts(m))
      local a = events_of(m, "analysis")
      assert.equal(1, #a)
      assert.equal("fail", a[1].data.verdict)
      assert.equal("haproxy", a[1].data.source)
      assert.equal("5xx_ratio", a[1].data.measure)
      assert.equal(10, a[1].data.pct)
      assert.near(0.3, a[1].data.value, 0.05)
      assert.is_true(a[1].data.requests >= 10, "requests " .. a[1].data.requests)
      assert.same({ v1 = 40 }, (h:sample(40)))
    end)

    it("compares response time with the old set over the same window: 200 ms slower fails", function()
      local m, h = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(8, h:url("/"), 30)
      local r = m:deploy("production", "v2-slow200", { strategy = canary{ interval = 1, metrics = {
        { name = "latency", source = "haproxy", measure = "response_time",
          baseline = { max_increase = 0.2, tolerance = 20 } } } } })
      load:finish()
      assert.is_false(r.success)
      assert.matches("analysis failed: metric 'latency' %(haproxy%) failed 1 time %(failure_limit 0%): response_time " ..
                     "of the new instances against the old set's over the same window: [%d.]+ is above the old set's",
                     r.errors[1])
      local a = events_of(m, "analysis")[1].data
      assert.is_true(a.value >= 150, "new " .. a.value)
      assert.is_true(a.baseline < 20, "old " .. a.baseline)
      assert.same({ 10 }, traffic_pcts(m))
    end)

    it("passes a good version at every share, measuring every interval during each hold, 100 % included", function()
      local m, h = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local load = fixtures.load(4, h:url("/"), 30)
      local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{
        initial_percentage = 50, increment = 50, interval = 1.2, analysis = { interval = 0.35, metrics = {
          { name = "errors", source = "haproxy", measure = "error_ratio", success = { max = 0 } },
          { name = "latency", source = "haproxy", measure = "response_time", baseline = { tolerance = 50 } } } } } })
      local res = load:finish()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      assert.equal(0, res.non2xx)
      local per_pct = {}
      for _, ev in ipairs(events_of(m, "analysis")) do
        assert.equal("pass", ev.data.verdict, ev.data.detail)
        local k = ev.data.pct .. " " .. ev.data.metric
        per_pct[k] = (per_pct[k] or 0) + 1
      end
      -- at 0.35, 0.7 and 1.05 s, then at the hold's end (1.2 s): each share, each metric
      for _, k in ipairs{ "50 errors", "50 latency", "100 errors", "100 latency" } do
        assert.is_true((per_pct[k] or 0) >= 3, k .. ": " .. tostring(per_pct[k]))
      end
    end)

    it("is refused behind a router without per-server counters, in the config and at deploy time", function()
      local target = fixtures.target_config{}
      target.analysis = { metrics = { { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0 } } } }
      local ok, e = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = target } } })
      assert.is_false(ok)
      assert.matches("deploy: config targets%.production%.analysis: analysis metric 'errors' reads HAProxy's " ..
                     "per%-server counters, but target 'production' routes with none, which keeps none %(open%-source " ..
                     "nginx has no per%-upstream counters%): measure it with source 'prometheus', 'probe' or 'http' there", e)
      local m = setup{ router = "none" }
      assert.is_true(m:deploy("production", "v1").success)
      local r = m:deploy("production", "v2", { strategy = canary{ metrics = {
        { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0 } } } } })
      assert.is_false(r.success)
      assert.matches("target 'production' routes with none", r.errors[1])
      assert.equal(1, #m:history("production")) -- refused before anything was recorded
    end)
  end)

  describe("probe: new against old, no metrics stack", function()
    it("fails a version 200 ms slower than the old set by the Mann-Whitney U test", function()
      local m = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local r = m:deploy("production", "v2-slow200", { strategy = canary{ metrics = {
        { name = "probe", source = "probe", count = 10 } } } })
      assert.is_false(r.success)
      assert.matches("analysis failed: metric 'probe' %(probe%) failed 1 time %(failure_limit 0%): median latency " ..
                     "[%d.]+ ms against the old set's [%d.]+ ms %(limit [%d.]+ ms%): slower, p = ", r.errors[1])
      local a = events_of(m, "analysis")[1].data
      assert.is_true(a.value >= 190, "new " .. a.value)
      assert.is_true(a.baseline < 50, "old " .. a.baseline)
      assert.is_true(a.p < 0.001, "p " .. a.p)
      assert.equal(0, a.errors_new)
      assert.same({ 10 }, traffic_pcts(m))
    end)

    it("fails a version that answers 5xx to real requests, on status codes", function()
      local m = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local r = m:deploy("production", "v2-err30", { strategy = canary{ metrics = {
        { name = "probe", source = "probe", count = 10, path = "/version" } } } })
      assert.is_false(r.success)
      assert.matches("requests to the new instances failed or answered an error, 0 of 10 to the old ones " ..
                     "%(max_error_increase 0%.05%)", r.errors[1])
      assert.is_true(events_of(m, "analysis")[1].data.errors_new >= 2)
    end)

    it("passes a version as fast as the old one, before the switch of a blue-green too", function()
      local m = setup{}
      assert.is_true(m:deploy("production", "v1").success)
      local r = m:deploy("production", "v2", { strategy = deploy.BlueGreenStrategy{ switch_delay = 0.5,
        scale_down_delay = 0.5, analysis = { interval = 10, metrics = { { name = "probe", source = "probe", count = 8 } } } } })
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      local a = events_of(m, "analysis")
      -- one at the end of each hold: before the switch (0 %) and in the window (100 %)
      assert.equal(2, #a)
      assert.same({ 0, 100 }, { a[1].data.pct, a[2].data.pct })
      for _, ev in ipairs(a) do
        assert.equal("pass", ev.data.verdict, ev.data.detail)
        assert.equal(8, ev.data.requests)
      end
    end)
  end)

  it("deploy.mann_whitney gives U and one-sided p-values (normal approximation, tie and continuity corrections)", function()
    local t = deploy.mann_whitney({ 1, 2, 3 }, { 4, 5, 6 })
    assert.equal(0, t.u)
    assert.near(0.0405, t.p_less, 0.0005)   -- scipy.stats.mannwhitneyu(..., method="asymptotic"): 0.0809 two-sided
    assert.near(0.9855, t.p_greater, 0.0005)
    t = deploy.mann_whitney({ 5, 5, 5 }, { 5, 5 })
    assert.same({ 3, 1, 1 }, { t.u, t.p_greater, t.p_less })
    t = deploy.mann_whitney({ 1, 2, 2, 3, 10 }, { 2, 2, 4 })
    assert.equal(7, t.u)   -- x over y: 0 + 1 + 1 + 2 + 3 (a tie counts one half)
    assert.error_matches(function() deploy.mann_whitney({}, { 1 }) end, "must be a list of 1 to 100000 numbers")
    assert.error_matches(function() deploy.mann_whitney({ 1, "x" }, { 1 }) end, "argument #1%[2%] must be a number")
  end)

  it("takes the target's analysis from the config when the strategy has none, the strategy's over it", function()
    local m = setup{ target_analysis = { interval = 5, metrics = { { name = "from_config", source = "probe", count = 3 } } } }
    assert.is_true(m:deploy("production", "v1").success)
    assert.is_true(m:deploy("production", "v2", { strategy = canary(nil, 0.3) }).success)
    local a = events_of(m, "analysis")
    assert.is_true(#a >= 2)
    assert.equal("from_config", a[1].data.metric)
    assert.is_true(m:deploy("production", "v3", { strategy = canary({ metrics = {
      { name = "from_strategy", source = "probe", count = 3 } } }, 0.3) }).success)
    for _, ev in ipairs(events_of(m, "analysis")) do assert.equal("from_strategy", ev.data.metric) end
  end)

  it("shows every measurement in deploy --json, the last of each metric in status and status --json, all in the report", function()
    local _, _, _, cfg = setup{}
    local dir = fixtures.tmpdir("analysis-cli")
    cfg.state = dir .. "/state.db"
    local config = cli.write_config(dir, cfg)
    fixtures.write_file(dir .. "/analysis.json", cjson.encode({ interval = 0.4, metrics = {
      { name = "probe", source = "probe", count = 5 } } }))
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local code, out = cli.run({ "--config", config, "deploy", "production", "v2-slow200", "--strategy", "canary",
                                "--set", "interval=1", "--set", "analysis=@" .. dir .. "/analysis.json", "--json" })
    assert.equal(1, code)
    local seen
    for line in out:gmatch("[^\n]+") do
      local ev = cjson.decode(line)
      if ev.kind == "analysis" then seen = ev.data end
    end
    assert.equal("fail", seen.verdict)
    assert.equal("probe", seen.metric)
    code, out = cli.run({ "--config", config, "status", "production" })
    assert.equal(0, code)
    assert.matches("ANALYSIS of %S+ %(v2%-slow200, failed%)", out)
    assert.matches("\nprobe%s+probe%s+fail%s+[%d.]+%s+1/0%s+10 %%", out)
    assert.matches("median latency [%d.]+ ms against the old set's", out)
    code, out = cli.run({ "--config", config, "status", "production", "--json" })
    local doc = cjson.decode(out)
    assert.equal("fail", doc.analysis.metrics[1].verdict)
    assert.equal("v2-slow200", doc.analysis.version)
    local id = doc.analysis.deployment_id
    code, out = cli.run({ "--config", config, "report", id })
    assert.equal(0, code)
    assert.matches('<table id="analysis">', out, 1, true)
    assert.matches('<tr class="measurement fail">', out, 1, true)
    assert.matches('<circle class="analysis fail"', out, 1, true)
  end)

  it("is not measured by a dry run (--simulate): its instances are scripted, its router only records", function()
    local _, _, _, cfg = setup{ target_analysis = { interval = 1, metrics = {
      { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 } } } } }
    local dir = fixtures.tmpdir("analysis-sim")
    cfg.state = dir .. "/state.db"
    local config = cli.write_config(dir, cfg)
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v2", "--simulate", "--strategy",
                                     "canary", "--set", "interval=60" })
    assert.equal(0, code, out .. err)
    assert.matches("%[simulated%] [^\n]*; analysis is not measured in a dry run", out)
    assert.matches("production traffic +new version at 100 %%", out)
    assert.matches("production: v2 would be deployed in", out)
    assert.is_nil(out:match("production analysis "))
    -- the real rollout measures it, at every share
    code, out, err = cli.run({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                               "--set", "interval=0.3", "--set", "increment=90" })
    assert.matches("production analysis ", out)
  end)

  describe("bad input", function()
    local ok_metric = { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 } }
    local function with(metric) return { metrics = { metric } } end
    local function metric(over)
      local t = {}
      for k, v in pairs(over) do t[k] = v end
      return t
    end

    it("in a strategy's analysis (Lua): each mistake named, with the fix", function()
      local many = {}
      for i = 1, 17 do many[i] = metric{ name = "m" .. i, source = "probe" } end
      local cases = {
        { 5, "CanaryStrategy analysis must be a table such as { interval = 60, metrics = { ... } }, got number" },
        { {}, "CanaryStrategy analysis needs metrics: a list such as" },
        { { metrics = {} }, "CanaryStrategy analysis needs metrics" },
        { { metrics = { x = 1 } }, "CanaryStrategy analysis metrics must be a list of tables, got a table" },
        { { interval = 0, metrics = { ok_metric } }, "CanaryStrategy analysis interval must be between 0.001 and 86400, got 0" },
        { { failure_limit = 1.5, metrics = { ok_metric } }, "failure_limit must be a whole number, got 1.5" },
        { { colour = 1, metrics = { ok_metric } }, "CanaryStrategy analysis has no field 'colour' %(known: interval, failure_limit, metrics%)" },
        { { metrics = many }, "has 17 metrics: at most 16" },
        { { metrics = { "x" } }, "CanaryStrategy analysis.metrics%[1%] must be a table such as" },
        { with{ source = "probe" }, "analysis.metrics%[1%] needs name" },
        { with{ name = "a b", source = "probe" }, "name 'a b' may only hold letters, digits, '_', '%-' and '%.'" },
        { { metrics = { ok_metric, ok_metric } }, "analysis.metrics%[2%] %(errors%) has the name of metrics%[1%]" },
        { with{ name = "x" }, "metrics%[1%] %(x%) needs source" },
        { with{ name = "x", source = "datadog" }, "source 'datadog' is not known %(known: haproxy, prometheus, probe, http%)" },
        { with{ name = "x", source = "haproxy", success = { max = 1 } }, "metrics%[1%] %(x%) needs measure" },
        { with{ name = "x", source = "haproxy", measure = "p99", success = { max = 1 } }, "measure 'p99' is not known %(known: 5xx_ratio, 4xx_ratio, error_ratio, response_time, requests%)" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio" }, "needs a condition: success = { max = 0.01 }" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", baseline = true, success = { max = 1 } }, "gives both baseline and success/failure" },
        { with{ name = "x", source = "haproxy", measure = "requests", baseline = true }, "measure 'requests' cannot be compared with the old set" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", baseline = 3 }, "baseline must be a table such as { max_increase = 0.2, tolerance = 5 }, got a number" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", baseline = { max_increase = -1 } }, "%(x%)%.baseline max_increase must be between 0 and 1000, got %-1" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", min_requests = -1, success = { max = 1 } }, "min_requests must be between 0 and 1e%+09, got %-1" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", success = { max = "x" } }, "success min and max must be numbers" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", success = {} }, "success needs min, max or both" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", success = { min = 2, max = 1 } }, "success min 2 is above its max 1" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", success = { maximum = 1 } }, "%(x%)%.success has no field 'maximum' %(known: min, max%)" },
        { with{ name = "x", source = "haproxy", measure = "5xx_ratio", failure = 0.1 }, "failure must be a table such as { max = 0.01 }" },
        { with{ name = "x", source = "prometheus", query = "up", success = { max = 1 } }, "needs address" },
        { with{ name = "x", source = "prometheus", address = "ftp://h", query = "up", success = { max = 1 } }, "address 'ftp://h' is not a URL: write http://host:port/" },
        { with{ name = "x", source = "prometheus", address = "http://127.0.0.1:9090" , success = { max = 1 } }, "needs query" },
        { with{ name = "x", source = "prometheus", address = "http://127.0.0.1:9090", query = "" , success = { max = 1 } }, "query is empty" },
        { with{ name = "x", source = "prometheus", address = "http://127.0.0.1:9090", query = "up" }, "needs success, failure or both" },
        { with{ name = "x", source = "prometheus", address = "http://127.0.0.1:9090", query = "up", measure = "x", success = { max = 1 } }, "has no field 'measure'" },
        { with{ name = "x", source = "http", success = { max = 1 } }, "needs url" },
        { with{ name = "x", source = "http", url = "http://h/x", field = "a..b", success = { max = 1 } }, "field 'a%.%.b' is not a path such as 'data%.score'" },
        { with{ name = "x", source = "http", url = "http://h/x", expect_status = 99, success = { max = 1 } }, "expect_status must be between 100 and 599, got 99" },
        { with{ name = "x", source = "probe", count = 1 }, "count must be between 3 and 1000, got 1" },
        { with{ name = "x", source = "probe", path = "x" }, "path 'x' must start with '/'" },
        { with{ name = "x", source = "probe", confidence = 1 }, "confidence must be between 0.5 and 0.9999, got 1" },
        { with{ name = "x", source = "probe", success = { max = 1 } }, "has no field 'success'" },
        { with{ name = "x", source = "probe", no_data = "maybe" }, "no_data 'maybe' is not known %(known: fail, pass, inconclusive%)" },
        { with{ name = "x", source = "probe", timeout = 0 }, "timeout must be between 0.001 and 60, got 0" },
        { with{ name = "x", source = "probe", path = print }, "CanaryStrategy analysis cannot be stored as JSON" },
      }
      for _, c in ipairs(cases) do
        local ok, e = pcall(deploy.CanaryStrategy, { analysis = c[1] })
        assert.is_false(ok, "accepted: " .. c[2])
        assert.matches(c[2], tostring(e), nil, false, "for " .. c[2])
      end
      local ok, e = pcall(deploy.BlueGreenStrategy, { analysis = with{ name = "x", source = "probe", count = 0 } })
      assert.is_false(ok)
      assert.matches("deploy: BlueGreenStrategy analysis%.metrics%[1%] %(x%) count must be between 3 and 1000, got 0", e)
      -- what was given is read back
      local s = deploy.CanaryStrategy{ analysis = with(ok_metric) }
      assert.equal("errors", s.analysis.metrics[1].name)
      assert.is_nil(deploy.CanaryStrategy{}.analysis)
    end)

    it("in a target's config", function()
      local target = fixtures.target_config{}
      target.analysis = { metrics = { { source = "probe" } } }
      local ok, e = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = target } } })
      assert.is_false(ok)
      assert.matches("deploy: config targets%.production%.analysis%.metrics%[1%] needs name", e)
      target.analysis = "probe"
      ok, e = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = target } } })
      assert.matches("deploy: config targets%.production%.analysis must be a table, got string", e)
    end)

    it("in --set", function()
      local _, _, _, cfg = setup{ router = "none" }
      local dir = fixtures.tmpdir("analysis-set")
      cfg.state = dir .. "/state.db"
      local config = cli.write_config(dir, cfg)
      local cases = {
        { "analysis=interval:5", "deploy: %-%-set analysis: its value is not a JSON object" },
        { "analysis=@" .. dir .. "/missing.json", "deploy: %-%-set analysis=@.-: cannot read the file" },
        { "analysis=7", "is not a JSON object %(a number%)" },
        { 'analysis={"metrics":[]}', "deploy: %-%-set: CanaryStrategy analysis needs metrics" },
        { 'analysis={"metrics":[{"name":"x","source":"probe","path":null}]}', "analysis: 'path' is null: leave it out instead" },
        { 'analysis={"metrics":[{"name":"x","source":"probe","count":1}]}', "count must be between 3 and 1000, got 1" },
      }
      for _, c in ipairs(cases) do
        local code, _, err = cli.run({ "--config", config, "deploy", "production", "v1", "--strategy", "canary", "--set", c[1] })
        assert.equal(2, code, c[1])
        assert.matches(c[2], err, nil, false, c[1])
      end
      assert.equal(0, #deploy.DeploymentManager{ config = config }:history("production"))
    end)

    it("in a GitOps manifest's strategy object, naming the file; a good one is applied with its analysis", function()
      local m = setup{ router = "none", instances = 1 }
      local repo = git.repo()
      repo:write("a.json", cjson.encode({ target = "production", version = "v1", strategy = { kind = "canary",
        analysis = { metrics = { { name = "x", source = "nope" } } } } }))
      repo:commit("bad analysis")
      local sync = deploy.GitOpsSynchronizer{ repo_url = repo:file_url(), manager = m }
      local r = sync:sync()
      assert.is_false(r.success)
      assert.matches("a%.json: field 'strategy': CanaryStrategy analysis%.metrics%[1%] %(x%) source 'nope' is not known",
                     table.concat(r.errors, "\n"))
      repo:write("a.json", cjson.encode({ target = "production", version = "v1", strategy = { kind = "blue-green",
        scale_down_delay = -1 } }))
      repo:commit("bad delay")
      r = sync:sync()
      assert.is_false(r.success)
      assert.matches("a%.json: field 'strategy': BlueGreenStrategy scale_down_delay must be a number of seconds >= 0",
                     table.concat(r.errors, "\n"))
      assert.same({}, m:history("production"))
      repo:write("a.json", cjson.encode({ target = "production", version = "v1" }))
      repo:commit("v1")
      assert.is_true(sync:sync().success)
      repo:write("a.json", cjson.encode({ target = "production", version = "v2", strategy = { kind = "blue-green",
        scale_down_delay = 0.3, analysis = { interval = 5, metrics = { { name = "probe", source = "probe", count = 3 } } } } }))
      repo:commit("v2 with analysis")
      r = sync:sync()
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      local a = events_of(m, "analysis")
      assert.equal(1, #a)
      assert.equal("pass", a[1].data.verdict)
    end)
  end)
end)
