-- Remote hosts over SSH: the command runner (runtime/ssh.c) and the remote
-- agent (runtime/ssh_agent.sh), against real sshd processes, each in its
-- own network namespace (spec/support/hosts.lua), driven through
-- build/ssh_probe run in the control namespace.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local hosts = require "spec.support.hosts"

local q = fixtures.shell_quote

local function capture(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok == true
end

local function probe_bin()
  local path = fixtures.build_dir() .. "/ssh_probe"
  if path:sub(1, 1) ~= "/" then path = fixtures.root() .. "/" .. path end
  return path
end

-- cjson reads every number as a float: pids and ports become integers.
local function integers(v)
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = integers(x) end
  elseif math.type(v) == "float" and math.tointeger(v) then
    return math.tointeger(v)
  end
  return v
end

local function decode(out, ok, what)
  assert(ok, (what or "ssh_probe") .. " failed: " .. out)
  local decoded, v = pcall(cjson.decode, out)
  assert(decoded, "ssh_probe printed no JSON: " .. out)
  return integers(v)
end

local function null(v) return v == nil or v == cjson.null end

-- The answers to the parser tests need no hosts.
describe("the ssh agent's answers", function()
  local function parse(verb, exit, text)
    return decode(capture(string.format("printf '%%s' %s | %s parse %s %d",
                                        q(text), q(probe_bin()), verb, exit)))
  end
  local line = "DEPLOYCTL-AGENT/1 start port=20001 pid=4242 starttime=99 "
               .. "boot=0b7c6f4e-1234-4abc-9def-0123456789ab log=/var/log/app.log\n"

  it("are read when they are exactly the protocol's line", function()
    assert.is_true(parse("start", 0, line).ok)
    assert.is_true(parse("inspect", 0, "DEPLOYCTL-AGENT/1 inspect state=dead pid=0 starttime=0 found=none "
                                       .. "boot=0b7c6f4e-1234-4abc-9def-0123456789ab\n").ok)
    assert.is_true(parse("stop", 0, "DEPLOYCTL-AGENT/1 stop result=killed pid=4242\n").ok)
  end)

  it("are refused with the host named when anything else comes back", function()
    local bad = {
      "Welcome to host!\n" .. line,                         -- a chatty login script
      line .. "extra\n",                                    -- a second line
      line:gsub("\n$", ""),                                 -- no newline
      line:gsub("port=20001", "port=70000"),                -- out of range
      line:gsub("pid=4242", "pid=1"),                       -- never an instance
      line:gsub("pid=4242", "pid=042"),                     -- leading zero
      line:gsub("starttime=99 ", "starttime=99  "),         -- two spaces
      line:gsub("boot=0b7c6f4e", "boot=0B7C6F4E"),          -- not the kernel's form
      line:gsub("log=/var", "log=var"),                     -- relative path
      line:gsub("AGENT/1", "AGENT/2"),                      -- another protocol
      line:gsub(" port=20001 pid=4242", " pid=4242 port=20001"),  -- fields reordered
    }
    for _, text in ipairs(bad) do
      local r = parse("start", 0, text)
      assert.is_false(r.ok, text)
      assert.matches("agent on 'test%-host': unexpected answer to start", r.error, 1, false)
    end
    local alive_without_pid = "DEPLOYCTL-AGENT/1 inspect state=alive pid=0 starttime=0 found=tag "
                              .. "boot=0b7c6f4e-1234-4abc-9def-0123456789ab\n"
    assert.is_false(parse("inspect", 0, alive_without_pid).ok)
  end)

  it("read several inspect lines in order, and a hello with an IPv4 or IPv6 address", function()
    local boot = "boot=0b7c6f4e-1234-4abc-9def-0123456789ab"
    local alive = "DEPLOYCTL-AGENT/1 inspect state=alive pid=4242 starttime=99 found=pid " .. boot .. "\n"
    local dead = "DEPLOYCTL-AGENT/1 inspect state=dead pid=0 starttime=0 found=none " .. boot .. "\n"
    assert.is_true(parse("inspect-2", 0, alive .. dead).ok)
    assert.is_false(parse("inspect-2", 0, alive).ok)               -- one line short
    assert.is_false(parse("inspect-2", 0, alive .. dead .. dead).ok) -- one too many
    assert.is_false(parse("inspect-2", 0, alive .. "noise\n").ok)
    -- a host's stops in one command: one line per instance, in order
    local stopped = "DEPLOYCTL-AGENT/1 stop result=stopped pid=4242\n"
    local gone = "DEPLOYCTL-AGENT/1 stop result=gone pid=4243\n"
    assert.is_true(parse("stop-2", 0, stopped .. gone).ok)
    assert.is_false(parse("stop-2", 0, stopped).ok)                  -- one line short
    assert.is_false(parse("stop-2", 0, stopped .. gone .. gone).ok)  -- one too many
    assert.is_false(parse("stop-2", 0, stopped .. "DEPLOYCTL-AGENT/1 stop result=paused pid=4243\n").ok)
    local r2 = parse("stop-2", 3, "DEPLOYCTL-AGENT/1 error stuck process group 4243 is still there 5 s after SIGKILL\n")
    assert.is_false(r2.ok)
    assert.matches("stuck", r2.error, 1, true)
    assert.is_true(parse("hello", 0, "DEPLOYCTL-AGENT/1 hello addr=10.0.0.5 " .. boot .. "\n").ok)
    assert.is_true(parse("hello", 0, "DEPLOYCTL-AGENT/1 hello addr=fd42:d55::11 " .. boot .. "\n").ok)
    local r = parse("hello", 0, "DEPLOYCTL-AGENT/1 hello addr=app1.example.com " .. boot .. "\n")
    assert.is_false(r.ok)
    assert.matches("unexpected answer to hello", r.error, 1, true)
  end)

  it("pass on the agent's own error with its code, and name a failed shell", function()
    local r = parse("start", 3, "DEPLOYCTL-AGENT/1 error no-free-port no free port in 20000-20001 on this host\n")
    assert.is_false(r.ok)
    assert.equal("agent on 'test-host': start failed: no free port in 20000-20001 on this host (no-free-port)", r.error)
    r = parse("logs", 127, "")
    assert.matches("logs exited with status 127", r.error, 1, true)
  end)
end)

local available, why = hosts.available()

describe("ssh to hosts in network namespaces", function()
  if not available then
    it("needs network namespaces", function() pending("ssh specs skipped: " .. why) end)
    return
  end

  local net
  setup(function() net = hosts.create{ count = 3 } end)
  teardown(function()
    if net then net:destroy() end
    fixtures.cleanup()
  end)

  -- Runs ssh_probe in the control namespace with the fixture's key, config
  -- and known_hosts (opts.ctx overrides: a string of options); env: shell
  -- assignments put before the command.
  local function probe(args, opts)
    opts = opts or {}
    local ctx = opts.ctx or string.format("--config %s --known-hosts %s --key %s",
                                          q(net.ssh_config), q(net.known_hosts), q(net.client_key))
    local cmd = (opts.env or "") .. " " .. net:wrap(q(probe_bin()) .. " " .. ctx .. " " .. args)
    return decode(capture(cmd .. " 2>&1"))
  end

  local function run(pairs, opts)
    opts = opts or {}
    local args = { "run" }
    if opts.timeout then args[#args + 1] = "--timeout " .. opts.timeout end
    if opts.rounds then args[#args + 1] = "--rounds " .. opts.rounds end
    if opts.timeouts then args[#args + 1] = "--timeouts " .. opts.timeouts end
    if opts.stdin then args[#args + 1] = "--stdin " .. q(opts.stdin) end
    for _, p in ipairs(pairs) do
      args[#args + 1] = q(p[1])
      args[#args + 1] = q(p[2])
    end
    return probe(table.concat(args, " "), opts)
  end

  describe("the command runner", function()
    it("runs commands on 3 hosts at once, with one handshake per host for many commands", function()
      local dests = { "h1", net.hosts[2].dest, "root@[" .. net.hosts[3].addr6 .. "]:22" }
      local pairs = {}
      for i, d in ipairs(dests) do pairs[i] = { d, "hostname -I" } end
      local r = run(pairs, { rounds = 4 })
      assert.equal(12, #r.results)
      for _, res in ipairs(r.results) do
        local i = res.dest == "h1" and 1 or res.dest == dests[2] and 2 or 3
        assert.equal("ok", res.status, res.error)
        assert.equal(0, res.exit)
        assert.equal(1, res.callbacks)
        assert.matches(net.hosts[i].addr, res.out, 1, true)
      end
      for _, d in ipairs(dests) do assert.equal(1, r.connections[d], d) end
      -- ssh_ctx_free asked the masters to exit (they would persist 600 s).
      fixtures.wait_until(function()
        for pid in net:exec("ip netns pids " .. q(net.ctl)):gmatch("%d+") do
          if fixtures.alive(tonumber(pid)) then return false end
        end
        return true
      end, 5, "the ssh masters to exit")
    end)

    it("opens a new connection when the master has gone, and removes its directory", function()
      local cdir = "/tmp/dssh-ctl-" .. fixtures.free_port()
      finally(function() os.execute("rm -rf " .. q(cdir)) end)
      -- The first destination's socket is <dir>/1; the master is SIGKILLed
      -- between the rounds, leaving a stale socket behind.
      -- Then it polls (5 s at most) until the master no longer answers:
      -- SIGKILL is not instant.
      local check = string.format("ssh -F /dev/null -o ControlPath=%s/1 -O check h1", cdir)
      local kill = string.format("kill -9 $(%s 2>&1 | sed -n 's/.*pid=\\([0-9]*\\).*/\\1/p'); "
                                 .. "for i in $(seq 250); do %s 2>/dev/null || break; sleep 0.02; done",
                                 check, check)
      local r = probe(string.format("run --rounds 2 --between %s h1 'echo alive'", q(kill)),
                      { ctx = string.format("--config %s --known-hosts %s --key %s --control-dir %s",
                                            q(net.ssh_config), q(net.known_hosts), q(net.client_key), q(cdir)) })
      for _, res in ipairs(r.results) do
        assert.equal("ok", res.status, res.error)
        assert.equal("alive\n", res.out)
      end
      assert.equal(2, r.connections.h1)
      assert.is_false(os.execute("test -e " .. q(cdir)) == true)
      -- A control directory others can read is refused: its sockets give access to the hosts.
      assert(os.execute("mkdir -m 0755 " .. q(cdir)))
      r = probe("run h1 true", { ctx = "--control-dir " .. q(cdir) })
      assert.matches("must be ours and private", r.ctx_error, 1, true)
    end)

    it("refuses output beyond its cap instead of truncating it", function()
      local r = run({ { "h1", "head -c 5000000 /dev/zero" }, { "h1", "head -c 4000000 /dev/zero | wc -c" } })
      assert.equal("too-big", r.results[1].status)
      assert.matches("passed 4194304 bytes", r.results[1].error, 1, true)
      assert.equal("ok", r.results[2].status)
      assert.equal("4000000\n", r.results[2].out)
    end)

    it("passes stdin, and keeps the command's exit status, stdout and stderr apart", function()
      local r = run({ { "h1", "cat; echo to-stderr >&2; exit 7" } }, { stdin = "line one\nline two\n" })
      local res = r.results[1]
      assert.equal("ok", res.status)
      assert.equal(7, res.exit)
      assert.equal("line one\nline two\n", res.out)
      assert.equal("to-stderr\n", res.err_text)
      assert.is_true(null(res.error))
    end)

    it("queues commands beyond sshd's MaxSessions instead of having them refused", function()
      local pairs = {}
      for i = 1, 24 do pairs[i] = { "h2", "sleep 0.3; echo done-" .. i } end
      local r = run(pairs, { timeout = 120 })
      for i, res in ipairs(r.results) do
        assert.equal("ok", res.status, res.error)
        assert.equal("done-" .. i .. "\n", res.out)
      end
      assert.equal(1, r.connections.h2)
    end)

    it("refuses a destination that could inject ssh options, before spawning anything", function()
      local marker = fixtures.tmpdir("inject") .. "/pwned"
      local bad = { "-oProxyCommand=touch " .. marker, "h1 -oProxyCommand=x", "root@h1\n",
                    "-p", "root@-oFoo", "h1:99999", "[h1]:22", "" }
      local pairs = {}
      for i, d in ipairs(bad) do pairs[i] = { d, "true" } end
      local r = run(pairs)
      assert.equal(#bad, r.rejected)
      for _, res in ipairs(r.results) do
        assert.equal(0, res.callbacks)
        assert.matches("^ssh: .*destination", res.error)
      end
      for _, d in ipairs(bad) do assert.equal(0, r.connections[d] or 0) end
      assert.is_nil(fixtures.read_file(marker))
    end)

    it("refuses a changed host key with an error that names the host, even with accept_new", function()
      net:change_host_key(2)
      finally(function() net:restore_host_key(2) end)
      for _, extra in ipairs({ "", "--accept-new" }) do
        local ctx = string.format("--config %s --known-hosts %s --key %s %s", q(net.ssh_config),
                                  q(net.known_hosts), q(net.client_key), extra)
        local r = run({ { net.hosts[2].dest, "echo should-not-run" } }, { ctx = ctx })
        local res = r.results[1]
        assert.equal("hostkey-changed", res.status)
        assert.equal("", res.out)
        assert.matches("the host key of '" .. net.hosts[2].dest .. "' has CHANGED", res.error, 1, true)
        assert.matches("refusing to connect", res.error, 1, true)
      end
    end)

    it("refuses a host whose key is unknown, unless accept_new allows first contact", function()
      local dir = fixtures.tmpdir("kh")
      fixtures.write_file(dir .. "/known_hosts", "")
      local ctx = string.format("--config %s --known-hosts %s --key %s", q(net.ssh_config),
                                q(dir .. "/known_hosts"), q(net.client_key))
      local r = run({ { "h3", "echo should-not-run" } }, { ctx = ctx })
      assert.equal("hostkey-unknown", r.results[1].status)
      assert.matches("the host key of 'h3' is not in known_hosts", r.results[1].error, 1, true)
      assert.equal("", fixtures.read_file(dir .. "/known_hosts"))
      r = run({ { "h3", "echo first-contact" } }, { ctx = ctx .. " --accept-new" })
      assert.equal("ok", r.results[1].status, r.results[1].error)
      assert.equal("first-contact\n", r.results[1].out)
      assert.matches(net.hosts[3].addr .. " ssh-ed25519 ", fixtures.read_file(dir .. "/known_hosts"), 1, true)
    end)

    it("fails within the connect timeout, naming the host, when its link is down", function()
      net:cut(3)
      finally(function() net:restore(3) end)
      local t0 = fixtures.now()
      local r = run({ { net.hosts[3].dest, "true" }, { net.hosts[3].dest, "true" } },
                    { ctx = string.format("--config %s --known-hosts %s --key %s --connect-timeout 2",
                                          q(net.ssh_config), q(net.known_hosts), q(net.client_key)),
                      timeout = 30 })
      local elapsed = fixtures.now() - t0
      for _, res in ipairs(r.results) do
        assert.equal("unreachable", res.status, res.error)
        assert.matches("cannot reach '" .. net.hosts[3].dest .. "'", res.error, 1, true)
      end
      -- Both commands waited on one connection attempt.
      assert.equal(1, r.connections[net.hosts[3].dest])
      assert.is_true(elapsed < 10, "took " .. elapsed .. " s")
    end)

    it("kills a command that outlives its timeout, and the connection serves the next", function()
      local t0 = fixtures.now()
      local r = run({ { "h1", "sleep 30" }, { "h1", "echo quick" } }, { timeouts = "3,30", rounds = 2 })
      assert.is_true(fixtures.now() - t0 < 20)
      for round = 0, 1 do
        local slow, quick = r.results[2 * round + 1], r.results[2 * round + 2]
        assert.equal("timeout", slow.status)
        assert.matches("did not finish within 3 s", slow.error, 1, true)
        assert.equal("ok", quick.status, quick.error)
        assert.equal("quick\n", quick.out)
      end
      assert.equal(1, r.connections.h1)
    end)

    it("reports refused authentication, and never shows the key's path", function()
      local dir = fixtures.tmpdir("key")
      -- An unprotected copy: ssh refuses it and quotes its path.
      local key = dir .. "/KEYPATH-not-for-eyes"
      assert(os.execute(string.format("cp %s %s && chmod 0644 %s", q(net.client_key), q(key), q(key))))
      for _, extra in ipairs({ "", "--no-share" }) do
        local ctx = string.format("--config %s --known-hosts %s --key %s %s", q(net.ssh_config),
                                  q(net.known_hosts), q(key), extra)
        local r = run({ { "h1", "true" } }, { ctx = ctx })
        local res = r.results[1]
        assert.equal("auth", res.status, res.error)
        assert.matches("'h1' refused our authentication", res.error, 1, true)
        assert.is_nil(res.error:find("KEYPATH", 1, true))
        assert.is_nil(res.err_text:find("KEYPATH", 1, true))
        if extra == "--no-share" then assert.matches("<ssh key>", res.err_text, 1, true) end
      end
      local r = probe("run h1 true", { ctx = "--key " .. q(dir .. "/KEYPATH-missing") })
      assert.matches("cannot be read", r.ctx_error, 1, true)
      assert.is_nil(r.ctx_error:find("KEYPATH", 1, true))
    end)

    it("takes the key itself from DEPLOY_SSH_KEY", function()
      local r = probe("run h1 'echo via-env-key'", {
        env = "DEPLOY_SSH_KEY=\"$(cat " .. q(net.client_key) .. ")\"",
        ctx = string.format("--config %s --known-hosts %s", q(net.ssh_config), q(net.known_hosts)),
      })
      assert.equal("ok", r.results[1].status, r.results[1].error)
      assert.equal("via-env-key\n", r.results[1].out)
    end)

    it("shares one connection: time per command with and without it", function()
      local n = 8
      local shared = run({ { "h1", "true" } }, { rounds = n })
      local unshared = run({ { "h1", "true" } }, {
        rounds = n,
        ctx = string.format("--config %s --known-hosts %s --key %s --no-share",
                            q(net.ssh_config), q(net.known_hosts), q(net.client_key)),
      })
      assert.equal(1, shared.connections.h1)
      assert.equal(n, unshared.connections.h1)
      local function mean(r, from)
        local s, k = 0, 0
        for i = from, #r.results do
          assert.equal("ok", r.results[i].status, r.results[i].error)
          s, k = s + r.results[i].seconds, k + 1
        end
        return s / k
      end
      -- The first shared command pays for the handshake; the rest do not.
      print(string.format("\n  ssh: %d commands: shared %.3f s each after a first of %.3f s (total %.2f s); "
                          .. "unshared %.3f s each (total %.2f s)", n, mean(shared, 2),
                          shared.results[1].seconds, shared.seconds, mean(unshared, 1), unshared.seconds))
    end)
  end)

  describe("the agent", function()
    local boot = (fixtures.read_file("/proc/sys/kernel/random/boot_id") or ""):gsub("%s+", "")

    local function agent(verb, dest, args, opts)
      return probe("agent-" .. verb .. " " .. q(dest) .. " " .. args, opts)
    end

    local function start(dest, o)
      local args = {
        "--tag", q(o.tag), "--ports", o.ports, "--log", q(o.log),
        "--version", o.version or "v1", "--target", "prod",
      }
      if o.exclude then args[#args + 1] = "--exclude " .. o.exclude end
      for _, name in ipairs(o.env_from or {}) do args[#args + 1] = "--env-from " .. name end
      args[#args + 1] = "-- " .. q(o.command)
      return agent("start", dest, table.concat(args, " "), { env = o.env })
    end

    local function stop(dest, inst, timeout)
      return agent("stop", dest, string.format("--pid %d --starttime %d --boot %s --stop-timeout %g",
                                               inst.pid, inst.starttime, q(inst.boot), timeout or 5))
    end

    local function stat_fields(pid)
      local s = fixtures.read_file("/proc/" .. pid .. "/stat")
      if not s then return nil end
      local f = {}
      for w in s:match("^.*%)%s+(.*)$"):gmatch("%S+") do f[#f + 1] = w end
      -- f[1] is field 3 (state): field n is f[n - 2].
      return { state = f[1], pgrp = tonumber(f[3]), sid = tonumber(f[4]), start = tonumber(f[20]) }
    end

    local function group_members(pgid)
      local members = {}
      for _, name in ipairs((function()
        local t = {}
        for n in capture("ls -1 /proc"):gmatch("(%d+)\n") do t[#t + 1] = n end
        return t
      end)()) do
        local st = stat_fields(name)
        if st and st.pgrp == pgid and st.state ~= "Z" then members[#members + 1] = tonumber(name) end
      end
      return members
    end

    local demo = fixtures.demo_app
    local dir, ports, low, inst, tag

    setup(function()
      dir = fixtures.tmpdir("agent")
      ports, low = fixtures.port_range(6)
      tag = dir .. "/state.db#1"
    end)

    it("starts the demo app detached on a free port, a secret in its environment and not in ps", function()
      -- low is taken by a listener on h1; low+1 is excluded by the caller.
      local blocker = fixtures.spawn(string.format(
        "exec ip netns exec %s %s --host 0.0.0.0 --port %d --version blocker",
        q(net.hosts[1].ns), q(demo()), low))
      finally(function() fixtures.stop(blocker) end)
      fixtures.wait_until(function()
        local out = net:host_exec(1, "ss -Htln")
        return out:find(":" .. low .. " ", 1, true)
      end, 5, "the blocker on port " .. low)
      fixtures.write_file(dir .. "/secret", "s3cr3t-value-Zq9\\n and a quote ' too")
      local r = start("h1", {
        tag = tag, ports = ports, exclude = tostring(low + 1), log = dir .. "/logs/app.log",
        env = "SECRET_TOKEN=\"$(cat " .. q(dir .. "/secret") .. ")\" APP_VERSION=v7",
        env_from = { "SECRET_TOKEN", "APP_VERSION" },
        command = "exec " .. demo() .. " --host 0.0.0.0 --port {port} --version \"$APP_VERSION\"",
      })
      assert.is_true(r.ok, r.error)
      assert.equal(low + 2, r.port)
      assert.equal(boot, r.boot)
      assert.equal(dir .. "/logs/app.log", r.log)
      inst = r
      -- Detached: its own session, the identity the agent reported.
      local st = stat_fields(r.pid)
      assert.equal(r.pid, st.sid)
      assert.equal(r.starttime, st.start)
      fixtures.wait_until(function()
        return (fixtures.read_file(r.log) or ""):find("listening on 0.0.0.0:" .. r.port, 1, true)
      end, 10, "the demo app's log")
      -- ${APP_VERSION} was expanded by the instance's own shell.
      local out = net:exec("curl -s -m 5 http://" .. net.hosts[1].addr .. ":" .. r.port .. "/version")
      assert.equal("v7\n", out)
      local env = (fixtures.read_file("/proc/" .. r.pid .. "/environ") or ""):gsub("%z", "\n")
      assert.matches("\nSECRET_TOKEN=s3cr3t-value-Zq9\\n and a quote ' too\n", "\n" .. env, 1, true)
      assert.matches("\nDEPLOY_INSTANCE=" .. tag .. "\n", "\n" .. env, 1, true)
      assert.matches("\nDEPLOY_PORT=" .. r.port .. "\n", "\n" .. env, 1, true)
      assert.matches("\nDEPLOY_VERSION=v1\n", "\n" .. env, 1, true)
      assert.matches("\nDEPLOY_TARGET=prod\n", "\n" .. env, 1, true)
      -- No command line on the host shows the secret.
      -- (this secret's value: a namespace shares the machine's process list,
      -- where other specs' own secrets may be passing by)
      local ps = net:host_exec(1, "ps -eo args")
      assert.is_nil(ps:find("s3cr3t-value-Zq9", 1, true))
      assert.is_nil((fixtures.read_file(r.log) or ""):find("s3cr3t-value-Zq9", 1, true))
    end)

    it("finds the instance again by its tag when its pid was never recorded", function()
      assert(inst, "needs the instance of the test before")
      local r = agent("inspect", "h1", "--tag " .. q(tag))
      assert.is_true(r.ok, r.error)
      assert.is_true(r.alive)
      assert.is_true(r.found_by_tag)
      assert.equal(inst.pid, r.pid)
      assert.equal(inst.starttime, r.starttime)
      r = agent("inspect", "h1", string.format("--tag %s --pid %d --starttime %d --boot %s",
                                               q(tag), inst.pid, inst.starttime, boot))
      assert.is_true(r.alive)
      assert.is_false(r.found_by_tag)
      r = agent("inspect", "h1", "--tag " .. q(tag .. "-other"))
      assert.is_true(r.ok, r.error)
      assert.is_false(r.alive)
    end)

    it("reads the last lines of the log, and follows it until the caller goes away", function()
      assert(inst, "needs the instance of the test before")
      local r = agent("logs", "h1", "--lines 1 --log " .. q(inst.log))
      assert.is_true(r.ok, r.error)
      assert.equal("demo-app v7 listening on 0.0.0.0:" .. inst.port .. "\n", r.out)
      r = agent("logs", "h1", "--log " .. q(dir .. "/nope.log"))
      assert.is_false(r.ok)
      assert.matches("agent on 'h1': logs failed: no log file", r.error, 1, true)

      local out = dir .. "/follow.json"
      local pid = fixtures.spawn(net:wrap(string.format(
        "%s --config %s --known-hosts %s --key %s agent-follow h1 --log %s --lines 1 --until MARK-%d --timeout 30",
        q(probe_bin()), q(net.ssh_config), q(net.known_hosts), q(net.client_key), q(inst.log), inst.port)), out)
      -- Once following (the old line has arrived), a new line is appended.
      local function tails()
        local n = 0
        for p in capture("ip netns pids " .. q(net.hosts[1].ns)):gmatch("%d+") do
          if (fixtures.read_file("/proc/" .. p .. "/comm") or ""):match("^tail") then n = n + 1 end
        end
        return n
      end
      fixtures.wait_until(function() return tails() > 0 end, 15, "tail -f on h1")
      local f = assert(io.open(inst.log, "a"))
      f:write("MARK-" .. inst.port .. "\n")
      f:close()
      assert.is_true(fixtures.wait_exit(pid, 20))
      local res = cjson.decode(fixtures.read_file(out))
      assert.is_true(res.ok, res.error)
      assert.equal("cancelled", res.status)
      assert.matches("MARK-" .. inst.port .. "\n", res.streamed, 1, true)
      -- The remote tail saw EOF on its stdin and went away.
      fixtures.wait_until(function() return tails() == 0 end, 10, "tail -f on h1 to end")
    end)

    it("stops the instance with SIGTERM, then reports it gone", function()
      assert(inst, "needs the instance of the test before")
      local r = stop("h1", inst)
      assert.is_true(r.ok, r.error)
      assert.equal("stopped", r.result)
      assert.is_false(fixtures.alive(inst.pid))
      r = agent("inspect", "h1", string.format("--tag %s --pid %d --starttime %d --boot %s",
                                               q(tag), inst.pid, inst.starttime, boot))
      assert.is_false(r.alive)
      r = stop("h1", inst)
      assert.equal("gone", r.result)
    end)

    it("kills an instance that ignores SIGTERM, with every process of its group", function()
      local r = start("h2", {
        tag = dir .. "/state.db#2", ports = ports, log = dir .. "/logs/stubborn.log",
        command = "trap '' TERM; sleep 1000 & sleep 1000 & echo started; wait",
      })
      assert.is_true(r.ok, r.error)
      fixtures.wait_until(function() return #group_members(r.pid) == 3 end, 10, "the shell and its two sleeps")
      local t0 = fixtures.now()
      local s = stop("h2", r, 1)
      assert.is_true(s.ok, s.error)
      assert.equal("killed", s.result)
      assert.is_true(fixtures.now() - t0 >= 1)
      assert.same({}, group_members(r.pid))
    end)

    it("never signals a pid that now belongs to another process", function()
      local other = fixtures.spawn(string.format("exec ip netns exec %s sleep 1000", q(net.hosts[2].ns)))
      finally(function() fixtures.stop(other) end)
      fixtures.wait_until(function()
        local st = stat_fields(other)
        return st and (fixtures.read_file("/proc/" .. other .. "/comm") or ""):match("^sleep")
      end, 5, "the other process")
      local st = stat_fields(other)
      -- Recorded with another start time (the pid was reused), or on another boot.
      local reused = { pid = other, starttime = st.start - 1, boot = boot }
      local rebooted = { pid = other, starttime = st.start, boot = "00000000-0000-4000-8000-000000000000" }
      for _, inst2 in ipairs({ reused, rebooted }) do
        local r = stop("h2", inst2, 1)
        assert.is_true(r.ok, r.error)
        assert.equal("gone", r.result)
      end
      assert.is_true(fixtures.alive(other))
      assert.equal("S", stat_fields(other).state)
    end)

    it("hands out distinct ports to starts on one host at once", function()
      -- As many ports as starts: without reservations all would pick the first.
      local three = fixtures.port_range(3)
      local outs, pids = {}, {}
      for i = 1, 3 do
        outs[i] = dir .. "/par-" .. i .. ".json"
        local cmd = net:wrap(string.format(
          "%s --config %s --known-hosts %s --key %s agent-start h3 --tag %s --ports %s --log %s "
          .. "--version v1 --target prod -- %s",
          q(probe_bin()), q(net.ssh_config), q(net.known_hosts), q(net.client_key),
          q(dir .. "/state.db#p" .. i), three, q(dir .. "/logs/par-" .. i .. ".log"),
          q("exec " .. demo() .. " --host 0.0.0.0 --port {port} --version p" .. i)))
        pids[i] = fixtures.spawn(cmd, outs[i])
      end
      local seen = {}
      for i = 1, 3 do
        assert.is_true(fixtures.wait_exit(pids[i], 60))
        local r = cjson.decode(fixtures.read_file(outs[i]))
        assert.is_true(r.ok, r.error)
        assert.is_nil(seen[r.port], "port " .. r.port .. " handed out twice")
        seen[r.port] = true
        finally(function() stop("h3", r, 2) end)
      end
    end)

    it("says why when no port is free", function()
      local port = fixtures.free_port()
      local blocker = fixtures.spawn(string.format("exec ip netns exec %s %s --host 0.0.0.0 --port %d --version b",
                                                   q(net.hosts[3].ns), q(demo()), port))
      finally(function() fixtures.stop(blocker) end)
      fixtures.wait_until(function()
        return net:host_exec(3, "ss -Htln"):find(":" .. port .. " ", 1, true)
      end, 5, "the blocker")
      local r = start("h3", { tag = dir .. "/state.db#9", ports = port .. "-" .. port,
                              log = dir .. "/logs/none.log", command = "true" })
      assert.is_false(r.ok)
      assert.matches("agent on 'h3': start failed: no free port in " .. port .. "-" .. port,
                     r.error, 1, true)
    end)
  end)
end)
