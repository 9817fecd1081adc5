-- Targets that share their settings through a metatable: lconfig reads
-- fields with lua_getfield, so __index supplies what a target leaves out.
local defaults = {
  instances = 2,
  provider = { kind = "process", command = "./app --port {port} --version {version}", ports = "21000-21999" },
  health = { path = "/ready", failure_threshold = 5 },
}
local function target(t) return setmetatable(t, { __index = defaults }) end
return {
  state = "postgresql://deploy:${APP_TOKEN}@db.internal/deploy",
  targets = {
    eu = target{ router = { kind = "haproxy", socket = "${HAPROXY_SOCKET}", backend = "eu" } },
    us = target{ instances = 3 },
  },
}
