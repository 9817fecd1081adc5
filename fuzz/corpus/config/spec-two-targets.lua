-- As spec/support/fixtures.lua builds them (target_config, config).
local command = "/srv/build/demo-app --port {port} --version {version} --unhealthy-file /tmp/deployctl-target-x/unhealthy-{version}"
return {
  state = "/tmp/deployctl-state-x/state.db",
  clock = "virtual",
  targets = {
    staging = {
      instances = 2,
      provider = { kind = "process", command = command, ports = "20000-20019", stop_timeout = 2 },
      router = { kind = "none" },
      health = { path = "/healthz", expect_status = 200, timeout = 1, interval = 0.05, failure_threshold = 3 },
    },
    production = {
      instances = 1,
      provider = { kind = "process", command = command, ports = "20020-20039", stop_timeout = 2 },
      router = { kind = "haproxy", socket = "/tmp/deployctl-haproxy-x/admin.sock", backend = "app",
                 prefix = "dc_", timeout = 5, drain_timeout = 0.5 },
    },
  },
}
