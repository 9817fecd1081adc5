-- deployctl report: one deployment as a self-contained HTML page (no
-- script, no external resource): a summary, an SVG chart of the new
-- version's traffic share, health and analysis verdicts over time, the
-- analysis measurements, and the event table.
local M = {}

local function esc(s)
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                                         ["'"] = "&#39;" }))
end

local function fmt_num(v) return string.format("%.1f", v):gsub("%.0$", "") end

-- The chart: x is seconds since the deployment started, y the share of the
-- new version (0..100 %). One point per weight change; health failures as
-- red marks on the axis, healthy checks as green ones.
local function chart(events, started, finished)
  local W, H, L, R, T, B = 760, 260, 50, 20, 20, 40
  local span = math.max(finished - started, 1e-3)
  local function x(ts) return L + (ts - started) / span * (W - L - R) end
  local function y(pct) return T + (100 - pct) / 100 * (H - T - B) end
  local parts = {
    string.format('<svg xmlns="http://www.w3.org/2000/svg" id="chart" width="%d" height="%d" viewBox="0 0 %d %d" role="img" aria-label="traffic share of the new version over time">', W, H, W, H),
    string.format('<rect x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#ccc"/>', L, T, W - L - R, H - T - B),
  }
  for pct = 0, 100, 25 do
    parts[#parts + 1] = string.format('<line x1="%d" x2="%d" y1="%s" y2="%s" stroke="#e5e5e5"/><text x="%d" y="%s" font-size="11" text-anchor="end" fill="#555">%d %%</text>',
      L, W - R, fmt_num(y(pct)), fmt_num(y(pct)), L - 6, fmt_num(y(pct) + 4), pct)
  end
  parts[#parts + 1] = string.format('<text x="%d" y="%d" font-size="11" fill="#555">0 s</text><text x="%d" y="%d" font-size="11" text-anchor="end" fill="#555">%s s</text>',
    L, H - B + 16, W - R, H - B + 16, fmt_num(span))
  -- the share as a step line: it holds its value until the next change
  local pts, last_pct, points = {}, 0, {}
  pts[#pts + 1] = fmt_num(x(started)) .. "," .. fmt_num(y(0))
  for _, ev in ipairs(events) do
    if ev.kind == "traffic" or ev.kind == "rolled_back" then
      local pct = ev.kind == "traffic" and ev.data.pct or 0
      pts[#pts + 1] = fmt_num(x(ev.ts)) .. "," .. fmt_num(y(last_pct))
      pts[#pts + 1] = fmt_num(x(ev.ts)) .. "," .. fmt_num(y(pct))
      points[#points + 1] = string.format('<circle class="point" data-pct="%s" cx="%s" cy="%s" r="4" fill="#1f6feb"><title>%s %% at +%s s</title></circle>',
        fmt_num(pct), fmt_num(x(ev.ts)), fmt_num(y(pct)), fmt_num(pct), fmt_num(ev.ts - started))
      last_pct = pct
    end
  end
  pts[#pts + 1] = fmt_num(x(finished)) .. "," .. fmt_num(y(last_pct))
  parts[#parts + 1] = '<polyline class="share" fill="none" stroke="#1f6feb" stroke-width="2" points="' .. table.concat(pts, " ") .. '"/>'
  for _, p in ipairs(points) do parts[#parts + 1] = p end
  for _, ev in ipairs(events) do
    local color = (ev.kind == "health_failed" and "#d1242f") or ((ev.kind == "healthy" or ev.kind == "verified") and "#1a7f37")
    if color then
      parts[#parts + 1] = string.format('<rect class="health %s" x="%s" y="%d" width="4" height="8" fill="%s"><title>%s at +%s s</title></rect>',
        ev.kind == "health_failed" and "bad" or "good", fmt_num(x(ev.ts) - 2), H - B - 10, color, esc(ev.kind), fmt_num(ev.ts - started))
    end
  end
  -- analysis verdicts along the top: green pass, red fail, amber inconclusive
  local colors = { pass = "#1a7f37", fail = "#d1242f", error = "#d1242f", inconclusive = "#bf8700" }
  for _, ev in ipairs(events) do
    if ev.kind == "analysis" and ev.data then
      parts[#parts + 1] = string.format('<circle class="analysis %s" cx="%s" cy="%d" r="3" fill="%s"><title>%s: %s at +%s s</title></circle>',
        esc(ev.data.verdict), fmt_num(x(ev.ts)), T + 6, colors[ev.data.verdict] or "#555", esc(ev.data.metric),
        esc(ev.data.verdict), fmt_num(ev.ts - started))
    end
  end
  parts[#parts + 1] = "</svg>"
  return table.concat(parts, "\n")
end

-- JSON as a person reads it: keys in alphabetical order (the same every
-- time), "/" and non-ASCII text as they are (cjson writes "\/"), integers
-- without a fraction. Only what JSON requires is escaped; the page escapes
-- the HTML after.
local cjson = require "cjson"

local function json_text(v)
  local t = type(v)
  if v == nil or v == cjson.null then return "null" end
  if t == "boolean" then return tostring(v) end
  if t == "number" then
    if math.type(v) == "integer" or (v == math.floor(v) and math.abs(v) < 2^53) then
      return string.format("%d", v)
    end
    return string.format("%.14g", v)
  end
  if t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(c)
      local named = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\t"] = "\\t", ["\r"] = "\\r" }
      return named[c] or string.format("\\u%04x", c:byte())
    end) .. '"'
  end
  if t ~= "table" then return '"' .. tostring(v) .. '"' end
  local n = #v
  local array_mt = rawget(cjson, "array_mt")
  if n > 0 or (array_mt ~= nil and getmetatable(v) == array_mt) then
    local items = {}
    for i = 1, n do items[i] = json_text(v[i]) end
    return "[" .. table.concat(items, ",") .. "]"
  end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local items = {}
  for _, k in ipairs(keys) do
    local val = v[k]
    if val == nil then val = v[tonumber(k)] end
    items[#items + 1] = json_text(k) .. ":" .. json_text(val)
  end
  return "{" .. table.concat(items, ",") .. "}"
end
M.json_text = json_text

-- Every measurement of the deployment's analysis, in order.
local function analysis_table(events, started)
  local rows = {}
  for _, ev in ipairs(events) do
    local a = ev.data
    if ev.kind == "analysis" and a then
      rows[#rows + 1] = string.format('<tr class="measurement %s"><td>+%s s</td><td>%s</td><td>%s</td><td>%s %%</td><td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>',
        esc(a.verdict), fmt_num(ev.ts - started), esc(a.metric), esc(a.source), fmt_num(a.pct or 0),
        a.value ~= nil and esc(a.value) or "-", a.baseline ~= nil and esc(a.baseline) or "-", esc(a.verdict),
        esc(a.detail or ""))
    end
  end
  if #rows == 0 then return "" end
  return '<h2>Analysis</h2><table id="analysis"><thead><tr><th>since start</th><th>metric</th><th>source</th>'
    .. '<th>share</th><th>value</th><th>old set</th><th>verdict</th><th>detail</th></tr></thead><tbody>\n'
    .. table.concat(rows, "\n") .. "\n</tbody></table>"
end

local function detail(ev)
  if not ev.data then return "" end
  return json_text(ev.data)
end

local LEGEND = [[
<ul class="legend">
<li><svg width="22" height="10"><line x1="0" y1="5" x2="22" y2="5" stroke="#1f6feb" stroke-width="2"/></svg> share of the new version's traffic (a dot at each change)</li>
<li><svg width="10" height="10"><rect x="3" y="1" width="4" height="8" fill="#1a7f37"/></svg> health check passed (healthy, verified)</li>
<li><svg width="10" height="10"><rect x="3" y="1" width="4" height="8" fill="#d1242f"/></svg> health check failed</li>
</ul>]]

function M.html(d, events)
  local started = d.started
  local finished = started + (d.duration or 0)
  for _, ev in ipairs(events) do
    if ev.ts > finished then finished = ev.ts end
  end
  local rows = {}
  for _, ev in ipairs(events) do
    rows[#rows + 1] = string.format("<tr class=\"event %s\"><td>%s</td><td>+%s s</td><td>%s</td><td class=\"data\"><code>%s</code></td></tr>",
      esc(ev.kind), esc(ev.time), fmt_num(ev.ts - started), esc(ev.kind), esc(detail(ev)))
  end
  local errors = ""
  if d.errors and #d.errors > 0 then
    local items = {}
    for _, e in ipairs(d.errors) do items[#items + 1] = "<li><pre>" .. esc(e) .. "</pre></li>" end
    errors = "<h2>Why it failed</h2><ul class=\"errors\">" .. table.concat(items) .. "</ul>"
  end
  local status_color = d.status == "succeeded" and "#1a7f37" or "#d1242f"
  return ([[<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>deployctl: TITLE</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 20px; margin: 0 0 8px; }
.status { color: COLOR; font-weight: 600; }
table { border-collapse: collapse; margin-top: 12px; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; white-space: nowrap; }
td.data { white-space: normal; overflow-wrap: anywhere; }
code { font-size: 12px; } pre { white-space: pre-wrap; margin: 0; }
.legend { list-style: none; padding: 0; margin: 4px 0 0; color: #57606a; font-size: 12px; display: flex; gap: 18px; }
.legend svg { vertical-align: middle; margin-right: 4px; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dt { color: #57606a; }
</style></head><body>
<h1>TITLE</h1>
<p class="status">STATUS</p>
<dl>
<dt>deployment</dt><dd>ID</dd>
<dt>kind</dt><dd>KIND</dd>
<dt>from</dt><dd>FROM</dd>
<dt>strategy</dt><dd>STRATEGY</dd>
<dt>started</dt><dd>STARTED</dd>
<dt>duration</dt><dd>DURATION s</dd>
<dt>by</dt><dd>USER</dd>
</dl>
<h2>Traffic share of VERSION, health and analysis</h2>
CHART
LEGEND
ANALYSIS
ERRORS
<h2>Events</h2>
<table id="events"><thead><tr><th>time</th><th>since start</th><th>event</th><th>data</th></tr></thead>
<tbody>
ROWS
</tbody></table>
</body></html>
]]):gsub("[A-Z][A-Z]+", {
    TITLE = esc(d.target .. " " .. d.version),
    COLOR = status_color,
    STATUS = esc(d.status),
    ID = esc(d.id),
    KIND = esc(d.kind),
    FROM = esc(d.from_version ~= "" and d.from_version or "nothing"),
    STRATEGY = esc(d.strategy),
    STARTED = esc(d.created_at),
    DURATION = fmt_num(d.duration or 0),
    USER = esc(d.user),
    VERSION = esc(d.version),
    CHART = chart(events, started, finished),
    LEGEND = LEGEND,
    ANALYSIS = analysis_table(events, started),
    ERRORS = errors,
    ROWS = table.concat(rows, "\n"),
  })
end

return M
