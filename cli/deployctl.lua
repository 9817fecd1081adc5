-- deployctl's command line, a Lua program on top of the same deploy module
-- that pipeline scripts use. Compiled into the deployctl binary.
--
-- Exit codes: 0 success, 1 deployment failed (and was rolled back),
-- 2 usage or configuration error, 3 target locked; `status TARGET`: 4
-- degraded, 5 unhealthy.

local deploy = require "deploy"
local cjson = require "cjson"

local EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3
-- status TARGET only: the target is degraded, or unhealthy.
local EXIT_DEGRADED, EXIT_UNHEALTHY = 4, 5

local out, err = io.stdout, io.stderr

-- ---------------------------------------------------------------------------
-- Secrets: values that ${NAME} in the config expands to are redacted from
-- everything printed.

local secrets = {}

local function redact(s)
  s = tostring(s)
  for _, v in ipairs(secrets) do
    s = s:gsub(v:gsub("%p", "%%%0"), "***")
  end
  return s
end

local function note_secrets(text)
  for name in text:gmatch("%${([%w_]+)}") do
    local v = os.getenv(name)
    -- very short values ("1", "on") would redact half the output
    if v and #v >= 4 then secrets[#secrets + 1] = v end
  end
  table.sort(secrets, function(a, b) return #a > #b end)
end

local function printf(fmt, ...) out:write(redact(string.format(fmt, ...))) end
local function eprintf(fmt, ...) err:write(redact(string.format(fmt, ...))) end

-- A usage or configuration error: raised as a table so that main() can tell
-- it from a bug and exit 2 with just the message.
local function usage_error(fmt, ...)
  error({ usage = string.format(fmt, ...) }, 0)
end

-- ---------------------------------------------------------------------------
-- Help: the one source for --help, `deployctl help`, the man page and the
-- shell completion.

local COMMANDS = {
  { "run", "[--simulate] SCRIPT [ARGS...]", "run a Lua pipeline script (arguments in `arg`)" },
  { "deploy", "TARGET VERSION [--strategy canary|blue-green] [--set key=value ...] [--simulate]", "deploy VERSION to TARGET" },
  { "rollback", "TARGET [VERSION]", "go back to the previous version, or to VERSION" },
  { "status", "[TARGET]", "current version, status, health and instances" },
  { "history", "TARGET [--limit N]", "past deployments of TARGET" },
  { "promote", "TARGET", "let a paused rollout go on (from any process)" },
  { "abort", "TARGET", "abort a running rollout (back to the old version)" },
  { "reconcile", "TARGET", "put TARGET back on its live version (after an HAProxy restart, a reboot)" },
  { "maintenance", "TARGET on|off [--message TEXT] [--retry-after S]", "the load balancers answer 503 with a page, or serve again" },
  { "logs", "TARGET [--host H] [--version V] [--lines N] [--follow]", "the output of TARGET's instances, from every host" },
  { "prune", "[TARGET]", "apply the retention now: old history and old versions' logs go" },
  { "report", "DEPLOYMENT_ID | latest TARGET", "a self-contained HTML report of one deployment" },
  { "store", "migrate --to URL [--from FILE]", "copy the SQLite history into PostgreSQL" },
  { "diff", "--repo URL [--branch B] [--path P]", "what a GitOps sync would change" },
  { "sync", "--repo URL [--branch B] [--path P] [--prune]", "apply what the git repository wants" },
  { "watch", "--repo URL [--branch B] [--path P] [--interval S]", "keep syncing as the repository changes" },
  { "serve", "[--listen ADDR:PORT] [--tls-cert F --tls-key F]", "the agent: dashboard, API, /metrics, webhooks, supervision" },
  { "completion", "bash", "print the bash completion script" },
  { "man", "", "print the man page (troff)" },
  { "version", "", "print deployctl's version" },
  { "help", "[COMMAND]", "this text, or a command's" },
}

local OUTPUT_FLAGS = [[
Output:
  --json     one JSON object per line per event (the data the store records)
  --quiet    only the result
  (on a terminal, a live progress line per target; otherwise plain event lines)
]]

local HELP = {
  run = [[
Usage: deployctl run [--simulate] SCRIPT [ARGS...]

Runs a Lua pipeline script with `deploy` preloaded (require "deploy").
The script's arguments are in the global table `arg` (arg[0] is SCRIPT).
A script that returns an integer sets the exit code; false means 1.
DeploymentManager{} without a config uses --config's (or $DEPLOY_CONFIG,
or ./deployctl.lua).

  --simulate   a dry run: no instance starts, no router changes, the store
               is not written. Every target's provider and router are
               replaced by simulated ones (instances in this process that
               come up after `simulate.start_time` seconds, 1 by default,
               and answer health as the config's `simulate` section says; a
               router that only records weights), on the virtual clock,
               with a temporary copy of the store: the pipeline sees the
               timeline the real rollout would follow, in a fraction of a
               second. See CONFIGURATION in `deployctl man`.
]],
  deploy = [[
Usage: deployctl deploy TARGET VERSION [--strategy canary|blue-green] [--set key=value ...] [--simulate] [--json|--quiet]

Deploys VERSION to TARGET with the given strategy (default blue-green).
--set gives the strategy's parameters, e.g.
  deployctl deploy production 1.4.2 --strategy canary --set initial_percentage=5 --set interval=60
  deployctl deploy production 1.4.2 --set switch_delay=10 --set scale_down_delay=60
  deployctl deploy production 1.4.2 --strategy canary --set pause_at=25,50   (a list: comma-separated)
  deployctl deploy production 1.4.2 --strategy canary --set session_affinity.cookie=canary \
    --set test_route.header=X-Canary                       (a table's fields: table.field=value)
  deployctl deploy production 1.4.2 --strategy canary --set analysis=@analysis.json
  deployctl deploy production 1.4.2 --set 'analysis={"interval":30,"metrics":[...]}'
analysis takes a JSON object, or @FILE holding one (see the README's Analysis);
without it the target's analysis (config) applies.
A strategy registered by a pipeline is not available here: use `run`.

  --simulate   print the timeline this rollout would follow, each line
               marked [simulated], and change nothing: no instance starts,
               no router is touched, the store is not written (see `run`)

]] .. OUTPUT_FLAGS,
  rollback = [[
Usage: deployctl rollback TARGET [VERSION] [--json|--quiet]

Rolls TARGET back to its previous version, or to VERSION from its history,
with an instant blue-green switch.

While a deployment of TARGET runs (a canary's steps, its hold at 100 %, a
blue-green's scale_down_delay), the version it came from still runs: the
rollback aborts that deployment (in whatever process runs it), which
returns traffic in one router change, no restart, and waits for its end.

]] .. OUTPUT_FLAGS,
  status = [[
Usage: deployctl status [TARGET] [--json]

Without TARGET: one line per configured target (version, status, health,
instances) and whether it is in maintenance, and below it what else is true: a rollout under way ("paused at
50 %, waiting for promote"), the failure of the last deployment beside the
version that still serves, why the target is degraded. A target never
deployed says so. Instances are counted by version while versions overlap:
"4 (2 live, 2 new)". With TARGET: also each instance with its port, pid,
health and traffic weight, read live from the instances and each router (a
target behind several load balancers shows one weight per router, in the
order of its `routers` list).

Exit codes with TARGET: 0 healthy (or never deployed, or a rollout under
way whose versions are healthy), 4 degraded (some live instance down or
unhealthy, or supervision gave up on it), 5 unhealthy (nothing serves
healthily); 2 usage or configuration error.
]],
  history = [[
Usage: deployctl history TARGET [--limit N] [--json]

Past deployments of TARGET, newest first: id, kind, version, strategy,
result, start, duration, who (user@host), the git revision when GitOps
made it, and the reason it failed. Ids are shown as the shortest prefix
that names one deployment of the store; any unique prefix works wherever
an id is asked for (`report`), and `latest` means the target's newest.
]],
  promote = [[
Usage: deployctl promote TARGET

Lets a paused rollout of TARGET go on (or ends the current wait between
canary steps early). The rollout may run in another process.
]],
  abort = [[
Usage: deployctl abort TARGET

Aborts the running rollout of TARGET, in whatever process it runs: traffic
goes back to the old version in one step and the new instances stop.
]],
  reconcile = [[
Usage: deployctl reconcile TARGET

Puts TARGET back on exactly its live version: instances of it that died are
started again, HAProxy gets back the servers it forgot (a restart or reload
drops servers added at runtime), and any other instance of TARGET is
stopped. It takes the target's lock: while a deployment of TARGET runs it
changes nothing and exits 3. `status TARGET` says when it is needed.
]],
  maintenance = [[
Usage: deployctl maintenance TARGET on [--message TEXT] [--retry-after S]
       deployctl maintenance TARGET off

on: every load balancer of TARGET answers 503 with a small HTML page that
shows TEXT (default: "This service is down for maintenance and will be back
shortly.") and a Retry-After header of S seconds (default 300). Instances
keep running as they are. off: the load balancers serve them again.
Maintenance lasts until turned off: reconcile, recovery after a crash and
deployments keep it (a deployment in maintenance rolls out behind the 503
page). It takes the target's lock: while a deployment of TARGET runs it
changes nothing and exits 3. `status TARGET` shows it. The load balancer
needs a few lines for it (README, "Routing beyond weights").
  --message TEXT     one line, at most 511 bytes of UTF-8
  --retry-after S    whole seconds, 0 to 604800
]],
  prune = [[
Usage: deployctl prune [TARGET]

Applies the retention of TARGET (or of every target) now; it also runs
after every deployment. The config says what is kept:

  retain = { history = 200, versions = 10, logs = 100 }

history: deployments kept in the store per target (older ones go with
their events); versions: versions whose instance logs are kept (older
versions' logs are deleted, on every host); logs: MiB an instance log may
reach before it is rotated (copied to .log.1 and emptied; 0: never). The
live version, the previous one (what a rollback goes back to) and anything
a running deployment uses are never pruned. Set it at the top level or
per target (targets.NAME.retain).
]],
  logs = [[
Usage: deployctl logs TARGET [--host H] [--version V] [--lines N] [--follow]

Prints the last N lines (default 100) of the log of each instance of
TARGET that runs, read where it runs: this machine, or each host over ssh.
Every line is prefixed with its host, version and instance:
  [app1 1.4.2#0] GET /healthz 200
  --host H      only the instances on H (one of the target's hosts)
  --version V   only the instances of version V
  --follow      keep printing what they write, until Ctrl-C
]],
  report = [[
Usage: deployctl report DEPLOYMENT_ID > rollout.html
       deployctl report latest TARGET > rollout.html

Writes a self-contained HTML page about one deployment: an SVG chart of the
new version's traffic share and health over time (with a legend), and the
table of events, each event's data as JSON with its keys in order. The ids
are in `deployctl history TARGET`; any unique prefix of one works (history
shows the shortest), and `latest` means TARGET's newest (TARGET may be left
out when the config has one target).
]],
  store = [[
Usage: deployctl store migrate --to postgresql://USER@HOST:PORT/DB [--from FILE]

Copies every target, deployment, event, instance, lock and operator command
of the SQLite store FILE (default: the config's state file) into the
PostgreSQL database, in one transaction, keeping ids. The database must not
hold deployctl history yet; its schema is created. The SQLite file is only
read. Then point config.state (or $DEPLOY_STATE) at the URL. Credentials:
libpq's PG* variables or ~/.pgpass; a password is never printed.
]],
  completion = [[
Usage: deployctl completion bash

Prints a bash completion script:  source <(deployctl completion bash)
]],
  man = [[
Usage: deployctl man > deployctl.1

Prints the man page, made from the same text as --help.
]],
  version = "Usage: deployctl version\n\nPrints deployctl's version.\n",
  help = "Usage: deployctl help [COMMAND]\n\nThe list of commands, or one command's help.\n",
}

local gitops_ok, gitops = pcall(require, "deployctl.gitops")
if gitops_ok and type(gitops) == "table" and gitops.help then
  for k, v in pairs(gitops.help) do HELP[k] = v end
end

local serve_ok, serve_cli = pcall(require, "deployctl.serve")
if serve_ok and type(serve_cli) == "table" and serve_cli.help then HELP.serve = serve_cli.help end

local function main_help()
  local lines = { "Usage: deployctl [--config FILE] <command> [arguments]", "", "Commands:" }
  for _, c in ipairs(COMMANDS) do
    lines[#lines + 1] = string.format("  %-11s %s", c[1], c[3])
  end
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Options:"
  lines[#lines + 1] = "  -c, --config FILE  configuration (else $DEPLOY_CONFIG, else ./deployctl.lua)"
  lines[#lines + 1] = "  --help          help for any command: deployctl COMMAND --help"
  lines[#lines + 1] = ""
  lines[#lines + 1] = "Exit codes: 0 success, 1 deployment failed and rolled back,"
  lines[#lines + 1] = "2 usage or configuration error, 3 target locked; status TARGET: 4 degraded, 5 unhealthy."
  return table.concat(lines, "\n") .. "\n"
end
HELP.main = main_help()

-- ---------------------------------------------------------------------------
-- Arguments

local function parse_global(argv)
  local opts, rest = {}, {}
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if #rest == 0 and (a == "--config" or a == "-c") then
      opts.config = argv[i + 1] or usage_error("--config needs a file path")
      i = i + 2
    elseif #rest == 0 and a:match("^%-%-config=") then
      opts.config = a:sub(10)
      i = i + 1
    else
      rest[#rest + 1] = a
      i = i + 1
      if #rest == 1 and rest[1] == "run" then
        -- everything after `run` belongs to run and the script
        for j = i, #argv do rest[#rest + 1] = argv[j] end
        break
      end
    end
  end
  return opts, rest
end

-- Flags of one command: spec maps a flag to "value", "bool" or "list".
local function parse_flags(cmd, args, spec, max_positional)
  local flags, pos = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--help" or a == "-h" then
      flags.help = true
      i = i + 1
    elseif a:sub(1, 2) == "--" and #a > 2 then
      local name, value = a:match("^%-%-([%w-]+)=(.*)$")
      name = name or a:sub(3)
      local kind = spec[name]
      if not kind then usage_error("%s: unknown flag --%s (see 'deployctl %s --help')", cmd, name, cmd) end
      if kind == "bool" then
        if value then usage_error("%s: --%s takes no value", cmd, name) end
        flags[name] = true
        i = i + 1
      else
        if not value then
          value = args[i + 1]
          if value == nil then usage_error("%s: --%s needs a value", cmd, name) end
          i = i + 2
        else
          i = i + 1
        end
        if kind == "list" then
          flags[name] = flags[name] or {}
          table.insert(flags[name], value)
        else
          flags[name] = value
        end
      end
    else
      pos[#pos + 1] = a
      i = i + 1
    end
  end
  if not flags.help and max_positional and #pos > max_positional then
    usage_error("%s: too many arguments (%s): see 'deployctl %s --help'", cmd,
      table.concat(pos, " ", max_positional + 1), cmd)
  end
  if flags.json and flags.quiet then usage_error("%s: --json and --quiet do not go together", cmd) end
  return flags, pos
end

-- --config, else $DEPLOY_CONFIG, else ./deployctl.lua (a ./deploy.lua that
-- is a config is still read, with a warning, for this release).
local function config_path(opts)
  if opts.config and opts.config ~= "" then return opts.config end
  return (deploy._config_path())
end

local function open_manager(opts, extra)
  local path = config_path(opts)
  local f = io.open(path, "r")
  if not f then
    usage_error("cannot read config file '%s' (give --config FILE, set DEPLOY_CONFIG, or create ./deployctl.lua)", path)
  end
  note_secrets(f:read("a") or "")
  f:close()
  local ok, m = pcall(deploy.DeploymentManager, {
    config = path, strategy = extra and extra.strategy, on_event = extra and extra.on_event })
  if not ok then usage_error("%s", tostring(m)) end
  return m
end

local function check_target(m, target)
  for _, t in ipairs(m:targets()) do
    if t == target then return end
  end
  usage_error("unknown target '%s' (known: %s)", target, table.concat(m:targets(), ", "))
end

-- ---------------------------------------------------------------------------
-- Output

local function fmt_duration(s)
  if not s then return "-" end
  if s < 60 then return string.format("%.1fs", s) end
  if s < 3600 then return string.format("%dm%02ds", s // 60, math.floor(s % 60)) end
  return string.format("%dh%02dm", s // 3600, (s % 3600) // 60)
end

-- The verdict of an analysis event (any event whose kind says "analysis":
-- its data's verdict, result or status, or ok/pass/passed/success), and
-- what it says about it.
local function analysis_of(ev)
  local d = ev.data or {}
  local verdict = d.verdict or d.result or d.status
  if type(verdict) ~= "string" then
    for _, k in ipairs{ "ok", "pass", "passed", "success" } do
      if type(d[k]) == "boolean" then verdict = d[k] and "pass" or "fail" break end
    end
  end
  local why = d.reason or d.detail or d.message or d.error
  return type(verdict) == "string" and verdict or nil, type(why) == "string" and why or nil
end

local function event_line(ev)
  local d = ev.data or {}
  local detail = ""
  if ev.kind == "traffic" then
    if d.router == "none" then
      detail = string.format("new version at %g %% (%d new beside %d old instances)", d.pct, d.new, d.old)
    else
      detail = string.format("new version at %g %% (weights old %d, new %d)", d.pct, d.weight_old, d.weight_new)
    end
  elseif ev.kind == "instance_started" then
    detail = string.format("instance %d on %s:%d (pid %d)", d.instance, d.host, d.port, d.pid)
  elseif ev.kind == "instance_stopped" then
    detail = string.format("%s instance %d (pid %d)", d.version, d.instance, d.pid)
  elseif ev.kind == "aborted" then
    detail = d.reason or ""
  elseif ev.kind == "health_failed" then
    detail = string.format("%s (%d in a row): %s", d.state, d.consecutive, d.detail or "")
  elseif ev.kind == "started" then
    detail = string.format("%s %s -> %s (%s)", d.kind, d.from ~= "" and d.from or "nothing", d.version, d.strategy)
  elseif ev.kind == "promoted" then
    detail = d.version
  elseif ev.kind == "paused" or ev.kind == "resumed" then
    detail = string.format("at %g %%%s", d.pct, d.reason and (": " .. d.reason) or "")
  elseif ev.kind == "analysis" then
    detail = string.format("%s %s: %s%s", d.metric, d.verdict,
      d.value ~= nil and (tostring(d.value) .. " ") or "", d.detail or "")
  elseif ev.kind == "bake" then
    detail = string.format("holding %g %% for %gs, %d old instance(s) still running", d.pct, d.seconds, d.old)
  elseif ev.kind == "finished" then
    detail = d.success and "success" or "failed"
  elseif ev.kind == "log" then
    detail = d.message or cjson.encode(d)
  elseif ev.kind == "hook_failed" then
    detail = string.format("%s: %s", d.hook, d.error)
  elseif ev.kind == "webhook" then
    detail = string.format("%s (%s): %s%s", d.name, d.type, d.ok and "ok" or "failed",
                           d.detail and d.detail ~= "" and (", " .. d.detail) or "")
  elseif ev.kind == "webhook_waiting" then
    detail = string.format("%s (%s) says not yet: %s; asking every %gs", d.name, d.type, d.detail or "", d.interval or 0)
  elseif ev.kind == "rolled_back" then
    detail = string.format("traffic back on the old version (from %g %%)", d.from_pct or 0)
  elseif ev.kind == "instance_restarted" then
    detail = string.format("instance %s of %s restarted: pid %s -> %s (%s)", tostring(d.instance), tostring(d.version),
      tostring(d.old_pid), tostring(d.pid), tostring(d.exit))
  elseif ev.kind == "degraded" or ev.kind == "recovered" then
    detail = tostring(d.reason or "")
  elseif ev.kind:find("analysis", 1, true) then
    local verdict, why = analysis_of(ev)
    detail = (verdict or "") .. (why and ((verdict and ": " or "") .. why) or "")
    if detail == "" then detail = cjson.encode(d) end
  end
  return string.format("%s %-10s %-16s %s\n", ev.time, ev.target, ev.kind, detail)
end

-- ts is written by hand: lua-cjson keeps only 14 significant digits, too
-- few for epoch seconds with microseconds.
local function event_json(ev)
  local s = cjson.encode({ deployment_id = ev.deployment_id, target = ev.target, kind = ev.kind,
                           time = ev.time, data = ev.data })
  return s:sub(1, -2) .. string.format(',"ts":%.6f}\n', ev.ts)
end

local function is_terminal()
  local ok = os.execute("test -t 1")
  return ok == true
end

-- A live progress line per target, redrawn in place on every event and
-- every second in between (the clock and the current wait move on):
--   production [#####.....]  50 % v2  step 5/10  healthy  next step in 12s  1m02s elapsed, ~1m00s left
local function progress_printer(interval)
  local state = {}
  local last_target
  local function bar(pct)
    local filled = math.floor(pct / 10 + 0.5)
    return "[" .. string.rep("#", filled) .. string.rep(".", 10 - filled) .. "]"
  end
  -- What the rollout waits for now, and the seconds left of that wait.
  local function current_wait(s, now)
    if s.rolling_back then return s.rolling_back, 0 end
    if s.paused_at then
      return string.format("paused %s: deployctl promote|abort %s", fmt_duration(now - s.paused_at), s.target), 0
    end
    if s.bake then return s.bake, 0 end
    if not s.step then return s.health and "starting" or "waiting for the new instances to be healthy", 0 end
    if interval and s.traffic_at then
      local left = math.max(0, interval - (now - s.traffic_at))
      if s.step == s.steps then return string.format("holding 100 %% for %s", fmt_duration(left)), left end
      return string.format("next step in %s", fmt_duration(left)), left
    end
    return nil, 0
  end
  local function draw(target, now)
    local s = state[target]
    local wait, wait_left = current_wait(s, now)
    local left = ""
    if s.steps and s.step and interval and not s.rolling_back then
      left = string.format(", ~%s left", fmt_duration(math.max(0, (s.steps - s.step) * interval + wait_left)))
    end
    local parts = { string.format("%-12s %s %3g %% %s", target, bar(s.pct or 0), s.pct or 0, s.version or "") }
    if s.step then parts[#parts + 1] = string.format("step %s/%s", s.step, s.steps or "?") end
    parts[#parts + 1] = s.health or "starting"
    if s.analysis then parts[#parts + 1] = s.analysis end
    if wait then parts[#parts + 1] = wait end
    parts[#parts + 1] = string.format("%s elapsed%s", fmt_duration(math.max(0, now - s.started)), left)
    if last_target and last_target ~= target then out:write("\n") end
    last_target = target
    out:write("\r\27[K", redact(table.concat(parts, "  ")))
    out:flush()
  end
  local printer = {}
  function printer.on_event(ev)
    local s = state[ev.target] or { started = ev.ts, target = ev.target }
    state[ev.target] = s
    local d = ev.data or {}
    if ev.kind == "started" then s.version = d.version s.started = ev.ts end
    if ev.kind == "traffic" then s.pct, s.step, s.steps, s.traffic_at = d.pct, d.step, d.steps, ev.ts end
    if ev.kind == "healthy" or ev.kind == "verified" then s.health = "healthy" end
    if ev.kind == "health_failed" then s.health = d.state .. " (" .. d.consecutive .. ")" end
    if ev.kind == "paused" then s.paused_at = ev.ts end
    if ev.kind == "resumed" then s.paused_at = nil s.traffic_at = ev.ts end
    if ev.kind == "bake" then s.bake = "holding, old set warm" end
    if ev.kind == "webhook_waiting" then s.bake = "waiting for webhook " .. d.name .. " (" .. d.type .. ")" end
    if ev.kind:find("analysis", 1, true) then
      local verdict, why = analysis_of(ev)
      if verdict then
        s.analysis = "analysis " .. (type(d.metric) == "string" and (d.metric .. " ") or "") .. verdict
                     .. (verdict ~= "pass" and why and (": " .. why) or "")
      end
    end
    if ev.kind == "aborted" then
      s.rolling_back = "rolling back: " .. tostring(d.reason or "aborted"):gsub("\n.*", "")
      s.paused_at = nil
    end
    if ev.kind == "rolled_back" then
      -- traffic is back on the old version: the bar says so
      s.pct = 0
      s.rolling_back = string.format("rolled back from %g %%", d.from_pct or 0)
    end
    draw(ev.target, ev.ts)
    if ev.kind == "aborted" or ev.kind == "finished" then
      if ev.kind == "finished" then s.done = true end
      out:write("\n")
      last_target = nil
      if ev.kind == "aborted" then out:write(redact(event_line(ev))) end
    end
  end
  -- Redraws the line of the rollout under way (the clock moved on).
  function printer.tick(now)
    local target = last_target
    if target and state[target] and not state[target].done then draw(target, now) end
  end
  return printer
end

-- The event sink for a command: --json, --quiet, a terminal, or plain
-- lines; and on a terminal, a ticker that redraws the progress line. A
-- simulated run prints its timeline as plain lines, each marked.
local function event_sink(flags, interval)
  if flags.quiet then return nil end
  if flags.simulate and flags.json then
    return function(ev)
      local line = event_json(ev)
      out:write(redact(line:sub(1, -3) .. ',"simulated":true}\n'))
      out:flush()
    end
  end
  if flags.simulate then
    return function(ev) out:write(redact("[simulated] " .. event_line(ev))) out:flush() end
  end
  if flags.json then return function(ev) out:write(redact(event_json(ev))) out:flush() end end
  if is_terminal() then
    local printer = progress_printer(interval)
    return printer.on_event, printer.tick
  end
  return function(ev) out:write(redact(event_line(ev))) out:flush() end
end

-- Runs fn() (a deployment) while tick(now) redraws every second, on the
-- real clock only (on the virtual one there is nothing to watch).
local function with_ticker(tick, fn)
  if not tick or deploy.virtual_clock() then return fn() end
  local done, results = false, nil
  deploy.parallel{
    function() results = table.pack(pcall(fn)) done = true end,
    function()
      local last = math.floor(deploy.now())
      while not done do
        deploy.sleep(0.1)
        local now = deploy.now()
        if math.floor(now) ~= last and not done then
          last = math.floor(now)
          tick(now)
        end
      end
    end,
  }
  if not results[1] then error(results[2], 0) end
  return table.unpack(results, 2, results.n)
end

local function result_exit(res, flags)
  if flags.simulate then res.simulated = true end
  if flags.json then
    out:write(redact(cjson.encode({ result = res })), "\n")
  elseif res.success and flags.simulate then
    printf("%s: %s would be deployed in %s (%s), simulated: nothing was started or changed\n", res.target,
           res.version, fmt_duration(res.duration), res.strategy)
  elseif res.success then
    printf("%s: %s deployed in %s (%s)\n", res.target, res.version, fmt_duration(res.duration), res.strategy)
  end
  if not res.success then
    for _, e in ipairs(res.errors or {}) do eprintf("%s: %s\n", res.target, e) end
  end
  if res.success then return EXIT_OK end
  local first = (res.errors or {})[1] or ""
  if first:find("target locked", 1, true) then return EXIT_LOCKED end
  return EXIT_FAILED
end

-- ---------------------------------------------------------------------------
-- Commands

local commands = {}

function commands.version(opts, args)
  local flags = parse_flags("version", args, {}, 0)
  if flags.help then out:write(HELP.version) return EXIT_OK end
  printf("deployctl %s (%s)\n", deploy._VERSION, _VERSION)
  return EXIT_OK
end

function commands.help(opts, args)
  local topic = args[1]
  if topic and not HELP[topic] then usage_error("help: no command '%s' (see 'deployctl help')", topic) end
  out:write(HELP[topic or "main"])
  return EXIT_OK
end

function commands.run(opts, args)
  if args[1] == "--help" or args[1] == "-h" then out:write(HELP.run) return EXIT_OK end
  local simulate = false
  if args[1] == "--simulate" then
    simulate = true
    table.remove(args, 1)
  end
  local script = args[1]
  if not script then usage_error("run: missing SCRIPT (see 'deployctl run --help')") end
  local chunk, lerr = loadfile(script, "t")
  if not chunk then
    if not io.open(script, "r") then usage_error("run: cannot read script '%s'", script) end
    usage_error("run: %s", lerr)
  end
  local script_arg = { [0] = script }
  for i = 2, #args do script_arg[i - 1] = args[i] end
  arg = script_arg
  -- A script's DeploymentManager{} without a config uses --config's; with
  -- --simulate every wait runs on the virtual clock.
  deploy._host{ config = opts.config, simulate = simulate }
  local rv = chunk(table.unpack(script_arg))
  if simulate then
    eprintf("[simulated] %s: no instance was started, no router was changed, the store was not written\n",
            deploy._simulation() or "dry run")
  end
  if math.type(rv) == "integer" then return rv end
  if rv == false then return EXIT_FAILED end
  return EXIT_OK
end

-- --set key=value pairs become strategy parameters (numbers when they look
-- like numbers).
-- Parameters that take a list: --set pause_at=25,50
-- A field of a table parameter: --set session_affinity.cookie=canary (a
-- string; max_age a number), the strategy checks the fields.
local LIST_PARAMS = { pause_at = true }
local NUMBER_FIELDS = { max_age = true }
-- Parameters that take a JSON object, given as text or as @FILE.
local JSON_PARAMS = { analysis = true }

local function json_param(k, v)
  local text, from = v, "its value"
  if v:sub(1, 1) == "@" then
    local f = io.open(v:sub(2), "r")
    if not f then usage_error("deploy: --set %s=%s: cannot read the file '%s'", k, v, v:sub(2)) end
    text, from = f:read("a"), "file '" .. v:sub(2) .. "'"
    f:close()
  end
  local ok, decoded = pcall(cjson.decode, text)
  if not ok or type(decoded) ~= "table" then
    usage_error("deploy: --set %s: %s is not a JSON object (%s): write e.g. --set '%s={\"interval\":30,\"metrics\":[...]}' "
                .. "or --set %s=@file.json", k, from, ok and ("a " .. type(decoded)) or tostring(decoded):gsub("^.-: ", ""), k, k)
  end
  -- JSON null has no place in a strategy's parameters.
  local function check(t)
    for key, item in pairs(t) do
      if item == cjson.null then usage_error("deploy: --set %s: '%s' is null: leave it out instead", k, tostring(key)) end
      if type(item) == "table" then check(item) end
    end
  end
  check(decoded)
  return decoded
end

local function strategy_params(sets)
  local params = {}
  for _, kv in ipairs(sets) do
    local k, field, v = kv:match("^([%w_]+)%.([%w_]+)=(.*)$")
    if not k then k, v = kv:match("^([%w_]+)=(.*)$") end
    if not k then
      usage_error("deploy: --set '%s' is not key=value or table.field=value (e.g. --set interval=60, --set "
        .. "test_route.header=X-Canary)", kv)
    end
    if field then
      if params[k] ~= nil and type(params[k]) ~= "table" then
        usage_error("deploy: --set %s.%s: %s is given a value of its own too", k, field, k)
      end
      params[k] = params[k] or {}
      params[k][field] = NUMBER_FIELDS[field] and tonumber(v) or v
    elseif JSON_PARAMS[k] then
      params[k] = json_param(k, v)
    elseif type(params[k]) == "table" then
      usage_error("deploy: --set %s=%s: %s takes fields, e.g. --set %s.NAME=VALUE", k, v, k, k)
    elseif LIST_PARAMS[k] then
      local list = {}
      for item in (v .. ","):gmatch("([^,]*),") do
        local n = tonumber(item)
        if not n then usage_error("deploy: --set %s: '%s' is not a list of numbers (e.g. --set %s=25,50)", k, v, k) end
        list[#list + 1] = n
      end
      params[k] = list
    else
      params[k] = tonumber(v) or v
    end
  end
  return params
end

local OUTPUT = { json = "bool", quiet = "bool" }

local function with_output(spec)
  local t = {}
  for k, v in pairs(spec) do t[k] = v end
  for k, v in pairs(OUTPUT) do t[k] = v end
  return t
end

-- --simulate: everything after this runs dry (deploy._host), and says so.
local function start_simulation(flags)
  deploy._host{ simulate = true }
  return function()
    if not flags.json then
      printf("[simulated] %s: no instance starts, no router changes, the store is not written\n",
             deploy._simulation() or "dry run")
    end
  end
end

function commands.deploy(opts, args)
  local flags, pos = parse_flags("deploy", args, with_output{ strategy = "value", set = "list", simulate = "bool" }, 2)
  if flags.help then out:write(HELP.deploy) return EXIT_OK end
  if #pos < 2 then usage_error("deploy: needs TARGET and VERSION (see 'deployctl deploy --help')") end
  local banner = flags.simulate and start_simulation(flags)
  local kinds = { canary = deploy.CanaryStrategy, ["blue-green"] = deploy.BlueGreenStrategy,
                  bluegreen = deploy.BlueGreenStrategy }
  local class = kinds[flags.strategy or "blue-green"]
  if not class then
    usage_error("deploy: --strategy '%s' is not known (known: canary, blue-green)", flags.strategy)
  end
  local ok, strategy = pcall(class, strategy_params(flags.set or {}))
  if not ok then usage_error("%s", (tostring(strategy):gsub("^deploy: ", "deploy: --set: "))) end
  local interval = strategy.name == "canary" and strategy.interval or nil
  local sink, tick = event_sink(flags, interval)
  local m = open_manager(opts, { on_event = sink })
  check_target(m, pos[1])
  if banner then banner() end
  local done, res = pcall(with_ticker, tick, function() return m:deploy(pos[1], pos[2], { strategy = strategy }) end)
  if not done then usage_error("%s", tostring(res)) end
  return result_exit(res, flags)
end

function commands.rollback(opts, args)
  local flags, pos = parse_flags("rollback", args, with_output{}, 2)
  if flags.help then out:write(HELP.rollback) return EXIT_OK end
  if #pos < 1 then usage_error("rollback: needs TARGET (see 'deployctl rollback --help')") end
  local sink, tick = event_sink(flags)
  local m = open_manager(opts, { on_event = sink })
  check_target(m, pos[1])
  local ok, res = pcall(with_ticker, tick, function() return m:rollback(pos[1], pos[2]) end)
  if not ok then usage_error("%s", tostring(res)) end
  if res.rolled_back_deployment and res.success and not flags.json then
    printf("%s: back on %s in %s: deployment %s was still running with %s warm, traffic returned in one router "
           .. "change (no restart)\n", res.target, res.version, fmt_duration(res.duration), res.rolled_back_deployment,
           res.version)
    return EXIT_OK
  end
  return result_exit(res, flags)
end

-- "2", or "4 (2 live, 2 new)" while versions overlap.
local function instance_counts(s)
  local by_role, order = {}, {}
  for _, g in ipairs(s.instances_by_version or {}) do
    if g.running > 0 then
      if not by_role[g.role] then order[#order + 1] = g.role end
      by_role[g.role] = (by_role[g.role] or 0) + g.running
    end
  end
  if #order <= 1 and (order[1] == nil or order[1] == "live") then return tostring(s.instances) end
  local parts = {}
  for _, role in ipairs{ "live", "new", "leaving" } do
    if by_role[role] then parts[#parts + 1] = by_role[role] .. " " .. role end
  end
  return string.format("%d (%s)", s.instances, table.concat(parts, ", "))
end

-- status TARGET's exit code: 0 healthy (also never deployed, stopped on
-- purpose by a prune, and a rollout
-- under way whose versions are healthy), 4 degraded, 5 unhealthy.
local function status_exit(s)
  if s.state == "degraded" or s.health == "degraded" then return EXIT_DEGRADED end
  if s.state == "never_deployed" or s.state == "stopped" then return EXIT_OK end
  if s.state == "unhealthy" or s.state == "failed" or s.health == "unhealthy" then return EXIT_UNHEALTHY end
  return EXIT_OK
end

-- The last measurement of each analysis metric of the target's newest
-- deployment (nil when it measured nothing).
local function last_analysis(m, target)
  local d = m:history(target, 1)[1]
  if not d then return nil end
  local by_metric, order = {}, {}
  for _, ev in ipairs(m:events(d.id)) do
    if ev.kind == "analysis" then
      local a = ev.data
      if not by_metric[a.metric] then order[#order + 1] = a.metric end
      by_metric[a.metric] = { metric = a.metric, source = a.source, verdict = a.verdict, value = a.value,
                              baseline = a.baseline, pct = a.pct, detail = a.detail, failures = a.failures,
                              failure_limit = a.failure_limit, time = ev.time }
    end
  end
  if #order == 0 then return nil end
  local list = {}
  for _, name in ipairs(order) do list[#list + 1] = by_metric[name] end
  return { deployment_id = d.id, version = d.version, status = d.status, metrics = list }
end

function commands.status(opts, args)
  local flags, pos = parse_flags("status", args, { json = "bool" }, 1)
  if flags.help then out:write(HELP.status) return EXIT_OK end
  local m = open_manager(opts)
  if pos[1] then check_target(m, pos[1]) end
  local targets = pos[1] and { pos[1] } or m:targets()
  local rows = {}
  for _, t in ipairs(targets) do rows[#rows + 1] = m:describe(t) end
  local instances, router_error, routers
  if pos[1] then instances, router_error, routers = m:live_instances(pos[1]) end
  local analysis = pos[1] and last_analysis(m, pos[1]) or nil
  if flags.json then
    local doc = { targets = rows, instances = instances, router_error = router_error, routers = routers,
                  lock = pos[1] and m:lock(pos[1]) or nil, analysis = analysis }
    out:write(redact(cjson.encode(doc)), "\n")
    return pos[1] and status_exit(rows[1]) or EXIT_OK
  end
  printf("%-16s %-20s %-14s %-10s %s\n", "TARGET", "VERSION", "STATUS", "HEALTH", "INSTANCES")
  for _, s in ipairs(rows) do
    local never = s.state == "never_deployed"
    printf("%-16s %-20s %-14s %-10s %s\n", s.target, s.current_version or "-", never and "never deployed" or s.status,
      never and "-" or s.health, instance_counts(s))
    -- the rest of the truth, when there is more to say than the columns
    if not never and (s.state ~= "healthy" or s.last_deployment and s.last_deployment.status ~= "succeeded") then
      printf("  %s\n", s.summary)
    end
  end
  for _, s in ipairs(rows) do
    local mt = s.maintenance
    if mt then
      printf("%s: in maintenance since %s (%s), Retry-After %d s%s\n", s.target, mt.since, mt.by, mt.retry_after,
        mt.message and (": " .. mt.message) or "")
    end
  end
  local several = routers and #routers > 1
  local function weight_of(w)
    return w == nil and "-" or (w == false and "absent" or tostring(w))
  end
  if instances and #instances > 0 then
    local host_width, weight_width = 5, 7
    for _, i in ipairs(instances) do
      host_width = math.max(host_width, #(i.node or "local"))
      if several then
        local ws = {}
        for k = 1, #routers do ws[k] = weight_of(i.router_weights[k]) end
        i.weight_text = table.concat(ws, "/")
      else
        i.weight_text = weight_of(i.router_weight)
      end
      weight_width = math.max(weight_width, #i.weight_text)
    end
    printf("\n%-8s %-" .. host_width .. "s %-16s %-15s %-6s %-8s %-11s %-" .. weight_width .. "s %-9s %s\n",
      "SERVER", "HOST", "VERSION", "ADDRESS", "PORT", "PID", "HEALTH", "WEIGHT", "STATE", "LIVE")
    for _, i in ipairs(instances) do
      local health = i.alive and i.health or (i.unreachable and "unreachable" or "dead")
      printf("%-8s %-" .. host_width .. "s %-16s %-15s %-6d %-8d %-11s %-" .. weight_width .. "s %-9s %s\n", i.server,
        i.node or "local", i.version, i.host ~= "" and i.host or "-", i.port, i.pid, health, i.weight_text, i.state,
        i.live and "yes" or "no")
    end
  end
  if several then
    printf("\nWEIGHT per router:\n")
    for k, r in ipairs(routers) do
      printf("  %d  %s%s\n", k, r.router, r.error and "  (could not be read)" or "")
    end
  end
  if analysis then
    printf("\nANALYSIS of %s (%s, %s)\n", analysis.deployment_id, analysis.version, analysis.status)
    printf("%-16s %-11s %-13s %-12s %-9s %s\n", "METRIC", "SOURCE", "VERDICT", "VALUE", "FAILURES", "AT")
    for _, a in ipairs(analysis.metrics) do
      printf("%-16s %-11s %-13s %-12s %-9s %g %% %s\n", a.metric, a.source, a.verdict,
        a.value ~= nil and string.format("%.6g", a.value) or "-",
        string.format("%d/%d", a.failures or 0, a.failure_limit or 0), a.pct or 0, a.time)
      printf("    %s\n", a.detail or "")
    end
  end
  if pos[1] then
    local lock = m:lock(pos[1])
    if lock then
      local who = lock.purpose == "deploy" and ("deployment " .. lock.deployment_id) or ("a " .. lock.purpose)
      printf("\nlocked by %s, pid %d on %s, since %s%s\n", who, lock.pid, lock.host, lock.since,
        lock["until"] and (", until " .. lock["until"] .. " unless renewed") or "")
    end
  end
  if router_error then eprintf("router: %s\n", router_error) end
  local exit = pos[1] and status_exit(rows[1]) or EXIT_OK
  for k, r in ipairs(routers or {}) do
    local missing = 0
    for _, i in ipairs(instances or {}) do
      if i.live and i.router_weights and i.router_weights[k] == false and not r.error then missing = missing + 1 end
    end
    if missing > 0 then
      eprintf("router: %d live instance(s) of %s are missing from %s (restarted?): run 'deployctl reconcile %s'\n",
        missing, pos[1], r.router, pos[1])
    end
  end
  return exit
end

function commands.maintenance(opts, args)
  local flags, pos = parse_flags("maintenance", args, { message = "value", ["retry-after"] = "value" }, 2)
  if flags.help then out:write(HELP.maintenance) return EXIT_OK end
  if #pos < 2 or (pos[2] ~= "on" and pos[2] ~= "off") then
    usage_error("maintenance: needs TARGET and on or off, e.g. deployctl maintenance production on --message 'back at 10:00' "
      .. "(see 'deployctl maintenance --help')")
  end
  local on = pos[2] == "on"
  if not on and (flags.message or flags["retry-after"]) then
    usage_error("maintenance: --message and --retry-after go with 'on', not with 'off'")
  end
  local retry
  if flags["retry-after"] then
    retry = math.tointeger(tonumber(flags["retry-after"]))
    if not retry or retry < 0 or retry > 604800 then
      usage_error("maintenance: --retry-after must be whole seconds from 0 to 604800, got '%s'", flags["retry-after"])
    end
  end
  local m = open_manager(opts)
  check_target(m, pos[1])
  local okcall, ok, why, locked = pcall(m.maintenance, m, pos[1], on, flags.message, retry)
  if not okcall then usage_error("%s", tostring(ok):gsub("^deploy: ", "")) end
  if not ok then
    eprintf("deployctl: %s\n", why)
    return locked and EXIT_LOCKED or EXIT_FAILED
  end
  if on then
    printf("%s: in maintenance: its load balancers answer 503%s\n", pos[1],
      flags.message and (" with \"" .. flags.message .. "\"") or "")
  else
    printf("%s: out of maintenance: its load balancers serve it again\n", pos[1])
  end
  return exit
end

function commands.store(opts, args)
  local flags, pos = parse_flags("store", args, { to = "value", from = "value" }, 1)
  if flags.help then out:write(HELP.store) return EXIT_OK end
  if pos[1] ~= "migrate" then usage_error("store: the only subcommand is 'migrate' (see 'deployctl store --help')") end
  if not flags.to then usage_error("store migrate: needs --to postgresql://USER@HOST:PORT/DB") end
  local from = flags.from
  if not from then
    local m = open_manager(opts)
    from = m:state_path()
    m:close()
  end
  if from:match("^postgres") then usage_error("store migrate: --from must be an SQLite state file, got a database URL") end
  local counts, why = deploy.migrate_store(from, flags.to)
  if not counts then
    eprintf("deployctl: store migrate: %s\n", why)
    return EXIT_FAILED
  end
  printf("copied %d target(s), %d deployment(s), %d event(s), %d instance(s) from %s: set config.state to the URL\n",
    counts.targets, counts.deployments, counts.events, counts.instances, from)
  return EXIT_OK
end

function commands.reconcile(opts, args)
  local flags, pos = parse_flags("reconcile", args, {}, 1)
  if flags.help then out:write(HELP.reconcile) return EXIT_OK end
  if #pos < 1 then usage_error("reconcile: needs TARGET (see 'deployctl reconcile --help')") end
  local m = open_manager(opts)
  check_target(m, pos[1])
  local ok, why, locked = m:reconcile(pos[1])
  if not ok then
    eprintf("deployctl: %s\n", why)
    return locked and EXIT_LOCKED or EXIT_FAILED
  end
  local s = m:get_status(pos[1])
  printf("%s: %s on %d instance(s), %s\n", pos[1], s.current_version or "nothing", s.instances, s.health)
  return EXIT_OK
end

local function fmt_bytes(n)
  if n >= 1024 * 1024 then return string.format("%.1f MiB", n / 1024 / 1024) end
  if n >= 1024 then return string.format("%.1f KiB", n / 1024) end
  return string.format("%d bytes", n)
end

function commands.prune(opts, args)
  local flags, pos = parse_flags("prune", args, {}, 1)
  if flags.help then out:write(HELP.prune) return EXIT_OK end
  local m = open_manager(opts)
  local targets = pos[1] and { pos[1] } or m:targets()
  if pos[1] then check_target(m, pos[1]) end
  local failed = false
  for _, t in ipairs(targets) do
    local r = m:prune(t)
    printf("%s: %d deployment(s) and %d log file(s) (%s) removed, %d log(s) rotated\n", t, r.deployments,
      r.logs_removed, fmt_bytes(r.bytes_freed), r.logs_rotated)
    if r.error then
      eprintf("deployctl: prune %s: %s\n", t, r.error)
      failed = true
    end
  end
  return failed and EXIT_FAILED or EXIT_OK
end

function commands.logs(opts, args)
  local flags, pos = parse_flags("logs", args, { host = "value", version = "value", lines = "value",
                                                 follow = "bool" }, 1)
  if flags.help then out:write(HELP.logs) return EXIT_OK end
  if #pos < 1 then usage_error("logs: needs TARGET (see 'deployctl logs --help')") end
  local lines
  if flags.lines then
    lines = math.tointeger(tonumber(flags.lines))
    if not lines or lines < 1 then usage_error("logs: --lines must be a positive integer, got '%s'", flags.lines) end
  end
  local m = open_manager(opts)
  check_target(m, pos[1])
  -- Chunks come as they are read: lines are put together per instance,
  -- each printed whole with its prefix.
  local partial, failed = {}, 0
  local function prefix(e)
    return string.format("[%s%s#%d] ", e.node and (e.node .. " ") or "", e.version, e.instance)
  end
  local function on_output(e, text, why)
    local key = e.server
    if text then
      local buf = (partial[key] or "") .. text
      local from = 1
      while true do
        local nl = buf:find("\n", from, true)
        if not nl then break end
        printf("%s%s\n", prefix(e), buf:sub(from, nl - 1))
        from = nl + 1
      end
      partial[key] = buf:sub(from)
      out:flush()
      return
    end
    if partial[key] and partial[key] ~= "" then printf("%s%s\n", prefix(e), partial[key]) end
    partial[key] = nil
    if why then
      failed = failed + 1
      eprintf("deployctl: %s\n", why)
    end
  end
  local ok, res, why = pcall(m.logs, m, pos[1], { host = flags.host, version = flags.version, lines = lines,
                                                  follow = flags.follow, on_output = on_output })
  if not ok then usage_error("%s", tostring(res)) end
  if res == nil then
    eprintf("deployctl: %s\n", why)
    return EXIT_FAILED
  end
  return failed > 0 and EXIT_FAILED or EXIT_OK
end

local function revision_of(d)
  local g = type(d.metadata) == "table" and d.metadata.gitops
  return type(g) == "table" and g.revision and g.revision:sub(1, 10) or "-"
end

-- How many leading characters tell every deployment of the store apart
-- (at least 8): history shows ids that short, and they work wherever an id
-- is asked for.
local function short_id_width(m)
  local ids = {}
  for _, t in ipairs(m:targets()) do
    for _, d in ipairs(m:history(t)) do ids[#ids + 1] = d.id end
  end
  table.sort(ids)
  local width = 8
  for i = 2, #ids do
    local a, b, n = ids[i - 1], ids[i], 0
    while n < #a and a:sub(n + 1, n + 1) == b:sub(n + 1, n + 1) do n = n + 1 end
    width = math.max(width, n + 1)
  end
  return width
end

function commands.history(opts, args)
  local flags, pos = parse_flags("history", args, { limit = "value", json = "bool" }, 1)
  if flags.help then out:write(HELP.history) return EXIT_OK end
  if #pos < 1 then usage_error("history: needs TARGET (see 'deployctl history --help')") end
  local limit = 0
  if flags.limit then
    limit = math.tointeger(tonumber(flags.limit))
    if not limit or limit < 1 then
      usage_error("history: --limit must be a positive integer, got '%s'", flags.limit)
    end
  end
  local m = open_manager(opts)
  check_target(m, pos[1])
  local rows = m:history(pos[1], limit)
  if flags.json then
    for _, d in ipairs(rows) do out:write(redact(cjson.encode(d)), "\n") end
    return EXIT_OK
  end
  local width = short_id_width(m)
  printf("%-" .. width .. "s %-8s %-14s %-11s %-11s %-24s %-8s %-18s %s\n", "ID", "KIND", "VERSION", "STRATEGY",
    "RESULT", "STARTED", "DURATION", "BY", "REVISION")
  for _, d in ipairs(rows) do
    printf("%-" .. width .. "s %-8s %-14s %-11s %-11s %-24s %-8s %-18s %s\n", d.id:sub(1, width), d.kind, d.version,
      d.strategy, d.status, d.created_at, fmt_duration(d.duration), d.user, revision_of(d))
    if d.errors and d.errors[1] then printf("    reason: %s\n", (d.errors[1]:gsub("\n.*", ""))) end
  end
  return EXIT_OK
end

local function control(command)
  return function(opts, args)
    local flags, pos = parse_flags(command, args, {}, 1)
    if flags.help then out:write(HELP[command]) return EXIT_OK end
    if #pos < 1 then usage_error("%s: needs TARGET (see 'deployctl %s --help')", command, command) end
    local m = open_manager(opts)
    check_target(m, pos[1])
    local ok, why = m[command](m, pos[1])
    if not ok then
      eprintf("deployctl: %s\n", why)
      return EXIT_FAILED
    end
    printf("%s: %s requested\n", pos[1], command)
    return EXIT_OK
  end
end
commands.promote = control("promote")
commands.abort = control("abort")

-- A deployment named on the command line: an id, any unique prefix of one,
-- or "latest" (the target's newest; the target may be left out when the
-- config has only one).
local function find_deployment(m, cmd, id, target)
  if id == "latest" then
    if not target then
      local targets = m:targets()
      if #targets ~= 1 then
        usage_error("%s: 'latest' needs the target: deployctl %s latest TARGET (targets: %s)", cmd, cmd,
          table.concat(targets, ", "))
      end
      target = targets[1]
    end
    check_target(m, target)
  elseif target then
    usage_error("%s: give a TARGET only with 'latest' (an id names its target)", cmd)
  end
  local d, why = m:deployment(id, target)
  if not d then usage_error("%s: %s (see 'deployctl history TARGET')", cmd, tostring(why):gsub("^deploy: ", "")) end
  return d
end

function commands.report(opts, args)
  local flags, pos = parse_flags("report", args, {}, 2)
  if flags.help then out:write(HELP.report) return EXIT_OK end
  if #pos < 1 then usage_error("report: needs DEPLOYMENT_ID (see 'deployctl history TARGET')") end
  local m = open_manager(opts)
  local d = find_deployment(m, "report", pos[1], pos[2])
  local report = require "deployctl.report"
  out:write(redact(report.html(d, m:events(d.id))))
  return EXIT_OK
end

-- The man page and bash completion, both made from COMMANDS and HELP.
-- The man page's CONFIGURATION and FILES sections (README.md has the
-- same with examples).
local CONFIGURATION = [[
The configuration is a Lua file returning a table: --config FILE (or -c
FILE), else $DEPLOY_CONFIG, else ./deployctl.lua. (A ./deploy.lua that is a
config is still read in this release, with a warning: rename it; that
name hides the deploy module from require in its directory.)

return {
  state = ".deploy/state.db",   -- or postgresql://USER@HOST/DB; $DEPLOY_STATE wins
  clock = "real",               -- or "virtual"; unset: the process's clock
  retain = { history = 200, versions = 10, logs = 100 },
  simulate = { start_time = 1, versions = { ["1.2.0"] = { unhealthy_after = 60 } } },
  targets = {
    production = {
      instances = 2,            -- per host, 1..64
      hosts = { "app1", "deploy@10.0.0.7:2222" },   -- only with provider kind ssh
      provider = { kind = "process", command = "./app --port {port}", ports = "20000-20999",
                   stop_timeout = 10, env = { TOKEN = "${TOKEN}" }, workdir = "/srv/app" },
      router = { kind = "haproxy", socket = "/run/haproxy/admin.sock", backend = "app",
                 prefix = "dc_", timeout = 5, drain_timeout = 30 },
      health = { path = "/healthz", expect_status = 200, timeout = 2, interval = 1,
                 failure_threshold = 3, start_timeout = 60 },
      retain = { history = 50 },
    },
  },
}

provider.kind: process (local processes), ssh (on the target's hosts: also
log_dir, key, known_hosts, ssh_config, accept_new, connect_timeout,
boot_limit, boot_wait), test (instances inside deployctl, for specs:
start_time, unhealthy, unhealthy_after, error_rate, crash_after, versions).
router.kind: haproxy (socket: a path, tcp://ADDR:PORT or ssh://HOST/path;
backend; prefix of the server names it owns, default dc_; timeout per
command, default 5; drain_timeout, default 30), nginx (include, upstream,
conf, pid, nginx, timeout, drain_timeout), none (the split follows the
instance ratio), test (records weights). simulate: how --simulate's
instances behave (the test provider's fields; start_time defaults to 1).
Placeholders in commands: {port} {version} {target} {instance} {host};
${NAME} is read from the environment and never stored or printed.]]

local FILES = {
  { "./deployctl.lua", "the configuration (see CONFIGURATION)" },
  { ".deploy/state.db", "the store (SQLite, WAL), unless config.state or $DEPLOY_STATE say otherwise" },
  { ".deploy/logs/TARGET-VERSION-N.log", "each local instance's output (beside the store: STATE_DIR/logs)" },
  { ".deploy/git/", "GitOps repository caches (beside the store)" },
  { "PREFIX/lib/deployctl/deploy-git.so, deploy-http.so", "modules loaded on first use (git, HTTP); $DEPLOY_MODULE_DIR first" },
  { "PREFIX/lib/lua/5.4/deploy.so", "the Lua module: require \"deploy\" and require \"deploy.testing\"" },
}

function commands.man(opts, args)
  local flags = parse_flags("man", args, {}, 0)
  if flags.help then out:write(HELP.man) return EXIT_OK end
  local function esc(s) return (s:gsub("\\", "\\e"):gsub("^%.", "\\&."):gsub("\n%.", "\n\\&."):gsub("\n'", "\n\\&'")) end
  local lines = {
    '.TH DEPLOYCTL 1 "" "deployctl ' .. deploy._VERSION .. '" "User Commands"',
    ".SH NAME", "deployctl \\- safe canary and blue-green rollouts behind HAProxy, scripted in Lua",
    ".SH SYNOPSIS",
  }
  -- each command's whole usage line, from its help (flags included)
  for _, c in ipairs(COMMANDS) do
    local usage = (HELP[c[1]] or ""):match("^Usage: deployctl " .. c[1]:gsub("%p", "%%%0") .. " ?([^\n]*)")
    lines[#lines + 1] = ".br"
    lines[#lines + 1] = "\\fBdeployctl\\fR [\\-c|\\-\\-config FILE] \\fB" .. c[1] .. "\\fR " .. esc(usage or c[2])
  end
  for _, l in ipairs({
    ".SH DESCRIPTION",
    "deployctl puts new versions of an application on target environments with canary and blue-green rollouts, "
      .. "gates every step on health checks, rolls back by itself, keeps a durable history, and syncs desired "
      .. "versions from a git repository.",
    ".SH COMMANDS",
  }) do lines[#lines + 1] = l end
  for _, c in ipairs(COMMANDS) do
    lines[#lines + 1] = ".TP"
    lines[#lines + 1] = "\\fB" .. c[1] .. "\\fR " .. esc(c[2])
    lines[#lines + 1] = esc(c[3])
    if HELP[c[1]] then
      lines[#lines + 1] = ".RS"
      lines[#lines + 1] = ".nf"
      lines[#lines + 1] = esc(HELP[c[1]]:gsub("\n+$", ""))
      lines[#lines + 1] = ".fi"
      lines[#lines + 1] = ".RE"
    end
  end
  lines[#lines + 1] = ".SH CONFIGURATION"
  lines[#lines + 1] = ".nf"
  lines[#lines + 1] = esc(CONFIGURATION)
  lines[#lines + 1] = ".fi"
  lines[#lines + 1] = ".SH FILES"
  for _, f in ipairs(FILES) do
    lines[#lines + 1] = ".TP\n" .. esc(f[1]) .. "\n" .. esc(f[2])
  end
  lines[#lines + 1] = ".SH ENVIRONMENT"
  lines[#lines + 1] = ".TP\nDEPLOY_CONFIG\nthe configuration file when --config is not given"
  lines[#lines + 1] = ".TP\nDEPLOY_STATE\nthe store (a SQLite file or postgresql:// URL), over config.state"
  lines[#lines + 1] = ".TP\nDEPLOY_MODULE_DIR\nwhere deploy-git.so and deploy-http.so are looked for first"
  lines[#lines + 1] = ".TP\nDEPLOY_SSH_KEY\nthe ssh provider's key (a path or the key itself)"
  lines[#lines + 1] = ".TP\nDEPLOY_GIT_USERNAME, DEPLOY_GIT_TOKEN, DEPLOY_GIT_SSH_KEY\nGitOps credentials"
  lines[#lines + 1] = ".SH EXIT STATUS"
  lines[#lines + 1] = "0 success, 1 deployment failed and rolled back, 2 usage or configuration error, 3 target locked; "
    .. "status TARGET: 4 degraded, 5 unhealthy."
  out:write(table.concat(lines, "\n"), "\n")
  return EXIT_OK
end

local function flags_of(help)
  local seen, list = {}, {}
  for f in (help or ""):gmatch("(%-%-[%w-]+)") do
    if not seen[f] then seen[f] = true list[#list + 1] = f end
  end
  if not seen["--help"] then list[#list + 1] = "--help" end
  return table.concat(list, " ")
end

function commands.completion(opts, args)
  local flags, pos = parse_flags("completion", args, {}, 1)
  if flags.help then out:write(HELP.completion) return EXIT_OK end
  if pos[1] ~= "bash" then usage_error("completion: only 'bash' is supported (deployctl completion bash)") end
  local names = {}
  for _, c in ipairs(COMMANDS) do names[#names + 1] = c[1] end
  local cases = {}
  for _, c in ipairs(COMMANDS) do
    cases[#cases + 1] = string.format("    %s) flags=%q ;;", c[1], flags_of(HELP[c[1]]))
  end
  local script = ([==[
# bash completion for deployctl (made by `deployctl completion bash`)
_deployctl() {
  local cur prev cmd i flags
  cur="${COMP_WORDS[COMP_CWORD]}"
  prev="${COMP_WORDS[COMP_CWORD-1]}"
  cmd=""
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "${COMP_WORDS[i]}" in
      --config|-c) ((i++)) ;;
      -*) ;;
      *) cmd="${COMP_WORDS[i]}"; break ;;
    esac
  done
  if [[ "$prev" == "--config" || "$prev" == "-c" ]]; then
    COMPREPLY=($(compgen -f -- "$cur")); return
  fi
  if [[ -z "$cmd" ]]; then
    COMPREPLY=($(compgen -W "COMMANDS --config --help" -- "$cur")); return
  fi
  case "$cmd" in
CASES
  esac
  if [[ "$prev" == "--strategy" ]]; then
    COMPREPLY=($(compgen -W "canary blue-green" -- "$cur")); return
  fi
  if [[ "$cur" == -* ]]; then
    COMPREPLY=($(compgen -W "$flags" -- "$cur")); return
  fi
  case "$cmd" in
    run) COMPREPLY=($(compgen -f -- "$cur")) ;;
    help) COMPREPLY=($(compgen -W "COMMANDS" -- "$cur")) ;;
    completion) COMPREPLY=($(compgen -W "bash" -- "$cur")) ;;
  esac
}
complete -F _deployctl deployctl
]==]):gsub("COMMANDS", table.concat(names, " ")):gsub("CASES", (table.concat(cases, "\n"):gsub("%%", "%%%%")))
  out:write(script)
  return EXIT_OK
end

-- GitOps: diff, sync, watch live in cli/gitops.lua.
local function gitops_ctx(opts)
  return {
    deploy = deploy,
    open_manager = function(extra) return open_manager(opts, extra) end,
    usage_error = usage_error,
    parse_flags = parse_flags,
    printf = printf,
    eprintf = eprintf,
    event_line = function(ev) return redact(event_line(ev)) end,
  }
end

for _, name in ipairs{ "diff", "sync", "watch" } do
  commands[name] = function(opts, args)
    if not gitops_ok or type(gitops) ~= "table" or not gitops[name] then
      usage_error("%s: GitOps support is not built into this deployctl", name)
    end
    for _, a in ipairs(args) do
      if a == "--help" or a == "-h" then out:write(HELP[name]) return EXIT_OK end
    end
    return gitops[name](gitops_ctx(opts), args)
  end
end

function commands.serve(opts, args)
  if not serve_ok then usage_error("serve: not built into this deployctl") end
  return serve_cli.serve(gitops_ctx(opts), args)
end

-- ---------------------------------------------------------------------------

local function main(...)
  local argv = { ... }
  local opts, rest = parse_global(argv)
  local cmd = rest[1]
  if not cmd or cmd == "--help" or cmd == "-h" then
    out:write(HELP.main)
    return cmd and EXIT_OK or EXIT_USAGE
  end
  if cmd == "--version" then cmd = "version" end
  local fn = commands[cmd]
  if not fn then usage_error("unknown command '%s' (see 'deployctl help')", cmd) end
  local args = {}
  for i = 2, #rest do args[i - 1] = rest[i] end
  return fn(opts, args)
end

local ok, rv = xpcall(main, function(e)
  if type(e) == "table" and e.usage then return e end
  return debug.traceback(tostring(e), 2)
end, ...)
out:flush()
-- Notifications and event webhooks are never waited for by a rollout; they
-- still get up to 10 s to leave before the process ends (not after Ctrl-C).
local left = (ok or not tostring(rv):find("interrupted", 1, true)) and deploy._flush(10) or 0
if left > 0 then eprintf("deployctl: %d notification(s) not delivered in 10 s: dropped\n", left) end
if ok then return rv end
if type(rv) == "table" then
  eprintf("deployctl: %s\n", rv.usage)
  return EXIT_USAGE
end
if tostring(rv):match("^[^\n]*interrupted\n") or tostring(rv):match("interrupted$") then
  eprintf("deployctl: interrupted\n")
  return 130
end
eprintf("deployctl: %s\n", rv)
return EXIT_USAGE
