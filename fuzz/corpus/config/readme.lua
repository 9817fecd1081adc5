return {
  state = ".deploy/state.db",        -- $DEPLOY_STATE overrides it
  clock = "real",                    -- or "virtual": every wait returns at once (unset: the
                                     -- process's clock, virtual under `deployctl run --simulate`)
  targets = {
    production = {
      instances = 2,                 -- per version (1..64)
      provider = {
        kind = "process",
        command = "./app --port {port} --version {version}",  -- run by /bin/sh
        ports = "20000-20999",       -- each instance gets a free port from here
        stop_timeout = 10,           -- SIGTERM, then SIGKILL after this many seconds
        env = { APP_TOKEN = "${APP_TOKEN}" },
        workdir = "/srv/app",        -- optional
      },
      router = {
        kind = "haproxy",            -- or "none"
        socket = "/run/haproxy/admin.sock",
        backend = "app",             -- declared with `balance roundrobin`, may have no servers
        drain_timeout = 30,          -- seconds to wait for sessions on a leaving server
      },
      health = {
        path = "/healthz", expect_status = 200,
        timeout = 2,                 -- per check
        interval = 1,                -- between checks
        failure_threshold = 3,       -- consecutive failures that abort
        start_timeout = 60,          -- how long new instances get to turn healthy
      },
    },
  },
}
