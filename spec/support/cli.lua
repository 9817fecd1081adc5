-- Running the real deployctl binary from specs, as a user would.
local fixtures = require "spec.support.fixtures"

local cli = {}

local q = fixtures.shell_quote

local function bin()
  local b = fixtures.build_dir()
  if b:sub(1, 1) ~= "/" then b = fixtures.root() .. "/" .. b end
  return b .. "/deployctl"
end
cli.bin = bin

local function env_prefix(env)
  local parts = {}
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. q(v) end
  table.sort(parts)
  return #parts > 0 and ("env " .. table.concat(parts, " ") .. " ") or ""
end

local function command(args, env)
  local words = {}
  for i, a in ipairs(args) do words[i] = q(a) end
  return env_prefix(env) .. q(bin()) .. " " .. table.concat(words, " ")
end

-- Runs deployctl to completion: returns exit code, stdout, stderr.
function cli.run(args, env)
  local dir = fixtures.tmpdir("cli")
  local cmd = command(args, env) .. " >" .. q(dir .. "/out") .. " 2>" .. q(dir .. "/err") .. " </dev/null"
  local _, _, code = os.execute(cmd)
  return code, fixtures.read_file(dir .. "/out") or "", fixtures.read_file(dir .. "/err") or ""
end

-- Starts deployctl in the background; the handle's :wait() returns exit
-- code, stdout, stderr; :output() reads stdout so far; :pid.
function cli.spawn(args, env)
  local dir = fixtures.tmpdir("cli")
  local h = { dir = dir }
  local inner = command(args, env) .. " >" .. q(dir .. "/out") .. " 2>" .. q(dir .. "/err") .. " </dev/null"
  -- The subshell records deployctl's own pid and, at the end, its status.
  local script = "(" .. inner .. " & echo $! > " .. q(dir .. "/pid") .. "; wait $!; echo $? > " .. q(dir .. "/rc") .. ") >/dev/null 2>&1 &"
  os.execute(script)
  fixtures.wait_until(function() return (fixtures.read_file(dir .. "/pid") or ""):match("%d+") end, 5, "deployctl to start")
  h.pid = tonumber(fixtures.read_file(dir .. "/pid"):match("%d+"))
  function h:output() return fixtures.read_file(dir .. "/out") or "" end
  function h:errors() return fixtures.read_file(dir .. "/err") or "" end
  function h:done() return (fixtures.read_file(dir .. "/rc") or ""):match("%d+") ~= nil end
  function h:wait(timeout)
    fixtures.wait_until(function() return self:done() end, timeout or 60, "deployctl to finish")
    return tonumber(fixtures.read_file(dir .. "/rc"):match("%d+")), self:output(), self:errors()
  end
  return h
end

-- Writes a config file (a Lua file returning the table) and returns its path.
function cli.write_config(dir, cfg)
  local function ser(v, indent)
    local t = type(v)
    if t == "string" then return string.format("%q", v) end
    if t == "number" or t == "boolean" then return tostring(v) end
    assert(t == "table", "cannot serialise " .. t)
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    local parts = {}
    for _, k in ipairs(keys) do
      local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or ("[" .. ser(k) .. "]")
      parts[#parts + 1] = indent .. "  " .. key .. " = " .. ser(v[k], indent .. "  ")
    end
    return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
  end
  local path = dir .. "/deployctl.lua"
  fixtures.write_file(path, "return " .. ser(cfg, "") .. "\n")
  return path
end

return cli
