-- A blue-green over 1, 3 and 10 hosts: how the wall time grows with the
-- number of hosts, and how many SSH connections each host sees per
-- deployment.
--
--   lua5.4 bench/hosts.lua [BUILD_DIR=build] [ROUNDS=3] [INSTANCES=2]
--
-- A Lua script rather than bench/hosts.c because the hosts are what
-- spec/support/hosts.lua makes (network namespaces, each with its own
-- sshd); it needs root, like the specs. deployctl runs in the namespaces'
-- control namespace, HAProxy there too (its runtime API on a unix socket),
-- the demo app on every host. Each round deploys the next version with
-- `deployctl deploy production vN` (blue-green, no boot limit) and times
-- the whole command: start-up, recovery check, preflight, starts over ssh,
-- health, switch, stops. Connections are counted where they arrive: the
-- "Accepted publickey" lines of each host's sshd log.
--
-- Prints, per host count, the median wall time, its ratio to one host
-- (target: 10 hosts <= 1.5x), the SSH connections per host per
-- deployment (target: 1), how busy the machine's CPUs were (every "host"
-- shares them here) and the CPU time of deployctl itself with the ssh
-- clients it ran (the deploy machine's share of the work).
package.path = "./?.lua;./spec/?.lua;" .. package.path

local build = arg[1] or "build"
local rounds = tonumber(arg[2]) or 3
local per_host = tonumber(arg[3]) or 2
local function abs(p) return p:sub(1, 1) == "/" and p or (io.popen("pwd"):read("l") .. "/" .. p) end
build = abs(build)
-- fixtures read the build directory from the environment: a child sees it.
if os.getenv("DEPLOY_BUILD_DIR") ~= build then
  local self = arg[0]
  local ok, _, code = os.execute(string.format("DEPLOY_BUILD_DIR=%q lua5.4 %q %q %d %d", build, self, build, rounds,
                                               per_host))
  os.exit(ok and 0 or code or 1)
end

local fixtures = require "spec.support.fixtures"
local hosts = require "spec.support.hosts"
local cli = require "spec.support.cli"

local q = fixtures.shell_quote

local ok, why = hosts.available()
if not ok then
  io.stderr:write("bench/hosts: cannot run here: ", why, "\n")
  os.exit(2)
end

local function now()
  local p = io.popen("date +%s.%N")
  local t = tonumber(p:read("l"))
  p:close()
  return t
end

-- Busy and total CPU time of the whole machine so far (jiffies), from
-- /proc/stat: every "host" here shares this machine's cores.
local function cpu()
  local line = fixtures.read_file("/proc/stat"):match("^cpu%s+([^\n]+)")
  local v = {}
  for n in line:gmatch("%d+") do v[#v + 1] = tonumber(n) end
  local idle = v[4] + (v[5] or 0)
  local total = 0
  for _, x in ipairs(v) do total = total + x end
  return total - idle, total
end

local function accepts(h)
  local n = 0
  for _ in (fixtures.read_file(h.log) or ""):gmatch("Accepted publickey") do n = n + 1 end
  return n
end

local function median(v)
  table.sort(v)
  return v[(#v + 1) // 2]
end

local results = {}
local net = hosts.create{ count = 10 }
local function run()
  for _, n in ipairs{ 1, 3, 10 } do
    local dir = fixtures.tmpdir("bench-hosts")
    local lb = fixtures.haproxy{ wrap = function(c) return net:wrap(c) end, bind = "10.213.0.1" }
    local names = {}
    for i = 1, n do names[i] = net.hosts[i].name end
    local cfg = {
      state = dir .. "/state.db",
      targets = { production = {
        instances = per_host,
        hosts = names,
        provider = {
          kind = "ssh",
          command = fixtures.demo_app() .. " --host {host} --port {port} --version {version} --unhealthy-file "
                    .. dir .. "/unhealthy-{version}",
          ports = "21000-21999", stop_timeout = 5, log_dir = dir .. "/logs",
          ssh_config = net.ssh_config, known_hosts = net.known_hosts, key = net.client_key, connect_timeout = 5,
        },
        router = { kind = "haproxy", socket = lb.socket, backend = lb.backend },
        health = { path = "/healthz", timeout = 1, interval = 0.1, failure_threshold = 3 },
      } },
    }
    local config = cli.write_config(dir, cfg)
    local busy, own = {}, {}
    local function deploy(version)
      local b0, t0j = cpu()
      local t0 = now()
      -- bash's `times`: the CPU of deployctl and of what it waited for
      -- (the ssh clients of its commands; not the masters' background
      -- halves).
      -- scale_down_delay = 0: blue stops right after the switch. Its
      -- default (30 s of blue kept warm) is a deliberate wait, the same
      -- for any number of hosts; this measures the work.
      local cmd = net:wrap("bash -c " .. q(q(cli.bin()) .. " --config " .. q(config) .. " deploy production "
                                           .. version .. " --set scale_down_delay=0 --quiet && times"))
      local out = io.popen(cmd .. " 2>&1")
      local text = out:read("a")
      local good = out:close()
      if not good then error("deploy " .. version .. " on " .. n .. " hosts failed: " .. text) end
      local b1, t1j = cpu()
      busy[#busy + 1] = (b1 - b0) / (t1j - t0j)
      local um, us, sm, ss = text:match("\n(%d+)m([%d.]+)s (%d+)m([%d.]+)s%s*$")
      own[#own + 1] = tonumber(um) * 60 + tonumber(us) + tonumber(sm) * 60 + tonumber(ss)
      return now() - t0
    end
    deploy("v0")  -- the blue side
    local times, conns = {}, {}
    for r = 1, rounds do
      local before = {}
      for i = 1, n do before[i] = accepts(net.hosts[i]) end
      times[r] = deploy("v" .. r)
      local total = 0
      for i = 1, n do total = total + accepts(net.hosts[i]) - before[i] end
      conns[r] = total / n
    end
    local m = median(times)
    table.remove(busy, 1)  -- the blue side's
    table.remove(own, 1)
    results[#results + 1] = { hosts = n, seconds = m, conns = median(conns), all = times, busy = median(busy),
                              own = median(own) }
    lb:stop()
    for _, pid in ipairs(fixtures.pids_matching(dir)) do fixtures.kill(pid, "KILL") end
  end
end
local ran, err = pcall(run)
net:destroy()
fixtures.cleanup()
if not ran then
  io.stderr:write("bench/hosts: ", tostring(err), "\n")
  os.exit(1)
end

print(string.format("blue-green, %d instances per host, median of %d rounds (no boot limit)", per_host, rounds))
print(string.format("%-6s %-9s %-11s %-22s %-9s %-16s %s", "hosts", "seconds", "ratio to 1", "ssh conns/host/deploy",
                    "CPU busy", "deployctl CPU s", "rounds"))
local base = results[1].seconds
for _, r in ipairs(results) do
  local all = {}
  for i, t in ipairs(r.all) do all[i] = string.format("%.2f", t) end
  print(string.format("%-6d %-9.2f %-11s %-22s %-9s %-16s %s", r.hosts, r.seconds, string.format("%.2fx", r.seconds / base),
                      string.format("%.2f", r.conns), string.format("%.0f %%", 100 * r.busy),
                      string.format("%.2f", r.own), table.concat(all, " ")))
end
local ten = results[#results]
print(string.format("target: 10 hosts <= 1.5x one host: %s (%.2fx); 1 ssh connection per host per deployment: %s",
                    ten.seconds / base <= 1.5 and "met" or "NOT met", ten.seconds / base,
                    ten.conns == 1 and results[2].conns == 1 and results[1].conns == 1 and "met" or "NOT met"))
