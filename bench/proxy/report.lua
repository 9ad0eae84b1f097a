-- The report of bench/proxy/run: medians, ratios measured in the same run,
-- the issue's targets marked met or unmet, a table on stdout and a JSON file.
--
--   luajit report.lua RAW META OUT_JSON
--
-- RAW has one line per measurement: `key=value` words, and `note=` text last.
-- META has `key=value` lines describing the run.

local raw_path, meta_path, out_path = arg[1], arg[2], arg[3]
assert(raw_path and meta_path and out_path, "usage: luajit report.lua RAW META OUT_JSON")

local format, concat, sort = string.format, table.concat, table.sort

-- p99: the table shows p99 latency; tls: the proxy speaks TLS to the origin
-- (the table shows the share of resumed handshakes; no target is judged).
local WORKLOADS = {
  { id = "http-small", what = "wrk, 64 keep-alive connections, 100-byte responses",
    rate = "req/s", cpu = "CPU s/M req", cpu_scale = 1e6, p99 = true },
  { id = "redis-p16", what = "redis-benchmark -P 16 -c 50 -t set,get",
    rate = "ops/s", cpu = "CPU s/M ops", cpu_scale = 1e6 },
  { id = "bulk", what = "one connection, client to server",
    rate = "Gbit/s", cpu = "CPU s/GiB", cpu_scale = 2 ^ 30 },
  { id = "churn", what = "wrk with Connection: close, one connection per request",
    rate = "conn/s", cpu = "CPU s/M conn", cpu_scale = 1e6 },
  { id = "https-small", what = "as http-small, the proxy speaks TLS to the origin",
    rate = "req/s", cpu = "CPU s/M req", cpu_scale = 1e6, p99 = true, tls = true },
  { id = "https-churn", what = "as churn, the proxy speaks TLS to the origin: one handshake per request",
    rate = "conn/s", cpu = "CPU s/M conn", cpu_scale = 1e6, tls = true },
}
local CONTENDERS = { "baseline", "haproxy-1w", "haproxy-1w-splice", "haproxy-2w", "nginx-1w", "nginx-2w",
                     "sluice-1w", "sluice-1w-splice", "sluice-1w-nohc", "sluice-1w-lua",
                     "sluice-1w-guard", "sluice-2w", "sluice-2w-splice", "sluice-2w-nohc",
                     "sluice-2w-lua", "sluice-2w-guard" }
local LABELS = {
  baseline = "no proxy", ["haproxy-1w"] = "haproxy 1w", ["haproxy-2w"] = "haproxy 2w",
  ["haproxy-1w-splice"] = "haproxy 1w splice-auto",
  ["nginx-1w"] = "nginx 1w", ["nginx-2w"] = "nginx 2w",
  ["sluice-1w"] = "sluice 1w", ["sluice-1w-splice"] = "sluice 1w splice = true",
  ["sluice-2w-splice"] = "sluice 2w splice = true",
  ["sluice-1w-nohc"] = "sluice 1w half_close off",
  ["sluice-2w-nohc"] = "sluice 2w half_close off",
  ["sluice-1w-lua"] = "sluice 1w + Lua stage",
  ["sluice-1w-guard"] = "sluice 1w + RESP guard",
  ["sluice-2w"] = "sluice 2w", ["sluice-2w-lua"] = "sluice 2w + Lua stage",
  ["sluice-2w-guard"] = "sluice 2w + RESP guard",
}
local IDLE_TARGET_CONNS = 10000
local IDLE_TARGET_MIB = 64

-- Reading ------------------------------------------------------------------

local meta = {}
for line in io.lines(meta_path) do
  local k, v = line:match("^([%w_]+)=(.*)$")
  if k then meta[k] = v end
end

local recs = {}   -- recs[workload][contender] = list of records
for line in io.lines(raw_path) do
  local note = line:match(" note=(.*)$")
  local head = note and line:sub(1, #line - #note - 6) or line
  local r = { note = note }
  for k, v in head:gmatch("([%w_]+)=(%S*)") do r[k] = tonumber(v) or v end
  recs[r.workload] = recs[r.workload] or {}
  local byc = recs[r.workload]
  byc[r.contender] = byc[r.contender] or {}
  local list = byc[r.contender]
  list[#list + 1] = r
end

local function median(t)
  if #t == 0 then return nil end
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  sort(s)
  local m = math.floor((#s + 1) / 2)
  if #s % 2 == 1 then return s[m] end
  return (s[m] + s[m + 1]) / 2
end

local function list_of(w, c) return (recs[w] or {})[c] or {} end

-- The finished measurements of a row, keyed by round, and the rounds in order.
local function ok_by_round(w, c)
  local by, order = {}, {}
  for _, r in ipairs(list_of(w, c)) do
    if r.status == "ok" then
      by[r.round] = r
      order[#order + 1] = r.round
    end
  end
  sort(order)
  return by, order
end

-- Why a row has no figure: the first note of its records.
local function why_not(w, c)
  for _, r in ipairs(list_of(w, c)) do
    if r.status ~= "ok" then return r.status, r.note or "" end
  end
  return "not run", ""
end

local function ref_of(c)
  if c:find("%-2w") then return "haproxy-2w" end
  return "haproxy-1w"
end

-- Median of a figure over rounds, and median of its per-round ratio to the
-- reference row (a ratio is taken only between rounds that both finished).
local function summarize(w, spec, c)
  local by, order = ok_by_round(w, c)
  local rates, p99s, cpus, hwms, loads, cores, errs, rounds = {}, {}, {}, {}, {}, {}, 0, 0
  local resumed = {}
  for _, round in ipairs(order) do
    local r = by[round]
    rounds = rounds + 1
    rates[#rates + 1] = r.rate
    if r.p99_ms then p99s[#p99s + 1] = r.p99_ms end
    if r.handshakes and r.handshakes > 0 then resumed[#resumed + 1] = 100 * r.resumed / r.handshakes end
    if r.load_busy_pct then loads[#loads + 1] = r.load_busy_pct end
    if c ~= "baseline" and r.proxy_cpus_busy_pct then cores[#cores + 1] = r.proxy_cpus_busy_pct end
    if c ~= "baseline" and r.work and r.work > 0 then
      cpus[#cpus + 1] = r.cpu_s / r.work * spec.cpu_scale
      hwms[#hwms + 1] = r.hwm_kb / 1024
    end
    errs = errs + (r.errors or 0)
  end
  if rounds == 0 then
    local status, note = why_not(w, c)
    return { status = status, note = note }
  end
  local row = { status = "ok", rounds = rounds, rate = median(rates), p99_ms = median(p99s),
                cpu = median(cpus), peak_rss_mib = median(hwms), errors = errs,
                load_busy_pct = median(loads), proxy_cpus_busy_pct = median(cores),
                rates = rates, resumed_pct = median(resumed) }
  local ref = ok_by_round(w, ref_of(c))
  local rr, cr = {}, {}
  for _, round in ipairs(order) do
    local r, h = by[round], ref[round]
    if h then
      rr[#rr + 1] = r.rate / h.rate
      if c ~= "baseline" and h.cpu_s > 0 and r.work > 0 and h.work > 0 then
        cr[#cr + 1] = (r.cpu_s / r.work) / (h.cpu_s / h.work)
      end
    end
  end
  row.vs = ref_of(c)
  row.ratio = median(rr)
  row.cpu_ratio = median(cr)
  return row
end

local function summarize_idle(c)
  local by = ok_by_round("idle", c)
  local rss, rss0, slope, n, rounds = {}, {}, {}, nil, 0
  for _, r in pairs(by) do
    rounds = rounds + 1
    rss[#rss + 1] = r.rss_kb / 1024
    rss0[#rss0 + 1] = r.rss0_kb / 1024
    slope[#slope + 1] = (r.rss_kb - r.rss_half_kb) / (r.n / 2)   -- KiB per connection
    n = r.n
  end
  if rounds == 0 then
    local status, note = why_not("idle", c)
    return { status = status, note = note }
  end
  local row = { status = "ok", rounds = rounds, conns = n, rss_mib = median(rss),
                rss_no_conn_mib = median(rss0), kib_per_conn = median(slope) }
  if n >= IDLE_TARGET_CONNS then
    row.rss_10k_mib, row.rss_10k_how = row.rss_mib, "measured"
  else
    row.rss_10k_mib = row.rss_mib + (IDLE_TARGET_CONNS - n) * row.kib_per_conn / 1024
    row.rss_10k_how = format("extrapolated from %d", n)
  end
  return row
end

local results = { workloads = {}, idle = {} }
for _, spec in ipairs(WORKLOADS) do
  if recs[spec.id] then
    local rows = {}
    for _, c in ipairs(CONTENDERS) do
      if list_of(spec.id, c)[1] then rows[c] = summarize(spec.id, spec, c) end
    end
    results.workloads[spec.id] = { what = spec.what, rate_unit = spec.rate,
                                   cpu_unit = spec.cpu, rows = rows }
  end
end
if recs.idle then
  for _, c in ipairs(CONTENDERS) do
    if list_of("idle", c)[1] then results.idle[c] = summarize_idle(c) end
  end
end

-- Targets ------------------------------------------------------------------

local targets = {}
-- Adds a target; `figures` is nil when its row has no figure (n/a), else
-- the fields it was judged on, and `met` the verdict.
local function target(t, figures, met)
  if figures then
    for k, v in pairs(figures) do t[k] = v end
    t.verdict = met and "met" or "unmet"
  else
    t.verdict = "n/a"
  end
  targets[#targets + 1] = t
end
local function ok(row) return row and row.status == "ok" and row end
for _, n in ipairs({ 1, 2 }) do
  local s, h = format("sluice-%dw", n), format("haproxy-%dw", n)
  for _, spec in ipairs(WORKLOADS) do
    local wl = not spec.tls and results.workloads[spec.id]
    if wl then
      local pass, lua = ok(wl.rows[s]), ok(wl.rows[s .. "-lua"])
      local judged = pass and pass.ratio and pass.cpu_ratio
      -- The no-proxy baseline's ratio to HAProxy 1w: the most any proxy's
      -- rate can reach with this load side (shown when it is under 1.1x).
      local base = ok(wl.rows.baseline)
      target({ target = format("pass-through >= 1.1x %s at no more CPU per unit", h),
               workload = spec.id, row = s },
             judged and { ratio = pass.ratio, cpu_ratio = pass.cpu_ratio,
                          ceiling = n == 1 and base and base.ratio or nil },
             judged and pass.ratio >= 1.1 and pass.cpu_ratio <= 1.0)
      judged = lua and lua.ratio
      target({ target = format("Lua stage >= 0.9x %s pass-through", h), workload = spec.id,
               row = s .. "-lua" },
             judged and { ratio = lua.ratio }, judged and lua.ratio >= 0.9)
    end
  end
  if recs.idle then
    local idle = ok(results.idle[s])
    target({ target = format("RSS with %d idle connections < %d MiB", IDLE_TARGET_CONNS,
                             IDLE_TARGET_MIB), workload = "idle", row = s },
           idle and { rss_mib = idle.rss_10k_mib, how = idle.rss_10k_how },
           idle and idle.rss_10k_mib < IDLE_TARGET_MIB)
  end
end
results.targets = targets
results.meta = meta

-- The table ----------------------------------------------------------------

local function num(v, fmt)
  if v == nil then return "-" end
  return format(fmt or "%.0f", v)
end

local function rate_fmt(spec) return spec.id == "bulk" and "%.2f" or "%.0f" end

local out = {}
local function p(...) out[#out + 1] = format(...) end

p("sluice proxy benchmark (%s mode), sluice %s, %s", meta.mode or "?", meta.sluice_rev or "?",
  meta.started or "")
p("%s round(s), medians; ratios are medians of per-round ratios to HAProxy with the same worker count",
  meta.rounds or "?")
p("pinning: 1-worker proxies on CPU %s, 2-worker proxies on CPUs %s, load generators and origins on CPU %s",
  meta.proxy_cpus_1w or "?", meta.proxy_cpus_2w or "?", meta.load_cpus or "?")
p("load average at start %s, at end %s", meta.loadavg_start or "?", meta.loadavg_end or "?")
if meta.mode == "quick" then
  p("QUICK MODE: short runs, figures are indicative only")
end
for _, spec in ipairs(WORKLOADS) do
  local wl = results.workloads[spec.id]
  if wl then
    p("")
    p("%s: %s", spec.id, spec.what)
    p("  %-24s %10s %8s %8s %12s %8s %9s %6s %6s %6s%s", "", spec.rate, "x haproxy",
      spec.p99 and "p99 ms" or "", spec.cpu, "x CPU", "peak MiB", "errors",
      "load%", "core%", spec.tls and " resumed%" or "")
    for _, c in ipairs(CONTENDERS) do
      local row = wl.rows[c]
      if row then
        if row.status == "ok" then
          p("  %-24s %10s %8s %8s %12s %8s %9s %6s %6s %6s%s", LABELS[c], num(row.rate, rate_fmt(spec)),
            row.ratio and format("%.2fx", row.ratio) or "-",
            spec.p99 and num(row.p99_ms, "%.2f") or "",
            num(row.cpu, "%.2f"), row.cpu_ratio and format("%.2fx", row.cpu_ratio) or "-",
            num(row.peak_rss_mib, "%.1f"), num(row.errors), num(row.load_busy_pct, "%.0f"),
            num(row.proxy_cpus_busy_pct, "%.0f"),
            spec.tls and format(" %9s", num(row.resumed_pct, "%.1f")) or "")
        else
          p("  %-24s %s: %s", LABELS[c], row.status, row.note)
        end
      end
    end
  end
end
if recs.idle then
  p("")
  p("idle: RSS with idle connections held open through the proxy")
  p("  %-24s %8s %10s %12s %10s %16s", "", "conns", "RSS MiB", "no conn MiB", "KiB/conn",
    "at 10,000 MiB")
  for _, c in ipairs(CONTENDERS) do
    local row = results.idle[c]
    if row and row.status == "ok" then
      p("  %-24s %8d %10.1f %12.1f %10.1f %16s", LABELS[c], row.conns, row.rss_mib,
        row.rss_no_conn_mib, row.kib_per_conn,
        format("%.1f%s", row.rss_10k_mib, row.rss_10k_how == "measured" and "" or " (extrap.)"))
    elseif row and c ~= "baseline" then
      p("  %-24s %s: %s", LABELS[c], row.status, row.note)
    end
  end
end
p("")
-- The TLS workloads judge no target: a run of those alone has none.
p(#targets > 0 and "targets (from the issue; reported, never asserted)"
  or "targets: none judged on these workloads")
-- Rows that did not run at all get one line, not one per target.
local absent, absent_shown = {}, {}
for _, t in ipairs(targets) do
  if t.verdict == "n/a" then
    absent[t.row] = absent[t.row] == nil and true or absent[t.row]
  else
    absent[t.row] = false
  end
end
for _, t in ipairs(targets) do
  if absent[t.row] then
    if not absent_shown[t.row] then
      absent_shown[t.row] = true
      local note = ""
      for _, spec in ipairs(WORKLOADS) do
        local wl = results.workloads[spec.id]
        local row = wl and wl.rows[t.row]
        if row and row.note and row.note ~= "" then note = ": " .. row.note; break end
      end
      p("  %-6s %-15s every target%s", "n/a", t.row, note)
    end
    goto continue
  end
  local fig = ""
  if t.ratio and t.cpu_ratio then
    fig = format("%.2fx, CPU %.2fx", t.ratio, t.cpu_ratio)
    if t.verdict == "unmet" and t.ceiling and t.ceiling < 1.1 then
      fig = fig .. format(" (no proxy: %.2fx, the load side's limit)", t.ceiling)
    end
  elseif t.ratio then
    fig = format("%.2fx", t.ratio)
  elseif t.rss_mib then
    fig = format("%.1f MiB (%s)", t.rss_mib, t.how)
  end
  p("  %-6s %-15s %-10s %-52s %s", t.verdict, t.row, t.workload, t.target, fig)
  ::continue::
end
io.write(concat(out, "\n"), "\n")

-- JSON ---------------------------------------------------------------------

local function json(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if v == math.floor(v) and math.abs(v) < 1e15 then return format("%d", v) end
    return format("%.6g", v)
  elseif t == "string" then
    return '"' .. v:gsub('[%c"\\]', function(ch)
      return ({ ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\t'] = '\\t' })[ch]
        or format("\\u%04x", ch:byte())
    end) .. '"'
  elseif t == "boolean" then
    return tostring(v)
  elseif t == "table" then
    local inner = indent .. "  "
    if #v > 0 or next(v) == nil then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = json(x, inner) end
      if #parts == 0 then return "[]" end
      return "[\n" .. inner .. concat(parts, ",\n" .. inner) .. "\n" .. indent .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    sort(keys)
    local parts = {}
    for _, k in ipairs(keys) do parts[#parts + 1] = json(tostring(k)) .. ": " .. json(v[k], inner) end
    return "{\n" .. inner .. concat(parts, ",\n" .. inner) .. "\n" .. indent .. "}"
  end
  return "null"
end

local f = assert(io.open(out_path, "w"))
f:write(json(results), "\n")
f:close()
