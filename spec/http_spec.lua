-- deploy.http.request against a real HTTP server on 127.0.0.1
-- (spec/support/hook_receiver.c): what is sent and what comes back, every
-- bad answer a server can give, bad arguments, and that a request in a
-- hook never holds up another target's rollout (real HAProxy, real
-- instances).
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local receiver = require "spec.support.receiver"
local cli = require "spec.support.cli"

describe("deploy.http.request", function()
  local rx
  setup(function() rx = receiver.start() end)
  after_each(function() fixtures.cleanup{ keep = { rx } } end)
  teardown(function() rx:stop() fixtures.cleanup() end)

  local function last_request() local all = rx:requests() return all[#all] end

  it("sends the method, headers and body, and returns status, headers and body", function()
    local res, err = deploy.http.request{ method = "put", url = rx:url("/status/201?x=1"),
      headers = { ["X-Token"] = "t-1", ["X-Count"] = 3 }, body = "plain text", timeout = 5 }
    assert.is_nil(err)
    assert.same({ 201, '{"status":201}', "application/json" }, { res.status, res.body, res.headers["content-type"] })
    assert.equal("number", type(res.duration))
    local r = last_request()
    assert.same({ "PUT", "/status/201", "t-1", "3", "plain text" },
                { r.method, r.path, r.headers["x-token"], r.headers["x-count"], r.body })
  end)

  it("defaults to GET, or to POST with a body; a table body goes as JSON", function()
    assert.equal(200, deploy.http.request{ url = rx:url("/ok") }.status)
    assert.equal("GET", last_request().method)
    local res = deploy.http.request{ url = rx:url("/ok"), body = { version = "1.2.3", share = 10 } }
    assert.equal(200, res.status)
    local r = last_request()
    assert.same({ "POST", "application/json" }, { r.method, r.headers["content-type"] })
    assert.same({ version = "1.2.3", share = 10 }, cjson.decode(r.body))
    -- a Content-Type given wins over the default
    deploy.http.request{ url = rx:url("/ok"), body = { a = 1 }, headers = { ["content-type"] = "application/vnd.x+json" } }
    assert.equal("application/vnd.x+json", last_request().headers["content-type"])
  end)

  it("hands back what a server answers, JSON or not, and does not follow redirects", function()
    local res = deploy.http.request{ url = rx:url("/text") }
    assert.same({ 200, "this is not JSON\n", "text/plain" }, { res.status, res.body, res.headers["content-type"] })
    res = deploy.http.request{ url = rx:url("/redirect") }
    assert.same({ 302, "/ok", "" }, { res.status, res.headers.location, res.body })
    assert.equal("/redirect", last_request().path) -- nothing followed
    res = deploy.http.request{ url = rx:url("/status/503") }
    assert.equal(503, res.status) -- an answer, not an error
  end)

  it("refuses a body over max_body (1 MiB unless raised), and takes one under it", function()
    local res, err, kind = deploy.http.request{ url = rx:url("/huge/3000000") }
    assert.is_nil(res)
    assert.equal("too_large", kind)
    assert.matches("^deploy%.http%.request: GET http://127%.0%.0%.1:%d+/huge/3000000: the answer's body is larger "
                   .. "than 1048576 bytes %(max_body%): refused$", err)
    res, err = deploy.http.request{ url = rx:url("/huge/3000000"), max_body = 4 * 1024 * 1024 }
    assert.is_nil(err)
    assert.equal(3000000, #res.body)
    res, err, kind = deploy.http.request{ url = rx:url("/huge/2000"), max_body = 1999 }
    assert.same({ "too_large" }, { kind })
  end)

  it("says timeout, refused and bad URL apart", function()
    local res, err, kind = deploy.http.request{ url = rx:url("/hang"), timeout = 0.3 }
    assert.same({ "timeout" }, { kind })
    assert.is_nil(res)
    assert.matches("/hang: timeout after 0%.3 s$", err)
    local port = fixtures.free_port()
    res, err, kind = deploy.http.request{ url = "http://127.0.0.1:" .. port .. "/x" }
    assert.same({ "refused" }, { kind })
    assert.matches("connection refused$", err)
    for _, url in ipairs({ "ftp://127.0.0.1/x", "not a url", "http://", "http://[::1/" }) do
      res, err, kind = deploy.http.request{ url = url }
      assert.is_nil(res, url)
      assert.equal("bad_url", kind, url)
      assert.matches("bad URL", err, 1, true)
    end
    -- a password in the URL never reaches the message
    res, err = deploy.http.request{ url = "http://bob:hunter22@127.0.0.1:" .. port .. "/x" }
    assert.matches("http://bob:%*%*%*@127", err)
    assert.is_nil(err:find("hunter22", 1, true))
  end)

  it("refuses bad arguments with a message naming the option", function()
    local bad = {
      { nil, "expects a table" },
      { { }, "url must be a string" },
      { { url = 5 }, "url must be a string" },
      { { url = rx:url("/ok"), bogus = 1 }, "unknown option 'bogus' %(known: method, url, headers, body, timeout, max_body%)" },
      { { url = rx:url("/ok"), method = 1 }, "method must be a string" },
      { { url = rx:url("/ok"), method = "GE T" }, "method 'GE T' is not an HTTP method" },
      { { url = rx:url("/ok"), headers = "x" }, "headers must be a table" },
      { { url = rx:url("/ok"), headers = { "list" } }, "headers must map names to strings" },
      { { url = rx:url("/ok"), headers = { a = true } }, "headers must map names to strings" },
      { { url = rx:url("/ok"), headers = { ["a b"] = "c" } }, "header name 'a b' holds a character" },
      { { url = rx:url("/ok"), headers = { a = "b\r\nX-Evil: 1" } }, "the value of header 'a' holds a line break" },
      { { url = rx:url("/ok"), body = 42 }, "body must be a string %(or a table, sent as JSON%), got number" },
      { { url = rx:url("/ok"), body = { f = print } }, "deploy%.http%.request: body cannot be stored as JSON" },
      { { url = rx:url("/ok"), timeout = 0 }, "timeout must be between 0%.001 and 600 seconds, got 0" },
      { { url = rx:url("/ok"), timeout = "5" }, "timeout must be a number of seconds, got string" },
      { { url = rx:url("/ok"), timeout = 1e9 }, "timeout must be between" },
      { { url = rx:url("/ok"), max_body = 0 }, "max_body must be between 1 and 67108864 bytes" },
      { { url = rx:url("/ok"), max_body = 10.5 }, "max_body must be a whole number of bytes" },
    }
    local before = #rx:requests()
    for _, case in ipairs(bad) do
      local ok, err = pcall(deploy.http.request, case[1])
      assert.is_false(ok, case[2])
      assert.matches("^deploy[.:]", err)
      assert.matches(case[2], err)
    end
    assert.equal(before, #rx:requests()) -- nothing was sent
  end)

  it("works in an on_event handler (handlers run between loop turns, so they may wait)", function()
    local target = fixtures.target_config{ instances = 1 }
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
    local r = m:deploy("production", "1.0.0", { on_event = function(ev)
      if ev.kind == "started" or ev.kind == "promoted" then
        assert(deploy.http.request{ url = rx:url("/notify/handler"), body = { kind = ev.kind } })
      end
    end })
    assert.is_true(r.success)
    local got = {}
    for _, q in ipairs(rx:requests("/notify/handler")) do got[#got + 1] = q.json.kind end
    assert.same({ "started", "promoted" }, got)
  end)

  it("works inside a Lua strategy's execute(d) and in a pipeline script", function()
    local target = fixtures.target_config{ instances = 1 }
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = target } } }
    local Checked = deploy.DeploymentStrategy:extend{ name = "checked" }
    function Checked:execute(d)
      assert(d:start())
      local res = assert(deploy.http.request{ url = rx:url("/notify/strategy"), body = { version = d.version } })
      if res.status ~= 200 then return false, "the check said " .. res.status end
      assert(d:set_traffic(100))
      return true
    end
    assert.is_true(m:deploy("production", "2.0.0", { strategy = Checked }).success)
    assert.same({ version = "2.0.0" }, rx:requests("/notify/strategy")[1].json)

    local dir = fixtures.tmpdir("script")
    fixtures.write_file(dir .. "/check.lua", [[
      local deploy = require "deploy"
      local res, err, kind = deploy.http.request{ url = arg[1] }
      print(res and res.status or kind)
      local _, _, kind2 = deploy.http.request{ url = arg[2], timeout = 0.2 }
      print(kind2)
    ]])
    local code, out, err = cli.run({ "run", dir .. "/check.lua", rx:url("/ok"), rx:url("/hang") })
    assert.equal(0, code, err)
    assert.equal("200\ntimeout\n", out)
  end)

  it("in a hook, waits without holding up another target's rollout (real HAProxy and instances)", function()
    local ha, hb = fixtures.haproxy{}, fixtures.haproxy{}
    local m = deploy.DeploymentManager{ config = fixtures.config{ targets = {
      a = fixtures.target_config{ haproxy = ha, instances = 1 },
      b = fixtures.target_config{ haproxy = hb, instances = 1 } } } }
    assert.is_true(m:deploy("a", "v1").success)
    assert.is_true(m:deploy("b", "v1").success)
    local order = {}
    local function note(what) order[#order + 1] = what end
    local canary = deploy.CanaryStrategy{ initial_percentage = 25, increment = 25, interval = 0.05 }
    local ra, rb
    deploy.parallel{
      function()
        ra = m:deploy("a", "v2", { strategy = canary, hooks = {
          before_step = function(pct)
            if pct ~= 50 then return true end
            note("a asks")
            -- answered only once b has finished: a blocked loop would never get there
            local res, err = deploy.http.request{ url = rx:url("/wait/b-done"), timeout = 20 }
            note("a answered " .. (res and res.status or err))
            return res ~= nil and res.status == 200
          end } })
      end,
      function()
        while order[1] ~= "a asks" do deploy.sleep(0.01) end
        rb = m:deploy("b", "v2", { strategy = canary, on_event = function(ev)
          if ev.kind == "traffic" then note("b at " .. ev.data.pct) end
        end })
        note("b finished")
        rx:open("b-done")
      end,
    }
    assert.is_true(rb.success)
    assert.is_true(ra.success, ra.errors and ra.errors[1])
    assert.same({ "a asks", "b at 25", "b at 50", "b at 75", "b at 100", "b finished", "a answered 200" }, order)
    assert.same({ v2 = 10 }, (ha:sample(10)))
    assert.same({ v2 = 10 }, (hb:sample(10)))
  end)
end)
