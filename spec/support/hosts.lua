-- Test hosts for the ssh specs: N "machines" on this one, each a network
-- namespace with its own address and its own sshd, behind a bridge in a
-- "control" namespace from which the code under test runs.
--
--   ctl namespace:   br0 10.213.0.1/24, fd42:d55::1/64
--                     |-- h1 (veth) --> host namespace h1: eth0 10.213.0.11, fd42:d55::11
--                     |-- h2 (veth) --> host namespace h2: eth0 10.213.0.12, ...
--
-- No link or address is made in the machine's own namespace, so nothing a
-- spec does reaches or disturbs the real network, and two runs side by side
-- (their namespaces carry the runner's pid) never see each other.
-- The hosts share this machine's filesystem and process table: a remote
-- command sees the same /tmp and the same build directory, and `ps` on a
-- "host" lists every process.
--
-- Each sshd: a host key made here, root login by key only, UsePAM no,
-- StrictModes no, its log in net.dir/hN/sshd.log. The client side gets a
-- key (net.client_key), a known_hosts with every host's key under its IPv4
-- and IPv6 address (net.known_hosts), and an ssh config (net.ssh_config)
-- with `Host h1` ... aliases (User root), meant for `ssh -F`.
--
--   local hosts = require "spec.support.hosts"
--   local ok, why = hosts.available()      -- false, reason: mark specs pending
--   local net = hosts.create{ count = 3 }  -- raises on failure, after undoing
--   net.hosts[1] --> { name = "h1", ns, addr, addr6, dest = "root@10.213.0.11", dir, log, pid }
--   net:exec("cmd")          -- runs in the control namespace: output, ok
--   net:wrap("cmd")          -- the shell text that runs cmd there (for fixtures.spawn)
--   net:host_exec(1, "cmd")  -- runs on host 1: output, ok
--   net:cut(1) / net:restore(1)                  -- link down / up
--   net:change_host_key(1) / net:restore_host_key(1)
--   net:destroy()            -- idempotent; also run for leftovers of crashed runs
--
-- Leftovers: create() first removes namespaces named dssh<pid>-* whose
-- <pid> is no longer a running Lua process (a run killed before teardown).
local fixtures = require "spec.support.fixtures"

local hosts = {}

local q = fixtures.shell_quote
local PREFIX = "dssh"
local SUBNET4 = "10.213.0."
local SUBNET6 = "fd42:d55::"
local SSHD = "/usr/sbin/sshd"

local function capture(cmd)
  local p = assert(io.popen(cmd .. " 2>&1", "r"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok == true
end

local function must(cmd, what)
  local out, ok = capture(cmd)
  if not ok then error("hosts: " .. (what or cmd) .. " failed: " .. out, 3) end
  return out
end

local function my_pid()
  return tonumber((capture("echo $PPID")))
end

local function is_lua(pid)
  local comm = fixtures.read_file("/proc/" .. pid .. "/comm") or ""
  return comm:match("^lua") ~= nil or comm:match("^busted") ~= nil
end

------------------------------------------------------------------------
-- Availability

local checked, available, reason

-- true, or false and why the specs cannot run here.
function hosts.available()
  if checked then return available, reason end
  checked = true
  local function no(why) available, reason = false, why return false, why end
  if (capture("id -u")):gsub("%s+", "") ~= "0" then
    return no("network namespaces need root (run the specs as root)")
  end
  if not capture("command -v ip >/dev/null && echo yes"):match("yes") then
    return no("no `ip` command (install iproute2: scripts/setup does)")
  end
  if not fixtures.read_file(SSHD) and not capture("test -x " .. SSHD .. " && echo yes"):match("yes") then
    return no(SSHD .. " is missing (install openssh-server: scripts/setup does)")
  end
  local name = PREFIX .. my_pid() .. "-probe"
  local out, ok = capture("ip netns add " .. name)
  capture("ip netns del " .. name)
  if not ok then
    return no("cannot create a network namespace (" .. out:gsub("%s+$", "")
              .. "): the specs need root with CAP_SYS_ADMIN, e.g. a privileged container")
  end
  available = true
  return true
end

------------------------------------------------------------------------
-- Leftovers

local function delete_ns(ns)
  -- Every process still in it (sshd, instances, ssh masters), then the
  -- namespace, which takes its links along.
  local pids = capture("ip netns pids " .. q(ns))
  for pid in pids:gmatch("%d+") do capture("kill -KILL " .. pid) end
  capture("ip netns del " .. q(ns))
end

-- Namespaces of runs whose Lua process is gone.
function hosts.cleanup_stale()
  local list = capture("ip netns list")
  for ns in list:gmatch("(%S+)[^\n]*\n?") do
    local pid = ns:match("^" .. PREFIX .. "(%d+)%-")
    if pid and not (fixtures.alive(tonumber(pid)) and is_lua(pid)) then delete_ns(ns) end
  end
end

------------------------------------------------------------------------
-- A set of hosts

local Net = {}
Net.__index = Net
local live = {}  -- nets not yet destroyed, for the sentinel below

function Net:wrap(cmd)
  return "ip netns exec " .. q(self.ctl) .. " " .. cmd
end

function Net:exec(cmd)
  return capture(self:wrap(cmd))
end

function Net:host_exec(i, cmd)
  return capture("ip netns exec " .. q(self.hosts[i].ns) .. " " .. cmd)
end

local function sshd_config(h, net)
  return table.concat({
    "Port 22",
    "ListenAddress " .. h.addr,
    "ListenAddress " .. h.addr6,
    "HostKey " .. h.dir .. "/host_key",
    "PidFile none",
    "AuthorizedKeysFile " .. net.dir .. "/authorized_keys",
    "UsePAM no",
    "StrictModes no",
    "PermitRootLogin prohibit-password",
    "PasswordAuthentication no",
    "KbdInteractiveAuthentication no",
    "PubkeyAuthentication yes",
    "UseDNS no",
    "PrintMotd no",
    "X11Forwarding no",
    -- sshd's default: the runner must keep its sessions per connection below.
    "MaxSessions 10",
    "MaxStartups 100",
    -- bash reads ~/.bashrc when run by sshd unless SHLVL says it is nested;
    -- these hosts share this machine's /root, whose .bashrc may be slow
    -- (pyenv init here: 0.5 s a command). The agent must not depend on it.
    -- Each host's own TMPDIR (the agent keeps port reservations there),
    -- removed with the rest at destroy().
    "SetEnv SHLVL=1 TMPDIR=" .. h.dir .. "/tmp",
    "LogLevel VERBOSE",
  }, "\n") .. "\n"
end

local function start_sshd(h)
  -- -E appends: only lines after this offset count as this start's.
  local before = #(fixtures.read_file(h.log) or "")
  h.pid = fixtures.spawn(string.format("exec ip netns exec %s %s -D -f %s -E %s",
                                       q(h.ns), SSHD, q(h.dir .. "/sshd_config"), q(h.log)))
  fixtures.wait_until(function()
    local log = (fixtures.read_file(h.log) or ""):sub(before + 1)
    if not fixtures.alive(h.pid) then
      error("hosts: sshd of " .. h.name .. " exited: " .. log, 0)
    end
    return log:find("Server listening on " .. h.addr6, 1, true)
       and log:find("Server listening on " .. h.addr, 1, true)
  end, 10, "sshd of " .. h.name)
end

local function stop_sshd(h)
  if h.pid then fixtures.stop(h.pid, 3) end
  h.pid = nil
end

local function keygen(path)
  os.remove(path)
  os.remove(path .. ".pub")
  must("ssh-keygen -q -t ed25519 -N '' -C '' -f " .. q(path), "ssh-keygen")
end

local function pubkey(path)
  return (fixtures.read_file(path .. ".pub") or ""):match("^(%S+%s+%S+)")
end

function Net:write_known_hosts()
  local lines = {}
  for _, h in ipairs(self.hosts) do
    local key = pubkey(h.dir .. "/host_key.recorded")
    lines[#lines + 1] = h.addr .. " " .. key
    lines[#lines + 1] = h.addr6 .. " " .. key
  end
  fixtures.write_file(self.known_hosts, table.concat(lines, "\n") .. "\n")
end

function Net:_add_host(i)
  local h = {
    name = "h" .. i,
    ns = self.prefix .. "-h" .. i,
    addr = SUBNET4 .. (10 + i),
    addr6 = SUBNET6 .. (10 + i),
    dir = self.dir .. "/h" .. i,
  }
  h.dest = "root@" .. h.addr
  h.log = h.dir .. "/sshd.log"
  self.hosts[i] = h
  must("mkdir -p " .. q(h.dir .. "/tmp"))
  must("ip netns add " .. q(h.ns))
  self.namespaces[#self.namespaces + 1] = h.ns
  must("ip -n " .. q(h.ns) .. " link set lo up")
  -- Both ends are created inside their namespaces: nothing appears in ours.
  must(string.format("ip link add name %s netns %s type veth peer name eth0 netns %s",
                     h.name, q(self.ctl), q(h.ns)))
  must(string.format("ip -n %s link set %s master br0 up", q(self.ctl), h.name))
  -- Linux flushes an interface's IPv6 addresses when its link goes down:
  -- cut() and restore() must leave the host as it was.
  must(string.format("ip netns exec %s sysctl -qw net.ipv6.conf.eth0.keep_addr_on_down=1", q(h.ns)))
  must(string.format("ip -n %s addr add %s/24 dev eth0", q(h.ns), h.addr))
  -- nodad: usable at once, no duplicate address detection delay.
  must(string.format("ip -n %s addr add %s/64 dev eth0 nodad", q(h.ns), h.addr6))
  must(string.format("ip -n %s link set eth0 up", q(h.ns)))
  keygen(h.dir .. "/host_key")
  -- What known_hosts records: change_host_key replaces host_key only.
  must(string.format("cp %s %s && cp %s %s", q(h.dir .. "/host_key"), q(h.dir .. "/host_key.recorded"),
                     q(h.dir .. "/host_key.pub"), q(h.dir .. "/host_key.recorded.pub")))
  fixtures.write_file(h.dir .. "/sshd_config", sshd_config(h, self))
  start_sshd(h)
end

function Net:_build(count)
  must("mkdir -p /run/sshd")  -- sshd's privilege separation directory
  must("ip netns add " .. q(self.ctl))
  self.namespaces[#self.namespaces + 1] = self.ctl
  local n = "ip -n " .. q(self.ctl) .. " "
  must(n .. "link set lo up")
  must(n .. "link add br0 type bridge")
  must(n .. "addr add " .. SUBNET4 .. "1/24 dev br0")
  must(n .. "addr add " .. SUBNET6 .. "1/64 dev br0 nodad")
  must(n .. "link set br0 up")
  keygen(self.client_key)
  must(string.format("cp %s %s", q(self.client_key .. ".pub"), q(self.dir .. "/authorized_keys")))
  for i = 1, count do self:_add_host(i) end
  self:write_known_hosts()
  local cfg = {}
  for _, h in ipairs(self.hosts) do
    cfg[#cfg + 1] = "Host " .. h.name .. "\n  HostName " .. h.addr .. "\n  User root\n"
  end
  fixtures.write_file(self.ssh_config, table.concat(cfg, "\n"))
  -- The bridge forwards once its ports are up; wait until every host
  -- answers on port 22 from the control namespace.
  for _, h in ipairs(self.hosts) do
    fixtures.wait_until(function()
      local _, ok = self:exec(string.format("bash -c 'exec 3<>/dev/tcp/%s/22' 2>/dev/null", h.addr))
      return ok
    end, 10, "port 22 of " .. h.name .. " from the control namespace")
  end
end

-- Cuts host i off the bridge (its end of the link down): connections to it
-- time out, as to a machine that dropped off the network.
function Net:cut(i)
  must(string.format("ip -n %s link set eth0 down", q(self.hosts[i].ns)))
end

function Net:restore(i)
  local h = self.hosts[i]
  must(string.format("ip -n %s link set eth0 up", q(h.ns)))
  fixtures.wait_until(function()
    local _, ok = self:exec(string.format("bash -c 'exec 3<>/dev/tcp/%s/22' 2>/dev/null", h.addr))
    return ok
  end, 10, "port 22 of " .. h.name .. " after restoring its link")
end

-- Host i gets a new host key (as after a reinstall, or a machine in the
-- middle); known_hosts still has the old one.
function Net:change_host_key(i)
  local h = self.hosts[i]
  stop_sshd(h)
  keygen(h.dir .. "/host_key")
  start_sshd(h)
end

function Net:restore_host_key(i)
  local h = self.hosts[i]
  stop_sshd(h)
  must(string.format("cp %s %s", q(h.dir .. "/host_key.recorded"), q(h.dir .. "/host_key")))
  start_sshd(h)
end

function Net:destroy()
  if self.destroyed then return end
  self.destroyed = true
  for _, h in ipairs(self.hosts) do stop_sshd(h) end
  for i = #self.namespaces, 1, -1 do delete_ns(self.namespaces[i]) end
  for i, n in ipairs(live) do
    if n == self then table.remove(live, i) break end
  end
  if self.dir:match("^/tmp/deployctl%-[%w_.-]+$") then capture("rm -rf " .. q(self.dir)) end
end

-- opts.count: how many hosts (default 3). Raises (after undoing what it
-- made) when a step fails.
function hosts.create(opts)
  opts = opts or {}
  local ok, why = hosts.available()
  if not ok then error("hosts: " .. why, 2) end
  hosts.cleanup_stale()
  local dir = fixtures.tmpdir("hosts")
  local prefix = PREFIX .. my_pid()
  for ns in capture("ip netns list"):gmatch("(%S+)[^\n]*\n?") do
    -- This runner's own namespaces from an earlier create() it never destroyed.
    if ns:sub(1, #prefix + 1) == prefix .. "-" then delete_ns(ns) end
  end
  local net = setmetatable({
    prefix = prefix, ctl = prefix .. "-ctl", dir = dir, hosts = {}, namespaces = {},
    client_key = dir .. "/client_key", known_hosts = dir .. "/known_hosts",
    ssh_config = dir .. "/ssh_config",
  }, Net)
  live[#live + 1] = net
  local built, err = pcall(net._build, net, opts.count or 3)
  if not built then
    net:destroy()
    error(err, 2)
  end
  return net
end

-- Last resort when a spec forgot destroy(): runs when the Lua state closes.
hosts._sentinel = setmetatable({}, { __gc = function()
  for i = #live, 1, -1 do pcall(live[i].destroy, live[i]) end
end })

return hosts
