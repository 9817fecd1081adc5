-- The core's seams: events are JSON built by a JSON library (any payload
-- up to the documented limit round-trips, any name stays valid), secrets
-- are redacted however many there are, and a manager owns only what it
-- uses (closing one never waits for, or breaks, another's rollout).
local deploy = require "deploy"
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup(opts)
  opts = opts or {}
  local target, dir = fixtures.target_config{ instances = 1, provider = opts.provider }
  local cfg = fixtures.config{ targets = { production = target } }
  local m = deploy.DeploymentManager{ config = cfg }
  return m, dir, cfg
end

local function last_events(m, kind)
  local d = m:history("production", 1)[1]
  local out = {}
  for _, ev in ipairs(m:events(d.id)) do
    if not kind or ev.kind == kind then out[#out + 1] = ev end
  end
  return out, d
end

describe("events", function()
  after_each(fixtures.cleanup)

  it("a d:log payload of 60 KiB round-trips intact; one over 64 KiB is refused with the limit named", function()
    local m = setup()
    local blob = {}
    for i = 1, 60 * 1024 / 16 do blob[i] = string.format("%015d\n", i) end
    blob = table.concat(blob)
    assert.equal(60 * 1024, #blob)
    local too_big
    local S = deploy.DeploymentStrategy:extend{ name = "logger" }
    function S:execute(d)
      assert(d:start())
      d:log({ blob = blob, quote = 'he said "hi"\n', nested = { list = { 1, 2.5, "three" } } })
      too_big = select(2, pcall(d.log, d, { blob = blob .. blob }))
      return d:set_traffic(100)
    end
    local r = m:deploy("production", "v1", { strategy = S })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    local logs = last_events(m, "log")
    assert.equal(1, #logs)
    assert.equal(blob, logs[1].data.blob)
    assert.equal('he said "hi"\n', logs[1].data.quote)
    assert.same({ list = { 1, 2.5, "three" } }, logs[1].data.nested)
    assert.matches("d:log%(event%) is %d+ bytes once encoded as JSON: at most 65536 are stored", too_big)
  end)

  it("a strategy named we\"ird produces valid events, history and --json output", function()
    local m, _, cfg = setup()
    local name = 'we"ird\\ \1'
    local S = deploy.DeploymentStrategy:extend{ name = name }
    function S:execute(d)
      assert(d:start())
      return d:set_traffic(100)
    end
    local r = m:deploy("production", "v1", { strategy = S })
    assert.is_true(r.success, table.concat(r.errors or {}, "\n"))
    assert.equal(name, r.strategy)
    local evs, d = last_events(m, "started")
    assert.equal(name, d.strategy)
    assert.equal(name, evs[1].data.strategy)
    for _, ev in ipairs(m:events(d.id)) do assert.is_table(ev.data, ev.kind) end
    -- the CLI's JSON lines parse back, strategy name included
    local dir = fixtures.tmpdir("weird")
    local config = cli.write_config(dir, cfg)
    local code, out, err = cli.run({ "--config", config, "history", "production", "--json" })
    assert.equal(0, code, err)
    local row = require("cjson").decode(out:match("^[^\n]+"))
    assert.equal(name, row.strategy)
  end)
end)

describe("secrets", function()
  after_each(fixtures.cleanup)

  it("200 distinct ${NAME} values are all redacted from events, errors and output", function()
    local env, names = {}, {}
    local provider = { env = {} }
    for i = 1, 200 do
      local name = string.format("DEPLOY_SPEC_SECRET_%03d", i)
      env[name] = string.format("s3cr3t-%03d-%08x", i, i * 2654435761 % 4294967296)
      provider.env[name] = "${" .. name .. "}"
      names[#names + 1] = name
    end
    local target = fixtures.target_config{ instances = 1, provider = provider }
    local dir = fixtures.tmpdir("secrets")
    local cfg = fixtures.config{ targets = { production = target } }
    local config = cli.write_config(dir, cfg)
    local script = dir .. "/leak.lua"
    -- The pipeline logs every secret value and fails with all of them in
    -- its error: none may reach the store or the terminal.
    fixtures.write_file(script, [[
local deploy = require "deploy"
local names = { ]] .. '"' .. table.concat(names, '", "') .. '"' .. [[ }
local values = {}
for i, n in ipairs(names) do values[i] = os.getenv(n) end
local all = table.concat(values, " ")
local S = deploy.DeploymentStrategy:extend{ name = "leaky" }
function S:execute(d)
  assert(d:start())
  d:log({ message = all })
  error("failed with " .. all)
end
local m = deploy.DeploymentManager{ config = arg[1] }
local r = m:deploy("production", "v1", { strategy = S })
for _, e in ipairs(r.errors or {}) do print(e) end
local d = m:history("production", 1)[1]
for _, ev in ipairs(m:events(d.id)) do if ev.kind == "log" then print(ev.data.message) end end
print(require("cjson").encode(d.errors))
]])
    local code, out, err = cli.run({ "run", script, config }, env)
    assert.equal(0, code, err)
    for _, name in ipairs(names) do
      assert.is_nil(out:find(env[name], 1, true), name .. " leaked to stdout")
      assert.is_nil(err:find(env[name], 1, true), name .. " leaked to stderr")
    end
    local redacted = select(2, out:gsub("%*%*%*", ""))
    -- 200 in the log event alone; the errors (cut to their documented
    -- length after redaction) add more
    assert.is_true(redacted > 200, out)
    -- nor the store's pages, checkpointed or still in the write-ahead log
    local bytes = (fixtures.read_file(cfg.state) or "") .. (fixtures.read_file(cfg.state .. "-wal") or "")
    assert.is_true(#bytes > 0)
    for _, name in ipairs(names) do
      assert.is_nil(bytes:find(env[name], 1, true), name .. " leaked to the store")
    end
  end)
end)

describe("ownership", function()
  after_each(fixtures.cleanup)

  it("closing a manager while another manager's rollout runs returns at once; the rollout goes on", function()
    local a = setup()
    local b = setup()
    assert.is_true(a:deploy("production", "v1").success)
    local closed_while_running, a_done
    local results = deploy.parallel{
      function()
        local r = a:deploy("production", "v2", {
          strategy = deploy.CanaryStrategy{ initial_percentage = 50, increment = 50, interval = 0.3 } })
        a_done = true
        return r
      end,
      function()
        -- wait until a's rollout holds traffic, then close b (and a itself)
        while #(a:instances("production")) < 2 do deploy.sleep(0.02) end
        b:close()
        a:close()
        closed_while_running = not a_done
        return true
      end,
    }
    assert.is_true(closed_while_running)
    assert.is_true(results[1].success, table.concat(results[1].errors or {}, "\n"))
    assert.has_error(function() b:get_status("production") end, "deploy: this DeploymentManager was closed")
  end)
end)
