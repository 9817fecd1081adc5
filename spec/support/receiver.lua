-- The HTTP receiver of the webhook and deploy.http specs: build/hook-receiver
-- (spec/support/hook_receiver.c), a real server on 127.0.0.1 that logs every
-- request and checks its X-Deploy-Signature with its own HMAC (OpenSSL's).
-- Its paths say how it answers (see the C file): /ok, /status/NNN,
-- /gate/NAME, /wait/NAME, /rollback/NAME, /flaky/N/NAME, /slow/MS, /hang,
-- /huge/BYTES, /redirect, /text, /notify/NAME.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"

local q = fixtures.shell_quote

local Receiver = {}
Receiver.__index = Receiver

local receiver = {}

local function bin()
  local b = fixtures.build_dir()
  if b:sub(1, 1) ~= "/" then b = fixtures.root() .. "/" .. b end
  return b .. "/hook-receiver"
end

-- opts.secret: the shared secret it checks signatures with (none: it
-- checks nothing). Returns { dir, port, pid, url(path) ... }.
function receiver.start(opts)
  opts = opts or {}
  local dir = fixtures.tmpdir("receiver")
  local port = fixtures.free_port()
  local cmd = string.format("exec %s --port %d --dir %s", q(bin()), port, q(dir))
  if opts.secret then cmd = cmd .. " --secret " .. q(opts.secret) end
  local self = setmetatable({ dir = dir, port = port, secret = opts.secret, base = "http://127.0.0.1:" .. port }, Receiver)
  self.pid = fixtures.spawn(cmd, dir .. "/receiver.log")
  fixtures.wait_until(function() return (fixtures.http_get(self.base .. "/ok", 1)) ~= 0 end, 10, "hook-receiver to listen")
  -- the readiness probe is not one of the spec's requests
  os.remove(dir .. "/requests.jsonl")
  return self
end

function Receiver:url(path) return self.base .. path end

-- Every request so far, oldest first, as logged: { n, method, path,
-- signature = "ok"|"bad"|"missing"|"unchecked", headers, body, json (the
-- body decoded, when it is JSON) }. path_prefix: only those paths.
function Receiver:requests(path_prefix)
  local out = {}
  local text = fixtures.read_file(self.dir .. "/requests.jsonl") or ""
  for line in text:gmatch("[^\n]+") do
    local r = cjson.decode(line)
    if not path_prefix or r.path:sub(1, #path_prefix) == path_prefix then
      local ok, body = pcall(cjson.decode, r.body)
      if ok then r.json = body end
      out[#out + 1] = r
    end
  end
  return out
end

function Receiver:open(name) fixtures.write_file(self.dir .. "/open-" .. name, "") end
function Receiver:close(name) os.remove(self.dir .. "/open-" .. name) end
function Receiver:ask_rollback(name) fixtures.write_file(self.dir .. "/rollback-" .. name, "") end

function Receiver:stop()
  if self.pid then fixtures.stop(self.pid, 3) self.pid = nil end
end

return receiver
