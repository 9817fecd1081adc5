-- deploy.health.check: concurrent HTTP checks through libcurl multi.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"

describe("deploy.health.check", function()
  after_each(fixtures.cleanup)

  it("checks every URL at once and classifies the set", function()
    local dir = fixtures.tmpdir("health")
    local good = fixtures.start_demo{ version = "ok1", dir = dir }
    local good2 = fixtures.start_demo{ version = "ok2", dir = dir }
    local bad = fixtures.start_demo{ version = "x-bad", dir = dir }
    local all = deploy.health.check{ urls = { good.url .. "/healthz", good2.url .. "/healthz" } }
    assert.equal("healthy", all.state)
    assert.equal(2, all.ok)
    assert.equal(2, all.total)
    assert.equal(200, all.results[1].status)
    assert.is_true(all.results[1].latency >= 0)

    local some = deploy.health.check{ urls = { good.url .. "/healthz", bad.url .. "/healthz" } }
    assert.equal("degraded", some.state)
    assert.is_true(some.results[1].ok)
    assert.is_false(some.results[2].ok)
    assert.equal(500, some.results[2].status)
    assert.equal("status 500 (expected 200)", some.results[2].error)

    local none = deploy.health.check{ urls = { bad.url .. "/healthz" } }
    assert.equal("unhealthy", none.state)
    local expect = deploy.health.check{ urls = { bad.url .. "/healthz" }, expect_status = 500 }
    assert.equal("healthy", expect.state)
  end)

  it("reports refused connections and timeouts, within the timeout", function()
    local dir = fixtures.tmpdir("health")
    local slow = fixtures.start_demo{ version = "slow", dir = dir, delay_ms = 2000 }
    local closed = fixtures.free_port()
    local t0 = fixtures.now()
    local r = deploy.health.check{ urls = { "http://127.0.0.1:" .. closed .. "/healthz", slow.url .. "/healthz" },
                                   timeout = 0.3 }
    local took = fixtures.now() - t0
    assert.equal("unhealthy", r.state)
    assert.equal("connection refused", r.results[1].error)
    assert.equal(0, r.results[1].status)
    assert.equal("timeout after 0.3 s", r.results[2].error)
    assert.is_true(took < 1.5, "the checks ran one after another or ignored the timeout: " .. took)
  end)

  it("no URL at all is unhealthy", function()
    assert.equal("unhealthy", deploy.health.check{ urls = {} }.state)
  end)

  it("refuses bad arguments with a message naming them", function()
    local cases = {
      { nil, "bad argument #1" },
      { { urls = "http://x" }, "urls must be a list of URLs, got string" },
      { { urls = { 1 } }, "urls%[1%] must be a string, got number" },
      { { urls = { "ftp://127.0.0.1/" } }, "ftp" },
      { { urls = { "not a url" } }, "not a url" },
      { { urls = {}, timeout = -1 }, "timeout must be a number of seconds in %(0, 600%]" },
      { { urls = {}, timeout = "1" }, "timeout must be a number" },
      { { urls = {}, expect_status = 42 }, "expect_status must be an HTTP status" },
    }
    for _, case in ipairs(cases) do
      local ok, err = pcall(deploy.health.check, case[1])
      assert.is_false(ok)
      assert.matches(case[2], err)
    end
  end)

  it("never shows a password from a URL in an error", function()
    local ok, err = pcall(deploy.health.check, { urls = { "http://user:s3cr3t@[bad/x" } })
    assert.is_false(ok)
    assert.not_matches("s3cr3t", err)
  end)
end)
