-- HTTP from specs through the real curl (a client nobody here wrote), and
-- HMAC signatures through the real openssl command.
local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"

local http = {}
local q = fixtures.shell_quote

-- http.request{ method, url, headers = { ["Name"] = "v" }, body = "...",
-- body_file = path, timeout = 10, cacert = path }
-- -> status (0 when no answer), body, headers (lowercase names), json (or nil)
-- Scratch files of one request (not fixtures.tmpdir: a spec makes hundreds
-- of requests, and cleanup looks for processes naming each of its dirs).
local function scratch()
  local base = os.tmpname()
  local files = { body = base .. ".body", headers = base .. ".headers", req = base .. ".req", err = base .. ".err" }
  return base, files
end

function http.request(o)
  local base, f = scratch()
  local args = { "curl", "-s", "-S", "-o", q(f.body), "-D", q(f.headers), "-w", "'%{http_code}'",
                 "--max-time", tostring(o.timeout or 10), "-X", q(o.method or "GET") }
  for k, v in pairs(o.headers or {}) do args[#args + 1] = "-H " .. q(k .. ": " .. v) end
  if o.body then
    fixtures.write_file(f.req, o.body)
    args[#args + 1] = "--data-binary @" .. q(f.req)
  elseif o.body_file then
    args[#args + 1] = "--data-binary @" .. q(o.body_file)
  end
  if o.cacert then args[#args + 1] = "--cacert " .. q(o.cacert) end
  args[#args + 1] = q(o.url)
  local p = io.popen(table.concat(args, " ") .. " 2>" .. q(f.err))
  local code = tonumber(p:read("a")) or 0
  p:close()
  local body = fixtures.read_file(f.body) or ""
  local err = fixtures.read_file(f.err)
  local head = fixtures.read_file(f.headers) or ""
  for _, path in pairs(f) do os.remove(path) end
  os.remove(base)
  local headers = {}
  for line in head:gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.*)$")
    if k then headers[k:lower()] = v end
  end
  local ok, doc = pcall(cjson.decode, body)
  return code, body, headers, ok and type(doc) == "table" and doc or nil, err
end

function http.get(url, headers)
  return http.request{ url = url, headers = headers }
end

function http.post(url, body, headers)
  return http.request{ method = "POST", url = url, body = body or "", headers = headers }
end

-- The lowercase hex HMAC-SHA256 of text with key (openssl dgst).
function http.hmac_sha256(key, text)
  local path = os.tmpname()
  fixtures.write_file(path, text)
  local p = io.popen("openssl dgst -sha256 -hmac " .. q(key) .. " -r " .. q(path))
  local out = p:read("a")
  p:close()
  os.remove(path)
  return (assert(out:match("^(%x+)"), "openssl dgst failed: " .. out))
end

return http
