-- Loaded by busted (--helper) in every run. Under the sanitizer build, the
-- ASan runtime is preloaded into lua5.4 (LD_PRELOAD) so that deploy.so can
-- load; the commands specs start (mktemp, haproxy, the ASan-built deployctl
-- itself) must not inherit that preload, so it is dropped for every child.
local preload = os.getenv("LD_PRELOAD")
if preload and preload:find("asan", 1, true) then
  local prefix = "unset LD_PRELOAD; "
  local execute, popen = os.execute, io.popen
  os.execute = function(cmd, ...)
    if cmd == nil then return execute() end
    return execute(prefix .. cmd, ...)
  end
  io.popen = function(cmd, ...) return popen(prefix .. cmd, ...) end
end
