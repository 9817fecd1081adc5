-- Installing: `cmake --install` into a scratch prefix, and the Debian
-- package `cpack -G DEB` makes, unpacked into a scratch root. From each,
-- deployctl runs, `require "deploy"` and `require "deploy.testing"` load,
-- the modules (deploy-http.so for health checks) are found from the
-- installed files alone, and busted runs a user's spec from a directory
-- outside the tree. The system-wide path (setup --install into
-- /usr/local, then plain busted with no path at all) is
-- scripts/check-install, which CI runs after the suite.
local fixtures = require "spec.support.fixtures"

local q = fixtures.shell_quote

local function build_dir()
  local b = fixtures.build_dir()
  if b:sub(1, 1) ~= "/" then b = fixtures.root() .. "/" .. b end
  return b
end

local function sh(cmd)
  local p = io.popen(cmd .. " 2>&1; echo \"rc=$?\"")
  local out = p:read("a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, out:gsub("rc=%d+%s*$", "")
end

local function version()
  local cmake = fixtures.read_file(fixtures.root() .. "/CMakeLists.txt")
  return cmake:match("project%(deployctl VERSION ([%d.]+)")
end

-- A user's spec, run by busted in its own directory with cpath pointing
-- at the prefix's lib/lua/5.4 (where Lua looks by default for /usr/local
-- and /usr), and bin/ on the PATH.
local function user_spec_runs(prefix)
  local dir = fixtures.tmpdir("user")
  local text = fixtures.read_file(fixtures.root() .. "/examples/rollout_spec.lua")
  fixtures.write_file(dir .. "/my_spec.lua", text)
  local env = "env -u DEPLOY_MODULE_DIR -u DEPLOY_BUILD_DIR " .. fixtures.lua_child_env() .. "LUA_CPATH=" .. q(prefix .. "/lib/lua/5.4/?.so;;") ..
              " PATH=" .. q(prefix .. "/bin:" .. os.getenv("PATH")) .. " "
  local rc, out = sh("cd " .. q(dir) .. " && " .. env .. "busted -o TAP my_spec.lua")
  assert.equal(0, rc, out)
  assert.matches("ok 4 ", out)
  rc, out = sh("cd " .. q(dir) .. " && " .. env ..
               "lua5.4 -e 'local d = require \"deploy\"; local t = require \"deploy.testing\"; io.write(d.VERSION, \" \", type(t.setup))'")
  assert.equal(0, rc, out)
  assert.equal(version() .. " function", out)
  rc, out = sh(env .. q(prefix .. "/bin/deployctl") .. " version")
  assert.equal(0, rc, out)
  assert.matches("^deployctl " .. version():gsub("%.", "%%.") .. " ", out)
end

describe("installing", function()
  after_each(fixtures.cleanup)

  it("cmake --install puts deployctl, deploy.so, the modules, the man page and the completion in their places", function()
    local prefix = fixtures.tmpdir("prefix")
    local rc, out = sh("cmake --install " .. q(build_dir()) .. " --prefix " .. q(prefix))
    assert.equal(0, rc, out)
    for _, f in ipairs({ "bin/deployctl", "lib/lua/5.4/deploy.so", "lib/deployctl/deploy-git.so",
                         "lib/deployctl/deploy-http.so", "share/man/man1/deployctl.1",
                         "share/bash-completion/completions/deployctl", "share/doc/deployctl/CHANGELOG.md" }) do
      assert.is_not_nil(fixtures.read_file(prefix .. "/" .. f), f)
    end
    local man = fixtures.read_file(prefix .. "/share/man/man1/deployctl.1")
    assert.matches("\n%.SH CONFIGURATION\n", man)
    assert.matches("\n%.SH FILES\n", man)
    assert.matches("deployctl%.lua", man)
    user_spec_runs(prefix)
  end)

  it("cpack -G DEB makes a package with its dependencies, that works unpacked in a scratch root", function()
    if fixtures.read_file(build_dir() .. "/CMakeCache.txt"):match("DEPLOY_SANITIZE:BOOL=ON") then
      pending("the package is made from the normal build (a sanitizer build would depend on libasan)")
      return
    end
    local out_dir = fixtures.tmpdir("deb")
    local rc, out = sh("cd " .. q(out_dir) .. " && cpack -G DEB --config " .. q(build_dir() .. "/CPackConfig.cmake") ..
                       " -B " .. q(out_dir))
    assert.equal(0, rc, out)
    local deb = out:match("package: (%S+%.deb) generated") or out_dir .. "/deployctl_" .. version() .. "_amd64.deb"
    local _, control = sh("dpkg-deb -f " .. q(deb))
    assert.matches("Package: deployctl\n", control)
    assert.matches("Version: " .. version():gsub("%.", "%%."), control)
    local depends = control:match("Depends: ([^\n]+)")
    for _, lib in ipairs({ "liblua5.4%-0", "libuv1", "libgit2%-", "libcurl", "libsqlite3%-0", "libjansson4",
                           "libpq5", "lua%-cjson", "lua5%.4" }) do
      assert.matches(lib, depends)
    end
    local _, files = sh("dpkg-deb -c " .. q(deb))
    for _, f in ipairs({ "./usr/bin/deployctl", "./usr/lib/lua/5.4/deploy.so", "./usr/lib/deployctl/deploy-http.so",
                         "./usr/share/man/man1/deployctl.1", "./usr/share/bash-completion/completions/deployctl" }) do
      assert.matches(f:gsub("%p", "%%%0"), files)
    end
    local root = fixtures.tmpdir("root")
    rc, out = sh("dpkg-deb -x " .. q(deb) .. " " .. q(root))
    assert.equal(0, rc, out)
    user_spec_runs(root .. "/usr")
  end)
end)
