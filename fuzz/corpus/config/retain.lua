-- Retention at the top level and overridden for one target (README).
return {
  retain = { history = 200, versions = 10, logs = 100 },
  targets = {
    production = { provider = { command = "./app --port {port}" }, retain = { versions = 20, history = 500 } },
    staging = { provider = { command = "./app --port {port}" }, retain = { logs = 0 } },
  },
}
