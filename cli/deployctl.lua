-- deployctl's command line, a Lua program on top of the same deploy module
-- that pipeline scripts use. Compiled into the deployctl binary.
--
-- Exit codes: 0 success, 1 deployment failed (and was rolled back),
-- 2 usage or configuration error, 3 target locked.

local deploy = require "deploy"

local EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3

local out, err = io.stdout, io.stderr

local function printf(fmt, ...) out:write(string.format(fmt, ...)) end
local function eprintf(fmt, ...) err:write(string.format(fmt, ...)) end

-- A usage or configuration error: raised as a table so that main() can tell
-- it from a bug and exit 2 with just the message.
local function usage_error(fmt, ...)
  error({ usage = string.format(fmt, ...) }, 0)
end

local HELP = {
  main = [[
Usage: deployctl [--config FILE] <command> [arguments]

Commands:
  run [--simulate] SCRIPT [ARGS...]  run a Lua pipeline script (arguments in `arg`)
  deploy TARGET VERSION         deploy VERSION to TARGET
  rollback TARGET [VERSION]     go back to the previous version, or to VERSION
  status [TARGET]               current version, status, health and instances
  history TARGET [--limit N]    past deployments of TARGET
  promote TARGET                let a paused rollout go on
  abort TARGET                  abort a running rollout (back to the old version)
  version                       print deployctl's version
  help [COMMAND]                this text, or a command's

Options:
  --config FILE   configuration (else $DEPLOY_CONFIG, else ./deploy.lua)
  --help          help for any command

Exit codes: 0 success, 1 deployment failed and rolled back,
2 usage or configuration error, 3 target locked.
]],
  run = [[
Usage: deployctl run [--simulate] SCRIPT [ARGS...]

Runs a Lua pipeline script with `deploy` preloaded (require "deploy").
The script's arguments are in the global table `arg` (arg[0] is SCRIPT).
A script that returns an integer sets the exit code; false means 1.
DeploymentManager{} without a config uses --config's (or $DEPLOY_CONFIG,
or ./deploy.lua).

  --simulate   run on the virtual clock: every wait returns at once and
               events carry virtual timestamps (instances still start and
               health checks still run for real)
]],
  deploy = [[
Usage: deployctl deploy TARGET VERSION [--strategy canary|blue-green] [--set key=value ...] [--quiet]

Deploys VERSION to TARGET with the given strategy (default blue-green).
--set gives the strategy's parameters, e.g.
  deployctl deploy production 1.4.2 --strategy canary --set initial_percentage=5 --set interval=60
  deployctl deploy production 1.4.2 --set switch_delay=10
]],
  rollback = [[
Usage: deployctl rollback TARGET [VERSION]

Rolls TARGET back to its previous version, or to VERSION from its history,
with an instant blue-green switch.
]],
  status = [[
Usage: deployctl status [TARGET]

Shows the current version, status, health and instance count of TARGET,
or of every configured target.
]],
  history = [[
Usage: deployctl history TARGET [--limit N]

Lists past deployments of TARGET, newest first.
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
  version = "Usage: deployctl version\n",
  help = "Usage: deployctl help [COMMAND]\n",
}

-- Splits argv into the global options, the command and its arguments.
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
        -- everything after `run SCRIPT` belongs to the script
        for j = i, #argv do rest[#rest + 1] = argv[j] end
        break
      end
    end
  end
  return opts, rest
end

-- Flags of one command: spec maps flag name to "value" or "bool".
local function parse_flags(cmd, args, spec, max_positional)
  local flags, pos = {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--help" or a == "-h" then
      flags.help = true
      i = i + 1
    elseif a:sub(1, 2) == "--" then
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
    usage_error("%s: too many arguments (%s): see 'deployctl %s --help'", cmd, table.concat(pos, " ", max_positional + 1), cmd)
  end
  return flags, pos
end

local function config_path(opts)
  local path = opts.config or os.getenv("DEPLOY_CONFIG")
  if path and path ~= "" then return path end
  return "deploy.lua"
end

local function open_manager(opts, extra)
  local path = config_path(opts)
  local f = io.open(path, "r")
  if not f then
    usage_error("cannot read config file '%s' (give --config FILE, set DEPLOY_CONFIG, or create ./deploy.lua)", path)
  end
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

local function fmt_duration(s)
  if not s then return "-" end
  if s < 60 then return string.format("%.1fs", s) end
  if s < 3600 then return string.format("%dm%02ds", s // 60, math.floor(s % 60)) end
  return string.format("%dh%02dm", s // 3600, (s % 3600) // 60)
end

local function event_line(ev)
  local d = ev.data or {}
  local detail = ""
  if ev.kind == "traffic" then
    detail = string.format("new version at %g %% (weights old %d, new %d)", d.pct, d.weight_old, d.weight_new)
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
  elseif ev.kind == "finished" then
    detail = d.success and "success" or "failed"
  end
  return string.format("%s %-10s %-16s %s\n", ev.time, ev.target, ev.kind, detail)
end

local function result_exit(res)
  if res.success then
    printf("%s: %s deployed in %s (%s)\n", res.target, res.version, fmt_duration(res.duration), res.strategy)
    return EXIT_OK
  end
  for _, e in ipairs(res.errors or {}) do eprintf("%s: %s\n", res.target, e) end
  local first = (res.errors or {})[1] or ""
  if first:find("target locked", 1, true) then return EXIT_LOCKED end
  return EXIT_FAILED
end

local commands = {}

function commands.version()
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
  if math.type(rv) == "integer" then return rv end
  if rv == false then return EXIT_FAILED end
  return EXIT_OK
end

local function live_printer()
  return function(ev) out:write(event_line(ev)) out:flush() end
end

-- --set key=value pairs become strategy parameters (numbers when they look
-- like numbers).
local function strategy_params(sets)
  local params = {}
  for _, kv in ipairs(sets) do
    local k, v = kv:match("^([%w_]+)=(.*)$")
    if not k then usage_error("deploy: --set '%s' is not key=value (e.g. --set interval=60)", kv) end
    params[k] = tonumber(v) or v
  end
  return params
end

function commands.deploy(opts, args)
  local flags, pos = parse_flags("deploy", args, { strategy = "value", quiet = "bool", set = "list" }, 2)
  if flags.help then out:write(HELP.deploy) return EXIT_OK end
  if #pos < 2 then usage_error("deploy: needs TARGET and VERSION (see 'deployctl deploy --help')") end
  local kinds = { canary = deploy.CanaryStrategy, ["blue-green"] = deploy.BlueGreenStrategy,
                  bluegreen = deploy.BlueGreenStrategy }
  local class = kinds[flags.strategy or "blue-green"]
  if not class then
    usage_error("deploy: --strategy '%s' is not known (known: canary, blue-green)", flags.strategy)
  end
  local ok, strategy = pcall(class, strategy_params(flags.set or {}))
  if not ok then usage_error("%s", tostring(strategy):gsub("^deploy: ", "deploy: --set: ")) end
  local m = open_manager(opts, { on_event = not flags.quiet and live_printer() or nil })
  check_target(m, pos[1])
  local ok, res = pcall(m.deploy, m, pos[1], pos[2], { strategy = strategy })
  if not ok then usage_error("%s", tostring(res)) end
  return result_exit(res)
end

function commands.rollback(opts, args)
  local flags, pos = parse_flags("rollback", args, { quiet = "bool" }, 2)
  if flags.help then out:write(HELP.rollback) return EXIT_OK end
  if #pos < 1 then usage_error("rollback: needs TARGET (see 'deployctl rollback --help')") end
  local m = open_manager(opts, { on_event = not flags.quiet and live_printer() or nil })
  check_target(m, pos[1])
  local ok, res = pcall(m.rollback, m, pos[1], pos[2])
  if not ok then usage_error("%s", tostring(res)) end
  return result_exit(res)
end

function commands.status(opts, args)
  local flags, pos = parse_flags("status", args, {}, 1)
  if flags.help then out:write(HELP.status) return EXIT_OK end
  local m = open_manager(opts)
  local targets = pos[1] and { pos[1] } or m:targets()
  if pos[1] then check_target(m, pos[1]) end
  printf("%-16s %-20s %-13s %-10s %s\n", "TARGET", "VERSION", "STATUS", "HEALTH", "INSTANCES")
  for _, t in ipairs(targets) do
    local s = m:get_status(t)
    printf("%-16s %-20s %-13s %-10s %d\n", s.target, s.current_version or "-", s.status, s.health, s.instances)
  end
  if pos[1] then
    local insts = m:instances(pos[1])
    if #insts > 0 then
      printf("\n%-8s %-20s %-6s %-8s %-7s %-6s %s\n", "SERVER", "VERSION", "PORT", "PID", "ALIVE", "WEIGHT", "STATE")
      for _, i in ipairs(insts) do
        printf("%-8s %-20s %-6d %-8d %-7s %-6d %s%s\n", i.server, i.version, i.port, i.pid, tostring(i.alive),
          i.weight, i.state, i.live and " (live)" or "")
      end
    end
  end
  return EXIT_OK
end

function commands.history(opts, args)
  local flags, pos = parse_flags("history", args, { limit = "value" }, 1)
  if flags.help then out:write(HELP.history) return EXIT_OK end
  if #pos < 1 then usage_error("history: needs TARGET (see 'deployctl history --help')") end
  local limit = 0
  if flags.limit then
    limit = tonumber(flags.limit)
    if not limit or math.type(limit) ~= "integer" and limit ~= math.floor(limit) or limit < 1 then
      usage_error("history: --limit must be a positive integer, got '%s'", flags.limit)
    end
    limit = math.floor(limit)
  end
  local m = open_manager(opts)
  check_target(m, pos[1])
  printf("%-20s %-8s %-16s %-11s %-12s %-24s %-9s %s\n", "ID", "KIND", "VERSION", "STRATEGY", "RESULT", "STARTED",
    "DURATION", "BY")
  for _, d in ipairs(m:history(pos[1], limit)) do
    printf("%-20s %-8s %-16s %-11s %-12s %-24s %-9s %s\n", d.id, d.kind, d.version, d.strategy, d.status,
      d.created_at, fmt_duration(d.duration), d.user)
    if d.errors and d.errors[1] then printf("    reason: %s\n", d.errors[1]) end
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
