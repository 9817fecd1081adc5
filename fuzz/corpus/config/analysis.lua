-- A target's declared analysis, every source (README, Analysis).
return {
  targets = {
    production = {
      provider = { command = "./app --port {port}" },
      router = { kind = "haproxy", socket = "/run/haproxy/admin.sock", backend = "app" },
      analysis = {
        interval = 30, failure_limit = 1,
        metrics = {
          { name = "errors", source = "haproxy", measure = "5xx_ratio", success = { max = 0.01 }, min_requests = 20 },
          { name = "latency", source = "haproxy", measure = "response_time", baseline = { max_increase = 0.2, tolerance = 5 } },
          { name = "error_rate", source = "prometheus", address = "http://127.0.0.1:9090",
            query = 'sum(rate(x{version="{version}"}[1m]))', success = { max = 0.01 }, failure = { min = 0.05 },
            no_data = "inconclusive" },
          { name = "probe", source = "probe", path = "/", count = 20, confidence = 0.95, max_error_increase = 0.05 },
          { name = "score", source = "http", url = "http://127.0.0.1:8080/score?v={version}", field = "data.score",
            expect_status = 200, success = { min = 0.9 }, timeout = 2 },
        },
      },
    },
  },
}
