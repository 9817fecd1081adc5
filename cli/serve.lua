-- deployctl serve: the agent (dashboard, JSON API, /metrics, push webhooks,
-- GitOps watch, supervision), on top of deploy.Server. Embedded in the
-- binary as "deployctl.serve"; cli/deployctl.lua calls M.serve(ctx, args).
--
-- ctx: deploy, open_manager(extra), usage_error(fmt, ...), parse_flags(cmd,
-- args, spec, max_positional), printf(fmt, ...), eprintf(fmt, ...),
-- event_line(ev).

local M = {}

M.help = [[
Usage: deployctl serve [--listen ADDR:PORT] [--tls-cert FILE --tls-key FILE] [--no-supervise] [--quiet]

Runs until SIGINT or SIGTERM, on one event loop:
  - a live dashboard at /, a JSON API under /api/v1 and /metrics (Prometheus);
  - the GitOps repositories of the config (gitops = { { repo_url = ..., branch = ...,
    path = ..., interval = ..., secret = ... } }) watched, and synced at once when a
    push webhook arrives: POST /hooks/github, /hooks/gitlab or /hooks/generic;
  - the live instances of every target supervised: one that dies is restarted
    with backoff (a target's restart = "on-failure" | "always" | "never").

  --listen ADDR:PORT   where to listen (default 127.0.0.1:9753, or config serve.listen);
                       port 0 picks a free one (printed)
  --tls-cert FILE      PEM certificate chain: serve HTTPS (with --tls-key)
  --tls-key FILE       its PEM private key
  --no-supervise       do not restart dead instances
  --quiet              no event lines

Anything that changes state (promote, abort, sync over the API) needs the token
DEPLOY_API_TOKEN, sent as 'Authorization: Bearer TOKEN'; without it set, nothing
may change state over HTTP. Listening beyond 127.0.0.1 needs the token set.

Exit codes: 0 stopped by a signal, 2 usage or configuration error (a port in use,
a certificate that does not load).
]]

-- A webhook secret as the config gives it: ${NAME} read from the
-- environment now (the config keeps it unexpanded: only serve needs it).
local function expand_secret(ctx, i, s)
  if not s then return nil end
  return (s:gsub("%${([%w_]+)}", function(name)
    local v = os.getenv(name)
    if not v or v == "" then
      ctx.usage_error("serve: config gitops[%d].secret names ${%s}, which is not set in the environment: set it", i, name)
    end
    return v
  end))
end

local FLAGS = { listen = "value", ["tls-cert"] = "value", ["tls-key"] = "value", ["no-supervise"] = "bool",
                quiet = "bool" }

function M.serve(ctx, args)
  local flags = ctx.parse_flags("serve", args, FLAGS, 0)
  if flags.help then
    ctx.printf("%s", M.help)
    return 0
  end
  local printer = nil
  if not flags.quiet then
    printer = function(ev) ctx.printf("%s", ctx.event_line(ev)) io.stdout:flush() end
  end
  local m = ctx.open_manager({ on_event = printer })
  local settings = m:settings()
  local cfg = settings.serve or {}
  local cert = flags["tls-cert"] or cfg.tls_cert
  local key = flags["tls-key"] or cfg.tls_key
  if (cert == nil) ~= (key == nil) then
    ctx.usage_error("serve: TLS needs both --tls-cert and --tls-key (or serve.tls_cert and serve.tls_key)")
  end
  for _, f in ipairs{ cert, key } do
    local h = io.open(f, "r")
    if not h then ctx.usage_error("serve: cannot read '%s': give a readable PEM file", f) end
    h:close()
  end
  -- Every secret first: a missing one stops serve before anything starts.
  local secrets = {}
  for i, g in ipairs(settings.gitops or {}) do secrets[i] = expand_secret(ctx, i, g.secret) or false end
  local repos = {}
  for i, g in ipairs(settings.gitops or {}) do
    local ok, sync = pcall(ctx.deploy.GitOpsSynchronizer, {
      repo_url = g.repo_url, branch = g.branch, path = g.path, interval = g.interval, prune = g.prune, manager = m })
    if not ok then ctx.usage_error("serve: config gitops[%d]: %s", i, (tostring(sync):gsub("^deploy: ", ""))) end
    repos[#repos + 1] = { sync = sync, secret = secrets[i] or nil }
  end
  local token = os.getenv("DEPLOY_API_TOKEN")
  if token == "" then token = nil end
  local ok, server = pcall(ctx.deploy.Server, {
    manager = m, listen = flags.listen or cfg.listen, tls_cert = cert, tls_key = key, token = token,
    repos = repos, supervise = not flags["no-supervise"] and (cfg.supervise or true),
    version = ctx.deploy._VERSION })
  if not ok then ctx.usage_error("%s", (tostring(server):gsub("^deploy: ", ""))) end
  local host = server.listen:match("^(.*):%d+$") or "127.0.0.1"
  local scheme = cert and "https" or "http"
  ctx.printf("serve: listening on %s://%s:%d (dashboard /, API /api/v1, metrics /metrics)%s\n", scheme, host,
    server.port, token and "" or "; DEPLOY_API_TOKEN is not set: promote and abort over HTTP are off")
  for _, r in ipairs(repos) do
    ctx.printf("serve: watching %s %s:%s every %gs%s\n", r.sync.repo_url, r.sync.branch, r.sync.path,
      r.sync.interval, r.secret and ", webhooks on" or "")
  end
  io.stdout:flush()
  local why = server:run()
  ctx.printf("serve: stopped (%s)\n", why)
  return 0
end

return M
