-- A config that builds its targets in a loop.
local targets = {}
for i, region in ipairs({ "eu-west", "us-east", "ap-south" }) do
  targets[region] = {
    instances = i,
    provider = { command = string.format("./app --port {port} --region %s", region),
                 ports = string.format("%d-%d", 20000 + i * 100, 20099 + i * 100) },
    router = i % 2 == 1 and { kind = "none" } or nil,
  }
end
return { targets = targets }
