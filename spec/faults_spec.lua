-- A fault sweep: the parts deployctl leans on misbehave mid-rollout, and
-- every time the rollout ends with a clear error and the target stays
-- consistent: integrity_check holds, and what HAProxy serves is what the
-- store says (at once, or after `reconcile` once the part answers again).
--   HAProxy's stats socket: no answer, garbage, an answer cut short, a
--     connection reset, a refused connection (spec/support/sockfault.c
--     sits between the router and a real HAProxy);
--   the store: locked by another writer beyond its busy timeout, on a disk
--     that turns read-only, on a disk that fills up (a small tmpfs);
--   the git remote: the connection reset in the middle of a fetch.
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

-- HAProxy serves exactly the live version's instances, each at a weight,
-- and no server of another version is left in the backend.
local function router_matches_store(m, h)
  local live = {}
  for _, i in ipairs(m:live_instances("production")) do
    if i.live then live[i.server] = i end
  end
  local seen = 0
  for _, s in ipairs(h:servers()) do
    if s.name:match("^dc_") then
      local i = live[s.name]
      assert.is_truthy(i, "HAProxy has " .. s.name .. ", which the store does not route to")
      assert.equal(i.port, s.port)
      assert.is_true(s.weight > 0, s.name .. " has weight 0")
      assert.equal(0, s.admin_state, s.name .. " is not ready")
      seen = seen + 1
    end
  end
  local n = 0
  for _ in pairs(live) do n = n + 1 end
  assert.equal(n, seen, "HAProxy lacks live servers")
  assert.is_true(m:integrity_check())
end

describe("faults on HAProxy's stats socket", function()
  after_each(fixtures.cleanup)

  local function setup()
    local h = fixtures.haproxy{}
    local dir = fixtures.tmpdir("faults")
    local sock, mode = dir .. "/fault.sock", dir .. "/mode"
    local proxy = fixtures.spawn(string.format("exec %s %s %s %s", q(fixtures.build_dir() .. "/sockfault"), q(sock),
                                               q(h.socket), q(mode)), dir .. "/sockfault.out")
    fixtures.wait_until(function() return (fixtures.read_file(dir .. "/sockfault.out") or ""):find("listening") end,
      10, "sockfault to listen")
    local target, tdir = fixtures.target_config{ instances = 1, haproxy = h }
    target.router.socket = sock
    target.router.timeout = 0.5
    target.router.drain_timeout = 0.2
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    local env = { h = h, dir = dir, config = config, tdir = tdir, proxy = proxy }
    function env.fault(m) fixtures.write_file(mode, m .. "\n") end
    function env.faulted() return fixtures.read_file(mode .. ".log") or "" end
    return env
  end

  -- A canary whose second traffic step meets the fault (it is switched on
  -- by the pipeline at the first step, from the event handler).
  local PIPELINE = [[
local deploy = require "deploy"
local config, modefile, fault = arg[1], arg[2], arg[3]
local m = deploy.DeploymentManager{ config = config, on_event = function(ev)
  if ev.kind == "traffic" and ev.data and ev.data.pct == 50 then
    local f = assert(io.open(modefile, "w")) f:write(fault, "\n") f:close()
  end
end }
local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{
  initial_percentage = 50, increment = 50, interval = 0.05 } })
for _, e in ipairs(r.errors or {}) do io.stderr:write(e, "\n") end
return r.success and 0 or 1
]]

  local expected = {
    hang = "got no answer from .- within 0%.5 s",
    garbage = "answered: \\x01\\xff\\xfe<html>502 Bad Gateway</html>\\n# not a stats answer",
    partial = "the answer was cut short after %d+ bytes",
    reset = "the connection closed without an answer",
    refuse = "failed on .-: connection reset by peer",
  }

  for _, fault in ipairs{ "hang", "garbage", "partial", "reset", "refuse" } do
    it(fault .. ": the rollout ends with an error naming the socket, and the target is one version again", function()
      local env = setup()
      fixtures.write_file(env.dir .. "/pipeline.lua", PIPELINE)
      local t0 = fixtures.now()
      local p = cli.spawn({ "run", env.dir .. "/pipeline.lua", env.config, env.dir .. "/mode", fault })
      local code, out, err = p:wait(60)
      assert.equal(1, code, out .. err)
      assert.is_true(fixtures.now() - t0 < 30, "the rollout took " .. (fixtures.now() - t0) .. " s")
      assert.matches(env.dir:gsub("%p", "%%%0") .. "/fault%.sock", err)
      assert.matches(expected[fault], err)
      assert.matches("run 'deployctl reconcile production' once it answers", err)
      assert.matches(fault, env.faulted())
      local m = deploy.DeploymentManager{ config = env.config }
      assert.equal("failed", m:history("production", 1)[1].status)
      assert.equal("v1", m:get_status("production").current_version)
      assert.is_true(m:integrity_check())
      -- HAProxy answers again: reconcile puts it where the store says
      env.fault("pass")
      local rc, rout, rerr = cli.run({ "--config", env.config, "reconcile", "production" })
      assert.equal(0, rc, rout .. rerr)
      router_matches_store(m, env.h)
      assert.same({ v1 = 20 }, (env.h:sample(20)))
      assert.same({}, fixtures.instances_of(env.tdir, "v2"))
    end)
  end
end)

describe("HAProxy counters a real HAProxy does not give", function()
  after_each(fixtures.cleanup)

  -- Found by fuzz/haproxy.c (fuzz/corpus/haproxy/scur-overflow): the drain
  -- step adds up the old servers' current sessions from `show stat`, and
  -- two counts of 2^63-1 wrapped into a negative sum, which the router took
  -- for an answer it could not read. The sum saturates now: the servers
  -- count as busy, the drain waits out drain_timeout, and they are deleted.
  it("a sum of sessions past 2^63 counts as busy, not as an unreadable answer", function()
    local h = fixtures.haproxy{}
    local dir = fixtures.tmpdir("scur")
    local sock, mode = dir .. "/fault.sock", dir .. "/mode"
    fixtures.spawn(string.format("exec %s %s %s %s", q(fixtures.build_dir() .. "/sockfault"), q(sock),
                                 q(h.socket), q(mode)), dir .. "/sockfault.out")
    fixtures.wait_until(function() return (fixtures.read_file(dir .. "/sockfault.out") or ""):find("listening") end,
      10, "sockfault to listen")
    local target, tdir = fixtures.target_config{ instances = 1, haproxy = h }
    target.router.socket = sock
    target.router.drain_timeout = 0.2
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    -- HAProxy's own answer, each of our rows twice with scur = 2^63-1
    local real = h:cmd("show stat " .. h.backend .. " 4 -1")
    local rows = {}
    for line in real:gmatch("[^\n]+") do
      if line:match("^#") then
        rows[#rows + 1] = line
      elseif line:match("^" .. h.backend .. ",") then
        local f = {}
        for field in (line .. ","):gmatch("([^,]*),") do f[#f + 1] = field end
        f[5] = "9223372036854775807"
        local big = table.concat(f, ",")
        rows[#rows + 1] = big
        rows[#rows + 1] = big
      end
    end
    assert.is_true(#rows >= 3, real)
    fixtures.write_file(mode .. ".answer", table.concat(rows, "\n") .. "\n\n")
    fixtures.write_file(mode, "stat\n")
    fixtures.write_file(dir .. "/bg.lua", [[
local deploy = require "deploy"
local m = deploy.DeploymentManager{ config = arg[1] }
local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{ initial_percentage = 100, interval = 0.05 } })
for _, e in ipairs(r.errors or {}) do io.stderr:write(e, "\n") end
return r.success and 0 or 1
]])
    local code, out, err = cli.spawn({ "run", dir .. "/bg.lua", config }):wait(60)
    assert.equal(0, code, out .. err)
    assert.matches("stat show stat " .. h.backend, fixtures.read_file(mode .. ".log") or "")
    local m = deploy.DeploymentManager{ config = config }
    assert.equal("v2", m:get_status("production").current_version)
    assert.same({}, fixtures.instances_of(tdir, "v1"))
    fixtures.write_file(mode, "pass\n")
    router_matches_store(m, h)
  end)
end)

-- sockfault between a client and a TCP server; returns the proxy's address
-- and a function that sets the mode.
local function tcp_fault(dir, upstream_port)
  local port = fixtures.free_port()
  local mode = dir .. "/tcpmode"
  fixtures.write_file(mode, "pass\n")
  fixtures.spawn(string.format("exec %s tcp:127.0.0.1:%d tcp:127.0.0.1:%d %s", q(fixtures.build_dir() .. "/sockfault"),
                               port, upstream_port, q(mode)), dir .. "/tcpfault.out")
  fixtures.wait_until(function() return (fixtures.read_file(dir .. "/tcpfault.out") or ""):find("listening") end,
    10, "sockfault to listen")
  return port, function(m) fixtures.write_file(mode, m .. "\n") end
end

describe("a git remote that drops the connection mid-fetch", function()
  local git = require "spec.support.git"
  after_each(fixtures.cleanup)

  it("fails the sync with a clear error, applies nothing, and the next fetch completes", function()
    local repo = git.repo()
    local daemon = git.daemon(repo.base)
    local dir = fixtures.tmpdir("gitfault")
    local port, set_mode = tcp_fault(dir, daemon.port)
    local m = deploy.DeploymentManager{ config = fixtures.config{
      targets = { staging = fixtures.target_config{ instances = 1 } } } }
    -- a pack of some size: the cut falls inside it
    local noise = {}
    for i = 1, 4000 do noise[i] = string.format("%08x %d\n", (i * 2654435761) % 4294967296, i) end
    repo:write("assets/noise.txt", table.concat(noise))
    repo:manifest("staging.json", { target = "staging", version = "1.0.0" })
    local rev = repo:commit("first")
    local s = deploy.GitOpsSynchronizer{ repo_url = string.format("git://127.0.0.1:%d/%s.git", port, repo.name),
                                         manager = m }
    set_mode("cut:3000")
    local r = s:sync()
    assert.is_false(r.success)
    assert.same({}, r.applied)
    assert.matches("cannot fetch from git://127%.0%.0%.1:" .. port .. "/deploy%.git %(branch main%): .-reset by peer",
      r.errors[1])
    assert.same({}, m:history("staging"))
    set_mode("pass")
    r = s:sync()
    assert.is_true(r.success, r.errors and r.errors[1])
    assert.equal(rev, r.revision)
    assert.equal("1.0.0", m:get_status("staging").current_version)
    -- what the cut fetch left behind did not damage the cache
    local out = git.sh("git -C " .. q(s.cache) .. " fsck --no-dangling 2>&1; echo rc=$?")
    assert.matches("rc=0", out)
  end)
end)

-- The store's disk misbehaves mid-rollout. Each needs root (mounts, a loop
-- device) and marks itself pending without it.
describe("a store that fails mid-rollout", function()
  local is_root = (io.popen("id -u"):read("l")) == "0"
  local mounts = {}
  -- the processes first (their logs are on the mounts), then the mounts,
  -- then the directories
  after_each(function()
    fixtures.cleanup{ keep = mounts }
    for i = #mounts, 1, -1 do
      os.execute("umount -l " .. q(mounts[i].mnt) .. " 2>/dev/null")
      if mounts[i].loop then os.execute("losetup -d " .. mounts[i].loop .. " 2>/dev/null") end
      mounts[i] = nil
    end
    fixtures.cleanup()
  end)

  -- A canary whose state file lives in `dir`; the fault is switched on
  -- from the event handler once traffic is at 50 %, by running `inject`.
  local PIPELINE = [[
local deploy = require "deploy"
local config, inject = arg[1], arg[2]
local m = deploy.DeploymentManager{ config = config, on_event = function(ev)
  if ev.kind == "traffic" and ev.data and ev.data.pct == 50 then assert(os.execute(inject)) end
end }
local r = m:deploy("production", "v2", { strategy = deploy.CanaryStrategy{
  initial_percentage = 50, increment = 50, interval = 0.3 } })
for _, e in ipairs(r.errors or {}) do io.stderr:write(e, "\n") end
return r.success and 0 or 1
]]

  -- state: the store's path (its directory also holds the instance logs).
  local function setup(state)
    local h = fixtures.haproxy{}
    local dir = fixtures.tmpdir("storefault")
    local target, tdir = fixtures.target_config{ instances = 1, haproxy = h }
    local config = cli.write_config(dir, fixtures.config{ state = state,
                                                          targets = { production = target } })
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "v1" })))
    fixtures.write_file(dir .. "/pipeline.lua", PIPELINE)
    return { h = h, dir = dir, tdir = tdir, config = config }
  end

  -- Runs the canary with the fault; then `repair` and check that the next
  -- deployctl finds the target on v1 alone, and the store whole.
  local function sweep(env, inject, repair, expected)
    local code, out, err = cli.run({ "run", env.dir .. "/pipeline.lua", env.config, inject })
    assert.equal(1, code, out .. err)
    assert.matches(expected, err)
    -- no traffic went on without being recorded: v1 serves alone
    assert.same({ v1 = 20 }, (env.h:sample(20)))
    repair()
    local rc, rout, rerr = cli.run({ "--config", env.config, "status", "production" })
    assert.equal(0, rc, rout .. rerr)
    local m = deploy.DeploymentManager{ config = env.config }
    local d = m:history("production", 1)[1]
    assert.equal("v2", d.version)
    assert.is_true(d.status == "failed" or d.status == "interrupted", d.status)
    assert.equal("v1", m:get_status("production").current_version)
    assert.is_true(m:integrity_check())
    assert.same({}, fixtures.instances_of(env.tdir, "v2"))
    router_matches_store(m, env.h)
  end

  it("locked by another writer beyond the busy timeout: the step is not taken, the rollout aborts", function()
    local env = setup(fixtures.tmpdir("busystate") .. "/state.db")
    local state = env.config:match("^(.*)/[^/]+$") and nil
    local m = deploy.DeploymentManager{ config = env.config }
    local path = m:state_path()
    m:close()
    -- sqlite3 holds the write lock for 22 s; the handler returns once it
    -- holds it. The store waits 10 s for a batch: the events of the 50 %
    -- step fail first, then the 100 % step, which is therefore not taken.
    local held = env.dir .. "/held"
    local hold = string.format("(echo 'BEGIN IMMEDIATE;'; echo \"UPDATE meta SET value = value WHERE key = 'schema_version';\";"
      .. " echo '.shell touch %s'; sleep 22; echo 'COMMIT;') | sqlite3 %s >/dev/null 2>&1 &"
      .. " while [ ! -e %s ]; do sleep 0.02; done", held, q(path), q(held))
    sweep(env, hold, function()
      fixtures.wait_until(function() return #fixtures.pids_matching("sqlite3 " .. path) == 0 end, 30, "the holder")
    end, "the step could not be recorded: deploy: store .-/state%.db: .-database is locked: another process has held")
    assert.is_nil(state)
  end)

  it("on a disk that turns read-only: the step is not taken, and the next run recovers", function()
    if not is_root then pending("needs root for a loop device") return end
    local base = fixtures.tmpdir("rofs")
    local img, mnt = base .. "/disk.img", base .. "/mnt"
    assert(os.execute("truncate -s 16M " .. q(img) .. " && mkfs.ext4 -q -F " .. q(img) .. " && mkdir " .. q(mnt)))
    local p = io.popen("losetup -f --show " .. q(img) .. " 2>&1")
    local dev = p:read("l")
    p:close()
    if not (dev and dev:match("^/dev/loop%d+$")) then pending("no loop device: " .. tostring(dev)) return end
    mounts[#mounts + 1] = { dir = base, mnt = mnt, loop = dev }
    assert(os.execute("blockdev --setrw " .. dev .. " && mount -o errors=remount-ro " .. dev .. " " .. q(mnt)))
    local sysfs = "/sys/fs/ext4/" .. dev:match("[^/]+$") .. "/trigger_fs_error"
    if not fixtures.read_file(sysfs) and not io.open(sysfs, "w") then pending("no " .. sysfs) return end
    -- the store on that disk (SQLite follows the link: its journal is there
    -- too); the instances' logs beside the link, so the disk can be taken
    -- down for repair while the old version runs
    local state = fixtures.tmpdir("rostate") .. "/state.db"
    assert(os.execute("ln -s " .. q(mnt .. "/state.db") .. " " .. q(state)))
    local env = setup(state)
    sweep(env, "echo deployctl-fault-sweep > " .. sysfs, function()
      -- the disk is repaired: checked and mounted read-write again
      assert(os.execute("umount " .. q(mnt) .. " && e2fsck -fy " .. dev .. " >/dev/null 2>&1; mount " .. dev .. " "
        .. q(mnt)))
    end, "the step could not be recorded: deploy: store .-/state%.db: .-: the disk is read%-only")
  end)

  it("on a disk that fills up: the step is not taken, and the next run recovers once there is room", function()
    if not is_root then pending("needs root to mount a tmpfs") return end
    local mnt = fixtures.tmpdir("fullfs")
    if not os.execute("mount -t tmpfs -o size=4m tmpfs " .. q(mnt)) then pending("cannot mount a tmpfs") return end
    mounts[#mounts + 1] = { dir = mnt, mnt = mnt }
    local env = setup(mnt .. "/state.db")
    sweep(env, "dd if=/dev/zero of=" .. q(mnt .. "/fill") .. " bs=64k >/dev/null 2>&1; true", function()
      os.remove(mnt .. "/fill")
    end, "the step could not be recorded: deploy: store .-/state%.db: .-the disk is full: free space on it")
  end)
end)
