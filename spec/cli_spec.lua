-- deployctl as a user runs it: the real binary, its output and exit codes.
local fixtures = require "spec.support.fixtures"
local cli = require "spec.support.cli"

local function setup(opts)
  opts = opts or {}
  local dir = fixtures.tmpdir("cli")
  local cfg = fixtures.config{ state = dir .. "/state.db", targets = {
    production = fixtures.target_config{ haproxy = opts.haproxy, instances = 1 },
    staging = fixtures.target_config{ instances = 1 },
  } }
  return cli.write_config(dir, cfg), dir
end

describe("deployctl", function()
  after_each(fixtures.cleanup)

  it("version and help", function()
    local code, out = cli.run({ "version" })
    assert.equal(0, code)
    assert.matches("^deployctl %d+%.%d+%.%d+", out)
    code, out = cli.run({ "help" })
    assert.equal(0, code)
    assert.matches("Usage: deployctl", out)
    code, out = cli.run({ "help", "deploy" })
    assert.matches("Usage: deployctl deploy TARGET VERSION", out)
    code, out = cli.run({ "deploy", "--help" })
    assert.equal(0, code)
    assert.matches("Usage: deployctl deploy TARGET VERSION", out)
  end)

  it("run SCRIPT passes its arguments in arg and returns its exit code", function()
    local dir = fixtures.tmpdir("run")
    fixtures.write_file(dir .. "/p.lua", [[
      local deploy = require "deploy"
      print(arg[0], arg[1], arg[2], select("#", ...), deploy._VERSION ~= nil)
      return tonumber(arg[2])
    ]])
    local code, out = cli.run({ "run", dir .. "/p.lua", "hello", "7" })
    assert.equal(7, code)
    assert.equal(dir .. "/p.lua\thello\t7\t2\ttrue\n", out)
  end)

  it("deploy, status, history and rollback", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    assert.equal(0, code, err)
    assert.matches("production: 1%.0%.0 deployed in", out)
    assert.matches("promoted", out)
    code, out = cli.run({ "--config", config, "deploy", "production", "1.1.0", "--strategy", "canary",
                          "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0" })
    assert.equal(0, code, out)
    assert.matches("new version at 50 %%", out)
    code, out = cli.run({ "--config", config, "status", "production" })
    assert.equal(0, code)
    assert.matches("production%s+1%.1%.0%s+deployed%s+healthy%s+1", out)
    code, out = cli.run({ "--config", config, "status" })
    assert.matches("production%s+1%.1%.0", out)
    assert.matches("staging%s+%-%s+deployed", out)
    code, out = cli.run({ "--config", config, "history", "production", "--limit", "1" })
    assert.equal(0, code)
    assert.matches("1%.1%.0%s+canary%s+succeeded", out)
    assert.not_matches("1%.0%.0%s+blue", out)
    code, out = cli.run({ "--config", config, "rollback", "production" })
    assert.equal(0, code, out)
    assert.same({ ["1.0.0"] = 10 }, (h:sample(10)))
  end)

  it("a failed deployment exits 1 and prints the reason", function()
    local config = setup()
    local code, out, err = cli.run({ "--config", config, "deploy", "staging", "2-bad" })
    assert.equal(1, code)
    assert.matches("staging: green not switched to: new instances of 2%-bad unhealthy", err)
  end)

  it("usage and configuration errors exit 2 with a message that names the problem", function()
    local config, dir = setup()
    local cases = {
      { { "frobnicate" }, "unknown command 'frobnicate'" },
      { { "--config", config, "deploy", "production" }, "deploy: needs TARGET and VERSION" },
      { { "--config", config, "deploy", "prod", "1.0" }, "unknown target 'prod' %(known: production, staging%)" },
      { { "--config", config, "deploy", "staging", "1.0", "extra" }, "too many arguments %(extra%)" },
      { { "--config", config, "deploy", "staging", "1.0", "--strategy", "yolo" }, "%-%-strategy 'yolo' is not known" },
      { { "--config", config, "deploy", "staging", "1.0", "--set", "interval" }, "is not key=value" },
      { { "--config", config, "deploy", "staging", "1.0", "--strategy", "canary", "--set", "interval=-3" }, "interval must be" },
      { { "--config", config, "deploy", "staging", "1.0", "--frob" }, "unknown flag %-%-frob" },
      { { "--config", config, "deploy", "staging", "bad version" }, "has a character not allowed" },
      { { "--config", config, "history", "staging", "--limit", "x" }, "%-%-limit must be a positive integer" },
      { { "--config", dir .. "/nope.lua", "status" }, "cannot read config file '.-nope%.lua'" },
      { { "--config" }, "%-%-config needs a file path" },
      { { "run" }, "run: missing SCRIPT" },
      { { "run", dir .. "/missing.lua" }, "cannot read script" },
    }
    for _, case in ipairs(cases) do
      local code, _, err = cli.run(case[1])
      assert.equal(2, code, table.concat(case[1], " ") .. " -> " .. err)
      assert.matches(case[2], err)
    end
  end)

  it("finds its config in $DEPLOY_CONFIG, then ./deploy.lua", function()
    local config, dir = setup()
    local code, out = cli.run({ "status", "staging" }, { DEPLOY_CONFIG = config })
    assert.equal(0, code)
    assert.matches("staging", out)
    local _, _, rc = os.execute("cd " .. fixtures.shell_quote(dir) .. " && " .. fixtures.shell_quote(cli.bin()) ..
                                " status staging >/dev/null 2>&1")
    assert.equal(0, rc)
  end)
end)
