-- Targets across many hosts: instances started over SSH (provider ssh), a
-- load balancer on a host of its own reached over ssh or TCP, against real
-- sshd, HAProxy and demo-app processes in network namespaces
-- (spec/support/hosts.lua): h1, h2 and h3 run the application, h4 runs
-- HAProxy. deployctl runs in the namespaces' control namespace, as a user
-- would run it on a deploy machine; so do wrk and curl.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"
local hosts = require "spec.support.hosts"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

local function capture(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok == true
end

-- Bad input is refused when the config is read: no hosts needed.
describe("targets across hosts: the config", function()
  local deploy = require "deploy"
  after_each(fixtures.cleanup)

  local function refused(target)
    local dir = fixtures.tmpdir("hosts-config")
    local ok, err = pcall(deploy.DeploymentManager,
                          { config = { state = dir .. "/state.db", targets = { production = target } } })
    assert.is_false(ok, "accepted")
    return tostring(err)
  end

  local function ssh_target(provider, extra)
    local t = { instances = 2, hosts = { "app1", "deploy@10.0.0.5:2222" },
                provider = { kind = "ssh", command = "./app --port {port}" } }
    for k, v in pairs(provider or {}) do t.provider[k] = v end
    for k, v in pairs(extra or {}) do t[k] = v end
    return t
  end

  it("refuses host strings ssh would misread, naming the entry", function()
    local cases = {
      { "-oProxyCommand=touch /tmp/x", "hosts%[1%] is not a usable ssh destination: destination '%-oProxyCommand=touch /tmp/x' starts with '%-'" },
      { "app 1", "hosts%[1%] is not a usable ssh destination: destination 'app 1' holds whitespace" },
      { "deploy@app1:99999", "hosts%[1%] is not a usable ssh destination: destination 'deploy@app1:99999': the port must be 1%-65535" },
      { "@app1", "hosts%[1%] is not a usable ssh destination: destination '@app1' has an empty user name" },
      { "[fd00::1", "hosts%[1%] is not a usable ssh destination: .*brackets must hold an IPv6 address" },
    }
    for _, c in ipairs(cases) do
      assert.matches("deploy: config targets%.production%." .. c[2], refused(ssh_target(nil, { hosts = { c[1] } })))
    end
    assert.matches("hosts%[2%] 'app1' is listed twice", refused(ssh_target(nil, { hosts = { "app1", "app1" } })))
    assert.matches("hosts is empty", refused(ssh_target(nil, { hosts = {} })))
    assert.matches("hosts must be a list of ssh destinations", refused(ssh_target(nil, { hosts = "app1" })))
    assert.matches("hosts%[2%] must be a string", refused(ssh_target(nil, { hosts = { "app1", 7 } })))
  end)

  it("refuses unknown provider fields, per kind, listing the known ones", function()
    local err = refused(ssh_target{ user = "deploy" })
    assert.matches("targets%.production%.provider has an unknown field 'user' %(known: kind, command, ports, "
                   .. "stop_timeout, workdir, env, log_dir, key, known_hosts, ssh_config, accept_new, "
                   .. "connect_timeout, boot_limit, boot_wait%)", err)
    err = refused({ instances = 1, provider = { kind = "process", command = "./app", boot_limit = 1 } })
    assert.matches("provider has an unknown field 'boot_limit' %(known: kind, command, ports, stop_timeout, workdir, env%)", err)
    assert.matches("kind 'kubernetes' is not known %(known: process, ssh, test%)", refused(ssh_target{ kind = "kubernetes" }))
  end)

  it("refuses hosts without the ssh provider, the ssh provider without hosts, and bad values", function()
    assert.matches("lists hosts, which the 'process' provider cannot reach: set provider.kind = 'ssh'",
                   refused(ssh_target{ kind = "process" }))
    local no_hosts = ssh_target()
    no_hosts.hosts = nil
    assert.matches("has provider.kind 'ssh' but no hosts", refused(no_hosts))
    assert.matches("boot_limit '0%%' is not a percentage of hosts", refused(ssh_target{ boot_limit = "0%" }))
    assert.matches("boot_limit must be a whole number of hosts %(>= 1%)", refused(ssh_target{ boot_limit = 1.5 }))
    assert.matches("boot_wait must be between 0 and 86400", refused(ssh_target{ boot_wait = -1 }))
    assert.matches("accept_new must be true or false", refused(ssh_target{ accept_new = "yes" }))
    assert.matches("connect_timeout must be between", refused(ssh_target{ connect_timeout = 0 }))
    -- a key that cannot be read is named by where it came from, never by its path
    local err = refused(ssh_target{ key = "/nonexistent/Secr3tKeyPath" })
    assert.matches("cannot set up ssh: the private key named by the configured ssh key cannot be read", err)
    assert.is_nil(err:find("Secr3tKeyPath", 1, true))
  end)

  it("refuses a balancer socket it cannot reach as written", function()
    local function with_socket(socket)
      return ssh_target(nil, { router = { kind = "haproxy", socket = socket, backend = "app" } })
    end
    assert.matches("socket 'tcp://lb1:9999': 'lb1' is not an IP address", refused(with_socket("tcp://lb1:9999")))
    assert.matches("socket 'tcp://10.0.0.1' is not an address and port", refused(with_socket("tcp://10.0.0.1")))
    assert.matches("socket 'ssh://lb1' names no host and socket path", refused(with_socket("ssh://lb1")))
    assert.matches("socket 'ssh://%-x/run/a.sock'.*starts with '%-'", refused(with_socket("ssh://-x/run/a.sock")))
    assert.matches("socket 'udp://x' is of a kind not known", refused(with_socket("udp://x")))
  end)
end)

local available, why = hosts.available()

describe("targets across hosts", function()
  if not available then
    it("needs network namespaces", function() pending("multi-host specs skipped: " .. why) end)
    return
  end

  local net
  local made = {}  -- what the running test made: directories and HAProxies
  setup(function() net = hosts.create{ count = 4 } end)
  teardown(function()
    if net then net:destroy() end
    fixtures.cleanup()
  end)
  -- The namespaces stay for the next test; what this one started goes.
  after_each(function()
    for _, e in ipairs(made) do
      e.lb:stop()
      for _, pid in ipairs(fixtures.pids_matching(e.dir)) do fixtures.kill(pid, "KILL") end
    end
    made = {}
  end)

  local function in_ns(i) return function(cmd) return "ip netns exec " .. q(net.hosts[i].ns) .. " " .. cmd end end
  local function in_ctl(cmd) return net:wrap(cmd) end

  -- A target on h1..h3 (2 instances each) behind HAProxy on h4, its runtime
  -- API reached over ssh (ssh://h4/...) or TCP (tcp://10.213.0.14:PORT).
  local function env(opts)
    opts = opts or {}
    local dir = fixtures.tmpdir("hosts-spec")
    local lb = fixtures.haproxy{ bind = net.hosts[4].addr, wrap = in_ns(4), client_wrap = in_ctl,
                                 stats_tcp = fixtures.free_port() }
    made[#made + 1] = { dir = dir, lb = lb }
    local socket = opts.socket == "tcp" and string.format("tcp://%s:%d", net.hosts[4].addr, lb.stats_tcp)
                   or "ssh://h4" .. lb.socket
    local provider = {
      kind = "ssh",
      command = fixtures.demo_app() .. " --host {host} --port {port} --version {version} --unhealthy-file "
                .. dir .. "/unhealthy-{version}",
      ports = "21000-21099", stop_timeout = 2, log_dir = dir .. "/logs",
      ssh_config = net.ssh_config, known_hosts = net.known_hosts, key = net.client_key, connect_timeout = 2,
    }
    for k, v in pairs(opts.provider or {}) do provider[k] = v end
    local cfg = {
      state = dir .. "/state.db",
      targets = { production = {
        instances = 2,
        hosts = { "h1", "h2", "h3" },
        provider = provider,
        router = { kind = "haproxy", socket = socket, backend = lb.backend },
        health = { path = "/healthz", timeout = 1, interval = 0.2, failure_threshold = opts.failure_threshold or 3 },
        retain = opts.retain,
      } },
    }
    local config = cli.write_config(dir, cfg)
    return { dir = dir, lb = lb, config = config }
  end

  -- deployctl in the control namespace: exit code, stdout, stderr.
  local function dctl(e, args)
    local d = fixtures.tmpdir("cli")
    local words = { q(cli.bin()), "--config", q(e.config) }
    for _, a in ipairs(args) do words[#words + 1] = q(a) end
    local _, _, code = os.execute(in_ctl(table.concat(words, " ")) .. " >" .. q(d .. "/out") .. " 2>"
                                  .. q(d .. "/err") .. " </dev/null")
    return code, fixtures.read_file(d .. "/out") or "", fixtures.read_file(d .. "/err") or ""
  end

  -- The same in the background: :output(), :done(), :wait(), .pid.
  local function dctl_spawn(e, args)
    local d = fixtures.tmpdir("cli")
    local words = { q(cli.bin()), "--config", q(e.config) }
    for _, a in ipairs(args) do words[#words + 1] = q(a) end
    local inner = in_ctl(table.concat(words, " ")) .. " >" .. q(d .. "/out") .. " 2>" .. q(d .. "/err") .. " </dev/null"
    -- ip netns exec execs deployctl: $! is deployctl's own pid.
    os.execute("(" .. inner .. " & echo $! > " .. q(d .. "/pid") .. "; wait $!; echo $? > " .. q(d .. "/rc")
               .. ") >/dev/null 2>&1 &")
    fixtures.wait_until(function() return (fixtures.read_file(d .. "/pid") or ""):match("%d+") end, 5, "deployctl")
    local h = { pid = tonumber(fixtures.read_file(d .. "/pid"):match("%d+")) }
    function h:output() return fixtures.read_file(d .. "/out") or "" end
    function h:done() return (fixtures.read_file(d .. "/rc") or ""):match("%d+") ~= nil end
    function h:wait(timeout)
      fixtures.wait_until(function() return self:done() end, timeout or 120, "deployctl to finish")
      return tonumber(fixtures.read_file(d .. "/rc"):match("%d+")), self:output(), fixtures.read_file(d .. "/err") or ""
    end
    return h
  end

  local function events(out)
    local list = {}
    for line in out:gmatch("[^\n]+") do
      local ok, ev = pcall(cjson.decode, line)
      if ok and type(ev) == "table" and ev.kind then list[#list + 1] = ev end
    end
    return list
  end

  -- Running instances of version per host (h1..h4): each demo-app process
  -- (not the shell that started it) is found by its command line, its host
  -- by its network namespace.
  local function instances_on(e, version)
    local per = {}
    for _, pid in ipairs(fixtures.instances_of(e.dir, version)) do
      if (fixtures.read_file("/proc/" .. pid .. "/comm") or ""):match("^demo%-app") then
        local ns = capture("ip netns identify " .. pid .. " 2>/dev/null"):gsub("%s+", "")
        per[ns] = (per[ns] or 0) + 1
      end
    end
    local out = {}
    for i, h in ipairs(net.hosts) do out[i] = per[h.ns] or 0 end
    return out
  end

  -- HAProxy's servers by host index, with their weights.
  local function servers_by_host(e)
    local by = { {}, {}, {}, {} }
    for _, s in ipairs(e.lb:servers()) do
      for i, h in ipairs(net.hosts) do
        if s.addr == h.addr then table.insert(by[i], s) end
      end
    end
    return by
  end

  local function sshd_accepts(i)
    local n = 0
    for _ in (fixtures.read_file(net.hosts[i].log) or ""):gmatch("Accepted publickey") do n = n + 1 end
    return n
  end

  -- Until wrk's requests reach HAProxy.
  local function wait_for_load(e)
    local function served()
      return tonumber(e.lb:cmd("show info"):match("CumReq: (%d+)")) or 0
    end
    local before = served()
    fixtures.wait_until(function() return served() > before + 100 end, 10, "wrk's requests")
  end

  local function deployed(e, version)
    local code, out, err = dctl(e, { "deploy", "production", version, "--quiet", "--set", "scale_down_delay=0" })
    local log = err:match("see (/%S+%.log)")
    local dump = ""
    if code ~= 0 then
      for i = 1, 3 do dump = dump .. "\nh" .. i .. ":\n" .. (net:host_exec(i, "ss -Htan")) end
    end
    assert.equal(0, code, out .. err .. (log and ("\n" .. log .. ":\n" .. (fixtures.read_file(log) or "")) or "") .. dump)
    assert.same({ 2, 2, 2, 0 }, instances_on(e, version))
  end

  it("rolls a canary over 3 hosts x 2 instances under load: exact shares at each step, 0 failed requests "
     .. "(HAProxy on its own host, over ssh)", function()
    local e = env{ socket = "ssh" }
    deployed(e, "v1")
    local old = {}
    for _, s in ipairs(e.lb:servers()) do old[s.name] = true end
    assert.same({ v1 = 60 }, (e.lb:sample(60)))
    -- At each step the pipeline reads HAProxy's weights and request
    -- counters; the requests between two steps say what share each got.
    local pipeline = e.dir .. "/canary.lua"
    fixtures.write_file(pipeline, [[
local deploy, cjson = require "deploy", require "cjson"
local sock = arg[1]
local function snapshot(kind, pct)
  local p = io.popen("echo 'show stat' | socat -t5 - UNIX-CONNECT:" .. sock)
  local text = p:read("a")
  p:close()
  local cols, servers = nil, {}
  for line in text:gmatch("[^\n]+") do
    if line:sub(1, 2) == "# " then
      cols = {}
      for c in (line:sub(3) .. ","):gmatch("([^,]*),") do cols[#cols + 1] = c end
    elseif cols then
      local row, i = {}, 0
      for f in (line .. ","):gmatch("([^,]*),") do i = i + 1 row[cols[i] or i] = f end
      if row.svname and row.svname:match("^dc_") then
        servers[row.svname] = { weight = tonumber(row.weight), req = tonumber(row.req_tot) or tonumber(row.stot) }
      end
    end
  end
  print(cjson.encode({ kind = kind, pct = pct, servers = servers }))
  io.stdout:flush()
end
local m = deploy.DeploymentManager{}
-- A step's weights hold from its traffic event until the next step's
-- before_step hook (or the promotion): those counters bound it.
local r = m:deploy("production", "v2", {
  strategy = deploy.CanaryStrategy{ initial_percentage = 25, increment = 25, interval = 2 },
  hooks = { before_step = function(pct) snapshot("before_step", pct) end },
  on_event = function(ev)
    if ev.kind == "traffic" then snapshot("traffic", ev.data.pct) end
    if ev.kind == "promoted" then snapshot("promoted", 100) end
  end })
print(cjson.encode({ kind = "result", success = r.success, errors = r.errors or {} }))
]])
    local load = fixtures.load(8, e.lb:url("/"), 120, in_ctl)
    wait_for_load(e)
    local code, out, err = dctl(e, { "run", pipeline, e.lb.socket })
    local res = load:finish()
    assert.equal(0, code, out .. err)
    local snaps, result = {}, nil
    for line in out:gmatch("[^\n]+") do
      local v = cjson.decode(line)
      if v.kind == "result" then result = v else snaps[#snaps + 1] = v end
    end
    assert.is_true(result.success, table.concat(result.errors, "\n"))
    -- before_step 25, then traffic and the end of each step
    local steps = {}
    for i, v in ipairs(snaps) do
      if v.kind == "traffic" then steps[#steps + 1] = { v, snaps[i + 1] } end
    end
    assert.equal(9, #snaps)
    assert.equal(4, #steps)
    for i, step in ipairs(steps) do
      local s, nxt = step[1], step[2]
      assert.equal(25 * i, s.pct)
      assert.equal(i < 4 and "before_step" or "promoted", nxt.kind)
      -- the weights give the share exactly, counting every host together
      local w_new, w_all, n_new = 0, 0, 0
      for name, sv in pairs(s.servers) do
        w_all = w_all + sv.weight
        if not old[name] then w_new = w_new + sv.weight n_new = n_new + 1 end
      end
      assert.equal(6, n_new)
      assert.equal(s.pct / 100, w_new / w_all)
      -- and so do the requests served until the next step
      local req_new, req_all = 0, 0
      for name, sv in pairs(nxt.servers) do
        local before = s.servers[name] and s.servers[name].req or 0
        req_all = req_all + sv.req - before
        if not old[name] then req_new = req_new + sv.req - before end
      end
      assert.is_true(req_all > 200, "too few requests at " .. s.pct .. " %: " .. req_all)
      local share = 100 * req_new / req_all
      assert.is_true(math.abs(share - s.pct) <= 2,
                     string.format("at %d %%, %.2f %% of %d requests went to v2", s.pct, share, req_all))
    end
    assert.equal(0, res.non2xx, res.output)
    assert.equal(0, res.socket_errors, res.output)
    assert.is_true(res.requests > 2000, "too few requests to mean anything: " .. res.requests)
    assert.same({ v2 = 60 }, (e.lb:sample(60)))
    assert.same({ 0, 0, 0, 0 }, instances_on(e, "v1"))
    assert.same({ 2, 2, 2, 0 }, instances_on(e, "v2"))
  end)

  it("switches a blue-green over 3 hosts x 2 instances under load in one step, 0 failed requests, with one "
     .. "ssh connection per host (HAProxy over TCP)", function()
    local e = env{ socket = "tcp" }
    deployed(e, "v1")
    local before = { sshd_accepts(1), sshd_accepts(2), sshd_accepts(3), sshd_accepts(4) }
    local load = fixtures.load(8, e.lb:url("/"), 120, in_ctl)
    wait_for_load(e)
    local code, out, err = dctl(e, { "deploy", "production", "v2", "--json", "--set", "scale_down_delay=0" })
    local res = load:finish()
    assert.equal(0, code, out .. err)
    local traffic = {}
    for _, ev in ipairs(events(out)) do
      if ev.kind == "traffic" then traffic[#traffic + 1] = ev.data end
    end
    assert.equal(1, #traffic)
    assert.same({ 100, 0, 1, 6, 6 }, { traffic[1].pct, traffic[1].weight_old, traffic[1].weight_new,
                                       traffic[1].old, traffic[1].new })
    assert.equal(0, res.non2xx, res.output)
    assert.equal(0, res.socket_errors, res.output)
    assert.is_true(res.requests > 1000, "too few requests to mean anything: " .. res.requests)
    assert.same({ v2 = 60 }, (e.lb:sample(60)))
    local by = servers_by_host(e)
    for i = 1, 3 do assert.equal(2, #by[i]) end
    assert.same({ 0, 0, 0, 0 }, instances_on(e, "v1"))
    -- one TCP + authentication handshake per host for the whole deployment
    assert.same({ 1, 1, 1, 0 }, { sshd_accepts(1) - before[1], sshd_accepts(2) - before[2],
                                  sshd_accepts(3) - before[3], sshd_accepts(4) - before[4] })
    -- status counts every host's instances and shows each one's host
    code, out = dctl(e, { "status", "production" })
    assert.equal(0, code)
    assert.matches("production%s+v2%s+deployed%s+healthy%s+6", out)
    for i = 1, 3 do
      local n = 0
      for _ in out:gmatch("dc_%d+%s+h" .. i .. "%s+v2%s+" .. net.hosts[i].addr:gsub("%.", "%%.") .. "%s+%d+%s+%d+%s+healthy%s+1") do
        n = n + 1
      end
      assert.equal(2, n, out)
    end
  end)

  it("a host whose link is cut mid-canary: the others roll back, the error names it, and reconcile once it is "
     .. "back leaves it on the live version only", function()
    local e = env{ socket = "ssh", failure_threshold = 2 }
    deployed(e, "v1")
    local run = dctl_spawn(e, { "deploy", "production", "v2", "--strategy", "canary", "--set", "initial_percentage=50",
                                "--set", "increment=50", "--set", "interval=30", "--json" })
    fixtures.wait_until(function() return run:output():find('"kind":"traffic"', 1, true) end, 60, "the first step")
    net:cut(2)
    local cut_at = fixtures.now()
    local code, out, err = run:wait(120)
    local restored = false
    finally(function() if not restored then net:restore(2) end end)
    assert.equal(1, code, out .. err)
    assert.is_true(fixtures.now() - cut_at < 40, "the abort took " .. (fixtures.now() - cut_at) .. " s")
    -- the error names the host and what failed: whichever noticed first,
    -- the agent that no longer answers or the health checks that time out
    assert.is_truthy(err:find("on h2: cannot inspect instances on 'h2': ssh: ", 1, true)
                     or err:match("unhealthy after %d consecutive failed checks: http://10%.213%.0%.12:%d+/healthz "
                                  .. "%(host 'h2'%)"), err)
    local kinds = {}
    for _, ev in ipairs(events(out)) do kinds[ev.kind] = (kinds[ev.kind] or 0) + 1 end
    assert.equal(1, kinds.rolled_back)
    -- the reachable hosts are back on v1 alone; h2 keeps what it had
    assert.same({ 2, 2, 2, 0 }, instances_on(e, "v1"))
    assert.same({ 0, 2, 0, 0 }, instances_on(e, "v2"))
    local by = servers_by_host(e)
    for i = 1, 3 do
      assert.equal(2, #by[i])
      for _, s in ipairs(by[i]) do assert.is_true(s.weight > 0) end
    end
    net:restore(2)
    restored = true
    assert.same({ v1 = 60 }, (e.lb:sample(60)))
    code, out, err = dctl(e, { "reconcile", "production" })
    assert.equal(0, code, out .. err)
    assert.same({ 2, 2, 2, 0 }, instances_on(e, "v1"))
    assert.same({ 0, 0, 0, 0 }, instances_on(e, "v2"))
    -- v1 serves on every host again; the failed canary is the last deployment's
    code, out = dctl(e, { "status", "production" })
    assert.equal(0, code, out)
    assert.matches("production%s+v1%s+deployed%s+healthy%s+6", out)
    assert.matches("the last deployment %(v2, [%w]+%) failed: canary aborted at 50 %%", out)
  end)

  for _, kill_at in ipairs{ "instance_started", "traffic" } do
    it("deployctl killed (SIGKILL) at '" .. kill_at .. "': the next run finds every remote instance and brings "
       .. "each host back to the live version", function()
      local e = env{ socket = "ssh" }
      deployed(e, "v1")
      local pipeline = e.dir .. "/crash.lua"
      fixtures.write_file(pipeline, [[
local deploy = require "deploy"
local kill_at = arg[1]
local function self_pid()
  local f = io.open("/proc/self/stat")
  local pid = f:read("n")
  f:close()
  return pid
end
local m = deploy.DeploymentManager{}
m:deploy("production", "v2", {
  strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 30 },
  on_event = function(ev)
    print(ev.kind)
    io.stdout:flush()
    if ev.kind == kill_at then os.execute("kill -9 " .. self_pid()) end
  end })
]])
      local code, out = dctl(e, { "run", pipeline, kill_at })
      assert.equal(137, code, out)
      assert.matches(kill_at, out)
      -- v2 instances were left behind on the hosts (some, at instance_started)
      local left = instances_on(e, "v2")
      assert.is_true(left[1] + left[2] + left[3] > 0)
      -- any next command recovers: only v1, 2 per host, and HAProxy serves it
      local err
      code, out, err = dctl(e, { "status", "production" })
      assert.equal(0, code, err)
      assert.matches("production%s+v1", out)
      fixtures.wait_until(function()
        local v2 = instances_on(e, "v2")
        return v2[1] + v2[2] + v2[3] == 0
      end, 10, "every v2 instance to be gone")
      assert.same({ 2, 2, 2, 0 }, instances_on(e, "v1"))
      local by = servers_by_host(e)
      for i = 1, 3 do assert.equal(2, #by[i]) end
      assert.same({ v1 = 60 }, (e.lb:sample(60)))
      local _, hist = dctl(e, { "history", "production", "--json" })
      assert.equal("interrupted", cjson.decode(hist:match("[^\n]+")).status)
      -- and the target takes the next deployment
      deployed(e, "v3")
      assert.same({ v3 = 60 }, (e.lb:sample(60)))
    end)
  end

  it("refuses a host whose key changed, naming it, with nothing started on any host", function()
    local e = env{ socket = "ssh" }
    deployed(e, "v1")
    net:change_host_key(2)
    finally(function() net:restore_host_key(2) end)
    local code, out, err = dctl(e, { "deploy", "production", "v2", "--json", "--set", "scale_down_delay=0" })
    assert.equal(1, code, out .. err)
    assert.matches("preflight failed, nothing was started: host 'h2' cannot be used: ssh: the host key of 'h2' "
                   .. "has CHANGED", err)
    for _, ev in ipairs(events(out)) do
      assert.is_true(ev.kind ~= "instance_started" and ev.kind ~= "traffic", ev.kind)
    end
    assert.same({ 0, 0, 0, 0 }, instances_on(e, "v2"))
    assert.same({ 2, 2, 2, 0 }, instances_on(e, "v1"))
    assert.same({ v1 = 60 }, (e.lb:sample(60)))
  end)

  it("reports a host that is down before anything starts (preflight)", function()
    local e = env{ socket = "ssh" }
    deployed(e, "v1")
    net:cut(3)
    finally(function() net:restore(3) end)
    local code, out, err = dctl(e, { "deploy", "production", "v2", "--set", "scale_down_delay=0" })
    assert.equal(1, code, out .. err)
    assert.matches("preflight failed, nothing was started: host 'h3' cannot be used: ssh: cannot reach 'h3'", err)
    assert.same({ 0, 0, 0, 0 }, instances_on(e, "v2"))
  end)

  it("with boot_limit = 1 starts the new instances host after host, each wave healthy and boot_wait apart",
     function()
    local e = env{ socket = "ssh", provider = { boot_limit = 1, boot_wait = 0.5 } }
    local code, out, err = dctl(e, { "deploy", "production", "v1", "--json" })
    assert.equal(0, code, out .. err)
    local seq, wave_at = {}, {}
    for _, ev in ipairs(events(out)) do
      if ev.kind == "boot_wave" then
        seq[#seq + 1] = string.format("wave %d/%d %s", ev.data.wave, ev.data.waves, table.concat(ev.data.hosts, ","))
        wave_at[ev.data.wave] = ev.ts
      elseif ev.kind == "instance_started" then
        seq[#seq + 1] = "started on " .. ev.data.node
      elseif ev.kind == "healthy" or ev.kind == "boot_wait" then
        seq[#seq + 1] = ev.kind
      end
    end
    assert.same({ "wave 1/3 h1", "started on h1", "started on h1", "healthy", "boot_wait",
                  "wave 2/3 h2", "started on h2", "started on h2", "healthy", "boot_wait",
                  "wave 3/3 h3", "started on h3", "started on h3", "healthy" }, seq)
    assert.is_true(wave_at[2] - wave_at[1] >= 0.5 and wave_at[3] - wave_at[2] >= 0.5)
    assert.same({ 2, 2, 2, 0 }, instances_on(e, "v1"))
    -- "50%" of 3 hosts is 2 at a time
    e = env{ socket = "ssh", provider = { boot_limit = "50%" } }
    code, out = dctl(e, { "deploy", "production", "v1", "--json" })
    assert.equal(0, code)
    local waves = {}
    for _, ev in ipairs(events(out)) do
      if ev.kind == "boot_wave" then waves[#waves + 1] = table.concat(ev.data.hosts, ",") end
    end
    assert.same({ "h1,h2", "h3" }, waves)
  end)

  it("prunes old versions' logs and rotates big ones on every host (retention)", function()
    local e = env{ socket = "ssh", retain = { versions = 1, logs = 0.001 } }
    local logs = e.dir .. "/logs"
    local function names(version)
      local p = io.popen("ls -1 " .. q(logs) .. " | grep -c -- '^production-" .. version .. "-' ; true")
      local n = tonumber(p:read("a"):match("%d+"))
      p:close()
      return n
    end
    deployed(e, "v1")
    deployed(e, "v2")
    assert.equal(6, names("v1"))
    -- the hosts write into one directory here (one file system): each file
    -- is one instance's, 0..5
    os.execute("touch -d '1 hour ago' " .. q(logs) .. "/*")
    deployed(e, "v3")
    assert.equal(0, names("v1"))
    assert.equal(6, names("v2")) -- the previous version's stay
    local f = assert(io.open(logs .. "/production-v3-0.log", "a"))
    f:write(string.rep("x", 2000), "\n")
    f:close()
    local code, out, err = dctl(e, { "prune", "production" })
    assert.equal(0, code, out .. err)
    assert.matches("production: 0 deployment%(s%) and 0 log file%(s%) %(0 bytes%) removed, 1 log%(s%) rotated", out)
    assert.equal("", fixtures.read_file(logs .. "/production-v3-0.log"))
    assert.matches(string.rep("x", 2000), fixtures.read_file(logs .. "/production-v3-0.log.1"))
  end)

  it("reads the logs of every host, of one host, and follows them", function()
    local e = env{ socket = "ssh" }
    deployed(e, "v1")
    local code, out, err = dctl(e, { "logs", "production" })
    assert.equal(0, code, err)
    for i = 1, 3 do
      local n = 0
      for _ in out:gmatch("%[h" .. i .. " v1#%d%] demo%-app v1 listening on " .. net.hosts[i].addr:gsub("%.", "%%.")) do
        n = n + 1
      end
      assert.equal(2, n, out)
    end
    code, out = dctl(e, { "logs", "production", "--host", "h2", "--lines", "1" })
    assert.equal(0, code)
    local lines = {}
    for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal(2, #lines, out)
    for _, l in ipairs(lines) do assert.matches("^%[h2 v1#%d%] ", l) end
    code, _, err = dctl(e, { "logs", "production", "--host", "h9" })
    assert.equal(2, code)
    assert.matches("'h9' is not a host of 'production' %(its hosts: h1, h2, h3%)", err)
    -- --follow prints what an instance writes, until Ctrl-C
    local follow = dctl_spawn(e, { "logs", "production", "--host", "h3", "--follow", "--lines", "1" })
    fixtures.wait_until(function() return follow:output():find("listening", 1, true) end, 20, "the first lines")
    local _, instances = dctl(e, { "status", "production", "--json" })
    local target_log
    for _, i in ipairs(cjson.decode(instances).instances) do
      if i.node == "h3" then target_log = i.log end
    end
    assert.is_truthy(target_log, instances)
    local f = assert(io.open(target_log, "a"))
    f:write("a line written after the follow began\n")
    f:close()
    fixtures.wait_until(function() return follow:output():find("%] a line written after the follow began") end,
                        20, "the followed line")
    fixtures.kill(follow.pid, "INT")
    code = follow:wait(20)
    assert.equal(0, code)
  end)
end)
