-- Fixtures for the busted specs: the demo app, a real HAProxy with its
-- runtime API, a real nginx, free ports, background processes, wrk load,
-- and config builders shaped like DESIGN.md's Configuration.
--
-- Plain Lua 5.4 plus io.popen/os.execute; specs run from the repo root:
--   lua5.4 /usr/bin/busted --cpath='build/?.so' spec
--
-- Everything started or created here is registered and undone by
-- fixtures.cleanup(); call it from an after_each/teardown (or `finally`).
-- Processes started by the code under test are caught too when their
-- command line names one of our temporary directories (target_config puts
-- its directory into the demo app's --unhealthy-file).
--
-- Sleeping is only ever a poll interval while waiting for something to
-- become ready (wait_until); a spec never sleeps to let time pass.

local fixtures = {}

local POLL_S = 0.02

-- Registries of what we started, undone by cleanup().
local started_pids = {}  -- pid -> true
local haproxies = {}     -- list of HAProxy handles still running
local nginxes = {}       -- list of nginx handles still running
local created_dirs = {}  -- list of paths
local handed_out_ports = {} -- port -> true, so two calls never collide

------------------------------------------------------------------------
-- Shell helpers

local function q(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end
fixtures.shell_quote = q

-- Runs a shell command, returns its stdout and whether it exited 0.
local function capture(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok == true
end

local function run(cmd)
  return os.execute(cmd) == true
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end
fixtures.read_file = read_file

local function write_file(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
end
fixtures.write_file = write_file

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

------------------------------------------------------------------------
-- Paths

local root_dir

-- Env assignments for a lua5.4 (or busted) child that loads this build's
-- deploy.so: under the sanitizer build it needs the ASan runtime preloaded
-- again (spec/support/sanitizer.lua drops the preload for every child).
function fixtures.lua_child_env()
  local preload = os.getenv("LD_PRELOAD")
  if preload and preload:find("asan", 1, true) then return "LD_PRELOAD=" .. q(preload) .. " " end
  return ""
end

function fixtures.root()
  if not root_dir then
    root_dir = capture("pwd"):gsub("%s+$", "")
  end
  return root_dir
end

function fixtures.build_dir()
  local dir = os.getenv("DEPLOY_BUILD_DIR")
  if dir == nil or dir == "" then dir = "build" end
  return dir
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  return fixtures.root() .. "/" .. path
end

function fixtures.demo_app()
  local path = absolute(fixtures.build_dir() .. "/demo-app")
  if not exists(path) then
    error("fixtures: " .. path .. " not found; build it with "
          .. "`cmake --build " .. fixtures.build_dir() .. " --target demo-app`", 2)
  end
  return path
end

------------------------------------------------------------------------
-- Time and processes

-- Seconds since boot, 10 ms resolution, without forking anything.
function fixtures.now()
  local s = read_file("/proc/uptime")
  return tonumber(s:match("^(%S+)"))
end

function fixtures.sleep(s)
  os.execute("sleep " .. string.format("%.3f", s))
end

function fixtures.wait_until(fn, timeout_s, what)
  local deadline = fixtures.now() + (timeout_s or 5)
  while true do
    local v = fn()
    if v then return v end
    if fixtures.now() >= deadline then
      error("timed out waiting for " .. (what or "a condition")
            .. " (" .. (timeout_s or 5) .. " s)", 2)
    end
    fixtures.sleep(POLL_S)
  end
end

-- State letter of /proc/PID/stat (R, S, D, Z, ...), nil when gone. The
-- command name in field 2 may hold spaces or parens: read after the last ')'.
local function proc_state(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then return nil end
  return stat:match("^.*%)%s+(%S)")
end

function fixtures.alive(pid)
  if not pid then return false end
  if not run("kill -0 " .. pid .. " 2>/dev/null") then return false end
  local state = proc_state(pid)
  return state ~= nil and state ~= "Z" and state ~= "X"
end

function fixtures.kill(pid, sig)
  return run(string.format("kill -%s %d 2>/dev/null", tostring(sig or "TERM"), pid))
end

-- Waits (a readiness wait: for the process to be gone) up to timeout_s.
function fixtures.wait_exit(pid, timeout_s)
  local deadline = fixtures.now() + (timeout_s or 5)
  while fixtures.alive(pid) do
    if fixtures.now() >= deadline then return false end
    fixtures.sleep(POLL_S)
  end
  return true
end

-- TERM, then KILL after grace_s. True when the process is gone.
function fixtures.stop(pid, grace_s)
  if not fixtures.alive(pid) then
    started_pids[pid] = nil
    return true
  end
  fixtures.kill(pid, "TERM")
  if not fixtures.wait_exit(pid, grace_s or 3) then
    fixtures.kill(pid, "KILL")
    fixtures.wait_exit(pid, 2)
  end
  started_pids[pid] = nil
  return not fixtures.alive(pid)
end

-- Starts cmd in the background (stdin from /dev/null, stdout and stderr to
-- logfile, appended when append is true) and returns its pid. For a simple
-- command the pid is the program's own; a compound command gets the pid of
-- the subshell running it.
local function spawn(cmd, logfile, append)
  logfile = logfile or "/dev/null"
  local line = string.format("%s %s %s 2>&1 </dev/null & echo $!",
                             cmd, append and ">>" or ">", q(logfile))
  local out = capture(line)
  local pid = tonumber(out:match("(%d+)"))
  if not pid then error("fixtures: could not start: " .. cmd, 3) end
  started_pids[pid] = true
  return pid
end

function fixtures.spawn(cmd, logfile)
  return spawn(cmd, logfile, false)
end

local function my_pid()
  -- The shell's parent is this Lua process.
  return tonumber((capture("echo $PPID")))
end

-- Pids whose command line (NULs read as spaces) contains pattern, plain
-- text. Zombies (empty command line) and this process are left out.
function fixtures.pids_matching(pattern)
  local self = my_pid()
  local pids = {}
  local listing = capture("ls -1 /proc")
  for name in listing:gmatch("(%d+)\n") do
    local pid = tonumber(name)
    if pid ~= self then
      local cmdline = read_file("/proc/" .. name .. "/cmdline")
      if cmdline and cmdline ~= "" then
        cmdline = cmdline:gsub("%z", " ")
        if cmdline:find(pattern, 1, true) then pids[#pids + 1] = pid end
      end
    end
  end
  table.sort(pids)
  return pids
end

------------------------------------------------------------------------
-- Directories

function fixtures.tmpdir(name)
  name = tostring(name or "spec"):gsub("[^%w_.-]", "_")
  local out, ok = capture("mktemp -d " .. q("/tmp/deployctl-" .. name .. "-XXXXXX"))
  local dir = out:gsub("%s+$", "")
  if not ok or dir == "" then error("fixtures: mktemp -d failed", 2) end
  created_dirs[#created_dirs + 1] = dir
  return dir
end

------------------------------------------------------------------------
-- Ports

local function random_u32()
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(4)
  f:close()
  return (string.unpack("<I4", bytes))
end

-- Ports we may hand out: below the kernel's ephemeral range when there is
-- room there (outgoing connections never take them), else 30000-60000.
local function port_window()
  local s = read_file("/proc/sys/net/ipv4/ip_local_port_range") or ""
  local low = tonumber(s:match("^%s*(%d+)"))
  if low and low - 1 - 20000 >= 1000 then return 20000, low - 1 end
  return 30000, 60000
end

-- Local ports of every TCP socket on the machine, in any state.
local function ports_in_use()
  local used = {}
  local out = capture("ss -Htan 2>/dev/null")
  for line in out:gmatch("[^\n]+") do
    local _, _, _, localaddr = line:match("^(%S+)%s+(%S+)%s+(%S+)%s+(%S+)")
    local port = localaddr and tonumber(localaddr:match(":(%d+)$"))
    if port then used[port] = true end
  end
  return used
end

local function pick_range(n)
  local lo, hi = port_window()
  local used = ports_in_use()
  for _ = 1, 200 do
    local low = lo + random_u32() % (hi - lo + 1 - n + 1)
    local free = true
    for p = low, low + n - 1 do
      if used[p] or handed_out_ports[p] then free = false break end
    end
    if free then
      for p = low, low + n - 1 do handed_out_ports[p] = true end
      return low, low + n - 1
    end
  end
  error("fixtures: no " .. n .. " consecutive free ports in " .. lo .. "-" .. hi, 3)
end

function fixtures.free_port()
  return (pick_range(1))
end

-- "LOW-HIGH" of n consecutive free ports (also returns low, high).
function fixtures.port_range(n)
  local low, high = pick_range(n or 10)
  return low .. "-" .. high, low, high
end

------------------------------------------------------------------------
-- HTTP through curl

local SEP = "\n@@fixtures:%{http_code}@@\n"

-- One GET; returns the status (0 when no response) and the body.
function fixtures.http_get(url, timeout_s)
  local out = capture(string.format("curl -s -m %g -o - -w %s %s",
                                    timeout_s or 5, q(SEP), q(url)))
  local body, code = out:match("^(.*)\n@@fixtures:(%d+)@@\n$")
  if not code then return 0, out end
  return tonumber(code), body
end

-- n sequential GETs of url over one curl (one keep-alive connection when
-- the server allows it). Returns version -> count for 2xx answers (the
-- body, trailing newline dropped) and the number of other outcomes,
-- failed connections included. wrap (optional) turns a command into one
-- run elsewhere (a network namespace: hosts.lua's net:wrap).
-- args (optional): more curl arguments, each a string, e.g. { "-H",
-- "X-Canary: always" } or { "-b", jar, "-c", jar } (a cookie jar that the
-- requests of one call share, as one browser would).
local function fetch_all(url, n, wrap, args)
  -- curl's URL globbing: /?[1-n] is n URLs, the query is ignored by the app.
  local glob = url .. (url:find("?", 1, true) and "&" or "?") .. "[1-" .. n .. "]"
  local extra = ""
  for _, a in ipairs(args or {}) do extra = extra .. " " .. q(a) end
  local cmd = string.format("curl -s -m %d%s -o - -w %s %s", 10 + n // 20, extra, q(SEP), q(glob))
  local out = capture(wrap and wrap(cmd) or cmd)
  local list, pos = {}, 1
  while true do
    local s, e, code = out:find("\n@@fixtures:(%d+)@@\n", pos)
    if not s then break end
    list[#list + 1] = { code = tonumber(code), body = (out:sub(pos, s - 1):gsub("\n$", "")) }
    pos = e + 1
  end
  return list
end

function fixtures.sample_url(url, n, wrap, args)
  local counts, bad = {}, 0
  local list = fetch_all(url, n, wrap, args)
  for _, r in ipairs(list) do
    if r.code >= 200 and r.code < 300 then
      counts[r.body] = (counts[r.body] or 0) + 1
    else
      bad = bad + 1
    end
  end
  return counts, bad + (n - #list)
end

-- n GETs of url in order (one curl, see sample_url): the body of each 2xx
-- answer, "HTTP <code>" for any other, "no answer" for none.
function fixtures.sequence(url, n, args)
  local out = {}
  for i, r in ipairs(fetch_all(url, n, nil, args)) do
    out[i] = (r.code >= 200 and r.code < 300) and r.body or (r.code == 0 and "no answer" or ("HTTP " .. r.code))
  end
  for i = #out + 1, n do out[i] = "no answer" end
  return out
end

------------------------------------------------------------------------
-- Demo app

-- Starts build/demo-app and waits until it listens. opts: version (required),
-- port (default: a free one), unhealthy_file, delay_ms, dir (for the log).
-- Returns { pid, port, version, url, log }.
function fixtures.start_demo(opts)
  assert(type(opts) == "table" and opts.version, "start_demo{ version = ... } needs a version")
  local port = opts.port or fixtures.free_port()
  local dir = opts.dir or fixtures.tmpdir("demo")
  local log = dir .. "/demo-" .. opts.version:gsub("[^%w_.-]", "_") .. "-" .. port .. ".log"
  local cmd = string.format("exec %s --port %d --version %s", q(fixtures.demo_app()), port, q(opts.version))
  if opts.unhealthy_file then cmd = cmd .. " --unhealthy-file " .. q(opts.unhealthy_file) end
  if opts.delay_ms then cmd = cmd .. " --delay-ms " .. math.tointeger(opts.delay_ms) end
  local pid = spawn(cmd, log)
  local wanted = "listening on 127.0.0.1:" .. port
  fixtures.wait_until(function()
    if (read_file(log) or ""):find(wanted, 1, true) then return true end
    if not fixtures.alive(pid) then
      error("fixtures: demo-app exited: " .. (read_file(log) or ""), 0)
    end
  end, 5, "demo-app " .. opts.version .. " on port " .. port)
  return { pid = pid, port = port, version = opts.version, log = log,
           url = "http://127.0.0.1:" .. port }
end

------------------------------------------------------------------------
-- HAProxy

local function haproxy_bin()
  local env = os.getenv("HAPROXY")
  if env and env ~= "" then return env end
  local out, ok = capture("command -v haproxy 2>/dev/null")
  if ok and out:match("%S") then return (out:gsub("%s+$", "")) end
  return "/usr/sbin/haproxy"
end

local function haproxy_config(opts)
  local lines = {
    "global",
    "  stats socket " .. opts.socket .. " level admin",
    "  stats timeout 30s",
    "",
    "defaults",
    "  mode http",
    "  timeout connect 2s",
    "  timeout client 30s",
    "  timeout server 30s",
    "  option http-keep-alive",
    -- No `option redispatch`: a request sent to a dead server must fail
    -- visibly, not be quietly moved to another one.
  }
  if opts.stats_tcp then
    table.insert(lines, 3, "  stats socket ipv4@" .. opts.bind .. ":" .. opts.stats_tcp .. " level admin")
  end
  if opts.retries then lines[#lines + 1] = "  retries " .. opts.retries end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "frontend fe"
  lines[#lines + 1] = "  bind " .. opts.bind .. ":" .. opts.port
  lines[#lines + 1] = "  default_backend " .. opts.backend
  lines[#lines + 1] = ""
  lines[#lines + 1] = "backend " .. opts.backend
  lines[#lines + 1] = "  balance roundrobin"
  for _, l in ipairs(fixtures.haproxy_route_lines(opts.routes, opts.map)) do lines[#lines + 1] = "  " .. l end
  for i, s in ipairs(opts.servers or {}) do
    if type(s) == "string" then
      lines[#lines + 1] = "  server " .. s
    else
      lines[#lines + 1] = string.format("  server %s %s:%d weight %d",
        s.name or ("s" .. i), s.addr or "127.0.0.1", s.port, s.weight or 1)
    end
  end
  return table.concat(lines, "\n") .. "\n"
end

-- The lines README ("Routing beyond weights") has a backend add for
-- deployctl's routes, for map file `map`: routes.cookie (sticky canaries),
-- routes.header or routes.test_cookie (testers), and always maintenance.
-- {} when routes is nil.
function fixtures.haproxy_route_lines(routes, map)
  if not routes then return {} end
  local m = "map(" .. map .. ")"
  local lines = {
    'http-request return status 503 content-type "text/html; charset=utf-8" lf-string "%[str(maintenance),' .. m
      .. ']" hdr Retry-After "%[str(retry_after),' .. m .. ']" if { str(maintenance),' .. m .. ' -m found }',
  }
  if routes.cookie then
    lines[#lines + 1] = "cookie " .. routes.cookie .. " dynamic"
    lines[#lines + 1] = "dynamic-cookie-key deployctl-spec"
    lines[#lines + 1] = "ignore-persist if { req.cook(" .. routes.cookie .. ") -m found } !{ req.cook(" .. routes.cookie
      .. ")," .. m .. " -m str sticky }"
    lines[#lines + 1] = 'http-response add-header Set-Cookie "%[srv_name,' .. m .. ']" if { srv_name,' .. m
      .. ' -m found }'
  end
  if routes.header or routes.test_cookie then
    local fetch = routes.header and ("req.hdr(" .. routes.header .. ")") or ("req.cook(" .. routes.test_cookie .. ")")
    lines[#lines + 1] = "server deployctl-test 127.0.0.1:1 weight 0 disabled"
    lines[#lines + 1] = "use-server deployctl-test if { " .. fetch .. "," .. m .. " -m str test_route }"
  end
  return lines
end

local Haproxy = {}
Haproxy.__index = Haproxy

local function socket_answers(sock)
  return run(string.format("echo 'show info' | socat -t2 - UNIX-CONNECT:%s >/dev/null 2>&1", q(sock)))
end

function Haproxy:_start()
  local cmd = string.format("%s -db -f %s", q(haproxy_bin()), q(self.config))
  self.pid = spawn("exec " .. (self.wrap and self.wrap(cmd) or cmd), self.log, true)
  fixtures.wait_until(function()
    if not fixtures.alive(self.pid) then
      error("fixtures: haproxy exited at start-up:\n" .. (read_file(self.log) or ""), 0)
    end
    return socket_answers(self.socket)
  end, 5, "haproxy's admin socket " .. self.socket)
end

-- Runs one runtime API command and returns HAProxy's answer, as is.
function Haproxy:cmd(text)
  local out = capture(string.format("printf '%%s\\n' %s | socat -t5 - UNIX-CONNECT:%s 2>&1",
                                    q(text), q(self.socket)))
  return out
end

-- What HAProxy 2.6 answers when a state-changing command worked: an empty
-- line for most, a confirmation for adding and deleting servers.
local CMD_SUCCESS = { [""] = true, ["New server registered."] = true, ["Server deleted."] = true }

-- Like cmd, but raises unless the answer says the command worked.
function Haproxy:cmd_ok(text)
  local out = self:cmd(text)
  if not CMD_SUCCESS[out:match("^%s*(.-)%s*$")] then
    error("haproxy: '" .. text .. "' failed: " .. out:gsub("%s+$", ""), 2)
  end
  return out
end

-- `show servers state <backend>` as a list of
-- { name, addr, port, weight (uweight), iweight, op_state, admin_state }.
-- op_state: 0 stopped, 1 starting, 2 running, 3 stopping. admin_state is a
-- bit field: 0x01 forced maintenance, 0x08 forced drain, 0 = ready.
function Haproxy:servers()
  local out = self:cmd("show servers state " .. self.backend)
  local columns, list = nil, {}
  for line in out:gmatch("[^\n]+") do
    if line:match("^#") then
      columns = {}
      for name in line:sub(2):gmatch("%S+") do columns[#columns + 1] = name end
    elseif columns then
      local row, i = {}, 0
      for field in line:gmatch("%S+") do
        i = i + 1
        row[columns[i] or i] = field
      end
      if row.srv_name then
        list[#list + 1] = {
          name = row.srv_name,
          addr = row.srv_addr,
          port = tonumber(row.srv_port),
          weight = tonumber(row.srv_uweight),
          iweight = tonumber(row.srv_iweight),
          op_state = tonumber(row.srv_op_state),
          admin_state = tonumber(row.srv_admin_state),
        }
      end
    end
  end
  return list
end

function Haproxy:url(path)
  return "http://" .. self.bind .. ":" .. self.port .. (path or "/")
end

-- One GET through the frontend: status (0 when no answer), body.
function Haproxy:get(path)
  return fixtures.http_get(self:url(path))
end

-- n sequential GETs of `path` (default /) through the frontend, one curl.
-- Returns { [version] = count } of 2xx answers and the count of the rest.
function Haproxy:sample(n, path, args)
  return fixtures.sample_url(self:url(path), n, self.client_wrap, args)
end

-- kill -9, then start again with the same config and port: runtime
-- changes (added servers, weights) are gone, as after a real crash.
function Haproxy:restart()
  if self.pid then
    fixtures.kill(self.pid, "KILL")
    fixtures.wait_exit(self.pid, 5)
    started_pids[self.pid] = nil
  end
  self:_start()
  return self
end

function Haproxy:stop()
  if self.pid then
    fixtures.stop(self.pid, 3)
    self.pid = nil
  end
  for i, h in ipairs(haproxies) do
    if h == self then table.remove(haproxies, i) break end
  end
end

-- opts: backend (default "app"), servers (nil: none; else a list of
-- { name, addr, port, weight } or raw "name addr:port ..." strings),
-- retries (default: HAProxy's), port (default: a free one), routes (the
-- backend gets README's lines for deployctl's routes, see
-- haproxy_route_lines, and an empty map file, self.map).
-- Elsewhere than this machine's 127.0.0.1: bind (the frontend's address,
-- also the TCP stats socket's), wrap (runs HAProxy there: a function from
-- a command to the command that runs it, e.g. in a network namespace),
-- client_wrap (the same for the curl of sample()), stats_tcp (a port for
-- `stats socket ipv4@bind:PORT`, self.stats_tcp).
function fixtures.haproxy(opts)
  opts = opts or {}
  local dir = fixtures.tmpdir("haproxy")
  local self = setmetatable({
    dir = dir,
    port = opts.port or fixtures.free_port(),
    bind = opts.bind or "127.0.0.1",
    socket = dir .. "/admin.sock",
    backend = opts.backend or "app",
    config = dir .. "/haproxy.cfg",
    log = dir .. "/haproxy.log",
    wrap = opts.wrap,
    client_wrap = opts.client_wrap,
    stats_tcp = opts.stats_tcp,
  }, Haproxy)
  if opts.routes then
    -- deployctl's map: an empty file HAProxy loads, filled at runtime
    self.map = dir .. "/" .. self.backend .. ".map"
    write_file(self.map, "")
  end
  write_file(self.config, haproxy_config{
    socket = self.socket, port = self.port, backend = self.backend, bind = self.bind,
    servers = opts.servers, retries = opts.retries, stats_tcp = opts.stats_tcp,
    routes = opts.routes, map = self.map,
  })
  haproxies[#haproxies + 1] = self
  self:_start()
  return self
end

------------------------------------------------------------------------
-- nginx
--
-- A real nginx (the Debian binary) started as root with its own conf,
-- pid, error log and temp paths in a temp dir, in the foreground
-- (`daemon off`, so the pid we spawn is the master), two workers. Its
-- http block includes <dir>/sites/*.conf: each site (Nginx:site) is one
-- target's upstream include, owned by the router, plus a frontend on a
-- free 127.0.0.1 port that proxies to that upstream. Sites let one nginx
-- serve every spec of a file.

local function nginx_bin()
  local env = os.getenv("NGINX")
  if env and env ~= "" then return env end
  return "/usr/sbin/nginx"
end
fixtures.nginx_bin = nginx_bin

-- The include the router writes for an empty server list (runtime/nginx.c,
-- render), generation 0: what an operator creates before nginx first starts.
function fixtures.nginx_empty_include(upstream, dir)
  local var = "deployctl_" .. upstream:gsub("[-.]", "_")
  return table.concat({
    "# deployctl nginx router: upstream " .. upstream .. ", generation 0.",
    "# Every apply rewrites this file: do not edit it.",
    "upstream " .. upstream .. " {",
    "    server 127.0.0.1:1 down;  # (none)",
    "}",
    "map $host $" .. var .. " {",
    "    default " .. upstream .. ";",
    "}",
    "map $upstream_addr $" .. var .. "_cookie {",
    '    default "";',
    "}",
    "server {",
    "    listen unix:" .. dir .. "/" .. upstream .. ".gen.sock;",
    "    access_log off;",
    "    location / { return 200 \"0\"; }",
    "}",
  }, "\n") .. "\n"
end

local Nginx = {}
Nginx.__index = Nginx

function Nginx:_conf()
  local d = self.dir
  local lines = {
    "worker_processes 2;",
    "pid " .. self.pid_file .. ";",
    "error_log " .. self.log .. " notice;",
    "events { worker_connections 1024; }",
    "http {",
    "  access_log off;",
    "  client_body_temp_path " .. d .. "/tmp/body;",
    "  proxy_temp_path " .. d .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. d .. "/tmp/fastcgi;",
    "  uwsgi_temp_path " .. d .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. d .. "/tmp/scgi;",
  }
  for _, l in ipairs(self.http) do lines[#lines + 1] = "  " .. l end
  -- The fixture's own server: its answer says which reload the workers run.
  lines[#lines + 1] = "  server { listen 127.0.0.1:" .. self.port
                      .. "; location / { return 200 \"fixture " .. self.generation .. "\"; } }"
  lines[#lines + 1] = "  include " .. d .. "/sites/*.conf;"
  lines[#lines + 1] = "}"
  return table.concat(lines, "\n") .. "\n"
end

-- Worker pids of the master (its children, from /proc).
function Nginx:workers()
  if not self.pid then return {} end
  local list = {}
  local s = read_file("/proc/" .. self.pid .. "/task/" .. self.pid .. "/children") or ""
  for pid in s:gmatch("%d+") do list[#list + 1] = tonumber(pid) end
  return list
end

function Nginx:_answers_generation()
  local code, body = fixtures.http_get("http://127.0.0.1:" .. self.port .. "/", 2)
  return code == 200 and body == "fixture " .. self.generation
end

function Nginx:_start()
  self.pid = spawn(string.format("exec %s -c %s -g 'daemon off;'", q(nginx_bin()), q(self.conf)),
                   self.dir .. "/nginx.out", true)
  fixtures.wait_until(function()
    if not fixtures.alive(self.pid) then
      error("fixtures: nginx exited at start-up:\n" .. (read_file(self.dir .. "/nginx.out") or "")
            .. (read_file(self.log) or ""), 0)
    end
    return (read_file(self.pid_file) or ""):match("^(%d+)") == tostring(self.pid)
           and self:_answers_generation()
  end, 10, "nginx on 127.0.0.1:" .. self.port)
end

-- Rewrites nginx.conf (after changing self.http) and reloads; returns once
-- every worker of the previous generation has exited, so the next
-- connection certainly meets the new configuration. ready (optional) is
-- enough instead: e.g. a new site's port answers.
function Nginx:reload(ready)
  self.generation = self.generation + 1
  write_file(self.conf, self:_conf())
  local old = self:workers()
  fixtures.kill(self.pid, "HUP")
  fixtures.wait_until(function()
    if ready then return ready() end
    if not self:_answers_generation() then return false end
    for _, pid in ipairs(old) do if fixtures.alive(pid) then return false end end
    return true
  end, 10, "nginx to reload (generation " .. self.generation .. ")")
end

-- `nginx -t` on the current files: ok, and what nginx said.
function Nginx:test()
  local out, ok = capture(string.format("%s -t -c %s 2>&1", q(nginx_bin()), q(self.conf)))
  return ok, out
end

-- A new target behind this nginx: upstream `name` (default app<N>) in an
-- include of its own, in the router's empty form, and a frontend on a
-- free port. Reloads nginx. Returns the site. opts.routes: the frontend
-- proxies as README's "Routing beyond weights" says (to $deployctl_NAME,
-- with its Set-Cookie), so testers' routes and sticky canaries work.
function Nginx:site(name, opts)
  opts = opts or {}
  self.nsites = self.nsites + 1
  name = name or ("app" .. self.nsites)
  local site = setmetatable({
    nginx = self, upstream = name, port = fixtures.free_port(),
    include = self.dir .. "/upstreams/" .. name .. ".conf",
  }, fixtures.NginxSite)
  write_file(site.include, fixtures.nginx_empty_include(name, self.dir .. "/upstreams"))
  write_file(self.dir .. "/sites/" .. name .. ".conf", table.concat({
    "include " .. site.include .. ";",
    "server {",
    "  listen 127.0.0.1:" .. site.port .. ";",
    -- A request to a dead instance fails visibly, not quietly retried on
    -- another (as the HAProxy fixture has no `option redispatch`).
    opts.routes
      and ("  location / { proxy_pass http://$deployctl_" .. name:gsub("[-.]", "_") .. "; proxy_next_upstream off;"
           .. " add_header Set-Cookie $deployctl_" .. name:gsub("[-.]", "_") .. "_cookie; }")
      or ("  location / { proxy_pass http://" .. name .. "; proxy_next_upstream off; }"),
    "}",
  }, "\n") .. "\n")
  -- Any answer (502: no server yet) means the new site is loaded.
  self:reload(function() return (site:get("/")) ~= 0 end)
  return site
end

function Nginx:stop()
  if self.pid then
    local workers = self:workers()
    fixtures.stop(self.pid, 3)
    -- Workers outlive a master that had to be killed: never leave them.
    for _, pid in ipairs(workers) do fixtures.stop(pid, 1) end
    self.pid = nil
  end
  for i, n in ipairs(nginxes) do
    if n == self then table.remove(nginxes, i) break end
  end
end

-- opts: http (list of extra directives for the http block, e.g.
-- { "keepalive_timeout 0;" }). Torn down by fixtures.cleanup() unless it
-- is kept there (cleanup{ keep = { n } }).
function fixtures.nginx(opts)
  opts = opts or {}
  local dir = fixtures.tmpdir("nginx")
  -- Workers run as nobody and must reach the temp paths under dir.
  run("chmod 755 " .. q(dir) .. " && mkdir -p " .. q(dir .. "/sites") .. " " .. q(dir .. "/upstreams")
      .. " " .. q(dir .. "/tmp"))
  local self = setmetatable({
    dir = dir, conf = dir .. "/nginx.conf", pid_file = dir .. "/nginx.pid",
    log = dir .. "/error.log", port = fixtures.free_port(), generation = 1,
    http = opts.http or {}, nsites = 0,
  }, Nginx)
  write_file(self.conf, self:_conf())
  nginxes[#nginxes + 1] = self
  self:_start()
  return self
end

local NginxSite = {}
NginxSite.__index = NginxSite
fixtures.NginxSite = NginxSite

function NginxSite:url(path)
  return "http://127.0.0.1:" .. self.port .. (path or "/")
end

function NginxSite:get(path)
  return fixtures.http_get(self:url(path))
end

-- n sequential GETs through the frontend, one curl (see sample_url).
function NginxSite:sample(n, path, args)
  return fixtures.sample_url(self:url(path), n, nil, args)
end

-- The router table for this site (DESIGN.md, Configuration).
function NginxSite:router()
  return { kind = "nginx", include = self.include, upstream = self.upstream,
           conf = self.nginx.conf, pid = self.nginx.pid_file, nginx = nginx_bin() }
end

-- The include as nginx would read it now.
function NginxSite:include_text()
  return read_file(self.include)
end

-- { [name] = weight } of the servers in the include ("down" is 0).
function NginxSite:weights()
  local w = {}
  local text = read_file(self.include) or ""
  -- the weighted upstream only: the first block
  local block = text:match("\nupstream [^\n]* {\n(.-)\n}") or ""
  for addr, what, name in ("\n" .. block):gmatch("\n    server (%S+) ([^;]-);  # (%S+)") do
    if name ~= "(none)" and name ~= "(maintenance)" then w[name] = tonumber(what:match("^weight=(%d+)")) or 0 end
  end
  return w
end

------------------------------------------------------------------------
-- Prometheus
--
-- Debian's prometheus, its data in a temp dir, listening on a free
-- 127.0.0.1 port, scraping /metrics of every "host:port" in opts.targets
-- every opts.scrape_interval (default "1s"). The targets may listen or not:
-- give the whole port range of a target, and whatever instance runs there
-- is scraped. Returns once its targets are active (Prometheus applies a
-- new target list up to 5 s after start).

local Prometheus = {}
Prometheus.__index = Prometheus

local function prometheus_bin()
  local env = os.getenv("PROMETHEUS")
  if env and env ~= "" then return env end
  return "/usr/bin/prometheus"
end

-- An instant query; returns the decoded answer (cjson) and the raw text.
function Prometheus:query(promql)
  local cjson = require "cjson"
  local out = capture(string.format("curl -s -m 5 -G --data-urlencode %s %s", q("query=" .. promql),
                                    q(self.url .. "/api/v1/query")))
  local ok, doc = pcall(cjson.decode, out)
  return ok and doc or nil, out
end

function Prometheus:stop()
  if self.pid then
    fixtures.stop(self.pid, 5)
    self.pid = nil
  end
end

function fixtures.prometheus(opts)
  opts = opts or {}
  local dir = fixtures.tmpdir("prometheus")
  local port = fixtures.free_port()
  local targets = {}
  for _, t in ipairs(opts.targets or {}) do targets[#targets + 1] = "'" .. t .. "'" end
  write_file(dir .. "/prometheus.yml", table.concat({
    "global:",
    "  scrape_interval: " .. (opts.scrape_interval or "1s"),
    "  scrape_timeout: " .. (opts.scrape_interval or "1s"),
    "  evaluation_interval: " .. (opts.scrape_interval or "1s"),
    "scrape_configs:",
    "  - job_name: demo",
    "    static_configs:",
    "      - targets: [" .. table.concat(targets, ", ") .. "]",
  }, "\n") .. "\n")
  local self = setmetatable({ dir = dir, port = port, url = "http://127.0.0.1:" .. port }, Prometheus)
  self.pid = spawn(string.format("exec %s --config.file=%s --storage.tsdb.path=%s --web.listen-address=127.0.0.1:%d "
                                 .. "--log.level=warn", q(prometheus_bin()), q(dir .. "/prometheus.yml"),
                                 q(dir .. "/data"), port), dir .. "/prometheus.log")
  fixtures.wait_until(function()
    if not fixtures.alive(self.pid) then
      error("fixtures: prometheus exited at start-up:\n" .. (read_file(dir .. "/prometheus.log") or ""), 0)
    end
    local code, body = fixtures.http_get(self.url .. "/api/v1/targets", 2)
    return code == 200 and body:find('"activeTargets":%[{') ~= nil
  end, 20, "prometheus on 127.0.0.1:" .. port .. " to scrape its targets")
  return self
end

------------------------------------------------------------------------
-- Load with wrk

local Load = {}
Load.__index = Load

local function parse_wrk(text)
  local requests = tonumber(text:match("(%d+) requests in"))
  if not requests then return nil end
  local c, r, w, t = text:match("Socket errors: connect (%d+), read (%d+), write (%d+), timeout (%d+)")
  c, r, w, t = tonumber(c) or 0, tonumber(r) or 0, tonumber(w) or 0, tonumber(t) or 0
  return {
    requests = requests,
    non2xx = tonumber(text:match("Non%-2xx or 3xx responses: (%d+)")) or 0,
    socket_errors = c + r + w + t,
    connect_errors = c, read_errors = r, write_errors = w, timeouts = t,
    rps = tonumber(text:match("Requests/sec:%s+([%d.]+)")),
    output = text,
  }
end

-- Waits for wrk to finish; returns { requests, non2xx, socket_errors, ... }.
function Load:wait()
  if not fixtures.wait_exit(self.pid, self.seconds + 15) then
    self:kill()
    error("fixtures: wrk did not finish within " .. (self.seconds + 15) .. " s", 2)
  end
  started_pids[self.pid] = nil
  local text = read_file(self.log) or ""
  local result = parse_wrk(text)
  if not result then error("fixtures: could not read wrk's output:\n" .. text, 2) end
  return result
end

-- Freezes wrk (SIGSTOP) and lets it go on (SIGCONT): its connections stay
-- open, it just sends nothing meanwhile.
function Load:pause() fixtures.kill(self.pid, "STOP") end
function Load:resume() fixtures.kill(self.pid, "CONT") end

-- Stops wrk now (SIGINT: it stops and prints its figures) and returns
-- them, as wait() does: load that lasts exactly as long as what it covers.
function Load:finish()
  fixtures.kill(self.pid, "INT")
  return self:wait()
end

function Load:kill()
  fixtures.stop(self.pid, 1)
end

-- Runs `wrk -t2 -c<n> -d<seconds>s --latency url` in the background.
-- opts.headers: list of extra request headers ("Connection: close");
-- opts.wrap: as for sample_url (a function alone is taken as opts.wrap).
function fixtures.load(n, url, seconds, opts)
  if type(opts) == "function" then opts = { wrap = opts } end
  seconds = math.tointeger(seconds or 3) or math.ceil(seconds)
  local dir = fixtures.tmpdir("wrk")
  local log = dir .. "/wrk.log"
  local threads = math.min(2, n)
  local headers = ""
  for _, h in ipairs(opts and opts.headers or {}) do headers = headers .. " -H " .. q(h) end
  local cmd = string.format("wrk -t%d -c%d -d%ds --latency%s %s", threads, n, seconds, headers, q(url))
  local pid = spawn("exec " .. (opts and opts.wrap and opts.wrap(cmd) or cmd), log)
  return setmetatable({ pid = pid, log = log, seconds = seconds, url = url }, Load)
end

------------------------------------------------------------------------
-- Config builders (DESIGN.md, Configuration)

local function merge(into, from)
  for k, v in pairs(from or {}) do into[k] = v end
  return into
end

-- opts: haproxy (a fixtures.haproxy handle), nginx (a site of a
-- fixtures.nginx), or neither for router "none";
-- instances (2), ports ("LOW-HIGH", default 20 free ones), health
-- (overrides), dir (default: a new tmpdir), delay_ms, stop_timeout (2),
-- provider (overrides).
-- Returns the target table and the directory where `unhealthy-<version>`
-- files turn that version's instances unhealthy (see set_unhealthy).
function fixtures.target_config(opts)
  opts = opts or {}
  local dir = opts.dir or fixtures.tmpdir("target")
  local command = fixtures.demo_app() .. " --port {port} --version {version}"
                  .. " --unhealthy-file " .. dir .. "/unhealthy-{version}"
  if opts.delay_ms then command = command .. " --delay-ms " .. math.tointeger(opts.delay_ms) end
  local router
  if opts.haproxy then
    router = { kind = "haproxy", socket = opts.haproxy.socket, backend = opts.haproxy.backend }
  elseif opts.nginx then
    router = opts.nginx:router()
  else
    router = { kind = "none" }
  end
  local target = {
    instances = opts.instances or 2,
    provider = merge({ kind = "process", command = command,
                       ports = opts.ports or fixtures.port_range(20),
                       stop_timeout = opts.stop_timeout or 2 }, opts.provider),
    router = router,
    health = merge({ path = "/healthz", expect_status = 200, timeout = 1,
                     interval = 0.05, failure_threshold = 3 }, opts.health),
  }
  return target, dir
end

-- Live processes of `version` started for the target_config whose
-- directory is `dir` (its command line names that directory, so specs
-- running side by side never see each other's instances).
function fixtures.instances_of(dir, version)
  return fixtures.pids_matching(dir .. "/unhealthy-" .. version)
end

-- Makes every instance of `version` from a target_config answer /healthz
-- with 500 (on = true, the default) or 200 again (on = false).
function fixtures.set_unhealthy(dir, version, on)
  local path = dir .. "/unhealthy-" .. version
  if on == false then
    os.remove(path)
  else
    write_file(path, "")
  end
end

-- opts: targets (name -> target table), state (default: <tmpdir>/state.db),
-- retain (passed through).
function fixtures.config(opts)
  opts = opts or {}
  return {
    state = opts.state or (fixtures.tmpdir("state") .. "/state.db"),
    targets = opts.targets or {},
    retain = opts.retain,
  }
end

------------------------------------------------------------------------
-- Cleanup

-- Stops everything started here (HAProxy, nginx, spawned commands, and
-- any process whose command line names one of our directories), then
-- removes the directories. opts.keep: handles (fixtures.nginx,
-- fixtures.haproxy) to leave running with their directories, for the next
-- spec of the same file.
function fixtures.cleanup(opts)
  local kept_dirs, kept_pids = {}, {}
  for _, h in ipairs(opts and opts.keep or {}) do
    kept_dirs[h.dir] = true
    if h.pid then kept_pids[h.pid] = true end
  end
  for i = #haproxies, 1, -1 do
    -- One HAProxy that will not stop must not keep the rest running.
    if not kept_dirs[haproxies[i].dir] then
      local ok = pcall(haproxies[i].stop, haproxies[i])
      if not ok then
        if haproxies[i].pid then fixtures.kill(haproxies[i].pid, "KILL") end
        table.remove(haproxies, i)
      end
    end
  end
  for i = #nginxes, 1, -1 do
    local n = nginxes[i]
    if not kept_dirs[n.dir] then
      local ok = pcall(n.stop, n)
      if not ok then
        if n.pid then fixtures.kill(n.pid, "KILL") end
        table.remove(nginxes, i)
      end
    end
  end
  local pids = {}
  for pid in pairs(started_pids) do
    if not kept_pids[pid] then pids[#pids + 1] = pid end
  end
  for _, dir in ipairs(created_dirs) do
    if not kept_dirs[dir] then
      for _, pid in ipairs(fixtures.pids_matching(dir)) do pids[#pids + 1] = pid end
    end
  end
  for _, pid in ipairs(pids) do fixtures.kill(pid, "TERM") end
  for _, pid in ipairs(pids) do
    if not fixtures.wait_exit(pid, 3) then
      fixtures.kill(pid, "KILL")
      fixtures.wait_exit(pid, 2)
    end
    started_pids[pid] = nil
  end
  local still = {}
  for _, dir in ipairs(created_dirs) do
    if kept_dirs[dir] then
      still[#still + 1] = dir
    elseif dir:match("^/tmp/deployctl%-[%w_.-]+$") then
      -- Only what tmpdir() made: a path under /tmp from mktemp.
      run("rm -rf " .. q(dir))
    end
  end
  created_dirs = still
end

-- Last resort when a spec forgot cleanup(): runs when the Lua state closes.
fixtures._sentinel = setmetatable({}, { __gc = function() fixtures.cleanup() end })

return fixtures
