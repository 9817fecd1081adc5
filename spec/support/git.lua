-- Git fixtures for the GitOps specs: repositories to commit manifests to,
-- and real servers on 127.0.0.1 serving them (git daemon, git
-- http-backend behind nginx with TLS and basic auth, sshd).
--
-- Everything lives in fixtures.tmpdir() directories and every server is
-- started with fixtures.spawn, so fixtures.cleanup() undoes it all.
local fixtures = require "spec.support.fixtures"
local cjson = require "cjson"

local git = {}
local q = fixtures.shell_quote

-- Runs a shell command; raises with its output when it fails.
local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1", "r"))
  local out = p:read("a")
  local ok = p:close()
  if not ok then error("git fixture: `" .. cmd .. "` failed:\n" .. out, 2) end
  return out
end
git.sh = sh

local function port_open(port)
  port = math.tointeger(port)
  return os.execute("bash -c 'exec 3<>/dev/tcp/127.0.0.1/" .. port .. "' 2>/dev/null") == true
end

------------------------------------------------------------------------
-- Repositories

local Repo = {}
Repo.__index = Repo

-- A bare repository at <base>/<name>.git (what the servers serve) and a
-- work tree to commit from. opts: base (a directory), name ("deploy"),
-- branch ("main").
function git.repo(opts)
  opts = opts or {}
  local base = opts.base or fixtures.tmpdir("git")
  local name = opts.name or "deploy"
  local self = setmetatable({
    base = base, name = name, branch = opts.branch or "main",
    bare = base .. "/" .. name .. ".git", work = base .. "/" .. name .. "-work",
  }, Repo)
  sh(string.format("git init -q --bare -b %s %s", q(self.branch), q(self.bare)))
  sh(string.format("git init -q -b %s %s", q(self.branch), q(self.work)))
  sh(string.format("git -C %s config user.email spec@example.com && git -C %s config user.name spec",
                   q(self.work), q(self.work)))
  return self
end

function Repo:file_url()
  return "file://" .. self.bare
end

function Repo:path(rel)
  return self.work .. "/" .. rel
end

-- Writes a file of the work tree (directories made as needed).
function Repo:write(rel, text)
  local dir = rel:match("^(.*)/[^/]+$")
  if dir then sh("mkdir -p " .. q(self:path(dir))) end
  fixtures.write_file(self:path(rel), text)
  return self
end

-- Writes a manifest: a table is encoded as JSON.
function Repo:manifest(rel, value)
  return self:write(rel, type(value) == "table" and cjson.encode(value) or value)
end

function Repo:symlink(rel, target)
  sh(string.format("cd %s && ln -sfn %s %s", q(self.work), q(target), q(rel)))
  return self
end

function Repo:remove(rel)
  sh(string.format("git -C %s rm -q -r %s", q(self.work), q(rel)))
  return self
end

-- Commits everything and pushes to the bare repository. Returns the sha.
function Repo:commit(message, branch)
  branch = branch or self.branch
  sh(string.format("git -C %s add -A && git -C %s commit -q --allow-empty -m %s && git -C %s push -q -f %s HEAD:refs/heads/%s",
                   q(self.work), q(self.work), q(message or "change"), q(self.work), q(self.bare), branch))
  return self:head(branch)
end

function Repo:head(branch)
  return (sh(string.format("git -C %s rev-parse refs/heads/%s", q(self.bare), branch or self.branch)):gsub("%s+$", ""))
end

-- Pushes a commit (on top of the branch) whose tree at `dir` (one level
-- below the root) also holds a raw blob entry with a name no honest tree
-- has, such as "../escape.json". `git mktree` refuses such names, so the
-- tree object is written byte by byte with `hash-object --literally`.
function Repo:commit_raw_entry(dir, entry_name, text)
  local bare = q(self.bare)
  local function hash(args, input)
    local file = self.base .. "/raw-object"
    fixtures.write_file(file, input)
    return (sh(string.format("git -C %s hash-object -w %s %s", bare, args, q(file))):gsub("%s+$", ""))
  end
  local function raw_tree(listing, extra)
    local entries = {}
    for mode, sha, name in listing:gmatch("(%d+) %a+ (%x+)\t([^\n]+)") do
      entries[#entries + 1] = { mode = mode, sha = sha, name = name }
    end
    entries[#entries + 1] = extra
    table.sort(entries, function(a, b) return a.name < b.name end)
    local parts = {}
    for _, e in ipairs(entries) do
      parts[#parts + 1] = e.mode:gsub("^0", "") .. " " .. e.name .. "\0" .. e.sha:gsub("%x%x", function(h)
        return string.char(tonumber(h, 16))
      end)
    end
    return table.concat(parts)
  end
  local parent = self:head()
  local blob = hash("--stdin <", text)
  local sub = hash("-t tree --literally", raw_tree(sh(string.format("git -C %s ls-tree %s", bare, q(parent .. ":" .. dir))),
                                                   { mode = "100644", sha = blob, name = entry_name }))
  local root_listing = sh(string.format("git -C %s ls-tree %s", bare, parent))
  local without = root_listing:gsub("040000 tree %x+\t" .. dir:gsub("%p", "%%%0") .. "\n", "")
  local top = hash("-t tree --literally", raw_tree(without, { mode = "40000", sha = sub, name = dir }))
  local commit = sh(string.format("git -C %s -c user.email=spec@example.com -c user.name=spec commit-tree %s -p %s -m raw",
                                  bare, top, parent)):gsub("%s+$", "")
  sh(string.format("git -C %s update-ref refs/heads/%s %s", bare, self.branch, commit))
  return commit
end

------------------------------------------------------------------------
-- git daemon (git://)

-- Serves every repository under base on a loopback port (default: a
-- free one; give the old port to start it again after stop()).
function git.daemon(base, port)
  port = port or fixtures.free_port()
  local log = base .. "/daemon.log"
  local pid = fixtures.spawn(string.format(
    "exec git daemon --export-all --reuseaddr --informative-errors --base-path=%s --listen=127.0.0.1 --port=%d %s",
    q(base), port, q(base)), log)
  fixtures.wait_until(function()
    if not fixtures.alive(pid) then error("git daemon exited: " .. (fixtures.read_file(log) or ""), 0) end
    return port_open(port)
  end, 10, "git daemon on port " .. port)
  return {
    pid = pid, port = port,
    url = function(name) return string.format("git://127.0.0.1:%d/%s.git", port, name) end,
    stop = function() fixtures.stop(pid) end,
  }
end

------------------------------------------------------------------------
-- https: git http-backend through fcgiwrap behind nginx, TLS with a
-- throwaway self-signed certificate, basic auth (user / token)

local function self_signed(dir)
  sh(string.format("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 "
                   .. "-addext subjectAltName=IP:127.0.0.1,DNS:127.0.0.1 -keyout %s -out %s",
                   q(dir .. "/key.pem"), q(dir .. "/cert.pem")))
  return dir .. "/cert.pem", dir .. "/key.pem"
end

local function nginx_conf(dir, base, port)
  return table.concat({
    "daemon off;",
    "user root;",
    "worker_processes 1;",
    "pid " .. dir .. "/nginx.pid;",
    "error_log " .. dir .. "/error.log;",
    "events { worker_connections 64; }",
    "http {",
    "  access_log " .. dir .. "/access.log;",
    "  client_body_temp_path " .. dir .. "/body;",
    "  fastcgi_temp_path " .. dir .. "/fastcgi;",
    "  proxy_temp_path " .. dir .. "/proxy;",
    "  uwsgi_temp_path " .. dir .. "/uwsgi;",
    "  scgi_temp_path " .. dir .. "/scgi;",
    "  server {",
    "    listen 127.0.0.1:" .. port .. " ssl;",
    "    ssl_certificate " .. dir .. "/cert.pem;",
    "    ssl_certificate_key " .. dir .. "/key.pem;",
    "    location / {",
    "      auth_basic git;",
    "      auth_basic_user_file " .. dir .. "/htpasswd;",
    "      include /etc/nginx/fastcgi_params;",
    "      fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;",
    "      fastcgi_param GIT_PROJECT_ROOT " .. base .. ";",
    "      fastcgi_param GIT_HTTP_EXPORT_ALL \"\";",
    "      fastcgi_param PATH_INFO $uri;",
    "      fastcgi_param REMOTE_USER $remote_user;",
    "      fastcgi_pass unix:" .. dir .. "/fcgiwrap.sock;",
    "    }",
    "  }",
    "}",
  }, "\n") .. "\n"
end

-- Serves base over https on a free port; only user:token gets in.
-- Returns { port, ca (the certificate to trust), url(name, userinfo) }.
function git.https(base, user, token)
  local dir = fixtures.tmpdir("https")
  local port = fixtures.free_port()
  self_signed(dir)
  local hash = sh("openssl passwd -apr1 " .. q(token)):gsub("%s+$", "")
  fixtures.write_file(dir .. "/htpasswd", user .. ":" .. hash .. "\n")
  fixtures.write_file(dir .. "/nginx.conf", nginx_conf(dir, base, port))
  local sock = dir .. "/fcgiwrap.sock"
  local fcgi = fixtures.spawn("exec /usr/sbin/fcgiwrap -c 2 -s unix:" .. q(sock), dir .. "/fcgiwrap.log")
  fixtures.wait_until(function() return fixtures.read_file(sock) ~= nil or os.execute("test -S " .. q(sock)) end,
                      10, "fcgiwrap's socket")
  local nginx = fixtures.spawn(string.format("exec nginx -p %s -c %s", q(dir .. "/"), q(dir .. "/nginx.conf")),
                               dir .. "/nginx.log")
  fixtures.wait_until(function()
    if not fixtures.alive(nginx) then
      error("nginx exited: " .. (fixtures.read_file(dir .. "/error.log") or "") .. (fixtures.read_file(dir .. "/nginx.log") or ""), 0)
    end
    return port_open(port)
  end, 10, "nginx on port " .. port)
  return {
    port = port, ca = dir .. "/cert.pem", dir = dir, pids = { fcgi, nginx },
    url = function(name, userinfo)
      return string.format("https://%s127.0.0.1:%d/%s.git", userinfo and (userinfo .. "@") or "", port, name)
    end,
  }
end

------------------------------------------------------------------------
-- ssh: sshd on a loopback port, throwaway host key, one authorised key

-- port: default a free one (22 for scp-style URLs, which cannot name one).
function git.sshd(port)
  local dir = fixtures.tmpdir("sshd")
  port = port or fixtures.free_port()
  sh(string.format("ssh-keygen -q -t ed25519 -N '' -f %s && ssh-keygen -q -t ed25519 -N '' -f %s && "
                   .. "ssh-keygen -q -t ed25519 -N '' -f %s",
                   q(dir .. "/host_key"), q(dir .. "/client_key"), q(dir .. "/other_key")))
  sh(string.format("cp %s %s && chmod 600 %s", q(dir .. "/client_key.pub"), q(dir .. "/authorized_keys"),
                   q(dir .. "/authorized_keys")))
  fixtures.write_file(dir .. "/sshd_config", table.concat({
    "Port " .. port, "ListenAddress 127.0.0.1", "HostKey " .. dir .. "/host_key",
    "PidFile " .. dir .. "/sshd.pid", "AuthorizedKeysFile " .. dir .. "/authorized_keys",
    "PasswordAuthentication no", "PubkeyAuthentication yes", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
    "StrictModes no", "UsePAM no", "",
  }, "\n"))
  sh("mkdir -p /run/sshd") -- sshd's privilege separation directory
  local pid = fixtures.spawn(string.format("exec /usr/sbin/sshd -D -e -f %s", q(dir .. "/sshd_config")),
                             dir .. "/sshd.log")
  fixtures.wait_until(function()
    if not fixtures.alive(pid) then error("sshd exited: " .. (fixtures.read_file(dir .. "/sshd.log") or ""), 0) end
    return port_open(port)
  end, 10, "sshd on port " .. port)
  -- A known_hosts file with the throwaway host key, for $HOME/.ssh.
  local home = dir .. "/home"
  local pub = fixtures.read_file(dir .. "/host_key.pub"):gsub("%s+$", "")
  sh("mkdir -p " .. q(home .. "/.ssh"))
  local host = port == 22 and "127.0.0.1" or string.format("[127.0.0.1]:%d", port)
  fixtures.write_file(home .. "/.ssh/known_hosts", host .. " " .. pub .. "\n")
  local user = sh("id -un"):gsub("%s+$", "")
  return {
    pid = pid, port = port, dir = dir, home = home, key = dir .. "/client_key", other_key = dir .. "/other_key",
    user = user,
    url = function(repo) return string.format("ssh://%s@127.0.0.1:%d%s", user, port, repo.bare) end,
    scp_url = function(repo) return string.format("%s@127.0.0.1:%s", user, repo.bare) end,
  }
end

git.port_open = port_open

return git
