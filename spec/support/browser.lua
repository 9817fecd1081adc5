-- A real headless Chromium driven over the DevTools protocol, for the
-- specs that look at a page as a person would (spec/serve_spec.lua).
--
-- Chromium speaks the protocol on a pipe (--remote-debugging-pipe: it reads
-- commands on fd 3 and writes answers on fd 4, each a JSON text ended by a
-- NUL byte); two FIFOs in a temporary directory connect it to this process,
-- so no WebSocket client is needed. The process is registered with the
-- fixtures and stopped by fixtures.cleanup().
--
--   local b = browser.open("http://127.0.0.1:9753/")
--   b:wait_for("document.querySelector('#t-production .share').textContent.includes('%')", 20)
--   b:eval("document.title")
--   b:click("#t-production button.promote")
--   b:screenshot("/tmp/dashboard.png")
--   b:close()

local cjson = require "cjson"
local fixtures = require "spec.support.fixtures"

local browser = {}
browser.__index = browser

local q = fixtures.shell_quote

function browser.available()
  return os.execute("command -v chromium >/dev/null 2>&1") == true
end

local function send(self, method, params, session)
  self.next_id = self.next_id + 1
  -- cjson writes an empty table as {}: the object CDP wants.
  local msg = { id = self.next_id, method = method, params = params or {} }
  if session then msg.sessionId = session end
  self.to:write(cjson.encode(msg), "\0")
  self.to:flush()
  return self.next_id
end

local function receive(self)
  local parts = {}
  while true do
    local c = self.from:read(1)
    if c == nil then error("browser: Chromium closed its pipe (see " .. self.dir .. "/chromium.log)", 3) end
    if c == "\0" then break end
    parts[#parts + 1] = c
  end
  return cjson.decode(table.concat(parts))
end

-- Sends a command and waits for its answer (events in between are dropped).
local function call(self, method, params, session)
  local id = send(self, method, params, session)
  while true do
    local m = receive(self)
    if m.id == id then
      if m.error then error("browser: " .. method .. ": " .. tostring(m.error.message), 2) end
      return m.result
    end
  end
end

function browser.open(url, opts)
  opts = opts or {}
  local self = setmetatable({ next_id = 0 }, browser)
  self.dir = fixtures.tmpdir("chromium")
  assert(os.execute("mkfifo " .. q(self.dir .. "/in") .. " " .. q(self.dir .. "/out")) == true)
  local size = opts.size or "1280,900"
  -- The FIFOs are opened by an inner shell, after the outer one has sent
  -- its output to the log: opening a FIFO blocks until the other end opens,
  -- and a process blocked there while still holding fixtures.spawn's pipe
  -- would keep that pipe from ever ending.
  local cmd = string.format(
    "exec chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-extensions --hide-scrollbars " ..
    "--remote-debugging-pipe --user-data-dir=%s --window-size=%s about:blank 3<%s 4>%s",
    q(self.dir .. "/profile"), size, q(self.dir .. "/in"), q(self.dir .. "/out"))
  self.pid = fixtures.spawn("sh -c " .. q(cmd), self.dir .. "/chromium.log")
  -- The shell opens fd 3 (our "in") first, then fd 4: open in that order.
  self.to = assert(io.open(self.dir .. "/in", "wb"))
  self.from = assert(io.open(self.dir .. "/out", "rb"))
  local target = call(self, "Target.createTarget", { url = url })
  local attached = call(self, "Target.attachToTarget", { targetId = target.targetId, flatten = true })
  self.session = attached.sessionId
  return self
end

-- The value of a JavaScript expression (JSON-able), or nil and the error.
function browser:eval(js)
  local r = call(self, "Runtime.evaluate", { expression = js, returnByValue = true, awaitPromise = true },
                 self.session)
  if r.exceptionDetails then
    return nil, (r.exceptionDetails.exception and r.exceptionDetails.exception.description)
                or r.exceptionDetails.text
  end
  return r.result.value
end

-- Waits until the expression is truthy (a readiness wait); returns its value.
function browser:wait_for(js, timeout_s, what)
  local last_err
  return fixtures.wait_until(function()
    local v, e = self:eval(js)
    last_err = e
    if v == cjson.null then return nil end
    return v
  end, timeout_s or 10, (what or js) .. (last_err and (" (" .. last_err .. ")") or ""))
end

-- The text of the first element matching a CSS selector (nil when none).
function browser:text(selector)
  local v = self:eval(string.format("(e => e ? e.textContent : null)(document.querySelector(%s))",
                                    cjson.encode(selector)))
  if v == cjson.null then return nil end
  return v
end

-- Clicks the element as a user would (a real mouse event at its centre).
function browser:click(selector)
  local box = self:eval(string.format(
    "(e => { if (!e) return null; e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();" ..
    " return {x: r.x + r.width / 2, y: r.y + r.height / 2, disabled: !!e.disabled}; })(document.querySelector(%s))",
    cjson.encode(selector)))
  if box == nil or box == cjson.null then error("browser: nothing matches " .. selector, 2) end
  if box.disabled then error("browser: " .. selector .. " is disabled", 2) end
  for _, kind in ipairs{ "mousePressed", "mouseReleased" } do
    call(self, "Input.dispatchMouseEvent", { type = kind, x = box.x, y = box.y, button = "left", clickCount = 1 },
         self.session)
  end
end

-- Types into an input (focus, then the text as typed characters).
function browser:type(selector, text)
  assert(self:eval(string.format("(e => { e.focus(); e.value = ''; return true; })(document.querySelector(%s))",
                                 cjson.encode(selector))))
  call(self, "Input.insertText", { text = text }, self.session)
end

-- A PNG of the page as it is now.
function browser:screenshot(path)
  local r = call(self, "Page.captureScreenshot", { format = "png", captureBeyondViewport = false }, self.session)
  local b64 = self.dir .. "/shot.b64"
  fixtures.write_file(b64, r.data)
  assert(os.execute("base64 -d " .. q(b64) .. " > " .. q(path)) == true, "browser: cannot decode the screenshot")
  return path
end

function browser:close()
  if self.closed then return end
  self.closed = true
  pcall(send, self, "Browser.close")
  pcall(function() self.to:close() end)
  pcall(function() self.from:close() end)
  fixtures.stop(self.pid, 5)
end

return browser
