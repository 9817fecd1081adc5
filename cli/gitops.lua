-- deployctl diff | sync | watch: GitOps from the command line, on top of
-- deploy.GitOpsSynchronizer. Embedded in the binary as "deployctl.gitops";
-- cli/deployctl.lua calls M.<command>(ctx, args) and exits with the result.
--
-- ctx: deploy, open_manager(extra), usage_error(fmt, ...), parse_flags(cmd,
-- args, spec, max_positional), printf(fmt, ...), eprintf(fmt, ...),
-- event_line(ev).

local M = {}

local EXIT_OK, EXIT_FAILED, EXIT_LOCKED = 0, 1, 3

-- A file name from a repository, printable: control characters escaped, so
-- a name cannot break a line or move the cursor.
local function printable(s)
  return (tostring(s or ""):gsub("[%c\127]", function(c)
    local named = { ["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r" }
    return named[c] or string.format("\\x%02x", c:byte())
  end))
end

local COMMON = [[
  --repo URL      the repository: https://, git://, ssh://, user@host:path or file://
  --branch B      the branch to follow (default main)
  --path P        the directory of the manifests in the repository (default /)
]]

local CREDENTIALS = [[
Credentials come from the environment: DEPLOY_GIT_USERNAME and
DEPLOY_GIT_TOKEN for https (or https://user:token@host/...), DEPLOY_GIT_SSH_KEY
(the path of a private key) for ssh. GIT_SSL_CAINFO names extra CA
certificates to trust. Tokens never appear in the output.
]]

M.help = {
  diff = "Usage: deployctl diff --repo URL [--branch B] [--path P]\n\n"
    .. "Fetches the repository and lists what a sync would change, one line per\n"
    .. "target: create, update (drift included) or delete, from the live version\n"
    .. "to the one git wants.\n\n" .. COMMON .. "\n" .. CREDENTIALS
    .. "\nExit codes: 0 done (with or without changes), 1 the repository could not\n"
    .. "be read or a manifest is invalid, 2 usage or configuration error.\n",
  sync = "Usage: deployctl sync --repo URL [--branch B] [--path P] [--prune] [--retry] [--quiet]\n\n"
    .. "Applies what git wants: every changed target rolls out at once, each with\n"
    .. "its manifest's strategy. A revision with an invalid manifest applies\n"
    .. "nothing. A target rolled back by hand stays pinned until git changes its\n"
    .. "manifest. A manifest whose rollout failed on a target is not applied to it\n"
    .. "again until a commit changes that manifest, or --retry asks for it.\n\n" .. COMMON
    .. "  --prune         stop targets whose manifest was removed (default: report them)\n"
    .. "  --retry         apply again the manifests whose rollout failed before\n"
    .. "  --quiet         no live event lines\n\n" .. CREDENTIALS
    .. "\nExit codes: 0 in sync, 1 something failed (and was rolled back), 2 usage or\n"
    .. "configuration error, 3 a target was locked by another deployment.\n",
  watch = "Usage: deployctl watch --repo URL [--branch B] [--path P] [--interval S] [--prune] [--quiet]\n\n"
    .. "Fetches every S seconds (default 60) and syncs when the revision changes or a\n"
    .. "target drifts. A failed fetch is retried with backoff (S doubled each time, at\n"
    .. "most 300 s); a failed rollout is not retried: the manifest stays held on that\n"
    .. "target until a commit changes it (fetching goes on every S seconds, so a fix\n"
    .. "is applied within one interval), or 'deployctl sync --retry'.\n"
    .. "Stops on SIGINT or SIGTERM.\n\n" .. COMMON
    .. "  --interval S    seconds between fetches (default 60)\n"
    .. "  --prune         stop targets whose manifest was removed\n"
    .. "  --quiet         no live event lines\n\n" .. CREDENTIALS
    .. "\nExit codes: 0 stopped cleanly, 2 usage or configuration error.\n",
}

local FLAGS = {
  diff = { repo = "value", branch = "value", path = "value" },
  sync = { repo = "value", branch = "value", path = "value", prune = "bool", quiet = "bool", retry = "bool" },
  watch = { repo = "value", branch = "value", path = "value", prune = "bool", quiet = "bool", interval = "value" },
}

local function short(rev)
  return rev and rev:sub(1, 12) or "-"
end

local function interval_of(ctx, cmd, text)
  if not text then return nil end
  local s = tonumber(text)
  if not s or s <= 0 or s ~= s or s == math.huge then
    ctx.usage_error("%s: --interval must be a number of seconds > 0, got '%s'", cmd, text)
  end
  return s
end

-- Parses the flags and builds the synchronizer (with the config's
-- manager). Returns nil when --help was asked for (and printed), else the
-- synchronizer and the flags.
local function open(ctx, cmd, args)
  local flags = ctx.parse_flags(cmd, args, FLAGS[cmd], 0)
  if flags.help then
    ctx.printf("%s", M.help[cmd])
    return nil
  end
  if not flags.repo or flags.repo == "" then
    ctx.usage_error("%s: --repo URL is required (see 'deployctl %s --help')", cmd, cmd)
  end
  local interval = interval_of(ctx, cmd, flags.interval)
  local printer = nil
  if not flags.quiet and cmd ~= "diff" then
    printer = function(ev) ctx.printf("%s", ctx.event_line(ev)) end
  end
  local m = ctx.open_manager({ on_event = printer })
  local ok, sync = pcall(ctx.deploy.GitOpsSynchronizer, {
    repo_url = flags.repo, branch = flags.branch, path = flags.path, manager = m,
    interval = interval, prune = flags.prune or false,
  })
  if not ok then ctx.usage_error("%s: %s", cmd, (tostring(sync):gsub("^deploy: ", ""))) end
  return sync, flags
end

local function change_line(c)
  return string.format("%-16s %-7s %-16s -> %-16s %s", c.target, c.kind, c.from or "-", c.to or "-", printable(c.file))
end

function M.diff(ctx, args)
  local sync = open(ctx, "diff", args)
  if not sync then return EXIT_OK end
  local changes, _, errors = sync:get_diff()
  if not changes then
    for _, e in ipairs(errors) do ctx.eprintf("diff: %s\n", e) end
    return EXIT_FAILED
  end
  ctx.printf("%s %s:%s at %s\n", sync.repo_url, sync.branch, sync.path, short(sync.revision))
  if #changes == 0 then
    ctx.printf("no changes: every target is at the version git wants\n")
    return EXIT_OK
  end
  for _, c in ipairs(changes) do
    local note = ""
    if c.pinned then
      note = "  (pinned: rolled back by hand from revision " .. short(c.pinned_revision) .. ")"
    elseif c.failed then
      note = "  (held: its rollout failed, revision " .. short(c.failed_revision) .. "; sync --retry)"
    end
    ctx.printf("%s%s\n", change_line(c), note)
  end
  return EXIT_OK
end

-- Prints a SyncResult; returns its exit code.
local function report(ctx, cmd, result)
  for _, a in ipairs(result.applied or {}) do
    if a.success then
      ctx.printf("%s: %s %s (%s, %s)\n", a.target, a.kind == "delete" and "pruned, was" or "now at",
                 a.kind == "delete" and (a.from or "-") or a.version, a.strategy or "-", printable(a.file))
    else
      ctx.printf("%s: %s %s FAILED\n", a.target, a.kind, a.version or a.from or "")
    end
  end
  for _, p in ipairs(result.pinned or {}) do
    ctx.printf("%s: pinned at %s (git wants %s): %s\n", p.target, p.from or "-", p.to or "-", p.reason)
  end
  for _, s in ipairs(result.skipped or {}) do
    ctx.printf("%s: %s skipped: %s\n", s.target, s.kind, s.reason)
  end
  for _, h in ipairs(result.held or {}) do
    ctx.printf("%s: held at %s (git wants %s): %s\n", h.target, h.from or "-", h.to or "-", h.reason)
  end
  local locked = false
  for _, e in ipairs(result.errors or {}) do
    ctx.eprintf("%s: %s\n", cmd, e)
    locked = locked or e:find("target locked", 1, true) ~= nil
  end
  local n = #(result.applied or {})
  ctx.printf("%s %s: %s (%d applied in %.1fs)\n", cmd, short(result.revision),
             result.success and "in sync" or "FAILED", n, result.duration or 0)
  if result.success then return EXIT_OK end
  return locked and EXIT_LOCKED or EXIT_FAILED
end

function M.sync(ctx, args)
  local sync, flags = open(ctx, "sync", args)
  if not sync then return EXIT_OK end
  return report(ctx, "sync", sync:sync{ retry = flags.retry or false })
end

function M.watch(ctx, args)
  local sync = open(ctx, "watch", args)
  if not sync then return EXIT_OK end
  ctx.printf("watching %s %s:%s every %gs (Ctrl-C to stop)\n", sync.repo_url, sync.branch, sync.path, sync.interval)
  local why = sync:watch(function(changes, result)
    for _, c in ipairs(changes) do ctx.printf("change: %s\n", change_line(c)) end
    report(ctx, "watch", result)
    io.stdout:flush()
  end)
  ctx.printf("watch: stopped (%s)\n", why)
  return EXIT_OK
end

return M
