-- A target whose metatable adds targets while the config is being read
-- (lconfig_load reads fields with lua_getfield, so __index runs): it
-- overflowed the array sized by the first count of the targets.
local targets = {}
local grow = { __index = function(_, key) targets["x_" .. key] = { provider = { command = "./app {port}" } } end }
targets.web = setmetatable({ provider = { command = "./app --port {port}" } }, grow)
return { targets = targets }
