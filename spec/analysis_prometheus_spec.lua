-- Analysis against a real Prometheus (Debian's), started for this file with
-- a 1 s scrape interval over the port range the demo-app instances take,
-- their data in a temp dir; and the http source, judging the JSON answers
-- of Prometheus's own HTTP API.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

local prom, ports

local function setup()
  local h = fixtures.haproxy{}
  local target, dir = fixtures.target_config{ haproxy = h, instances = 2, ports = ports }
  local cfg = fixtures.config{ targets = { production = target } }
  cfg.clock = "real"
  local m = deploy.DeploymentManager{ config = cfg, strategy = deploy.BlueGreenStrategy{ scale_down_delay = 0 } }
  assert.is_true(m:deploy("production", "v1").success)
  return m, h, dir
end

local function events_of(m, kind)
  local out = {}
  for _, ev in ipairs(m:events(m:history("production", 1)[1].id)) do
    if ev.kind == kind then out[#out + 1] = ev end
  end
  return out
end

local function gauge_metric(over)
  local t = { name = "error_ratio", source = "prometheus", address = prom.url,
              query = 'max(demo_error_ratio{version="{version}"})' }
  for k, v in pairs(over or {}) do t[k] = v end
  return t
end

local function canary(metric, opts)
  opts = opts or {}
  return deploy.CanaryStrategy{ initial_percentage = opts.initial or 50, increment = 50, interval = opts.interval or 2,
                                analysis = { interval = opts.every or 1.5, metrics = { metric } } }
end

describe("analysis with Prometheus", function()
  lazy_setup(function()
    -- room for the old set and two new sets that failed within the 5 s a
    -- port handed out stays reserved (runtime/process.c), and one more
    local low, high
    ports, low, high = fixtures.port_range(10)
    local targets = {}
    for p = low, high do targets[#targets + 1] = "127.0.0.1:" .. p end
    prom = fixtures.prometheus{ targets = targets, scrape_interval = "1s" }
  end)
  after_each(function() fixtures.cleanup{ keep = { prom } } end)
  lazy_teardown(function()
    prom:stop()
    fixtures.cleanup()
  end)

  it("a query whose value fails aborts: the new version's 5xx ratio from its own counters, under load", function()
    local m, h = setup()
    local load = fixtures.load(8, h:url("/"), 30)
    local r = m:deploy("production", "a-err30", { strategy = canary({ name = "error_rate", source = "prometheus",
      address = prom.url, success = { max = 0.05 },
      query = 'sum(rate(demo_requests_total{version="{version}",code="500"}[5s]))'
              .. ' / sum(rate(demo_requests_total{version="{version}"}[5s]))' }, { initial = 25, interval = 6, every = 3 }) })
    load:finish()
    assert.is_false(r.success)
    assert.matches("^canary aborted at 25 %%: analysis failed: metric 'error_rate' %(prometheus%) failed 1 time " ..
                   "%(failure_limit 0%): 0%.%d+ is outside the success range %(<= 0%.05%)", r.errors[1])
    local a = events_of(m, "analysis")[1].data
    assert.near(0.3, a.value, 0.1)
    assert.equal(1, a.series)
    assert.same({ v1 = 40 }, (h:sample(40)))
  end)

  it("a query Prometheus refuses aborts, with Prometheus's reason", function()
    local m = setup()
    local r = m:deploy("production", "b1", { strategy = canary(gauge_metric{ query = "sum(rate(",
                                                                              success = { max = 1 } }) })
    assert.is_false(r.success)
    assert.matches("failed 1 time %(failure_limit 0%): Prometheus refused the query %(bad_data%): invalid parameter " ..
                   "\"query\": .*parse error", r.errors[1])
    assert.equal("error", events_of(m, "analysis")[1].data.verdict)
    -- one number is wanted: several series are an error that says how to fix the query
    r = m:deploy("production", "b2", { strategy = canary(gauge_metric{ query = 'demo_error_ratio{version="{version}"}',
                                                                        success = { max = 1 } }) })
    assert.is_false(r.success)
    assert.matches("the query returned 2 series: aggregate them to one %(sum, max, %.%.%.%)", r.errors[1])
    -- and a Prometheus that does not answer
    r = m:deploy("production", "b3", { strategy = canary(gauge_metric{ address = "http://127.0.0.1:" .. fixtures.free_port(),
                                                                        success = { max = 1 } }) })
    assert.is_false(r.success)
    assert.matches("Prometheus at http://127%.0%.0%.1:%d+ did not answer: connection refused", r.errors[1])
  end)

  it("a query with no data fails, unless the metric says no_data = 'pass'", function()
    local m = setup()
    local query = 'max(demo_error_ratio{version="{version}",zone="nowhere"})'
    local r = m:deploy("production", "c1", { strategy = canary(gauge_metric{ query = query, success = { max = 0.05 } }) })
    assert.is_false(r.success)
    assert.matches("failed 1 time %(failure_limit 0%): no data: the query returned no series", r.errors[1])
    local a = events_of(m, "analysis")[1].data
    assert.equal("fail", a.verdict)
    assert.is_nil(a.value)
    r = m:deploy("production", "c2", { strategy = canary(gauge_metric{ query = query, success = { max = 0.05 },
                                                                       no_data = "pass" }, { interval = 0.5 }) })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    for _, ev in ipairs(events_of(m, "analysis")) do assert.equal("pass", ev.data.verdict) end
  end)

  it("a value between the success and failure conditions pauses the rollout until promote", function()
    local m, h = setup()
    local metric = gauge_metric{ success = { max = 0.05 }, failure = { min = 0.5 } }
    local paused, traffic_after_pause, promoted_at = 0, 0, {}
    local results = deploy.parallel{
      function()
        return m:deploy("production", "d-err20", { strategy = canary(metric, { interval = 1.5, every = 1 }),
          on_event = function(ev)
            if ev.kind == "paused" then paused = paused + 1 end
            if ev.kind == "traffic" and paused > #promoted_at then traffic_after_pause = traffic_after_pause + 1 end
          end })
      end,
      function()
        for i = 1, 2 do -- at 50 %, then at 100 %
          while paused < i do deploy.sleep(0.02) end
          -- paused past the hold's end: nothing moves on by itself
          deploy.sleep(2)
          promoted_at[i] = deploy.now()
          assert(m:promote("production"))
        end
      end,
    }
    local r = results[1]
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal(2, paused)
    assert.equal(0, traffic_after_pause)
    local kinds, last = {}, nil
    for _, ev in ipairs(m:events(m:history("production", 1)[1].id)) do
      if ev.kind == "paused" or ev.kind == "resumed" or ev.kind == "traffic" or ev.kind == "promoted" then
        kinds[#kinds + 1] = ev.kind .. (ev.data and ev.data.pct and (" " .. ev.data.pct) or "")
      end
      if ev.kind == "paused" then
        assert.matches("^analysis inconclusive: metric 'error_ratio' %(prometheus%): 0%.2 is in neither range " ..
                       "%(success <= 0%.05, failure >= 0%.5%)$", ev.data.reason)
      end
      if ev.kind == "analysis" then last = ev.data end
    end
    assert.same({ "traffic 50", "paused 50", "resumed 50", "traffic 100", "paused 100", "resumed 100", "promoted" }, kinds)
    assert.equal("inconclusive", last.verdict)
    assert.equal(0, last.failures)
    local counts = h:sample(40)
    assert.is_nil(counts.v1)
    assert.is_true(counts["d-err20"] >= 30) -- it answers 20 % with 500s, by design
  end)

  it("while paused, health is still watched: a version that turns unhealthy goes back without an operator", function()
    local m, h, target_dir = setup()
    local paused
    local results = deploy.parallel{
      function()
        return m:deploy("production", "h-err20", { strategy = canary(gauge_metric{ success = { max = 0.05 },
          failure = { min = 0.5 } }), on_event = function(ev) if ev.kind == "paused" then paused = true end end })
      end,
      function()
        while not paused do deploy.sleep(0.02) end
        fixtures.set_unhealthy(target_dir, "h-err20")
      end,
    }
    assert.is_false(results[1].success)
    assert.matches("^canary aborted at 50 %%: unhealthy after 3 consecutive failed checks", results[1].errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  it("an inconclusive pause ends with abort: back to the old version", function()
    local m, h = setup()
    local paused
    local results = deploy.parallel{
      function()
        return m:deploy("production", "e-err20", { strategy = canary(gauge_metric{ success = { max = 0.05 },
          failure = { min = 0.5 } }), on_event = function(ev) if ev.kind == "paused" then paused = true end end })
      end,
      function()
        while not paused do deploy.sleep(0.02) end
        assert(m:abort("production"))
      end,
    }
    assert.is_false(results[1].success)
    assert.matches("aborted by the operator %(deployctl abort%)", results[1].errors[1])
    assert.same({ v1 = 20 }, (h:sample(20)))
  end)

  describe("http: a URL whose JSON answer is judged", function()
    local function http_metric(over)
      local t = { name = "api", source = "http", field = "data.result.0.value.1",
                  url = prom.url .. "/api/v1/query?query=max(demo_error_ratio%7Bversion%3D%22{version}%22%7D)" }
      for k, v in pairs(over or {}) do t[k] = v end
      return t
    end

    it("passes a value in range and fails one out of range", function()
      local m = setup()
      local r = m:deploy("production", "f1", { strategy = canary(http_metric{ success = { max = 0.1 } }) })
      assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
      local a = events_of(m, "analysis")
      assert.equal(0, a[1].data.value)
      assert.equal(200, a[1].data.status)
      r = m:deploy("production", "f2-err30", { strategy = canary(http_metric{ success = { max = 0.1 } }) })
      assert.is_false(r.success)
      assert.matches("metric 'api' %(http%) failed 1 time %(failure_limit 0%): 0%.3 is outside the success range", r.errors[1])
    end)

    it("fails on an answer that is not JSON, or has another status", function()
      local m = setup()
      local r = m:deploy("production", "g1", { strategy = canary(http_metric{ url = prom.url .. "/metrics",
                                                                                success = { max = 1 } }) })
      assert.is_false(r.success)
      assert.matches("%(http%) failed 1 time %(failure_limit 0%): http://127%.0%.0%.1:%d+/metrics did not answer JSON",
                     r.errors[1])
      r = m:deploy("production", "g2", { strategy = canary(http_metric{ url = prom.url .. "/nothing-here",
                                                                         success = { max = 1 } }) })
      assert.is_false(r.success)
      assert.matches("/nothing%-here answered HTTP 404 %(expected 200%)", r.errors[1])
    end)
  end)
end)
