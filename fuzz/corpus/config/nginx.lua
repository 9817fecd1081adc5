-- The README's nginx router.
return {
  state = "/var/lib/deployctl/state.db",
  targets = {
    web = {
      instances = 2,
      provider = { kind = "process", command = "./app --port {port} --version {version}", ports = "20000-20999" },
      router = {
        kind = "nginx",
        include = "/etc/nginx/deployctl/app.conf",
        upstream = "app",
        conf = "/etc/nginx/nginx.conf",
        pid = "/run/nginx.pid",
        nginx = "/usr/sbin/nginx",
        timeout = 10,
        drain_timeout = 30,
      },
      health = { path = "/healthz", expect_status = 200, failure_threshold = 3 },
    },
  },
}
