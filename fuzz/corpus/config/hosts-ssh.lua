-- The README's targets on several hosts over ssh, with ssh's own key,
-- known_hosts and config (the paths given there do not exist here).
return {
  targets = {
    production = {
      hosts = { "app1", "app2", "deploy@10.0.0.7:2222" },
      instances = 2,
      provider = {
        kind = "ssh",
        command = "/srv/app/bin/app --listen {host}:{port} --version {version}",
        ports = "20000-20999",
        stop_timeout = 10,
        env = { APP_TOKEN = "${APP_TOKEN}" },
        workdir = "/srv/app",
        log_dir = "/var/log/app",
        accept_new = false,
        connect_timeout = 10,
        boot_limit = "25%",
        boot_wait = 5,
      },
      router = { kind = "haproxy", socket = "ssh://lb1/run/haproxy/admin.sock", backend = "app" },
      health = { path = "/healthz", timeout = 2, interval = 1, failure_threshold = 3 },
    },
    staging = {
      hosts = { "[::1]:2222" },
      provider = { kind = "ssh", command = "./app --port {port}", boot_limit = 1 },
      router = { kind = "haproxy", socket = "tcp://10.0.0.1:9999", backend = "staging" },
    },
  },
}
