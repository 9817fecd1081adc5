-- deployctl serve, for real: the binary started on a 127.0.0.1 port with a
-- real HAProxy and demo-app instances, its dashboard opened in headless
-- Chromium, its /metrics scraped by a real Prometheus, push webhooks signed
-- with openssl and sent with curl, instances killed with SIGKILL.
--
-- One serve (and one HAProxy, one repository) for the file: the tests run in
-- order and each leaves the targets as the next expects.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"
local git = require "spec.support.git"
local http = require "spec.support.http"
local browser = require "spec.support.browser"

local TOKEN = "tok-" .. string.format("%08x", math.random(0, 0x7fffffff))
local SECRET = "whsec-" .. string.format("%08x", math.random(0, 0x7fffffff))

local env = {}

local function url(path) return "http://127.0.0.1:" .. env.port .. path end
local function auth() return { Authorization = "Bearer " .. TOKEN } end

local function status(target)
  local code, body, _, doc = http.get(url("/api/v1/status/" .. target))
  assert.equal(200, code, body)
  return doc
end

local function serve_info()
  local _, _, _, doc = http.get(url("/api/v1/status"))
  return doc.serve
end

local function events_of(id)
  local code, body, _, doc = http.get(url("/api/v1/deployments/" .. id .. "/events"))
  assert.equal(200, code, body)
  return doc.events
end

local function kinds(events)
  local k = {}
  for _, e in ipairs(events) do k[#k + 1] = e.kind end
  return k
end

local function has(list, value)
  for _, v in ipairs(list) do if v == value then return true end end
  return false
end

-- The value of one sample of /metrics (nil when absent).
local function metric(text, name, labels)
  for line in text:gmatch("[^\n]+") do
    local n, l, v = line:match("^([%w_]+){(.-)} (%S+)$")
    if not n then n, v = line:match("^([%w_]+) (%S+)$") l = "" end
    if n == name and (not labels or l:find(labels, 1, true)) then return tonumber(v) end
  end
  return nil
end

local function start_serve(config, extra_env, args)
  local e = { DEPLOY_API_TOKEN = TOKEN, WEBHOOK_SECRET = SECRET }
  for k, v in pairs(extra_env or {}) do e[k] = v or nil end
  local argv = { "--config", config, "serve", "--listen", "127.0.0.1:0" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = cli.spawn(argv, e)
  local port = fixtures.wait_until(function()
    if p:done() then error("serve exited: " .. p:output() .. p:errors()) end
    return tonumber(p:output():match("listening on https?://127%.0%.0%.1:(%d+)"))
  end, 20, "serve to listen")
  return p, port
end

describe("deployctl serve", function()
  setup(function()
    env.h = fixtures.haproxy{}
    env.dir = fixtures.tmpdir("serve")
    env.repo = git.repo()
    env.repo:manifest("web.json", { target = "web", version = "w1" })
    env.repo:commit("w1")
    local cfg = fixtures.config{ state = env.dir .. "/state.db", targets = {
      production = fixtures.target_config{ haproxy = env.h, instances = 2, dir = env.dir },
      staging = fixtures.target_config{ instances = 1, dir = env.dir },
      web = fixtures.target_config{ instances = 1, dir = env.dir },
      batch = fixtures.target_config{ instances = 1, dir = env.dir },
    } }
    cfg.targets.batch.restart = "always"
    cfg.gitops = { { repo_url = env.repo:file_url(), branch = "main", interval = 3600, secret = "${WEBHOOK_SECRET}" } }
    cfg.serve = { supervise = { interval = 0.1, limit = 2, window = 120, backoff_max = 0.3 } }
    env.config = cli.write_config(env.dir, cfg)
    assert.equal(0, (cli.run({ "--config", env.config, "deploy", "production", "v1" })))
    assert.equal(0, (cli.run({ "--config", env.config, "deploy", "batch", "b1" })))
    env.serve, env.port = start_serve(env.config)
    -- its first GitOps round puts web on w1
    fixtures.wait_until(function()
      local _, _, _, doc = http.get(url("/api/v1/status/web"))
      return doc and doc.current_version == "w1"
    end, 30, "the first GitOps round to deploy web w1")
  end)
  teardown(function()
    -- serve first: stopped with the instances, it would restart them
    if env.serve and not env.serve:done() then
      fixtures.kill(env.serve.pid, "TERM")
      pcall(env.serve.wait, env.serve, 10)
    end
    fixtures.cleanup()
  end)

  it("answers the status of every target: never deployed, serving, with the specification's fields", function()
    local code, body, headers, doc = http.get(url("/api/v1/status"))
    assert.equal(200, code, body)
    assert.matches("^application/json", headers["content-type"])
    local by = {}
    for _, v in ipairs(doc.targets) do by[v.target] = v end
    assert.same({ "batch", "production", "staging", "web" },
                (function() local t = {} for k in pairs(by) do t[#t + 1] = k end table.sort(t) return t end)())
    local st = by.staging
    assert.equal("never_deployed", st.state)
    assert.equal("never deployed", st.summary)
    assert.equal(cjson.null, st.current_version)
    assert.equal(0, st.instances)
    local p = by.production
    assert.same({ "production", "v1", "deployed", "healthy", 2 },
                { p.target, p.current_version, p.status, p.health, p.instances })
    assert.equal("healthy", p.state)
    assert.same({ { version = "v1", role = "live", running = 2, total = 2 } }, p.instances_by_version)
    assert.equal(cjson.null, p.rollout)
    assert.equal("succeeded", p.last_deployment.status)
    assert.is_true(doc.serve.token)
    assert.equal(env.repo:head(), doc.serve.gitops[1].revision)
    assert.is_true(doc.serve.gitops[1].webhook)
    local c404, b404 = http.get(url("/api/v1/status/nope"))
    assert.equal(404, c404)
    assert.matches("unknown target 'nope' %(known: batch, production, staging, web%)", b404)
  end)

  it("the dashboard in Chromium shows a canary's live share, and its Promote button lets the rollout go on", function()
    if not browser.available() then pending("chromium is not installed (scripts/setup installs it)") return end
    local d = cli.spawn({ "--config", env.config, "deploy", "production", "v2", "--strategy", "canary",
                          "--set", "initial_percentage=25", "--set", "increment=25", "--set", "interval=0.3",
                          "--set", "pause_at=50" })
    local b = browser.open(url("/#token=" .. TOKEN))
    finally(function() b:close() end)
    -- the live share, read from the page as it updates
    local share = b:wait_for([[(() => { const c = document.querySelector('#t-production');
        return c && c.querySelector('.state').textContent === 'paused' ? c.querySelector('.share').textContent : null })()]],
      30, "the dashboard to show the pause")
    assert.equal("50 % v2", share)
    assert.equal("paused at 50 %, waiting for promote", b:text("#t-production .summary"))
    assert.equal("2/4 (paused)", b:text("#t-production .step"))
    assert.equal("2 / 2 / 0", b:text("#t-production .instances"))
    assert.matches("^deploy ", b:text("#t-production .lock"))
    -- HAProxy agrees with what the page says
    assert.same({ v1 = 10, v2 = 10 }, (env.h:sample(20)))
    -- the timeline came live over the event stream
    b:wait_for("document.querySelector('#t-production tr[data-kind=paused]') !== null", 10, "the paused event")
    local shot = env.dir .. "/dashboard.png"
    b:screenshot(shot)
    assert.equal("\137PNG", fixtures.read_file(shot):sub(1, 4))
    assert.is_false(d:done())
    b:click("#t-production button.promote")
    b:wait_for("document.querySelector('#msg').textContent === 'production: promote requested'", 10, "the answer")
    local rc, out, err = d:wait(60)
    assert.equal(0, rc, out .. err)
    b:wait_for([[document.querySelector('#t-production .version').textContent === 'v2' &&
                 document.querySelector('#t-production .state').textContent === 'healthy']], 20, "v2 live")
    assert.same({ v2 = 20 }, (env.h:sample(20)))
    local ev = events_of(status("production").last_deployment.id)
    local k = kinds(ev)
    assert.is_true(has(k, "resumed") and has(k, "promoted"), table.concat(k, " "))
    for _, e in ipairs(ev) do
      if e.kind == "traffic" then assert.is_true(e.data.pct <= 50 or has(k, "resumed")) end
    end
  end)

  it("refuses every state-changing request without the token (401), and with a wrong one", function()
    local before = status("production")
    local rounds = serve_info().gitops[1].rounds
    for _, path in ipairs{ "/api/v1/targets/production/promote", "/api/v1/targets/production/abort", "/api/v1/sync" } do
      for _, h in ipairs{ {}, { Authorization = "Bearer wrong" }, { Authorization = TOKEN } } do
        local code, body, headers = http.post(url(path), "{}", h)
        assert.equal(401, code, path .. ": " .. body)
        assert.equal('Bearer realm="deployctl"', headers["www-authenticate"])
        assert.matches("Authorization: Bearer", body)
      end
    end
    assert.same({ rounds, false }, { serve_info().gitops[1].rounds, serve_info().gitops[1].syncing })
    local after = status("production")
    assert.same({ before.current_version, before.state }, { after.current_version, after.state })
    -- with the token: nothing runs, so nothing to promote (and nothing done)
    local code, body = http.post(url("/api/v1/targets/production/promote"), "", auth())
    assert.equal(409, code)
    assert.matches("no deployment of 'production' is running", body)
  end)

  it("a push webhook with a good signature syncs at once; a bad or replayed one changes nothing (401, 409)", function()
    -- (no hold of the old set at 100 %: the sync is what this test is about)
    env.repo:manifest("web.json", { target = "web", version = "w2",
                                    strategy = { kind = "blue-green", scale_down_delay = 0 } })
    local rev = env.repo:commit("w2")
    local body = cjson.encode({ ref = "refs/heads/main", after = rev, repository = { clone_url = env.repo:file_url() } })
    local rounds = serve_info().gitops[1].rounds
    -- a wrong signature, or none: 401, and no round starts
    for _, sig in ipairs{ "sha256=" .. http.hmac_sha256("not-the-secret", body), "", "sha1=abc" } do
      local code = http.post(url("/hooks/github"), body, { ["X-GitHub-Event"] = "push",
        ["X-GitHub-Delivery"] = "d-bad", ["X-Hub-Signature-256"] = sig })
      assert.equal(401, code)
      local g = serve_info().gitops[1]
      assert.same({ rounds, false }, { g.rounds, g.syncing })
    end
    assert.equal("w1", status("web").current_version)
    -- signed with the secret: synced now (the poll interval is an hour)
    local headers = { ["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "d-1",
                      ["X-Hub-Signature-256"] = "sha256=" .. http.hmac_sha256(SECRET, body) }
    local code, answer = http.post(url("/hooks/github"), body, headers)
    assert.equal(202, code, answer)
    local ok_w2 = pcall(fixtures.wait_until, function() return status("web").current_version == "w2" end, 30, "web to reach w2")
    assert(ok_w2, "web did not reach w2: " .. env.serve:output() .. env.serve:errors() .. cjson.encode(serve_info()))
    fixtures.wait_until(function() return not serve_info().gitops[1].syncing end, 10, "the round to end")
    assert.equal(rev, serve_info().gitops[1].revision)
    -- the same delivery again: 409, nothing starts
    rounds = serve_info().gitops[1].rounds
    local again, again_body = http.post(url("/hooks/github"), body, headers)
    assert.equal(409, again, again_body)
    assert.matches("received before", again_body)
    assert.same({ rounds, false }, { serve_info().gitops[1].rounds, serve_info().gitops[1].syncing })
    -- a push to another branch is answered and ignored
    local other = cjson.encode({ ref = "refs/heads/dev" })
    local oc, ob = http.post(url("/hooks/github"), other, { ["X-GitHub-Event"] = "push", ["X-GitHub-Delivery"] = "d-2",
      ["X-Hub-Signature-256"] = "sha256=" .. http.hmac_sha256(SECRET, other) })
    assert.equal(200, oc, ob)
    assert.matches("ignored", ob)
    -- GitLab: the token header; generic: an HMAC header of its own
    local gl = cjson.encode({ ref = "refs/heads/main", object_kind = "push" })
    assert.equal(401, (http.post(url("/hooks/gitlab"), gl, { ["X-Gitlab-Event"] = "Push Hook", ["X-Gitlab-Token"] = "nope" })))
    assert.equal(202, (http.post(url("/hooks/gitlab"), gl, { ["X-Gitlab-Event"] = "Push Hook",
      ["X-Gitlab-Token"] = SECRET, ["X-Gitlab-Event-UUID"] = "u-1" })))
    assert.equal(409, (http.post(url("/hooks/gitlab"), gl, { ["X-Gitlab-Event"] = "Push Hook",
      ["X-Gitlab-Token"] = SECRET, ["X-Gitlab-Event-UUID"] = "u-1" })))
    local gen = '{"ref":"main"}'
    assert.equal(202, (http.post(url("/hooks/generic"), gen,
      { ["X-Deploy-Signature"] = "sha256=" .. http.hmac_sha256(SECRET, gen):upper() })))
    -- no delivery id: the same body again is the same delivery
    assert.equal(409, (http.post(url("/hooks/generic"), gen,
      { ["X-Deploy-Signature"] = "sha256=" .. http.hmac_sha256(SECRET, gen) })))
    -- bad input, signed: not JSON, not an object, a ref that is not a string
    for _, bad in ipairs{ "{not json", "[1,2]", '{"ref": 7}' } do
      local bc, bb = http.post(url("/hooks/generic"), bad, { ["X-Deploy-Delivery"] = bad,
        ["X-Deploy-Signature"] = "sha256=" .. http.hmac_sha256(SECRET, bad) })
      assert.equal(400, bc, bb)
    end
    -- a body over the cap is refused before anyone reads it
    local big = env.dir .. "/big.json"
    fixtures.write_file(big, '{"ref":"' .. string.rep("x", 2 * 1024 * 1024) .. '"}')
    assert.equal(413, (http.request{ method = "POST", url = url("/hooks/github"), body_file = big,
                                      headers = { ["X-GitHub-Event"] = "push" } }))
    local _, metrics_text = http.get(url("/metrics"))
    assert.equal(3, metric(metrics_text, "deployctl_webhooks_total", 'source="github",result="unauthorized"'))
    assert.equal(1, metric(metrics_text, "deployctl_webhooks_total", 'source="github",result="replayed"'))
  end)

  it("restarts an instance killed with SIGKILL, and the restart shows in events and metrics", function()
    local before = status("production")
    local live = {}
    local code, out = cli.run({ "--config", env.config, "status", "production", "--json" })
    assert.equal(0, code, out)
    -- (cjson reads every number as a float: the pids are made whole)
    for _, i in ipairs(cjson.decode(out).instances) do
      if i.live then i.pid = math.tointeger(i.pid) live[#live + 1] = i end
    end
    assert.equal(2, #live)
    -- the recorded pid is the demo app itself, not a shell around it
    assert.matches("demo%-app", fixtures.read_file("/proc/" .. live[1].pid .. "/cmdline"))
    assert.is_true(fixtures.kill(live[1].pid, "KILL"))
    local after = fixtures.wait_until(function()
      local s = status("production")
      return s.supervision.restarts > before.supervision.restarts and s.instances == 2 and s
    end, 20, "the instance to be restarted")
    assert.equal("healthy", after.state)
    local ev = events_of(after.last_deployment.id)
    local restarted
    for _, e in ipairs(ev) do if e.kind == "instance_restarted" then restarted = e.data end end
    assert.equal(live[1].pid, restarted.old_pid)
    -- deploy (another process) started it: how it ended is not serve's to
    -- know (the restart of one serve started says; see the next test)
    assert.equal("unknown", restarted.exit)
    assert.is_true(fixtures.alive(math.tointeger(restarted.pid)))
    assert.same({ v2 = 20 }, (env.h:sample(20)))
    local _, text = http.get(url("/metrics"))
    assert.is_true(metric(text, "deployctl_instance_restarts_total", 'target="production"') >= 1)
  end)

  it("marks a version that cannot stay up degraded instead of restarting it forever", function()
    -- batch restarts always; the limit is 2 restarts in the window
    local killed = {}
    local s = fixtures.wait_until(function()
      local st = status("batch")
      if st.supervision.degraded then return st end
      local _, out = cli.run({ "--config", env.config, "status", "batch", "--json" })
      for _, i in ipairs(cjson.decode(out).instances or {}) do
        -- (a pid of 0 is a restart under way: kill(0) would hit this very process group)
        if i.live and i.alive and math.tointeger(i.pid) and i.pid > 1 and not killed[i.pid] then
          killed[i.pid] = true
          fixtures.kill(math.tointeger(i.pid), "KILL")
        end
      end
    end, 60, "batch to be marked degraded")
    assert.equal("degraded", s.state)
    assert.equal(2, s.supervision.restarts)
    -- the second death was of an instance serve had started: its end is known
    local exits = {}
    for _, e in ipairs(events_of(s.last_deployment.id)) do
      if e.kind == "instance_restarted" then exits[#exits + 1] = e.data.exit end
    end
    assert.same({ "unknown", "signal 9" }, exits)
    assert.matches("not restarted any more", s.summary)
    local code = cli.run({ "--config", env.config, "status", "batch" })
    assert.equal(4, code)
    local _, text = http.get(url("/metrics"))
    assert.equal(1, metric(text, "deployctl_target_degraded", 'target="batch"'))
    -- a reconcile by hand brings it back, and supervision says so
    assert.equal(0, (cli.run({ "--config", env.config, "reconcile", "batch" })))
    fixtures.wait_until(function() return not status("batch").supervision.degraded end, 20, "batch to recover")
    assert.equal(0, (cli.run({ "--config", env.config, "status", "batch" })))
  end)

  it("serves /metrics that a real Prometheus scrapes and queries", function()
    local pdir = fixtures.tmpdir("prometheus")
    local pport = fixtures.free_port()
    fixtures.write_file(pdir .. "/prometheus.yml", string.format([[
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: deployctl
    static_configs:
      - targets: ["127.0.0.1:%d"]
]], env.port))
    fixtures.spawn(string.format("prometheus --config.file=%s --storage.tsdb.path=%s --web.listen-address=127.0.0.1:%d",
      fixtures.shell_quote(pdir .. "/prometheus.yml"), fixtures.shell_quote(pdir .. "/data"), pport), pdir .. "/log")
    local function query(expr)
      local code, body, _, doc = http.get(string.format("http://127.0.0.1:%d/api/v1/query?query=%s", pport,
        expr:gsub("[^%w]", function(c) return string.format("%%%02X", c:byte()) end)))
      if code ~= 200 or not doc or doc.status ~= "success" then return nil, body end
      return doc.data.result
    end
    local r = fixtures.wait_until(function()
      local res = query('up{job="deployctl"}')
      return res and res[1] and res[1].value[2] == "1" and res
    end, 60, "Prometheus to scrape serve")
    assert.equal("1", r[1].value[2])
    local live = query('deployctl_live_version_info{target="production"}')
    assert.equal("v2", live[1].metric.version)
    local deps = query('deployctl_deployments_total{target="production",result="succeeded"}')
    assert.equal("2", deps[1].value[2])
    local st = query('deployctl_target_state{target="staging",state="never_deployed"}')
    assert.equal("1", st[1].value[2])
    local hist = query('deployctl_rollout_duration_seconds_count{target="production"}')
    assert.equal("2", hist[1].value[2])
    -- every name has the prefix
    local names = query('count by (__name__) ({job="deployctl"})')
    for _, n in ipairs(names) do
      local name = n.metric.__name__
      assert.is_truthy(name:match("^deployctl_") or name:match("^up$") or name:match("^scrape_"), name)
    end
  end)

  it("answers bad requests with the problem named: unknown routes, wrong methods, bad bodies and queries", function()
    local cases = {
      { "GET", "/nope", 404, "no such route" },
      { "GET", "/api/v1/nothing", 404, "no such route" },
      { "DELETE", "/api/v1/status", 405, "use GET" },
      { "GET", "/api/v1/targets/production/promote", 405, "use POST" },
      { "POST", "/metrics", 405, "use GET" },
      { "GET", "/hooks/github", 405, "use POST" },
      { "GET", "/api/v1/targets/production/history?limit=0", 400, "limit must be a whole number from 1 to 1000" },
      { "GET", "/api/v1/targets/production/history?limit=abc", 400, "limit must be" },
      { "GET", "/api/v1/targets/nope/history", 404, "unknown target 'nope'" },
      { "GET", "/api/v1/deployments/zzzz", 404, "" },
      { "GET", "/api/v1/deployments/latest", 400, "needs the target" },
      { "GET", "/api/v1//status", 400, "malformed path" },
    }
    for _, c in ipairs(cases) do
      local code, body = http.request{ method = c[1], url = url(c[2]) }
      assert.equal(c[3], code, c[1] .. " " .. c[2] .. ": " .. body)
      assert.matches(c[4], body, 1, true)
    end
    for _, b in ipairs{ "{bad", "[]", '{"deployment_id": 5}', '{"colour": "red"}' } do
      local code, body = http.post(url("/api/v1/targets/production/abort"), b, auth())
      assert.equal(400, code, b .. ": " .. body)
    end
    -- a promote naming a deployment that is not the running one changes nothing
    local code, body = http.post(url("/api/v1/targets/production/promote"), '{"deployment_id":"d0"}', auth())
    assert.equal(409, code, body)
    local hist_code, _, _, hist = http.get(url("/api/v1/targets/production/history?limit=1"))
    assert.equal(200, hist_code)
    local id = hist.deployments[1].id
    local c1, _, _, one = http.get(url("/api/v1/deployments/" .. id:sub(1, 14)))
    assert.equal(200, c1)
    assert.equal(id, one.id)
    local c2, _, _, latest = http.get(url("/api/v1/deployments/latest?target=production"))
    assert.equal(200, c2)
    assert.equal(id, latest.id)
    local c3, b3 = http.get(url("/api/v1/deployments/d"))
    assert.equal(400, c3, b3)
    assert.matches("names more than one deployment", b3)
  end)

  it("streams target changes and events to a client (server-sent events)", function()
    local out = env.dir .. "/stream.txt"
    local pid = fixtures.spawn("curl -sN --max-time 30 " .. fixtures.shell_quote(url("/api/v1/stream")), out)
    fixtures.wait_until(function() return (fixtures.read_file(out) or ""):find("event: target\ndata: {", 1, true) end,
      10, "the snapshot")
    assert.equal(0, (cli.run({ "--config", env.config, "deploy", "staging", "s1" })))
    local text = fixtures.wait_until(function()
      local t = fixtures.read_file(out) or ""
      -- the events as they happen; the target's view once serve has read it again
      return t:find('"kind":"finished"', 1, true) and t:find('"target":"staging","current_version":"s1"', 1, true)
             and t
    end, 20, "the events of the deployment of staging, then its new view")
    assert.is_truthy(text:find("event: target\ndata: {\"target\":\"staging\",\"current_version\":\"s1\"", 1, true))
    fixtures.stop(pid)
  end)

  it("stops on SIGTERM with exit 0, restarting nothing on its way out", function()
    local _, out = cli.run({ "--config", env.config, "status", "production", "--json" })
    local pids = {}
    for _, i in ipairs(cjson.decode(out).instances) do pids[#pids + 1] = math.tointeger(i.pid) end
    assert.is_true(fixtures.kill(env.serve.pid, "TERM"))
    local rc, text = env.serve:wait(20)
    assert.equal(0, rc, text)
    assert.matches("serve: stopped", text)
    -- the instances are not serve's: they go on serving
    for _, pid in ipairs(pids) do assert.is_true(fixtures.alive(pid)) end
  end)
end)

describe("deployctl serve: TLS, and bad flags and config refused before it listens", function()
  local dir, base
  setup(function()
    dir = fixtures.tmpdir("serve-bad")
    base = fixtures.config{ state = dir .. "/state.db", targets = {
      web = fixtures.target_config{ instances = 1, dir = dir } } }
  end)
  teardown(function() fixtures.cleanup() end)

  local function config_with(edit)
    local cfg = cjson.decode(cjson.encode(base))
    edit(cfg)
    return cli.write_config(fixtures.tmpdir("serve-cfg"), cfg)
  end

  it("serves HTTPS with a certificate and its key", function()
    local cert, key = dir .. "/cert.pem", dir .. "/key.pem"
    assert.is_true(os.execute(string.format(
      "openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 " ..
      "-days 1 -keyout %s -out %s >/dev/null 2>&1",
      fixtures.shell_quote(key), fixtures.shell_quote(cert))) == true)
    local cfg = cli.write_config(dir, base)
    local p = cli.spawn({ "--config", cfg, "serve", "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key })
    local port = fixtures.wait_until(function()
      if p:done() then error("serve exited: " .. p:output() .. p:errors()) end
      return tonumber(p:output():match("listening on https://127%.0%.0%.1:(%d+)"))
    end, 20, "serve to listen over TLS")
    local code, body = http.request{ url = "https://127.0.0.1:" .. port .. "/api/v1/status", cacert = cert }
    assert.equal(200, code, body)
    assert.matches('"target":"web"', body, 1, true)
    -- plain HTTP on that port is not answered as HTTP
    local plain = http.request{ url = "http://127.0.0.1:" .. port .. "/api/v1/status" }
    assert.are_not.equal(200, plain)
    -- a second serve on the same port: refused, naming the port
    local c2, o2, e2 = cli.run({ "--config", cfg, "serve", "--listen", "127.0.0.1:" .. port })
    assert.equal(2, c2, o2 .. e2)
    assert.matches(tostring(port), e2, 1, true)
    fixtures.kill(p.pid, "TERM")
    assert.equal(0, (p:wait(20)))
  end)

  it("refuses bad flags, bad config keys and unloadable certificates with exit 2, naming the problem", function()
    local good = cli.write_config(dir, base)
    local cases = {
      { good, { "--listen", "nowhere" }, "is not ADDRESS:PORT" },
      { good, { "--listen", "127.0.0.1:99999" }, "the port must be a number from 0 to 65535" },
      { good, { "--listen", "127.0.0.1:0", "--tls-cert", dir .. "/none.pem" }, "TLS needs both" },
      { good, { "--listen", "127.0.0.1:0", "--tls-cert", dir .. "/none.pem", "--tls-key", dir .. "/none.pem" },
        "cannot read" },
      { good, { "--listen", "127.0.0.1:0", "--bogus" }, "--bogus" },
      { config_with(function(c) c.targets.web.restart = "sometimes" end), {},
        "targets.web.restart 'sometimes' is not known: use 'on-failure', 'always' or 'never'" },
      { config_with(function(c) c.gitops = { repo_url = "file:///x" } end), {}, "gitops" },
      { config_with(function(c) c.gitops = { { branch = "main" } } end), {}, "has no repo_url" },
      { config_with(function(c) c.gitops = { { repo_url = "file:///x", colour = "red" } } end), {}, "colour" },
      { config_with(function(c) c.gitops = { { repo_url = "file:///x", interval = -1 } } end), {}, "interval" },
      { config_with(function(c) c.serve = { supervise = { limit = 0 } } end), {}, "limit" },
      { config_with(function(c) c.serve = { port = 80 } end), {}, "port" },
      { config_with(function(c) c.serve = { listen = 9753 } end), {}, "listen" },
      { config_with(function(c) c.gitops = { { repo_url = "file:///x", secret = "${DEPLOY_SPEC_UNSET_SECRET}" } } end),
        {}, "names ${DEPLOY_SPEC_UNSET_SECRET}, which is not set in the environment" },
      { config_with(function(c) c.gitops = { { repo_url = "file:///x", secret = "" } } end), {}, "has an empty secret" },
    }
    local bad_pem = dir .. "/bad.pem"
    fixtures.write_file(bad_pem, "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    cases[#cases + 1] = { good, { "--listen", "127.0.0.1:0", "--tls-cert", bad_pem, "--tls-key", bad_pem },
                          "cannot load the certificate" }
    for _, c in ipairs(cases) do
      local args = { "--config", c[1], "serve" }
      for _, a in ipairs(c[2]) do args[#args + 1] = a end
      local code, out, err = cli.run(args)
      assert.equal(2, code, table.concat(c[2], " ") .. ": " .. out .. err)
      assert.matches(c[3], err, 1, true)
      assert.not_matches("listening on", out)
    end
  end)
end)
