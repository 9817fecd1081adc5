-- deploy.testing: a kit for users' busted specs of their pipelines and
-- strategies. Targets whose instances run inside the process (provider
-- kind "test", scripted: healthy, unhealthy after N s, slow to start, a
-- share of 5xx answers, crashing), a router that records the weights it
-- is given (kind "test"), the virtual clock, a throw-away store, helpers
-- that read the timeline, and a close that stops everything.
--
--   local testing = require "deploy.testing"
--   local kit = testing.setup{ targets = { production = { instances = 2,
--                 versions = { ["1.1.0"] = { unhealthy_after = 30 } } } } }
--   kit:deploy("production", "1.0.0")
--   local r = kit:deploy("production", "1.1.0", { strategy = deploy.CanaryStrategy{} })
--   assert.is_false(r.success)
--   assert.same({ 10, 20, 0 }, kit:shares("production"))
--   kit:close()
--
-- Compiled into deploy.so (luaopen_deploy_testing); C is the C side:
-- router_log(manager, target) and stats(manager, target, version).
local C = ...
local deploy = require "deploy"

local testing = { VERSION = deploy.VERSION }

local SCRIPT = { start_time = true, unhealthy = true, unhealthy_after = true, error_rate = true,
                 crash_after = true, versions = true }
local TARGET = { instances = true, health = true, retain = true, hosts = true }

local function fail(level, fmt, ...)
  error("deploy.testing: " .. string.format(fmt, ...), level + 1)
end

local function known(set)
  local names = {}
  for k in pairs(set) do names[#names + 1] = k end
  table.sort(names)
  return table.concat(names, ", ")
end

-- A provider section of kind "test": the script of every version, and
-- versions = { ["1.2.0"] = { ... } } for some.
function testing.provider(script)
  script = script or {}
  if type(script) ~= "table" then fail(2, "provider{...} expects a table of script fields, got %s", type(script)) end
  local p = { kind = "test" }
  for k, v in pairs(script) do
    if not SCRIPT[k] then fail(2, "provider has no field '%s' (known: %s)", tostring(k), known(SCRIPT)) end
    p[k] = v
  end
  return p
end

-- A router section of kind "test": records every apply, serves nothing.
function testing.router() return { kind = "test" } end

-- Health checks quick enough for the virtual clock (the defaults of a
-- real target wait a second per round and give 60 s to start).
local HEALTH = { path = "/healthz", timeout = 1, interval = 1, failure_threshold = 3, start_timeout = 60 }

local function tmp_state()
  local path = os.tmpname()
  return path
end

-- A whole config: spec.targets maps names to { instances, health, retain,
-- hosts, and the provider's script fields }; state: a temporary file;
-- clock: virtual.
function testing.config(spec)
  spec = spec or {}
  if type(spec) ~= "table" then fail(2, "config{...} expects a table, got %s", type(spec)) end
  local targets = {}
  for name, t in pairs(spec.targets or { production = {} }) do
    if type(t) ~= "table" then fail(2, "targets.%s must be a table, got %s", tostring(name), type(t)) end
    local script, target = {}, { router = testing.router() }
    for k, v in pairs(t) do
      if SCRIPT[k] then script[k] = v
      elseif TARGET[k] then target[k] = v
      else fail(2, "targets.%s has no field '%s' (known: %s, %s)", tostring(name), tostring(k), known(TARGET), known(SCRIPT)) end
    end
    target.instances = target.instances or 1
    local health = {}
    for k, v in pairs(HEALTH) do health[k] = v end
    for k, v in pairs(target.health or {}) do health[k] = v end
    target.health = health
    target.provider = testing.provider(script)
    targets[name] = target
  end
  return { state = spec.state or tmp_state(), clock = "virtual", targets = targets, retain = spec.retain }
end

local Kit = {}
Kit.__index = Kit

-- A DeploymentManager on test targets (see config), with the kit's
-- readers. spec.strategy, spec.strategies, spec.on_event: the manager's.
function testing.setup(spec)
  spec = spec or {}
  if type(spec) ~= "table" then fail(2, "setup{...} expects a table, got %s", type(spec)) end
  local allowed = { targets = true, state = true, retain = true, strategy = true, strategies = true, on_event = true }
  for k in pairs(spec) do
    if not allowed[k] then fail(2, "setup has no field '%s' (known: %s)", tostring(k), known(allowed)) end
  end
  local config = testing.config{ targets = spec.targets, state = spec.state, retain = spec.retain }
  -- the process's clock, given back at close: specs after this one (in
  -- the same busted run) keep theirs
  local clock = deploy._clock()
  local manager = deploy.DeploymentManager{ config = config, strategy = spec.strategy,
                                            strategies = spec.strategies, on_event = spec.on_event }
  return setmetatable({ manager = manager, config = config, own_state = spec.state == nil, marks = {},
                        clock = clock }, Kit)
end

-- Where the router's record stood when the kit's last deployment of
-- target began: weights() reads from there on.
local function mark(self, target)
  local ok, log = pcall(C.router_log, self.manager, target)
  self.marks[target] = ok and #log or 0
end

function Kit:deploy(target, version, options)
  mark(self, target)
  return self.manager:deploy(target, version, options)
end
function Kit:rollback(target, version)
  mark(self, target)
  return self.manager:rollback(target, version)
end
function Kit:status(target) return self.manager:get_status(target) end

-- The events of one deployment: the target's last one, or deployment id
-- `which` (a string); only those of `kind` when given.
function Kit:events(target, kind, which)
  local id = which
  if not id then
    local last = self.manager:history(target, 1)[1]
    if not last then return {} end
    id = last.id
  end
  local out = {}
  for _, ev in ipairs(self.manager:events(id) or {}) do
    if not kind or ev.kind == kind then out[#out + 1] = ev end
  end
  return out
end

-- The kinds of the last deployment's events, in order.
function Kit:kinds(target)
  local out = {}
  for _, ev in ipairs(self:events(target)) do out[#out + 1] = ev.kind end
  return out
end

-- The new version's share at each traffic step of the last deployment,
-- as the rollout recorded it (an abort's return to the old version is
-- the last step, at 0).
function Kit:shares(target)
  local out = {}
  for _, ev in ipairs(self:events(target)) do
    if ev.kind == "traffic" then out[#out + 1] = ev.data.pct
    elseif ev.kind == "rolled_back" or ev.kind == "aborted" and ev.data and ev.data.router_applied then
      out[#out + 1] = 0
    end
  end
  return out
end

-- The version of each server name the router was given, from the
-- instance_started events of the target's history.
local function versions_of(manager, target)
  local by_name = {}
  for _, d in ipairs(manager:history(target, 1000)) do
    for _, ev in ipairs(manager:events(d.id) or {}) do
      if ev.kind == "instance_started" and ev.data.server then by_name[ev.data.server] = ev.data.version end
    end
  end
  return by_name
end

-- What the router was asked to serve, apply by apply, during the kit's
-- last deployment of target (all = true: since the start): { at, servers
-- = { { name, host, port, weight, version } }, shares = { [version] = pct } }.
function Kit:weights(target, all)
  local log = C.router_log(self.manager, target)
  local from = all and 0 or (self.marks[target] or 0)
  log = table.move(log, from + 1, #log, 1, {})
  local by_name = versions_of(self.manager, target)
  for _, apply in ipairs(log) do
    local total, per = 0, {}
    for _, s in ipairs(apply.servers) do
      s.version = by_name[s.name] or "?"
      total = total + s.weight
      per[s.version] = (per[s.version] or 0) + s.weight
    end
    apply.shares = {}
    for v, w in pairs(per) do apply.shares[v] = total > 0 and (w * 100 / total) or 0 end
  end
  return log
end

-- The share of `version` at each router apply of the last deployment
-- (the split traffic really got), rounded to 0.01.
function Kit:router_shares(target, version, all)
  local out = {}
  for _, apply in ipairs(self:weights(target, all)) do
    out[#out + 1] = math.floor((apply.shares[version] or 0) * 100 + 0.5) / 100
  end
  return out
end

-- Requests the running instances of version (every version when nil)
-- answered, and how many with a 5xx: for an analysis hook.
function Kit:stats(target, version) return C.stats(self.manager, target, version) end

-- Stops every instance the test provider started and drops the store.
function Kit:close()
  if self.closed then return end
  self.closed = true
  self.manager:close()
  pcall(deploy._clock, self.clock)
  if self.own_state then
    for _, suffix in ipairs({ "", "-wal", "-shm" }) do os.remove(self.config.state .. suffix) end
  end
end
Kit.__close = Kit.close
Kit.__gc = Kit.close

testing.router_log = C.router_log
testing.stats = C.stats

return testing
