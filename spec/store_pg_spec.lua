-- The PostgreSQL store backend against a real PostgreSQL (one throwaway
-- cluster for the file, a database per spec), driven from C by store-probe: group commit, savepoints, leases
-- across runners, operator commands, a server that goes away, and where
-- the password may appear (nowhere).
local fixtures = require "spec.support.fixtures"
local pg = require "spec.support.pg"

local available, why = pg.available()

local function answers_by_cmd(answers)
  local by = {}
  for _, a in ipairs(answers) do
    by[a.cmd] = by[a.cmd] or {}
    table.insert(by[a.cmd], a)
  end
  return by
end

local function ids(deployments)
  local out = {}
  for i, d in ipairs(deployments or {}) do out[i] = d.id end
  return out
end

-- Asserts a probe run went through: exit 0 (under ASan, 0 also means no
-- leak) and nothing on stderr.
local function assert_clean(code, err, out)
  assert.equal(0, code, "store-probe exited " .. tostring(code) .. "\nstderr: " .. tostring(err) .. "\nstdout: "
    .. tostring(out))
end

describe("the PostgreSQL store", function()
  if not available then
    pending(why)
    return
  end

  local cluster, c, n = nil, nil, 0
  setup(function() cluster = pg.cluster() end)
  teardown(function()
    pg.cleanup()
    pg.teardown()
    fixtures.cleanup()
  end)
  before_each(function()
    n = n + 1
    c = cluster:database("spec" .. n)
  end)
  after_each(function()
    pg.end_probes()
    -- a spec that stopped the server leaves it running for the next
    if not cluster.running then cluster:start() end
    fixtures.cleanup{ keep = { cluster } }
  end)

  it("creates its schema once when runners start together, and refuses newer or foreign schemas", function()
    local url = c:url{}
    local runs = {}
    for i = 1, 4 do runs[i] = pg.spawn_probe(url, { "ensure t" .. i, "stats" }) end
    for i = 1, 4 do
      local answers, code, out, err = runs[i]:wait(30)
      assert_clean(code, err, out)
      assert.equal("ok", answers[2].rc, out)
    end
    assert.equal("deployctl|3", c:sql("SELECT (SELECT value FROM meta WHERE key = 'application') || '|' || "
      .. "(SELECT value FROM meta WHERE key = 'schema_version')"))
    assert.equal("4", c:sql("SELECT count(*) FROM targets"))
    -- a later deployctl bumped the schema
    c:sql("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    local answers, code, out, err = pg.run_probe(url, { "ensure x" })
    assert_clean(code, err, out)
    assert.equal("error", answers[2].rc)
    assert.matches("was written by a newer deployctl %(schema 4, this build knows 3%): upgrade deployctl", answers[2].err)
    -- and fast: a refusal does not wait for the timeout
    assert.is_true(answers[2].ms < 3000, out)
    -- a database whose tables belong to another program
    c:create_db("other")
    c:sql("CREATE TABLE targets(x int)", "other")
    answers = pg.run_probe(c:url{ db = "other" }, { "history" })
    assert.equal("error", answers[2].rc)
    assert.matches("is not a deployctl store: its schema public holds tables of another program %(targets%)",
      answers[2].err)
    assert.equal("", c:sql("SELECT to_regclass('meta')", "other"))
  end)

  it("commits many writes of one batch in one transaction and one round trip", function()
    -- the probe alone uses this database; its counters are read from another
    local db = c:create_db("gc")
    local url = c:url{ db = db }
    local function xact_commit()
      return tonumber((c:sql("SELECT xact_commit FROM pg_stat_database WHERE datname = 'gc'", "postgres")))
    end
    local function run(n, batched)
      local lines = { "ensure web" .. n, "begin web" .. n .. " d" .. n, "stats" }
      if batched then lines[#lines + 1] = "batch" end
      for i = 1, 200 do lines[#lines + 1] = "event d" .. n .. " web" .. n .. " step" .. i .. " data={\"i\":" .. i .. "}" end
      if batched then lines[#lines + 1] = "commit" end
      lines[#lines + 1] = "stats"
      local before = xact_commit()
      local answers, code, out, err = pg.run_probe(url, lines)
      assert_clean(code, err, out)
      -- a session's transactions are counted by the time it is gone
      fixtures.wait_until(function()
        return c:sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'gc'", "postgres") == "0"
      end, 10, "the probe's session to end")
      return answers, xact_commit() - before
    end
    run(0, true) -- creates the schema
    local answers, one_batch = run(1, true)
    local by = answers_by_cmd(answers)
    local s0, s1 = by.stats[1], by.stats[2]
    assert.equal(200, #by.commit[1].results)
    for _, r in ipairs(by.commit[1].results) do assert.equal("ok", r.rc, r.err) end
    assert.equal(1, s1.transactions - s0.transactions)
    assert.equal(1, s1.round_trips - s0.round_trips)
    assert.equal("200", c:sql("SELECT count(*) FROM events WHERE deployment_id = 'd1'", db))
    -- the same writes one by one: 199 more transactions on the server
    local _, one_each = run(2, false)
    assert.equal(199, one_each - one_batch)
  end)

  it("undoes a failing op of a batch alone, in its savepoint", function()
    local url = c:url{ lease = 1 }
    local p = pg.probe(c:url{})
    assert.equal("ok", p:send("ensure web").rc)
    assert.equal("ok", p:send("ensure api").rc)
    assert.equal("ok", p:send("begin web d1").rc)
    -- a BEGIN refused as locked in the middle of a batch
    p:send("batch")
    local before = p:send("stats")
    for _, l in ipairs{ "event d1 web a", "begin web d2", "iadd web d1 0 port=8001", "event d1 web b" } do
      p:post(l)
    end
    local r = p:send("commit").results
    assert.same({ "ok", "locked", "ok", "ok" }, { r[1].rc, r[2].rc, r[3].rc, r[4].rc })
    assert.matches("target locked: 'web' is being deployed by deployment d1 %(pid %d+ on .-, since .-, until .-%)",
      r[2].err)
    assert.equal("d1", r[2].lock.deployment_id)
    assert.equal("a,b", c:sql("SELECT string_agg(kind, ',' ORDER BY id) FROM events WHERE deployment_id = 'd1'"))
    assert.equal("1", c:sql("SELECT count(*) FROM instances"))
    assert.equal("0", c:sql("SELECT count(*) FROM deployments WHERE id = 'd2'"))
    local mid = p:send("stats")
    assert.equal(1, mid.transactions - before.transactions)
    assert.equal(1, mid.round_trips - before.round_trips)
    -- an op whose statement fails (a duplicate id): rolled back to its
    -- savepoint, the ops after it sent again, one transaction
    p:send("batch")
    for _, l in ipairs{ "event d1 web c", "begin api d1", "event d1 web d" } do p:post(l) end
    r = p:send("commit").results
    assert.same({ "ok", "error", "ok" }, { r[1].rc, r[2].rc, r[3].rc })
    assert.matches("cannot insert deployment 'd1': duplicate key value", r[2].err)
    assert.equal("a,b,c,d", c:sql("SELECT string_agg(kind, ',' ORDER BY id) FROM events WHERE deployment_id = 'd1'"))
    assert.equal("deployed", c:sql("SELECT status FROM targets WHERE name = 'api'"))
    local after = p:send("stats")
    assert.equal(1, after.transactions - mid.transactions)
    assert.equal(2, after.round_trips - mid.round_trips)
    -- what a failing op did before it failed is undone too: a takeover of
    -- an expired lease whose insert then fails leaves the old holder alone
    local q = pg.probe(url)
    assert.equal("ok", q:send("ensure cache").rc)
    assert.equal("ok", q:send("begin cache old1").rc)
    fixtures.wait_until(function()
      local l = q:send("lock cache").lock
      return l.expires_at < l.now
    end, 5, "the lease of old1 to expire")
    q:send("batch")
    q:post("begin cache d1")
    q:post("event old1 cache after")
    r = q:send("commit").results
    assert.same({ "error", "ok" }, { r[1].rc, r[2].rc })
    assert.equal("running", c:sql("SELECT status FROM deployments WHERE id = 'old1'"))
    assert.equal("old1", c:sql("SELECT deployment_id FROM locks WHERE target = 'cache'"))
    assert.equal("0", c:sql("SELECT count(*) FROM events WHERE kind = 'interrupted'"))
    for _, h in ipairs{ p, q } do
      local code, err = h:close()
      assert.equal(0, code, err)
    end
  end)

  it("lets exactly one of 8 runners take a target's lock at once", function()
    local url = c:url{}
    local barrier = fixtures.tmpdir("barrier") .. "/go"
    local runs = {}
    for i = 1, 8 do
      runs[i] = pg.spawn_probe(url, { "ensure race", "barrier " .. barrier .. " timeout=30", "begin race r" .. i })
    end
    -- every runner connected and ready before any begins
    fixtures.wait_until(function()
      for i = 1, 8 do if #runs[i]:answers() < 2 then return false end end
      return true
    end, 30, "8 runners to connect")
    fixtures.write_file(barrier, "go\n")
    local winners, locked = {}, 0
    for i = 1, 8 do
      local answers, code, out, err = runs[i]:wait(30)
      assert_clean(code, err, out)
      local a = answers[4]
      assert.equal("barrier", answers[3].cmd)
      assert.equal("ok", answers[3].rc)
      if a.rc == "ok" then
        winners[#winners + 1] = "r" .. i
      else
        assert.equal("locked", a.rc, a.err)
        locked = locked + 1
      end
    end
    assert.equal(1, #winners)
    assert.equal(7, locked)
    assert.equal(winners[1], c:sql("SELECT deployment_id FROM locks WHERE target = 'race'"))
    assert.equal("1|" .. winners[1] .. "|running",
      c:sql("SELECT count(*) || '|' || min(id) || '|' || min(status) FROM deployments WHERE target = 'race'"))
    assert.equal("running", c:sql("SELECT status FROM targets WHERE name = 'race'"))
    local answers = pg.run_probe(url, { "integrity" })
    assert.equal("ok", answers[2].rc, answers[2].err)
  end)

  it("takes over an expired lease, and a renewal after expiry reports the lock lost", function()
    local url = c:url{ lease = 1 }
    local a = pg.probe(url)
    local b = pg.probe(url)
    assert.equal(1, a.opened.lease)
    assert.equal("ok", a:send("ensure web").rc)
    local begun = a:send("begin web d0a host=runner-a")
    assert.equal("ok", begun.rc, begun.err)
    local renewed = a:send("renew d0a")
    assert.equal("ok", renewed.rc, renewed.err)
    assert.is_true(renewed.lock.expires_at > renewed.lock.acquired_at)
    -- the other runner is refused while the lease lives
    local refused = b:send("begin web d0b host=runner-b")
    assert.equal("locked", refused.rc)
    assert.matches("deployment d0a %(pid %d+ on runner%-a, since [%dT:.Z-]+, until [%dT:.Z-]+%)", refused.err)
    -- runner a stops renewing; runner b takes the target once it expired
    local took
    fixtures.wait_until(function()
      took = b:send("begin web d0b host=runner-b")
      return took.rc ~= "locked"
    end, 10, "the lease of d0a to expire")
    assert.equal("ok", took.rc, took.err)
    local d = b:send("get d0a").deployments[1]
    assert.equal("interrupted", d.status)
    assert.matches("stopped renewing its lease, which expired at .-; deployment d0b took the target over", d.errors)
    local ev = b:send("events d0a").events
    assert.equal("interrupted", ev[#ev].kind)
    -- runner a wakes up: its renewal says the lock is lost, and to whom
    local lost = a:send("renew d0a")
    assert.equal("locked", lost.rc)
    assert.matches("the lease of deployment 'd0a' on 'web' was lost: deployment d0b %(pid %d+ on runner%-b", lost.err)
    -- a renewal after expiry with nobody taking over: lost as well
    assert.equal("ok", a:send("ensure api").rc)
    assert.equal("ok", a:send("begin api d0c").rc)
    fixtures.wait_until(function()
      local l = a:send("lock api").lock
      return l.expires_at < l.now
    end, 5, "the lease of d0c to expire")
    local late = a:send("renew d0c")
    assert.equal("locked", late.rc)
    assert.matches("the lease of deployment 'd0c' on 'api' expired at", late.err)
    for _, h in ipairs{ a, b } do
      local code, err = h:close()
      assert.equal(0, code, err)
    end
  end)

  it("recovers deployments whose lease expired, never one with a live lease", function()
    local long = pg.probe(c:url{ lease = 60 })
    local short = pg.probe(c:url{ lease = 1 })
    for _, t in ipairs{ "live", "dead" } do assert.equal("ok", long:send("ensure " .. t).rc) end
    assert.equal("ok", long:send("begin live d-live host=elsewhere").rc)
    assert.equal("ok", short:send("begin dead d-dead host=elsewhere").rc)
    fixtures.wait_until(function()
      local l = short:send("lock dead").lock
      return l.expires_at < l.now
    end, 5, "the lease of d-dead to expire")
    local r = long:send("recover")
    assert.equal("ok", r.rc, r.err)
    assert.same({ "d-dead" }, ids(r.deployments))
    assert.equal("interrupted", r.deployments[1].status)
    assert.equal("running", c:sql("SELECT status FROM deployments WHERE id = 'd-live'"))
    assert.equal("failed", c:sql("SELECT status FROM targets WHERE name = 'dead'"))
    assert.equal("", c:sql("SELECT deployment_id FROM locks WHERE target = 'dead'"))
    -- a second recovery finds nothing more
    assert.same({}, ids(short:send("recover").deployments))
    for _, h in ipairs{ long, short } do
      local code, err = h:close()
      assert.equal(0, code, err)
    end
  end)

  it("locks a target for a reconcile, which a deployment waits for or takes over once its lease expired", function()
    local p = pg.probe(c:url{ lease = 1 })
    assert.equal("ok", p:send("ensure web").rc)
    local taken = p:send("take web r0001")
    assert.equal("ok", taken.rc, taken.err)
    assert.equal("web", taken.target.name)
    local refused = p:send("begin web d01")
    assert.equal("locked", refused.rc)
    assert.matches("target locked: 'web' is being reconciled %(pid %d+ on .-, since .-, until .-%): wait for it to "
      .. "finish", refused.err)
    assert.equal("reconcile", refused.lock.purpose)
    -- a reconcile's lock is renewed by its holder id as a deployment's is
    local renewed = p:send("renew r0001")
    assert.equal("ok", renewed.rc, renewed.err)
    assert.equal("reconcile", renewed.lock.purpose)
    assert.equal("ok", p:send("release web r0001").rc)
    local gone = p:send("renew r0001")
    assert.equal("locked", gone.rc)
    assert.equal("deploy: store: the lease of 'r0001' was lost: nothing is locked under that id", gone.err)
    assert.equal("ok", p:send("begin web d01").rc)
    assert.equal("ok", p:send("finish d01 succeeded promoted=1 tstatus=deployed").rc)
    -- a reconcile that stopped renewing: taken over, and no deployment is
    -- interrupted for it
    assert.equal("ok", p:send("take web r0002").rc)
    fixtures.wait_until(function()
      local l = p:send("lock web").lock
      return l.expires_at < l.now
    end, 5, "the reconcile's lease to expire")
    local begun = p:send("begin web d02 version=2.0")
    assert.equal("ok", begun.rc, begun.err)
    assert.equal("0", c:sql("SELECT count(*) FROM events WHERE kind = 'interrupted'"))
    -- the version it starts from is the one live as the lock was taken
    assert.equal("1.0", c:sql("SELECT from_version FROM deployments WHERE id = 'd02'"))
    assert.equal("deploy", p:send("lock web").lock.purpose)
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("records an operator command only for a running deployment, and reading it removes nothing", function()
    local p = pg.probe(c:url{})
    assert.equal("ok", p:send("ensure web").rc)
    local none = p:send("control web promote by=ops@laptop")
    assert.equal("notfound", none.rc)
    assert.equal("no deployment of 'web' is running: nothing to promote", none.err)
    assert.equal("ok", p:send("begin web d1").rc)
    local set = p:send("control web promote by=ops@laptop")
    assert.equal("ok", set.rc, set.err)
    assert.equal("d1", set.deployments[1].id)
    local first = set.id
    local read1 = p:send("controls 0").controls
    local read2 = p:send("controls 0").controls
    assert.equal(1, #read1)
    assert.same(read1, read2)
    assert.same({ id = first, deployment_id = "d1", target = "web", command = "promote",
      requested_by = "ops@laptop" }, read1[1])
    assert.same({}, p:send("controls " .. first).controls)
    assert.equal("ok", p:send("finish d1 succeeded promoted=1 tstatus=deployed thealth=healthy").rc)
    assert.equal("notfound", p:send("control web abort").rc)
    -- the command stays with the deployment it was given to
    assert.equal("ok", p:send("begin web d2").rc)
    assert.same({}, p:send("controls " .. first).controls)
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("fails operations cleanly while PostgreSQL is down and works again once it is back", function()
    local p = pg.probe(c:url{ timeout = 2 })
    assert.equal("ok", p:send("ensure web").rc)
    assert.equal("ok", p:send("begin web d1").rc)
    c:stop("fast")
    local t0 = fixtures.now()
    local down = p:send("event d1 web while-down")
    assert.equal("error", down.rc)
    assert.matches("cannot add event 'while%-down' of deployment 'd1': not recorded: the PostgreSQL database at "
      .. "postgresql://deployer@/" .. c.db .. "%?host=.- is unreachable", down.err)
    local read = p:send("history web")
    assert.equal("error", read.rc)
    assert.matches("cannot read the history of target 'web': the PostgreSQL database at .- is unreachable", read.err)
    assert.is_true(fixtures.now() - t0 < 8, "failed within the timeout")
    c:start()
    local back
    fixtures.wait_until(function()
      back = p:send("event d1 web after")
      return back.rc == "ok"
    end, 20, "the store to reconnect")
    local ev = p:send("events d1").events
    local kinds = {}
    for i, e in ipairs(ev) do kinds[i] = e.kind end
    assert.same({ "after" }, kinds)
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("reports a lease as lost when it may have run out while the database was unreachable", function()
    local p = pg.probe(c:url{ lease = 2, timeout = 1 })
    assert.equal("ok", p:send("ensure web").rc)
    assert.equal("ok", p:send("begin web d01").rc)
    c:stop("fast")
    -- within the lease: an error, the lease still this runner's
    local first = p:send("renew d01")
    assert.equal("error", first.rc)
    assert.matches("cannot renew the lock of deployment 'd01': not recorded: the PostgreSQL database at .- is "
      .. "unreachable", first.err)
    -- past it: lost, so that the runner stops acting on the target
    local lost
    fixtures.wait_until(function()
      lost = p:send("renew d01")
      return lost.rc ~= "error"
    end, 10, "the lease to run out")
    assert.equal("locked", lost.rc)
    assert.matches("the lease of deployment 'd01' may have run out while the PostgreSQL database at .- is "
      .. "unreachable .-: another runner may take its target over", lost.err)
    c:start()
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("gives up on a server that stops answering at the timeout, and says the write may have landed", function()
    local p = pg.probe(c:url{ timeout = 2 })
    assert.equal("ok", p:send("ensure web").rc)
    assert.equal("ok", p:send("begin web d1").rc)
    local backend = c:sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'deployctl'")
    assert.matches("^%d+$", backend)
    assert(os.execute("kill -STOP " .. backend))
    local ok, a = pcall(p.send, p, "event d1 web frozen", 10)
    os.execute("kill -CONT " .. backend)
    assert(ok, a)
    assert.equal("error", a.rc)
    assert.matches("cannot add event 'frozen' of deployment 'd1': no answer from the PostgreSQL database at .- "
      .. "within 2 s, before it confirmed the commit: it may or may not be recorded", a.err)
    assert.is_true(a.ms >= 1900 and a.ms < 5000, "gave up after " .. a.ms .. " ms")
    -- a new connection serves what comes next
    local h = p:send("history web")
    assert.equal("ok", h.rc, h.err)
    assert.same({ "d1" }, ids(h.deployments))
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("fails a write in flight when PostgreSQL stops, without recording it", function()
    local p = pg.probe(c:url{ timeout = 30 })
    assert.equal("ok", p:send("ensure web").rc)
    -- another session holds the target's row, so the BEGIN waits on it
    local holder = fixtures.spawn(string.format("%s/psql -X -q -U postgres -h %s -p %d -d %s -c %s",
      pg.BIN, fixtures.shell_quote(c.dir), c.port, c.db,
      fixtures.shell_quote("BEGIN; SELECT 1 FROM targets WHERE name = 'web' FOR UPDATE; SELECT pg_sleep(60);")))
    fixtures.wait_until(function()
      return c:sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") == "1"
    end, 10, "the row to be held")
    p:post("begin web d-inflight")
    fixtures.wait_until(function()
      return c:sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'deployctl' "
        .. "AND wait_event_type = 'Lock'") == "1"
    end, 10, "the BEGIN to wait for the row")
    c:stop("fast")
    local a = p:next(10)
    assert.equal("error", a.rc)
    assert.matches("cannot insert deployment 'd%-inflight': not recorded: the PostgreSQL database at .- is "
      .. "unreachable %(terminating connection due to administrator command%)", a.err)
    fixtures.stop(holder)
    c:start()
    local h
    fixtures.wait_until(function()
      h = p:send("history web")
      return h.rc == "ok"
    end, 20, "the store to reconnect")
    assert.same({}, ids(h.deployments))
    local code, err = p:close()
    assert.equal(0, code, err)
  end)

  it("never shows the password: not in the location, messages or output", function()
    local secret = pg.PASSWORD
    local outputs = {}
    local function run(url, lines, env)
      local answers, code, out, err = pg.run_probe(url, lines, env)
      outputs[#outputs + 1] = out .. err
      return answers, code, out, err
    end
    -- the password in the URL: it connects, and the location leaves it out
    local answers, code, out, err = run(c:url{ password = true, params = { "application_name=pwtest" } },
      { "ensure web", "history" })
    assert_clean(code, err, out)
    assert.equal("ok", answers[2].rc, answers[2].err)
    assert.equal(string.format("postgresql://%s@127.0.0.1:%d/%s?application_name=pwtest", pg.USER, c.port, c.db),
      answers[1].location)
    -- a wrong password: refused, and said so without either password
    answers = run(c:url{ password = true, password_value = "wrong-" .. secret }, { "history" })
    assert.equal("error", answers[2].rc)
    assert.matches("password authentication failed for user \"deployer\"", answers[2].err)
    -- the password as a parameter, and in a URL libpq cannot read
    answers = run(string.format("postgresql://%s@127.0.0.1:%d/%s?password=%s", pg.USER, c.port, c.db, secret),
      { "history" })
    assert.equal("ok", answers[2].rc, answers[2].err)
    assert.is_nil(answers[1].location:find("password", 1, true))
    answers = run(string.format("postgresql://%s:%s%%zz@127.0.0.1:%d/%s", pg.USER, secret, c.port, c.db), { "history" })
    assert.equal("open", answers[1].cmd)
    assert.equal("error", answers[1].rc)
    assert.matches("invalid PostgreSQL URL", answers[1].err)
    -- PGPASSWORD and ~/.pgpass, read by libpq itself
    answers = run(c:url{ tcp = true }, { "history" }, { PGPASSWORD = secret })
    assert.equal("ok", answers[2].rc, answers[2].err)
    local home = fixtures.tmpdir("home")
    fixtures.write_file(home .. "/.pgpass", string.format("127.0.0.1:%d:%s:%s:%s\n", c.port, c.db, pg.USER, secret))
    assert(os.execute("chmod 600 " .. fixtures.shell_quote(home .. "/.pgpass")))
    answers = run(c:url{ tcp = true }, { "history" }, { HOME = home })
    assert.equal("ok", answers[2].rc, answers[2].err)
    -- and without any password: refused
    answers = run(c:url{ tcp = true, timeout = 2 }, { "history" }, { HOME = fixtures.tmpdir("nohome") })
    assert.equal("error", answers[2].rc)
    for _, o in ipairs(outputs) do
      assert.is_nil(o:find(secret, 1, true), "the password appeared in: " .. o)
    end
    local log = fixtures.read_file(c.dir .. "/server.log") or ""
    assert.is_nil(log:find(secret, 1, true), "the password appeared in the server's log")
  end)

  it("gives clear errors for bad URLs and for a server that is not PostgreSQL", function()
    local function open_err(url)
      local answers = pg.run_probe(url, { "history" })
      if answers[1].rc ~= "ok" then return answers[1].err end
      assert.equal("error", answers[2].rc)
      return answers[2].err
    end
    assert.matches("invalid lease 'soon' in PostgreSQL URL postgresql://u@h/db: give seconds, e%.g%. %?lease=15",
      open_err("postgresql://u@h/db?lease=soon"))
    assert.matches("invalid PostgreSQL URL postgresql://u@h/db%?colour=blue: invalid URI query parameter: \"colour\"",
      open_err("postgresql://u@h/db?colour=blue"))
    assert.matches("invalid PostgreSQL URL postgres://%[::1/db: .*write postgresql://user@host:port/database",
      open_err("postgres://[::1/db"))
    -- nothing listens there
    local port = fixtures.free_port()
    local err = open_err(string.format("postgresql://u@127.0.0.1:%d/db?timeout=1", port))
    assert.matches("the PostgreSQL database at postgresql://u@127%.0%.0%.1:%d+/db%?timeout=1 is unreachable %(.*"
      .. "Connection refused", err)
    -- an HTTP server where PostgreSQL was expected
    local http_port = fixtures.free_port()
    fixtures.spawn(string.format("socat TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr,fork SYSTEM:%s", http_port,
      fixtures.shell_quote("printf 'HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n'")))
    fixtures.wait_until(function()
      return os.execute(string.format("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d' 2>/dev/null", http_port)) == true
    end, 5, "the HTTP server")
    for _, mode in ipairs{ "prefer", "disable" } do
      err = open_err(string.format("postgresql://u@127.0.0.1:%d/db?sslmode=%s&timeout=2", http_port, mode))
      assert.matches("postgresql://u@127%.0%.0%.1:%d+/db%?sslmode=" .. mode .. "&timeout=2 does not answer as a "
        .. "PostgreSQL server %(.-%): check the host and port", err)
    end
    -- a host name is looked up off the loop, each of its addresses tried
    -- (localhost: ::1, where nothing listens, and 127.0.0.1)
    local answers = pg.run_probe(string.format("postgresql://%s:%s@localhost:%d/%s", pg.USER, pg.PASSWORD, c.port,
      c.db), { "history" })
    assert.equal("ok", answers[2].rc, answers[2].err)
  end)

  it("copies an SQLite store in, once, keeping ids", function()
    -- a state file as deployctl wrote it with schema 1
    local dir = fixtures.tmpdir("sqlite")
    local file = dir .. "/state.db"
    local sql = [[
PRAGMA application_id = 1146113113;
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES('application','deployctl'),('schema_version','1');
CREATE TABLE targets(name TEXT PRIMARY KEY, current_version TEXT NOT NULL DEFAULT '', previous_version TEXT NOT NULL DEFAULT '', live_deployment TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT 'deployed', health TEXT NOT NULL DEFAULT 'unhealthy', updated_at REAL NOT NULL DEFAULT 0);
CREATE TABLE deployments(seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, target TEXT NOT NULL, version TEXT NOT NULL, from_version TEXT NOT NULL DEFAULT '', kind TEXT NOT NULL DEFAULT 'deploy', strategy TEXT NOT NULL DEFAULT '', status TEXT NOT NULL, created_at REAL NOT NULL DEFAULT 0, finished_at REAL NOT NULL DEFAULT 0, duration REAL NOT NULL DEFAULT 0, errors TEXT, metadata TEXT, owner_pid INTEGER NOT NULL DEFAULT 0, owner_start INTEGER NOT NULL DEFAULT 0, owner_host TEXT NOT NULL DEFAULT '', user TEXT NOT NULL DEFAULT '');
CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, deployment_id TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL, data TEXT);
CREATE TABLE locks(target TEXT PRIMARY KEY, deployment_id TEXT NOT NULL, pid INTEGER NOT NULL, pid_start INTEGER NOT NULL, host TEXT NOT NULL, acquired_at REAL NOT NULL);
CREATE TABLE instances(id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, deployment_id TEXT NOT NULL, version TEXT NOT NULL, idx INTEGER NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, pid INTEGER NOT NULL DEFAULT 0, pid_start INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, weight INTEGER NOT NULL DEFAULT 0, server TEXT NOT NULL DEFAULT '', log_path TEXT NOT NULL DEFAULT '', started_at REAL NOT NULL DEFAULT 0);
CREATE TABLE controls(target TEXT PRIMARY KEY, command TEXT NOT NULL, requested_at REAL NOT NULL, requested_by TEXT NOT NULL DEFAULT '');
INSERT INTO targets VALUES('web','2.0','1.0','d7','running','healthy',1700000000.5);
INSERT INTO deployments VALUES(5,'d5','web','1.0','','deploy','rolling','succeeded',1700000000.25,1700000010.5,10.25,NULL,'{"ticket":"T-1"}',100,200,'ci-1','ci@ci-1');
INSERT INTO deployments VALUES(7,'d7','web','2.0','1.0','deploy','canary','succeeded',1700000100,1700000110,10,'[]',NULL,101,201,'ci-1','ci@ci-1');
INSERT INTO deployments VALUES(9,'d9','web','3.0','2.0','deploy','canary','running',1700000200,0,0,NULL,NULL,102,202,'ci-1','ci@ci-1');
INSERT INTO events VALUES(3,'d5','web',1700000001,'started','{"a":1}'),(4,'d7','web',1700000101,'started',NULL);
INSERT INTO locks VALUES('web','d9',102,202,'ci-1',1700000200);
INSERT INTO instances VALUES(11,'web','d7','2.0',0,'127.0.0.1',8001,4242,77,'running',256,'dc_11','/tmp/x.log',1700000105);
INSERT INTO controls VALUES('web','abort',1700000300,'ops');
]]
    fixtures.write_file(dir .. "/make.sql", sql)
    assert(os.execute("sqlite3 " .. fixtures.shell_quote(file) .. " < " .. fixtures.shell_quote(dir .. "/make.sql")))
    local url = c:url{}
    local answers, code, out, err = pg.run_probe(url, { "import " .. file, "history web", "instances web",
      "events d5", "target web", "recover", "ensure api", "begin api d10", "iadd api d10 0", "history" })
    assert_clean(code, err, out)
    local imp = answers[2]
    assert.equal("ok", imp.rc, imp.err)
    assert.same({ targets = 1, deployments = 3, events = 2, locks = 1, instances = 1, controls = 0 }, imp.counts)
    assert.same({ "d9", "d7", "d5" }, ids(answers[3].deployments))
    local d5 = answers[3].deployments[3]
    assert.same({ 5, 1700000000.25, 10.25, "{\"ticket\":\"T-1\"}", "ci@ci-1" },
      { d5.seq, d5.created_at, d5.duration, d5.metadata, d5.user })
    assert.same({ 11, 8001, "dc_11", "" }, { answers[4].instances[1].id, answers[4].instances[1].port,
      answers[4].instances[1].server, answers[4].instances[1].node })
    assert.equal(3, answers[5].events[1].id)
    assert.equal("d7", answers[6].target.live_deployment)
    -- the lock came without a lease (a one-machine store): recovery interrupts d9
    assert.same({ "d9" }, ids(answers[7].deployments))
    -- new rows continue after the copied ids
    assert.equal(10, answers[11].deployments[1].seq)
    assert.equal(12, answers[10].id)
    -- copying again into a store that has rows: refused, nothing changed
    answers = pg.run_probe(url, { "import " .. file })
    assert.equal("error", answers[2].rc)
    assert.matches("already holds 2 targets and 4 deployments: copy only into an empty store", answers[2].err)
    assert.equal("4", c:sql("SELECT count(*) FROM deployments"))
  end)

  it("copies a store deployctl wrote with SQLite (schema 3) and deployctl goes on from it", function()
    local cli = require "spec.support.cli"
    local target = fixtures.target_config{ instances = 2 }
    local dir = fixtures.tmpdir("tosql")
    local file = dir .. "/state.db"
    local config = cli.write_config(dir, fixtures.config{ state = file, targets = { production = target } })
    for _, v in ipairs{ "v1", "v2" } do
      local code, out, err = cli.run({ "--config", config, "deploy", "production", v })
      assert.equal(0, code, out .. err)
    end
    local _, sqlite_history = cli.run({ "--config", config, "history", "production" })
    local answers, code, out, err = pg.run_probe(c:url{}, { "copyfile " .. file, "history production" })
    assert_clean(code, err, out)
    assert.equal("ok", answers[2].rc, answers[2].err)
    assert.same({ targets = 1, deployments = 2, locks = 0, controls = 0 },
      { targets = answers[2].counts.targets, deployments = answers[2].counts.deployments,
        locks = answers[2].counts.locks, controls = answers[2].counts.controls })
    assert.is_true(answers[2].counts.events > 10)
    assert.equal(2, answers[2].counts.instances)
    assert.equal("2", c:sql("SELECT count(*) FROM instances WHERE handle <> ''"))
    -- the same history, read by deployctl from PostgreSQL, and it deploys on
    local pconfig = cli.write_config(fixtures.tmpdir("topg"), fixtures.config{ state = c:url{},
      targets = { production = target } })
    local _, pg_history = cli.run({ "--config", pconfig, "history", "production" })
    assert.equal(sqlite_history, pg_history)
    local code3, out3, err3 = cli.run({ "--config", pconfig, "deploy", "production", "v3" })
    assert.equal(0, code3, out3 .. err3)
    assert.equal("v3|v2", c:sql("SELECT current_version || '|' || previous_version FROM targets"))
  end)

  it("serves deployctl itself: runners share history and status, and the password stays out of sight", function()
    local cli = require "spec.support.cli"
    local target, tdir = fixtures.target_config{ instances = 1 }
    local dir = fixtures.tmpdir("runner")
    local config = cli.write_config(dir, fixtures.config{ state = c:url{ password = true }, targets = {
      production = target } })
    local outputs = {}
    local function run(...)
      local code, out, err = cli.run({ "--config", config, ... })
      outputs[#outputs + 1] = out .. err
      return code, out, err
    end
    local code, out, err = run("deploy", "production", "v1")
    assert.equal(0, code, out .. err)
    -- another runner (another process, as on another machine) deploys next
    code, out, err = run("deploy", "production", "v2")
    assert.equal(0, code, out .. err)
    code, out = run("history", "production")
    assert.equal(0, code, out)
    assert.matches("v2.-succeeded.-\n.-v1.-succeeded", out)
    code, out = run("status", "production")
    assert.matches("production%s+v2%s+deployed", out)
    assert.equal("d%", c:sql("SELECT left(live_deployment, 1) || '%' FROM targets WHERE name = 'production'"))
    for _, o in ipairs(outputs) do
      assert.is_nil(o:find(pg.PASSWORD, 1, true), "the password appeared in: " .. o)
    end
    for _, pid in ipairs(fixtures.pids_matching(tdir)) do
      for _, f in ipairs{ "environ", "cmdline" } do
        local text = fixtures.read_file("/proc/" .. pid .. "/" .. f) or ""
        assert.is_nil(text:find(pg.PASSWORD, 1, true), "the password appeared in /proc/" .. pid .. "/" .. f)
      end
    end
  end)
end)
