-- Webhooks (Flagger's kinds) and notifications, against a real HTTP
-- receiver on 127.0.0.1 that checks every signature with its own HMAC
-- (spec/support/hook_receiver.c), real HAProxy and real instances.
local deploy = require "deploy"
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local receiver = require "spec.support.receiver"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote
local SECRET = "hook-secret-" .. tostring(math.random(1e9))

local function kinds(events, wanted)
  local out = {}
  for _, ev in ipairs(events) do
    if not wanted or wanted[ev.kind] then out[#out + 1] = ev.kind end
  end
  return out
end

local function set(...)
  local s = {}
  for _, k in ipairs({ ... }) do s[k] = true end
  return s
end

local function last_events(m, target)
  return m:events(m:history(target)[1].id)
end

-- The receiver checks every request against SECRET (401 when it does not
-- match or is missing): a webhook or notification that names no secret is
-- given that one; the specs of a wrong secret name theirs.
local function signed(list)
  for _, w in ipairs(list or {}) do
    if w.secret == nil then w.secret = SECRET end
  end
  return list
end

local function fast_canary(extra)
  local p = { initial_percentage = 50, increment = 50, interval = 0.05 }
  if extra and extra.webhooks then signed(extra.webhooks) end
  for k, v in pairs(extra or {}) do p[k] = v end
  return deploy.CanaryStrategy(p)
end

describe("webhooks", function()
  local rx
  local n = 0
  -- A name of its own for every gate, so that specs sharing the receiver never open each other's.
  local function fresh(name) n = n + 1 return name .. "-" .. n end

  setup(function() rx = receiver.start{ secret = SECRET } end)
  after_each(function() fixtures.cleanup{ keep = { rx } } end)
  teardown(function() rx:stop() fixtures.cleanup() end)

  -- A target behind a real HAProxy with v1 live, its webhooks and notify
  -- as given. v1 goes live through a manager of the same store without the
  -- webhooks (their gates would hold it; notify is told), then the manager
  -- with them takes over, as the next deployctl process would.
  local function target(opts)
    opts = opts or {}
    local h = fixtures.haproxy{}
    local t, dir = fixtures.target_config{ haproxy = h, instances = opts.instances or 2 }
    t.notify = signed(opts.notify)
    local cfg = fixtures.config{ targets = { production = t } }
    local m0 = deploy.DeploymentManager{ config = cfg }
    local r = m0:deploy("production", "v1", { strategy = deploy.BlueGreenStrategy{} })
    assert(r.success, r.errors and r.errors[1])
    m0:close()
    t.webhooks = signed(opts.webhooks)
    return deploy.DeploymentManager{ config = cfg }, h, dir
  end

  it("confirm-promotion holds the rollout at 100 % until the receiver says yes, then promotes", function()
    local gate = fresh("qa")
    local m, h, dir = target{}
    local strategy = fast_canary{ webhooks = { { name = "qa-gate", type = "confirm-promotion",
      url = rx:url("/gate/" .. gate), secret = SECRET, interval = 0.05 } } }
    local r, held
    deploy.parallel{
      function() r = m:deploy("production", "v2", { strategy = strategy }) end,
      function()
        while #rx:requests("/gate/" .. gate) < 3 do deploy.sleep(0.02) end
        -- held: all traffic on v2, v1 still running and still the current version
        held = { sample = (h:sample(10)), v1 = #fixtures.instances_of(dir, "v1") >= 2,
                 current = m:get_status("production").current_version }
        rx:open(gate)
      end,
    }
    assert.is_true(r.success, r.errors and r.errors[1])
    assert.same({ sample = { v2 = 10 }, v1 = true, current = "v1" }, held)
    assert.equal("v2", m:get_status("production").current_version)
    assert.same({}, fixtures.instances_of(dir, "v1"))
    local asks = rx:requests("/gate/" .. gate)
    for _, a in ipairs(asks) do assert.equal("ok", a.signature) end
    local p = asks[1].json
    assert.same({ "qa-gate", "confirm-promotion", "production", "v2", "v1", "before_promote", 100, "healthy", 2 },
                { p.webhook, p.type, p.target, p.version, p.from, p.phase, p.share, p.checks.state, p.checks.ok })
    assert.equal(m:history("production")[1].id, p.deployment)
    assert.same({ "confirm-promotion", "application/json" }, { asks[1].headers["x-deploy-webhook"], asks[1].headers["content-type"] })
    local evs = last_events(m, "production")
    assert.same({ "webhook_waiting", "webhook", "promoted" }, kinds(evs, set("webhook_waiting", "webhook", "promoted")))
    for _, ev in ipairs(evs) do
      if ev.kind == "webhook_waiting" then assert.same({ 403, false }, { ev.data.status, ev.data.ok }) end
      if ev.kind == "webhook" then assert.is_true(ev.data.ok and ev.data.waited > 0) end
    end
  end)

  it("signs the body with HMAC-SHA256: the signature openssl computes is the one sent", function()
    local gate = fresh("sig")
    rx:open(gate)
    local m = target{ webhooks = { { name = "sig", type = "confirm-rollout", url = rx:url("/gate/" .. gate), secret = SECRET } } }
    assert.is_true(m:deploy("production", "v2").success)
    local req = rx:requests("/gate/" .. gate)[1]
    local dir = fixtures.tmpdir("sig")
    fixtures.write_file(dir .. "/body", req.body)
    local p = io.popen("openssl dgst -sha256 -hmac " .. q(SECRET) .. " -r " .. q(dir .. "/body"))
    local digest = p:read("*a"):match("^(%x+)")
    p:close()
    assert.equal("sha256=" .. digest, req.headers["x-deploy-signature"])
    assert.equal("ok", req.signature)
  end)

  it("a wrong secret is rejected by the receiver: a gate never opens (an abort ends it), a call fails the rollout", function()
    local gate = fresh("wrong")
    rx:open(gate) -- it would let a right signature through
    local m, h = target{ webhooks = { { name = "gate", type = "confirm-traffic-increase", url = rx:url("/gate/" .. gate),
                                        secret = "not-the-secret", interval = 0.05 } } }
    local r
    deploy.parallel{
      function() r = m:deploy("production", "v2", { strategy = fast_canary() }) end,
      function()
        while #rx:requests("/gate/" .. gate) < 3 do deploy.sleep(0.02) end
        assert.same({ v1 = 10 }, (h:sample(10))) -- not one request went to v2
        assert.is_true(m:abort("production"))
      end,
    }
    assert.is_false(r.success)
    assert.matches("aborted by the operator", r.errors[1])
    for _, a in ipairs(rx:requests("/gate/" .. gate)) do assert.equal("bad", a.signature) end
    local waiting
    for _, ev in ipairs(last_events(m, "production")) do if ev.kind == "webhook_waiting" then waiting = ev.data end end
    assert.same({ 401, "gate" }, { waiting.status, waiting.name })
    assert.matches("signature does not match", waiting.detail)
    assert.same({ v1 = 10 }, (h:sample(10)))
    assert.equal("v1", m:get_status("production").current_version)

    -- a call (pre-rollout) with the wrong secret fails after its retries
    local m2, h2 = target{ webhooks = { { name = "pre", type = "pre-rollout", url = rx:url("/ok"), secret = "not-the-secret", retries = 1 } } }
    local r2 = m2:deploy("production", "v2", { strategy = fast_canary() })
    assert.is_false(r2.success)
    assert.matches("webhook 'pre' %(pre%-rollout%) failed after 2 attempts: status 401: .*signature does not match", r2.errors[1])
    assert.same({ v1 = 10 }, (h2:sample(10)))
  end)

  it("notifications arrive in order: started ... promoted, and started ... rolled back, filtered by severity", function()
    local info, errors, slack = fresh("info"), fresh("errors"), fresh("slack")
    local m, h, dir = target{ notify = {
      { url = rx:url("/notify/" .. info), format = "json", secret = SECRET },
      { url = rx:url("/notify/" .. errors), format = "json", severity = "error" },
      { url = rx:url("/notify/" .. slack), format = "slack", severity = "warning" } } }
    local function events(name)
      local out = {}
      for _, req in ipairs(rx:requests("/notify/" .. name)) do out[#out + 1] = req.json end
      return out
    end
    -- the v1 deploy of target() is told too
    fixtures.wait_until(function() return #events(info) == 2 end, 10, "the v1 notifications")
    assert.is_true(m:deploy("production", "v2", { strategy = fast_canary() }).success)
    -- holds of 1 s: time for three failed checks at 50 %
    local r = m:deploy("production", "v3", { strategy = fast_canary{ interval = 1 }, hooks = {
      after_step = function(pct) if pct >= 50 then fixtures.set_unhealthy(dir, "v3") end end } })
    assert.is_false(r.success)
    fixtures.wait_until(function() return #events(info) == 6 and #events(errors) == 1 end, 10, "the notifications")
    local seen = {}
    for _, e in ipairs(events(info)) do seen[#seen + 1] = e.event .. " " .. e.version end
    assert.same({ "started v1", "promoted v1", "started v2", "promoted v2", "started v3", "rolled_back v3" }, seen)
    local rb = events(info)[6]
    assert.same({ "error", "production", "v2", "canary" }, { rb.severity, rb.target, rb.from, rb.strategy })
    assert.matches("unhealthy", rb.reason)
    assert.matches("^production: v3 rolled back at %d+ %%: .*; v2 serves all traffic again$", rb.summary)
    for _, req in ipairs(rx:requests("/notify/" .. info)) do assert.equal("ok", req.signature) end
    -- severity "error": only the rollback; "warning": the rollback only too (nothing paused)
    assert.same({ "rolled_back" }, { events(errors)[1].event })
    fixtures.wait_until(function() return #events(slack) == 1 end, 10, "the Slack message")
    local text = events(slack)[1].text
    assert.matches("^production: v3 rolled back at %d+ %%", text)
    assert.is_nil(text:find("http", 1, true)) -- no links
    assert.same({ v2 = 10 }, (h:sample(10)))
  end)

  it("a notification that cannot be delivered is retried, dropped and said on stderr; the rollout never waits for it", function()
    local t, dir = fixtures.target_config{ instances = 1 }
    local down = "http://127.0.0.1:" .. fixtures.free_port() .. "/hook"
    t.notify = { { url = rx:url("/status/500"), format = "json", retries = 1, secret = SECRET },
                 { url = down, retries = 0, timeout = 1 } }
    local cdir = fixtures.tmpdir("notify-cli")
    local config = cli.write_config(cdir, fixtures.config{ state = cdir .. "/state.db", targets = { production = t } })
    local before = #rx:requests("/status/500")
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v1" })
    assert.equal(0, code, err)
    assert.matches("production: v1 deployed", out)
    -- started and promoted, each tried twice, then dropped
    assert.equal(4, #rx:requests("/status/500") - before)
    assert.matches("notification to " .. rx:url("/status/500"):gsub("%p", "%%%0") .. " dropped: status 500: .- after 2 attempts", err)
    assert.matches("notification to " .. down:gsub("%p", "%%%0") .. " dropped: connection refused after 1 attempt", err)
  end)

  it("event webhooks get every event of the rollout, in order", function()
    local m = target{ webhooks = { { name = "audit", type = "event", url = rx:url("/notify/audit-" .. n), secret = SECRET } } }
    local path = "/notify/audit-" .. n
    assert.is_true(m:deploy("production", "v2", { strategy = fast_canary() }).success)
    local evs, v2 = {}, {}
    fixtures.wait_until(function()
      evs = last_events(m, "production") -- the store may write the last ones after deploy() returned
      v2 = {}
      for _, req in ipairs(rx:requests(path)) do
        if req.json.version == "v2" then v2[#v2 + 1] = req end
      end
      return #v2 == #evs
    end, 10, "every event of the v2 rollout")
    for i, req in ipairs(v2) do
      assert.same({ "ok", "event", evs[i].kind, evs[i].deployment_id, "production" },
                  { req.signature, req.json.phase, req.json.event.kind, req.json.deployment, req.json.target })
    end
  end)

  it("pre-rollout, rollout and post-rollout: calls with retries; a failure before the outcome rolls back, after it is recorded", function()
    local flaky = fresh("flaky")
    local m, h = target{ webhooks = {
      { name = "pre", type = "pre-rollout", url = rx:url("/flaky/2/" .. flaky), retries = 2, secret = SECRET },
      { name = "each-step", type = "rollout", url = rx:url("/notify/step-" .. flaky), secret = SECRET },
      { name = "post", type = "post-rollout", url = rx:url("/status/500"), retries = 0, secret = SECRET } } }
    local r = m:deploy("production", "v2", { strategy = fast_canary() })
    assert.is_true(r.success, r.errors and r.errors[1])
    assert.equal(3, #rx:requests("/flaky/2/" .. flaky)) -- two 500s, then 200
    local steps = rx:requests("/notify/step-" .. flaky)
    assert.same({ "analysis", 50 }, { steps[1].json.phase, steps[1].json.share })
    assert.is_true(#steps >= 2)
    local failed
    for _, ev in ipairs(last_events(m, "production")) do if ev.kind == "hook_failed" then failed = ev.data end end
    assert.equal("on_promote", failed.hook)
    assert.matches("webhook 'post' %(post%-rollout%) failed after 1 attempt: status 500", failed.error)
    assert.same({ v2 = 10 }, (h:sample(10)))

    -- one retry fewer than the receiver needs: the rollout never starts traffic
    flaky = fresh("flaky")
    local m2, h2 = target{ webhooks = { { name = "pre", type = "pre-rollout", url = rx:url("/flaky/2/" .. flaky), retries = 1 } } }
    local r2 = m2:deploy("production", "v2", { strategy = fast_canary() })
    assert.is_false(r2.success)
    assert.matches("before_step hook failed at 50 %%: webhook 'pre' %(pre%-rollout%) failed after 2 attempts: status 500", r2.errors[1])
    assert.same({ v1 = 10 }, (h2:sample(10)))
  end)

  it("bad answers: a redirect or a non-2xx holds a gate, a huge body or a timeout fails a call, non-JSON 2xx is fine", function()
    local m, h = target{ webhooks = {
      { name = "text", type = "pre-rollout", url = rx:url("/text") },
      { name = "huge", type = "post-rollout", url = rx:url("/huge/200000"), retries = 0 },
      { name = "slow", type = "rollout", url = rx:url("/hang"), timeout = 0.2, retries = 0 } } }
    local r = m:deploy("production", "v2", { strategy = fast_canary() })
    assert.is_false(r.success)
    assert.matches("analysis failed: webhook 'slow' %(rollout%) failed after 1 attempt: timeout after 0%.2 s", r.errors[1])
    local huge
    for _, ev in ipairs(last_events(m, "production")) do
      if ev.kind == "webhook" and ev.data.name == "huge" then huge = ev.data end
    end
    assert.matches("larger than 65536 bytes", huge.detail) -- post-rollout runs after the abort too
    assert.same({ v1 = 10 }, (h:sample(10)))

    local m2 = target{ webhooks = { { name = "moved", type = "confirm-rollout", url = rx:url("/redirect"), interval = 0.05 } } }
    local r2
    deploy.parallel{
      function() r2 = m2:deploy("production", "v2") end,
      function()
        local waiting
        while not waiting do
          for _, ev in ipairs(last_events(m2, "production")) do
            if ev.kind == "webhook_waiting" then waiting = ev.data end
          end
          deploy.sleep(0.02)
        end
        assert.equal(302, waiting.status)
        m2:abort("production")
      end,
    }
    assert.is_false(r2.success)
    assert.matches("aborted by the operator", r2.errors[1])
  end)

  it("confirm-traffic-increase holds each increase, and confirm-rollout holds the start", function()
    local up, start = fresh("up"), fresh("start")
    local m, h, dir = target{ webhooks = {
      { name = "start", type = "confirm-rollout", url = rx:url("/gate/" .. start), interval = 0.05 },
      { name = "up", type = "confirm-traffic-increase", url = rx:url("/gate/" .. up), interval = 0.05 } } }
    local r
    deploy.parallel{
      function() r = m:deploy("production", "v2", { strategy = fast_canary() }) end,
      function()
        while #rx:requests("/gate/" .. start) < 2 do deploy.sleep(0.02) end
        assert.same({}, fixtures.instances_of(dir, "v2")) -- nothing started
        rx:open(start)
        while #rx:requests("/gate/" .. up) < 2 do deploy.sleep(0.02) end
        assert.same({ v1 = 10 }, (h:sample(10))) -- started, no traffic yet
        assert.is_true(#fixtures.instances_of(dir, "v2") >= 2)
        rx:open(up)
      end,
    }
    assert.is_true(r.success, r.errors and r.errors[1])
    local shares = {}
    for _, req in ipairs(rx:requests("/gate/" .. up)) do
      local key = ("%g->%g"):format(req.json.share, req.json.next_share)
      if shares[#shares] ~= key then shares[#shares + 1] = key end
    end
    assert.same({ "0->50", "50->100" }, shares)
  end)

  it("a rollback webhook that answers 2xx rolls the rollout back (Flagger's rollback hook)", function()
    local name = fresh("rb")
    local m, h = target{ webhooks = { { name = "stop", type = "rollback", url = rx:url("/rollback/" .. name) } } }
    local r = m:deploy("production", "v2", { strategy = fast_canary{ initial_percentage = 25, increment = 25 }, hooks = {
      before_step = function(pct) if pct == 75 then rx:ask_rollback(name) end end } })
    assert.is_false(r.success)
    assert.matches("canary aborted at 75 %%: analysis failed: webhook 'stop' %(rollback%) asked for a rollback %(status 200", r.errors[1])
    assert.same({ v1 = 10 }, (h:sample(10)))
  end)

  it("a gate watches the new version's health while it waits: unhealthy means rolled back", function()
    local gate = fresh("never")
    local m, h, dir = target{ webhooks = { { name = "gate", type = "confirm-promotion", url = rx:url("/gate/" .. gate), interval = 0.05 } } }
    local r
    deploy.parallel{
      function() r = m:deploy("production", "v2", { strategy = fast_canary() }) end,
      function()
        while #rx:requests("/gate/" .. gate) < 2 do deploy.sleep(0.02) end
        fixtures.set_unhealthy(dir, "v2")
      end,
    }
    assert.is_false(r.success)
    assert.matches("not promoted: unhealthy while webhook 'gate' %(confirm%-promotion%) waited", r.errors[1])
    assert.same({ v1 = 10 }, (h:sample(10)))
  end)

  it("a rollback (deployctl rollback) is held by no gate", function()
    local gate = fresh("closed")
    local m = target{ webhooks = {
      { name = "gate", type = "confirm-promotion", url = rx:url("/gate/" .. gate) },
      { name = "events", type = "event", url = rx:url("/notify/rb-events-" .. n) } } }
    rx:open(gate)
    assert.is_true(m:deploy("production", "v2").success)
    rx:close(gate)
    local before = #rx:requests("/gate/" .. gate)
    local r = m:rollback("production")
    assert.is_true(r.success, r.errors and r.errors[1])
    assert.equal("v1", m:get_status("production").current_version)
    assert.equal(before, #rx:requests("/gate/" .. gate))
    fixtures.wait_until(function()
      for _, req in ipairs(rx:requests("/notify/rb-events-" .. n)) do
        if req.json.event.kind == "finished" and req.json.version == "v1" then return true end
      end
    end, 10, "the rollback's events")
  end)

  it("deployctl abort ends a gate's wait from another process; webhooks and notify from a config file", function()
    local gate = fresh("cli")
    local h = fixtures.haproxy{}
    local t = fixtures.target_config{ haproxy = h, instances = 1 }
    t.webhooks = { { name = "qa", type = "confirm-promotion", url = rx:url("/gate/" .. gate), secret = "${HOOK_SECRET}", interval = 0.05 } }
    t.notify = { { url = rx:url("/notify/" .. gate), format = "json", secret = "${HOOK_SECRET}" } }
    local dir = fixtures.tmpdir("cli")
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = t } })
    local env = { HOOK_SECRET = SECRET }
    rx:open(gate)
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" }, env)))
    rx:close(gate)
    local p = cli.spawn({ "--config", config, "deploy", "production", "v2", "--strategy", "canary",
                          "--set", "initial_percentage=100", "--set", "interval=0" }, env)
    fixtures.wait_until(function() return #rx:requests("/gate/" .. gate) >= 4 end, 20, "the gate's asks")
    assert.matches("webhook_waiting%s+qa %(confirm%-promotion%) says not yet: status 403", p:output())
    assert.equal(0, (cli.run({ "--config", config, "abort", "production" }, env)))
    local code, out, err = p:wait(30)
    assert.equal(1, code, out)
    assert.matches("aborted by the operator %(deployctl abort%)", err)
    assert.is_nil((out .. err):find(SECRET, 1, true))
    for _, req in ipairs(rx:requests("/gate/" .. gate)) do assert.equal("ok", req.signature) end
    assert.same({ v1 = 10 }, (h:sample(10)))
    fixtures.wait_until(function()
      local last = rx:requests("/notify/" .. gate)
      return #last >= 4 and last[#last].json.event == "rolled_back"
    end, 10, "the rolled_back notification")
  end)

  it("a dry run (--simulate) calls no webhook and sends no notification; its gates pass, and it says so", function()
    local gate = fresh("dry")
    local t = fixtures.target_config{ instances = 1 }
    t.webhooks = { { name = "qa", type = "confirm-promotion", url = rx:url("/gate/" .. gate), secret = SECRET, interval = 0.05 },
                   { name = "ev", type = "event", url = rx:url("/event/" .. gate), secret = SECRET } }
    t.notify = { { url = rx:url("/notify/" .. gate), format = "json", secret = SECRET } }
    local dir = fixtures.tmpdir("dry")
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = t } })
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "v1", "--simulate" })
    assert.equal(0, code, out .. err)
    assert.matches("webhooks and notifications are not sent %(gates pass%)", out .. err)
    assert.same({}, rx:requests("/gate/" .. gate))
    assert.same({}, rx:requests("/event/" .. gate))
    assert.same({}, rx:requests("/notify/" .. gate))
  end)

  it("a strategy's webhook replaces the target's of the same name; before_promote is a Lua hook too", function()
    local gate = fresh("target-gate")
    local m = target{ webhooks = { { name = "gate", type = "confirm-promotion", url = rx:url("/gate/" .. gate) } } }
    local calls = {}
    local r = m:deploy("production", "v2", { strategy = fast_canary{ webhooks = {
      { name = "gate", type = "confirm-promotion", url = rx:url("/notify/strategy-gate-" .. n) } } },
      hooks = { before_promote = function(d) calls[#calls + 1] = d.version return true end } })
    assert.is_true(r.success, r.errors and r.errors[1])
    assert.same({}, rx:requests("/gate/" .. gate))
    assert.equal(1, #rx:requests("/notify/strategy-gate-" .. n))
    assert.same({ "v2" }, calls)
    rx:open(gate) -- the target's gate (webhooks run before Lua hooks) lets v3 reach the Lua hook
    local r2 = m:deploy("production", "v3", { strategy = fast_canary(),
      hooks = { before_promote = function() return false, "QA said no" end } })
    assert.is_false(r2.success)
    assert.matches("not promoted: hook before_promote said fail: QA said no", r2.errors[1])
  end)

  describe("bad declarations", function()
    local function config_error(webhooks, notify)
      local t = fixtures.target_config{ instances = 1 }
      t.webhooks, t.notify = webhooks, notify
      local ok, err = pcall(deploy.DeploymentManager, { config = fixtures.config{ targets = { production = t } } })
      assert.is_false(ok)
      return err
    end
    local good = { name = "g", type = "confirm-promotion", url = "https://ci.example/gate" }
    local function with(over)
      local w = {}
      for k, v in pairs(good) do w[k] = v end
      for k, v in pairs(over) do w[k] = v end
      if over.drop then w[over.drop] = nil w.drop = nil end
      return w
    end

    it("in the config: each field checked, naming the field and the fix", function()
      local cases = {
        { "x", "targets%.production%.webhooks must be a list of tables" },
        { { good, extra = 1 }, "targets%.production%.webhooks must be a list %(entries 1%.%.n" },
        { { "x" }, "webhooks%[1%] must be a table" },
        { { with{ colour = "red" } }, "webhooks%[1%] has an unknown field 'colour' %(known: name, type, url, secret, timeout, retries, interval%)" },
        { { with{ drop = "name" } }, "webhooks%[1%]%.name is missing" },
        { { with{ name = "bad name" } }, "webhooks%[1%]%.name 'bad name' is not a usable name" },
        { { good, good }, "webhooks%[2%]%.name 'g' is taken by another webhook" },
        { { with{ type = "confirm-deploy" } }, "webhooks%[1%]%.type 'confirm%-deploy' is not a webhook type %(known: confirm%-rollout, pre%-rollout" },
        { { with{ drop = "type" } }, "webhooks%[1%]%.type is missing" },
        { { with{ url = "ftp://x/y" } }, "webhooks%[1%]%.url 'ftp://x/y' is not an http%(s%) URL" },
        { { with{ url = "http:// spaces" } }, "webhooks%[1%]%.url .* is not an http%(s%) URL" },
        { { with{ url = 7 } }, "webhooks%[1%]%.url must be a string, got number" },
        { { with{ drop = "url" } }, "webhooks%[1%]%.url is missing" },
        { { with{ secret = "${DEPLOYCTL_SPEC_UNSET_VAR}" } }, "webhooks%[1%]%.secret environment variable DEPLOYCTL_SPEC_UNSET_VAR is not set" },
        { { with{ secret = "" } }, "webhooks%[1%]%.secret is empty" },
        { { with{ timeout = 0 } }, "webhooks%[1%]%.timeout must be between 0%.001 and 600 seconds" },
        { { with{ timeout = "5" } }, "webhooks%[1%]%.timeout must be a number, got string" },
        { { with{ interval = -1 } }, "webhooks%[1%]%.interval must be between 0%.01 and 86400 seconds" },
        { { with{ retries = 2 } }, "webhooks%[1%]%.retries has no meaning for a confirm%-promotion webhook" },
        { { with{ type = "pre-rollout", retries = 1.5 } }, "webhooks%[1%]%.retries must be a whole number" },
        { { with{ type = "pre-rollout", retries = 11 } }, "webhooks%[1%]%.retries must be between 0 and 10" },
        { { with{ type = "post-rollout", interval = 5 } }, "webhooks%[1%]%.interval is only for confirm%-%* webhooks" },
        { { with{ type = "rollback", retries = 1 } }, "webhooks%[1%]%.retries has no meaning for a rollback webhook" },
      }
      for _, c in ipairs(cases) do
        local err = config_error(c[1])
        assert.matches("^deploy: config targets%.production%.", err)
        assert.matches(c[2], err)
      end
      local ncases = {
        { { { url = "https://x.example/h", format = "xml" } }, "notify%[1%]%.format 'xml' is not a format %(known: slack, json%)" },
        { { { url = "https://x.example/h", severity = "debug" } }, "notify%[1%]%.severity 'debug' is not a severity %(known: info, warning, error" },
        { { { url = "hooks.slack.com/x" } }, "notify%[1%]%.url 'hooks%.slack%.com/x' is not an http%(s%) URL" },
        { { { format = "json" } }, "notify%[1%]%.url is missing" },
        { { { url = "https://x.example/h", channel = "#ops" } }, "notify%[1%] has an unknown field 'channel' %(known: url, format, severity, secret, timeout, retries%)" },
        { { { url = "https://x.example/h", retries = -1 } }, "notify%[1%]%.retries must be between 0 and 10" },
        { { { url = "${DEPLOYCTL_SPEC_UNSET_VAR}" } }, "notify%[1%]%.url environment variable DEPLOYCTL_SPEC_UNSET_VAR is not set" },
        { "slack", "notify must be a list of tables" },
      }
      for _, c in ipairs(ncases) do
        local err = config_error(nil, c[1])
        assert.matches("^deploy: config targets%.production%.", err)
        assert.matches(c[2], err)
      end
    end)

    it("on a strategy: CanaryStrategy, BlueGreenStrategy and a Lua strategy class", function()
      local ok, err = pcall(deploy.CanaryStrategy, { webhooks = { with{ type = "nope" } } })
      assert.is_false(ok)
      assert.matches("^deploy: CanaryStrategy webhooks%[1%]%.type 'nope' is not a webhook type", err)
      ok, err = pcall(deploy.BlueGreenStrategy, { webhooks = "x" })
      assert.matches("^deploy: BlueGreenStrategy webhooks must be a list of tables", err)
      assert.is_true(pcall(deploy.CanaryStrategy, { webhooks = {} }))
      local s = deploy.CanaryStrategy{ webhooks = { good } }
      assert.equal("confirm-promotion", s.webhooks[1].type)
      local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = fixtures.target_config{ instances = 1 } } } }
      local Lua = deploy.DeploymentStrategy:extend{ name = "lua", webhooks = { with{ url = "nope" } } }
      function Lua:execute(d) return true end
      ok, err = pcall(m.deploy, m, "production", "v1", { strategy = Lua })
      assert.is_false(ok)
      assert.matches("^deploy: strategy webhooks%[1%]%.url 'nope' is not an http%(s%) URL", err)
      assert.same({}, m:history("production"))
    end)

    it("secrets given as ${NAME} never reach events, errors or the store", function()
      local t = fixtures.target_config{ instances = 1 }
      local m = deploy.DeploymentManager{ config = fixtures.config{ targets = { production = t } } }
      -- the spec's process has no HOOK env var: a Lua table takes the value itself, registered as a secret
      local secret = SECRET
      local r = m:deploy("production", "v1", { strategy = fast_canary{ webhooks = {
        { name = "pre", type = "pre-rollout", url = rx:url("/status/418?token=" .. secret), secret = secret, retries = 0 } } } })
      assert.is_false(r.success)
      local all = cjson.encode(r) .. cjson.encode(m:events(m:history("production")[1].id)) .. cjson.encode(m:history("production"))
      assert.is_nil(all:find(secret, 1, true))
      assert.matches("status 418", r.errors[1])
    end)
  end)
end)
