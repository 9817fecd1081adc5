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
    -- never deployed: says so, no health, no instances (issue 13)
    assert.matches("staging%s+%-%s+never deployed%s+%-%s+0", out)
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
      { { "--config", config, "deploy", "staging", "1.0", "--strategy", "canary", "--set", "pause_at=25,x" }, "pause_at: .25,x. is not a list of numbers" },
      { { "--config", config, "deploy", "staging", "1.0", "--strategy", "canary", "--set", "pause_at=150" }, "pause_at" },
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

  it("finds its config in $DEPLOY_CONFIG, then ./deployctl.lua", function()
    local config, dir = setup()
    local code, out = cli.run({ "status", "staging" }, { DEPLOY_CONFIG = config })
    assert.equal(0, code)
    assert.matches("staging", out)
    local _, _, rc = os.execute("cd " .. fixtures.shell_quote(dir) .. " && " .. fixtures.shell_quote(cli.bin()) ..
                                " status staging >/dev/null 2>&1")
    assert.equal(0, rc)
  end)
end)

describe("deployctl output", function()
  after_each(fixtures.cleanup)

  local cjson = require "cjson"
  local deploy = require "deploy"

  it("--json: one JSON object per line per event, matching the store", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    local code, out = cli.run({ "--config", config, "deploy", "production", "1.1.0", "--json", "--strategy", "canary",
                                "--set", "initial_percentage=50", "--set", "increment=50", "--set", "interval=0" })
    assert.equal(0, code)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = cjson.decode(line) end
    local result = table.remove(lines)
    assert.is_true(result.result.success)
    assert.equal("1.1.0", result.result.version)
    local m = deploy.DeploymentManager{ config = config }
    local stored = m:events(m:history("production", 1)[1].id)
    assert.equal(#stored, #lines)
    for i, ev in ipairs(stored) do
      assert.equal(ev.kind, lines[i].kind)
      assert.equal(ev.deployment_id, lines[i].deployment_id)
      assert.equal(ev.target, lines[i].target)
      assert.near(ev.ts, lines[i].ts, 1e-6)
      assert.same(ev.data, lines[i].data)
    end
    local pcts = {}
    for _, l in ipairs(lines) do if l.kind == "traffic" then pcts[#pcts + 1] = l.data.pct end end
    assert.same({ 50, 100 }, pcts)
  end)

  it("--quiet prints only the result; plain lines when not a terminal", function()
    local config = setup()
    local code, out = cli.run({ "--config", config, "deploy", "staging", "1.0.0", "--quiet" })
    assert.equal(0, code)
    assert.matches("^staging: 1%.0%.0 deployed in [%d.]+s %(blue%-green%)\n$", out)
    code, out = cli.run({ "--config", config, "deploy", "staging", "1.1.0", "--set", "scale_down_delay=0" })
    assert.matches("%d%d%d%d%-%d%d%-%d%dT[%d:.]+Z staging%s+started%s+deploy 1%.0%.0 %-> 1%.1%.0", out)
    assert.not_matches("\27%[K", out)
    assert.has_error(function() error(select(3, cli.run({ "--config", config, "deploy", "staging", "1", "--json", "--quiet" }))) end,
      "deployctl: deploy: --json and --quiet do not go together\n")
  end)

  it("on a terminal: a live progress line with a bar, the step, health, elapsed and remaining time", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    local dir = fixtures.tmpdir("tty")
    local cmd = string.format("%s --config %s deploy production 1.1.0 --strategy canary --set initial_percentage=25 --set increment=25 --set interval=0.1",
      fixtures.shell_quote(cli.bin()), fixtures.shell_quote(config))
    -- script(1) gives deployctl a pseudo-terminal
    os.execute("script -qec " .. fixtures.shell_quote(cmd) .. " /dev/null > " .. dir .. "/tty.out 2>&1 </dev/null")
    local tty = fixtures.read_file(dir .. "/tty.out")
    assert.matches("\r\27%[K", tty)
    -- the wait under way and the time left (the rest of the steps and this wait)
    assert.matches("production%s+%[###%.%.%.%.%.%.%.%]%s+25 %% 1%.1%.0%s+step 1/4%s+healthy%s+next step in [%d.]+s%s+"
                   .. "[%d.]+s elapsed, ~0%.%ds left", tty)
    assert.matches("%[##########%] 100 %%", tty)
    assert.matches("production: 1%.1%.0 deployed in", tty)
  end)

  it("status shows each instance with port, pid, health and the weight read live from HAProxy", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    local code, out = cli.run({ "--config", config, "status", "production" })
    assert.equal(0, code)
    local m = deploy.DeploymentManager{ config = config }
    local inst = m:instances("production")[1]
    assert.matches(inst.server .. "%s+local%s+1%.0%.0%s+127%.0%.0%.1%s+" .. inst.port .. "%s+" .. inst.pid
                   .. "%s+healthy%s+1%s+running%s+yes", out)
    -- the weight is read from HAProxy, not from the store
    h:cmd("set server app/" .. inst.server .. " weight 7")
    code, out = cli.run({ "--config", config, "status", "production", "--json" })
    local doc = cjson.decode(out)
    assert.equal(7, doc.instances[1].router_weight)
    assert.equal("healthy", doc.instances[1].health)
    assert.equal("1.0.0", doc.targets[1].current_version)
    -- a dead instance shows as dead, and HAProxy down is reported
    fixtures.kill(inst.pid, "KILL")
    fixtures.wait_until(function() return not fixtures.alive(inst.pid) end, 5, "the instance to die")
    h:stop()
    code, out, err = cli.run({ "--config", config, "status", "production" })
    -- its only live instance dead: unhealthy, exit 5 (issue 13)
    assert.equal(5, code)
    assert.matches("dead", out)
    assert.matches("router: haproxy: cannot connect", err)
  end)

  it("logs prints each local instance's output with its version and index, filters, and follows", function()
    local dir = fixtures.tmpdir("logs")
    local target = fixtures.target_config{ instances = 2 }
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
    assert.equal(0, (cli.run({ "--config", config, "deploy", "production", "1.0.0", "--quiet" })))
    local code, out, err = cli.run({ "--config", config, "logs", "production", "--lines", "1" })
    assert.equal(0, code, err)
    assert.matches("^%[1%.0%.0#0%] demo%-app 1%.0%.0 listening on 127%.0%.0%.1:%d+\n%[1%.0%.0#1%] demo%-app 1%.0%.0 "
                   .. "listening on 127%.0%.0%.1:%d+\n$", out)
    code, _, err = cli.run({ "--config", config, "logs", "production", "--version", "9.9" })
    assert.equal(1, code)
    assert.matches("no instance of 'production' at version 9%.9 runs", err)
    code, _, err = cli.run({ "--config", config, "logs", "production", "--host", "app1" })
    assert.equal(2, code)
    assert.matches("'app1' is not a host of 'production' %(its hosts: this machine%)", err)
    local follow = cli.spawn({ "--config", config, "logs", "production", "--follow", "--lines", "1" })
    fixtures.wait_until(function() return select(2, follow:output():gsub("listening", "")) == 2 end, 10, "the tails")
    local deploy = require "deploy"
    local log = deploy.DeploymentManager{ config = config }:instances("production")[2].log
    local f = assert(io.open(log, "a"))
    f:write("written after the follow began\n")
    f:close()
    fixtures.wait_until(function() return follow:output():find("[1.0.0#1] written after the follow began", 1, true) end,
                        10, "the followed line")
    fixtures.kill(follow.pid, "INT")
    assert.equal(0, (follow:wait(10)))
  end)

  it("status notices servers a restarted HAProxy forgot, and reconcile puts them back", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    h:restart()
    local code, _, err = cli.run({ "--config", config, "status", "production" })
    assert.equal(0, code)
    assert.matches("1 live instance%(s%) of production are missing from haproxy " .. h.socket:gsub("%p", "%%%0") ..
                   " %(backend app%) %(restarted%?%): run 'deployctl reconcile production'", err)
    local out
    code, out = cli.run({ "--config", config, "reconcile", "production" })
    assert.equal(0, code)
    assert.matches("production: 1%.0%.0 on 1 instance%(s%), healthy", out)
    assert.same({ ["1.0.0"] = 10 }, (h:sample(10)))
    code, _, err = cli.run({ "--config", config, "status", "production" })
    assert.equal("", err)
  end)

  it("history shows who, the git revision GitOps recorded, and why a deployment failed", function()
    local config = setup()
    local dir = fixtures.tmpdir("hist")
    fixtures.write_file(dir .. "/p.lua", [[
      local deploy = require "deploy"
      local m = deploy.DeploymentManager{}
      m:deploy("staging", "2.0.0", { metadata = { gitops = { revision = "0123456789abcdef0123" } } })
    ]])
    assert.equal(0, (cli.run({ "--config", config, "run", dir .. "/p.lua" })))
    cli.run({ "--config", config, "deploy", "staging", "2.1.0-bad" })
    local code, out = cli.run({ "--config", config, "history", "staging" })
    assert.equal(0, code)
    assert.matches("ID%s+KIND%s+VERSION%s+STRATEGY%s+RESULT%s+STARTED%s+DURATION%s+BY%s+REVISION", out)
    local user = os.getenv("USER") or "root"
    assert.matches("2%.0%.0%s+blue%-green%s+succeeded%s+%S+Z%s+[%d.]+s%s+%S+@%S+%s+0123456789\n", out)
    assert.matches("2%.1%.0%-bad%s+blue%-green%s+failed.-\n    reason: green not switched to", out)
    code, out = cli.run({ "--config", config, "history", "staging", "--json", "--limit", "1" })
    assert.equal("2.1.0-bad", cjson.decode(out).version)
  end)

  it("redacts ${NAME} secrets from everything it prints", function()
    local h = fixtures.haproxy{}
    local dir = fixtures.tmpdir("secret")
    local target = fixtures.target_config{ haproxy = h, instances = 1 }
    target.router.socket = "${DEPLOYCTL_SPEC_SECRET}/admin.sock"
    local config = cli.write_config(dir, fixtures.config{ state = dir .. "/state.db", targets = { production = target } })
    local secret = "/tmp/Sup3rS3cretT0ken"
    local code, out, err = cli.run({ "--config", config, "deploy", "production", "1.0.0" },
                                   { DEPLOYCTL_SPEC_SECRET = secret })
    assert.equal(1, code)
    assert.matches("cannot connect to %*%*%*/admin%.sock", err)
    assert.not_matches("Sup3rS3cretT0ken", out .. err)
    -- nor in the store: the history and its events
    local _, hist = cli.run({ "--config", config, "history", "production", "--json" }, { DEPLOYCTL_SPEC_SECRET = secret })
    assert.matches("%*%*%*\\?/admin%.sock", hist)
    local db = fixtures.read_file(dir .. "/state.db") .. (fixtures.read_file(dir .. "/state.db-wal") or "")
    assert.is_nil(db:find("Sup3rS3cretT0ken", 1, true))
  end)
end)

describe("deployctl report", function()
  after_each(fixtures.cleanup)

  it("writes a self-contained HTML page whose chart has one point per weight change, and renders in Chromium", function()
    local h = fixtures.haproxy{}
    local config = setup{ haproxy = h }
    cli.run({ "--config", config, "deploy", "production", "1.0.0" })
    cli.run({ "--config", config, "deploy", "production", "1.1.0", "--strategy", "canary",
              "--set", "initial_percentage=20", "--set", "increment=20", "--set", "interval=0.05" })
    local m = require("deploy").DeploymentManager{ config = config }
    local d = m:history("production", 1)[1]
    local changes = 0
    for _, ev in ipairs(m:events(d.id)) do if ev.kind == "traffic" then changes = changes + 1 end end
    assert.equal(5, changes)
    local code, html = cli.run({ "--config", config, "report", d.id })
    assert.equal(0, code)
    assert.matches("^<!DOCTYPE html>", html)
    assert.not_matches("<script", html)
    assert.not_matches("https?://[%w.]+/[%w]", html:gsub('xmlns="http://www.w3.org/2000/svg"', ""))
    local dir = fixtures.tmpdir("report")
    fixtures.write_file(dir .. "/rollout.html", html)
    local chromium = "chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking "
      .. "--disable-component-update --disable-sync --user-data-dir=" .. dir .. "/profile "
    local url = "file://" .. dir .. "/rollout.html"
    os.execute(chromium .. "--window-size=1000,1200 --screenshot=" .. dir .. "/shot.png " .. url .. " >/dev/null 2>&1")
    local png = fixtures.read_file(dir .. "/shot.png")
    assert.is_truthy(png, "chromium wrote no screenshot")
    assert.equal("\137PNG", png:sub(1, 4))
    assert.is_true(#png > 10000)
    local p = io.popen(chromium .. "--dump-dom " .. url .. " 2>/dev/null")
    local dom = p:read("a")
    p:close()
    local points = 0
    for _ in dom:gmatch('<circle class="point"') do points = points + 1 end
    assert.equal(changes, points)
    assert.matches('id="events"', dom)
    local rows = 0
    for _ in dom:gmatch('<tr class="event ') do rows = rows + 1 end
    assert.equal(#m:events(d.id), rows)
    local code2, _, err = cli.run({ "--config", config, "report", "d0000nothere" })
    assert.equal(2, code2)
    assert.matches("no deployment 'd0000nothere'", err)
  end)
end)

describe("shell completion and man page", function()
  after_each(fixtures.cleanup)

  local function complete(line)
    local dir = fixtures.tmpdir("compl")
    local words = {}
    for w in line:gmatch("%S+") do words[#words + 1] = w end
    if line:sub(-1) == " " then words[#words + 1] = "" end
    local quoted = {}
    for i, w in ipairs(words) do quoted[i] = fixtures.shell_quote(w) end
    fixtures.write_file(dir .. "/c.sh", string.format([[
      source <(%s completion bash)
      COMP_WORDS=(%s); COMP_CWORD=%d
      _deployctl
      printf '%%s\n' "${COMPREPLY[@]}"
    ]], fixtures.shell_quote(cli.bin()), table.concat(quoted, " "), #words - 1))
    local p = io.popen("bash " .. dir .. "/c.sh 2>&1")
    local outp = p:read("a")
    p:close()
    local got = {}
    for w in outp:gmatch("%S+") do got[#got + 1] = w end
    table.sort(got)
    return got
  end

  it("completes commands, flags and strategy names from the help text", function()
    assert.same({ "deploy", "diff" }, complete("deployctl d"))
    assert.same({ "--json", "--quiet", "--set", "--simulate", "--strategy" }, (function()
      local all = complete("deployctl deploy production 1.0 --")
      local keep = {}
      for _, w in ipairs(all) do if w ~= "--help" then keep[#keep + 1] = w end end
      return keep
    end)())
    assert.same({ "blue-green", "canary" }, complete("deployctl deploy production 1.0 --strategy "))
    assert.same({ "--limit" }, complete("deployctl history production --l"))
  end)

  it("the man page is made from the same help text and renders", function()
    local code, man = cli.run({ "man" })
    assert.equal(0, code)
    assert.matches("^%.TH DEPLOYCTL 1", man)
    for _, cmd in ipairs{ "run", "deploy", "rollback", "status", "history", "promote", "abort", "report" } do
      assert.matches("\\fB" .. cmd .. "\\fR", man, 1, true)
      local _, help = cli.run({ cmd, "--help" })
      local first = help:match("^([^\n]+)")
      assert.is_truthy(man:find(first, 1, true), cmd .. ": " .. first)
    end
    local dir = fixtures.tmpdir("man")
    fixtures.write_file(dir .. "/deployctl.1", man)
    local p = io.popen("MANWIDTH=100 man -l " .. dir .. "/deployctl.1 2>&1 | col -b")
    local rendered = p:read("a")
    p:close()
    assert.matches("safe canary and blue%-green rollouts", rendered)
    assert.matches("EXIT STATUS", rendered)
    -- the configuration, the files, and every command's whole synopsis
    assert.matches("\nCONFIGURATION\n.-%./deployctl%.lua.-targets = {", rendered)
    assert.matches("\nFILES\n.-%.deploy/state%.db", rendered)
    assert.matches("router%.kind: haproxy .-prefix.-timeout", rendered)
    local synopsis = rendered:match("\nSYNOPSIS\n(.-)\nDESCRIPTION")
    for _, line in ipairs({ "deploy TARGET VERSION [--strategy canary|blue-green] [--set key=value ...] [--simulate] [--json|--quiet]",
                            "logs TARGET [--host H] [--version V] [--lines N] [--follow]", "history TARGET [--limit N] [--json]" }) do
      assert.is_truthy(synopsis:gsub("%s+", " "):find(line, 1, true), line)
    end
  end)

  it("deployctl version and deploy.VERSION show the one version of CMakeLists.txt", function()
    local v = fixtures.read_file(fixtures.root() .. "/CMakeLists.txt"):match("project%(deployctl VERSION ([%d.]+)")
    local code, out = cli.run({ "version" })
    assert.equal(0, code)
    assert.equal("deployctl " .. v .. " (Lua 5.4)\n", out)
    assert.equal(v, require("deploy").VERSION)
    assert.matches("## %[" .. v:gsub("%.", "%%.") .. "%]", fixtures.read_file(fixtures.root() .. "/CHANGELOG.md"))
  end)
end)
