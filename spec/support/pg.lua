-- A throwaway PostgreSQL cluster for specs, and a driver for store-probe.
--
--   local pg = require "spec.support.pg"
--   local ok, why = pg.available()        -- false + reason: mark the spec pending
--   local c = pg.cluster()                -- initdb + start, a role and a database
--   c:url{ password = true, lease = 2 }   -- postgresql://... over TCP or the socket
--   c:sql("SELECT 1")                      -- psql as the superuser, output trimmed
--   c:stop() / c:start()                   -- the same cluster down and up again
--   pg.cleanup()                           -- from after_each: stops every cluster
--   pg.teardown()                          -- from teardown: removes the initdb template
--
-- The cluster lives in a fixtures.tmpdir (removed by fixtures.cleanup), runs
-- as the unprivileged postgres user (PostgreSQL refuses root), listens on a
-- unix socket in that directory and on 127.0.0.1 at a free port, with
-- fsync off. Local socket logins are trusted; TCP logins need the password
-- (scram-sha-256), so a spec can check where a password goes.
local fixtures = require "spec.support.fixtures"
local cjson = require "cjson"

local pg = {}
local q = fixtures.shell_quote

pg.BIN = "/usr/lib/postgresql/15/bin"
pg.USER = "deployer"
pg.PASSWORD = "s3cr3t-Pa55-9xq"
pg.DB = "deploystate"

local clusters = {}
local probes = {}  -- interactive probes whose pipe is still open

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function capture(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok == true, code
end

local is_root = capture("id -u"):match("^0") ~= nil

-- true, or false and why PostgreSQL cannot be used here.
function pg.available()
  for _, b in ipairs{ "initdb", "pg_ctl", "postgres", "psql" } do
    if not exists(pg.BIN .. "/" .. b) then
      return false, "PostgreSQL 15 is not installed (" .. pg.BIN .. "/" .. b .. " is missing): scripts/setup installs it"
    end
  end
  local _, ok = capture("id -u postgres >/dev/null 2>&1")
  if is_root and not ok then return false, "there is no 'postgres' user to run PostgreSQL as (it refuses to run as root)" end
  if not exists(fixtures.build_dir() .. "/store-probe") then
    return false, fixtures.build_dir() .. "/store-probe is not built: cmake --build " .. fixtures.build_dir()
      .. " --target store-probe"
  end
  return true
end

-- PostgreSQL refuses to run as root: as root, run it as the postgres user;
-- as anyone else, as oneself.
local function as_postgres(cmd)
  return is_root and ("runuser -u postgres -- " .. cmd) or cmd
end

local function own(dir)
  if is_root then assert(os.execute("chown postgres " .. q(dir))) end
  assert(os.execute("chmod 700 " .. q(dir)))
end

-- initdb takes seconds: it runs once per process, into a template that
-- each cluster copies (removed by pg.teardown, or when Lua exits).
local template

local function template_dir()
  if template then return template end
  local out, ok = capture("mktemp -d /tmp/deployctl-pgtemplate-XXXXXX")
  local dir = out:gsub("%s+$", "")
  assert(ok and dir ~= "", "pg: mktemp failed")
  own(dir)
  out, ok = capture(as_postgres(q(pg.BIN .. "/initdb") .. " -D " .. q(dir .. "/data")
    .. " -U postgres --auth-local=trust --auth-host=scram-sha-256 --no-sync --no-instructions -E UTF8 --locale=C")
    .. " 2>&1")
  if not ok then
    os.execute("rm -rf " .. q(dir))
    error("pg: initdb failed: " .. out, 3)
  end
  template = dir
  return dir
end

-- Removes the template (from a describe's teardown).
function pg.teardown()
  if template and template:match("^/tmp/deployctl%-pgtemplate%-[%w]+$") then os.execute("rm -rf " .. q(template)) end
  template = nil
end

pg._sentinel = setmetatable({}, { __gc = function() pg.teardown() end })

local Cluster = {}
Cluster.__index = Cluster

function Cluster:pg_ctl(args)
  return capture(as_postgres(q(pg.BIN .. "/pg_ctl") .. " -D " .. q(self.data) .. " " .. args) .. " 2>&1")
end

function Cluster:start()
  local opts = string.format("-k %s -c listen_addresses=127.0.0.1 -p %d -c fsync=off -c full_page_writes=off "
    .. "-c synchronous_commit=off -c autovacuum=off -c max_connections=40 -c shared_buffers=16MB", self.dir, self.port)
  local out, ok = self:pg_ctl("-w -t 30 -l " .. q(self.dir .. "/server.log") .. " -o " .. q(opts) .. " start")
  if not ok then
    error("pg: cannot start PostgreSQL: " .. out .. "\n" .. (fixtures.read_file(self.dir .. "/server.log") or ""), 2)
  end
  self.running = true
end

-- mode: fast (sessions are terminated, transactions rolled back) or immediate.
function Cluster:stop(mode)
  if not self.running then return end
  self:pg_ctl("-w -t 30 -m " .. (mode or "fast") .. " stop")
  self.running = false
end

-- Runs SQL through psql as the superuser over the socket; returns the
-- trimmed output (rows as a|b lines) and whether it succeeded.
function Cluster:sql(sql, db)
  local out, ok = capture(q(pg.BIN .. "/psql") .. " -X -q -At -v ON_ERROR_STOP=1 -U postgres -h " .. q(self.dir)
    .. " -p " .. self.port .. " -d " .. q(db or pg.DB) .. " -c " .. q(sql) .. " 2>&1")
  return (out:gsub("%s+$", "")), ok
end

-- A URL for the store: over TCP with the password in it (password = true),
-- over TCP without it (tcp = true: libpq then looks at PGPASSWORD and
-- ~/.pgpass), or over the socket; extra query parameters from params.
function Cluster:url(opts)
  opts = opts or {}
  local params = {}
  local base
  if opts.password then
    base = string.format("postgresql://%s:%s@127.0.0.1:%d/%s", pg.USER, opts.password_value or pg.PASSWORD,
      self.port, opts.db or pg.DB)
  elseif opts.tcp then
    base = string.format("postgresql://%s@127.0.0.1:%d/%s", pg.USER, self.port, opts.db or pg.DB)
  else
    base = string.format("postgresql://%s@/%s", pg.USER, opts.db or pg.DB)
    params[#params + 1] = "host=" .. self.dir
    params[#params + 1] = "port=" .. self.port
  end
  if opts.lease then params[#params + 1] = "lease=" .. opts.lease end
  if opts.timeout then params[#params + 1] = "timeout=" .. opts.timeout end
  for _, p in ipairs(opts.params or {}) do params[#params + 1] = p end
  if #params > 0 then base = base .. "?" .. table.concat(params, "&") end
  return base
end

-- A fresh empty database owned by the role, for a spec that wants its own.
function Cluster:create_db(name)
  local out, ok = self:sql("CREATE DATABASE " .. name .. " OWNER " .. pg.USER, "postgres")
  assert(ok, out)
  return name
end

-- Starts a new cluster with the role and its database.
function pg.cluster()
  local dir = fixtures.tmpdir("pg")
  local c = setmetatable({ dir = dir, data = dir .. "/data", port = fixtures.free_port() }, Cluster)
  own(dir)
  local out, ok = capture("cp -a " .. q(template_dir() .. "/data") .. " " .. q(c.data) .. " 2>&1")
  if not ok then error("pg: cannot copy the template cluster: " .. out, 2) end
  clusters[#clusters + 1] = c
  c:start()
  local sql = string.format("CREATE ROLE %s LOGIN PASSWORD '%s'", pg.USER, pg.PASSWORD)
  out, ok = c:sql(sql, "postgres")
  assert(ok, out)
  c:create_db(pg.DB)
  return c
end

-- A view of the cluster whose url{} and sql() default to a new database
-- `db` (owned by the role): a spec file shares one cluster, and each spec
-- gets a database of its own. stop() and start() act on the cluster.
function Cluster:database(db)
  local base = self
  base:create_db(db)
  local view = setmetatable({ db = db }, { __index = base })
  function view:url(opts)
    local o = {}
    for k, v in pairs(opts or {}) do o[k] = v end
    o.db = o.db or db
    return base:url(o)
  end
  function view:sql(sql, d) return base:sql(sql, d or db) end
  function view:stop(mode) return base:stop(mode) end
  function view:start() return base:start() end
  return view
end

-- Ends every interactive probe (a spec's own, before the next spec).
function pg.end_probes()
  for i = #probes, 1, -1 do
    if probes[i].pipe then
      pcall(probes[i].post, probes[i], "quit")
      pcall(probes[i].pipe.close, probes[i].pipe)
      probes[i].pipe = nil
    end
    probes[i] = nil
  end
end

-- Ends every interactive probe and stops every cluster started here (also
-- after a failed spec).
function pg.cleanup()
  for i = #probes, 1, -1 do
    if probes[i].pipe then
      pcall(probes[i].post, probes[i], "quit")
      pcall(probes[i].pipe.close, probes[i].pipe)
      probes[i].pipe = nil
    end
    probes[i] = nil
  end
  for i = #clusters, 1, -1 do
    pcall(clusters[i].stop, clusters[i], "immediate")
    clusters[i] = nil
  end
end

------------------------------------------------------------------------
-- store-probe

local function probe_bin()
  local b = fixtures.build_dir()
  if b:sub(1, 1) ~= "/" then b = fixtures.root() .. "/" .. b end
  return b .. "/store-probe"
end
pg.probe_bin = probe_bin

local function decode_lines(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    local ok, v = pcall(cjson.decode, line)
    out[#out + 1] = ok and v or { unparsed = line }
  end
  return out
end
pg.decode_lines = decode_lines

local function env_prefix(env)
  local parts = {}
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. q(v) end
  table.sort(parts)
  return #parts > 0 and ("env " .. table.concat(parts, " ") .. " ") or ""
end

-- Runs a script of commands (a list of lines) to the end. Returns the
-- decoded answers, the exit code, stdout and stderr.
function pg.run_probe(url, lines, env)
  local dir = fixtures.tmpdir("probe")
  fixtures.write_file(dir .. "/in", table.concat(lines, "\n") .. "\n")
  local cmd = env_prefix(env) .. q(probe_bin()) .. " " .. q(url) .. " <" .. q(dir .. "/in") .. " >"
    .. q(dir .. "/out") .. " 2>" .. q(dir .. "/err")
  local _, _, code = os.execute(cmd)
  local out = fixtures.read_file(dir .. "/out") or ""
  return decode_lines(out), code, out, fixtures.read_file(dir .. "/err") or ""
end

-- Starts a script in the background; :wait() returns as run_probe does,
-- :answers() what it printed so far.
function pg.spawn_probe(url, lines, env)
  local dir = fixtures.tmpdir("probe")
  fixtures.write_file(dir .. "/in", table.concat(lines, "\n") .. "\n")
  local inner = env_prefix(env) .. q(probe_bin()) .. " " .. q(url) .. " " .. q(dir) .. " <" .. q(dir .. "/in")
    .. " >" .. q(dir .. "/out") .. " 2>" .. q(dir .. "/err") .. "; echo $? >" .. q(dir .. "/rc")
  local h = { dir = dir, pid = fixtures.spawn("sh -c " .. q(inner)) }
  function h:answers() return decode_lines(fixtures.read_file(dir .. "/out") or "") end
  function h:done() return (fixtures.read_file(dir .. "/rc") or ""):match("%d+") ~= nil end
  function h:wait(timeout)
    fixtures.wait_until(function() return self:done() end, timeout or 60, "store-probe to finish")
    local out = fixtures.read_file(dir .. "/out") or ""
    return decode_lines(out), tonumber(fixtures.read_file(dir .. "/rc"):match("%d+")), out,
      fixtures.read_file(dir .. "/err") or ""
  end
  return h
end

-- An interactive probe: :send(line) writes one command and returns its
-- answer (waiting for it); :post(line) writes one without waiting (read it
-- with :next()); :close() ends it and returns its exit code and stderr.
-- Commands go through a file the probe follows (STORE_PROBE_FOLLOW): a pipe
-- would stay open in every process the spec starts after it.
function pg.probe(url, env)
  local dir = fixtures.tmpdir("probe")
  local input = dir .. "/in"
  fixtures.write_file(input, "")
  local e = { STORE_PROBE_FOLLOW = "1" }
  for k, v in pairs(env or {}) do e[k] = v end
  local inner = env_prefix(e) .. q(probe_bin()) .. " " .. q(url) .. " " .. q(dir) .. " <" .. q(input) .. " >"
    .. q(dir .. "/out") .. " 2>" .. q(dir .. "/err") .. "; echo $? >" .. q(dir .. "/rc")
  local h = { dir = dir, seen = 0 }
  h.pid = fixtures.spawn("sh -c " .. q(inner))
  h.pipe = assert(io.open(input, "a"))
  probes[#probes + 1] = h
  function h:next(timeout, what)
    local want = self.seen + 1
    local answers
    fixtures.wait_until(function()
      answers = decode_lines(fixtures.read_file(dir .. "/out") or "")
      return #answers >= want
    end, timeout or 30, what or "store-probe to answer")
    self.seen = want
    return answers[want]
  end
  function h:post(line)
    self.pipe:write(line, "\n")
    self.pipe:flush()
  end
  function h:send(line, timeout)
    self:post(line)
    return self:next(timeout, "store-probe to answer '" .. line .. "'")
  end
  function h:output() return fixtures.read_file(dir .. "/out") or "" end
  function h:close(timeout)
    if self.pipe then
      self:post("quit")
      self.pipe:close()
      self.pipe = nil
    end
    fixtures.wait_until(function() return (fixtures.read_file(dir .. "/rc") or ""):match("%d+") end,
      timeout or 30, "store-probe to exit")
    return tonumber(fixtures.read_file(dir .. "/rc"):match("%d+")), fixtures.read_file(dir .. "/err") or ""
  end
  h.opened = h:next(30, "store-probe to open the store")
  return h
end

return pg
