-- sluice.options: the options of a C stage, from a Lua table, as the config
-- reader passes them (src/pipeline/opts.h): numbers, strings, booleans,
-- lists of strings; other tables are kept only so errors can name them.
--
--   local opts = options.build{ max_length = 1024 }  -- sl_opts *, collected
--   local conf, err = options.configure("sluice.codec.line", { max_length = 1024 })
--
-- configure parses the options for the C stage registered under that name,
-- exactly as at load: it returns the stage's configuration (a void *
-- cdata, freed when collected: keep it referenced while any pipeline uses
-- it; nil for a stage without options, then err is nil too), or nil and
-- "max_length: expected a positive integer, got 0".
--
--   local conf, err = options.cached("sluice.codec.line", { max_length = 1024 })
--
-- cached is configure for stages added while pipelines run: one
-- configuration per module and set of options, kept for the life of the
-- Lua state (so as many as there are distinct option sets in the code).
local ffi = require("ffi")
local C = require("sluice.core")

local type = type
local pairs = pairs
local error = error

local NUMBER, STRING, BOOLEAN, LIST, TABLE = 1, 2, 3, 4, 5 -- sl_opt_type
local PUSH = 0

local errbuf = ffi.new("char[512]")
local confp = ffi.new("void *[1]")

local _M = {}

local function add(o, key, t, num, s)
  if C.sl_ffi_opts_add(o, key, t, num or 0, s, s and #s or 0) ~= 0 then
    error("out of memory building stage options", 3)
  end
end

-- Whether t holds only strings, at 1..#t.
local function string_list(t)
  local n = 0
  for _, v in pairs(t) do
    if type(v) ~= "string" then return false end
    n = n + 1
  end
  return n == #t
end

-- Returns a new sl_opts * (collected) holding the string keys of tbl.
function _M.build(tbl)
  if type(tbl) ~= "table" then error("bad 'tbl' argument (table expected)", 2) end
  local o = C.sl_ffi_opts_new()
  if o == nil then error("out of memory building stage options", 2) end
  o = ffi.gc(o, C.sl_ffi_opts_free)
  for k, v in pairs(tbl) do
    if type(k) == "string" then
      local t = type(v)
      if t == "number" then
        add(o, k, NUMBER, v)
      elseif t == "string" then
        add(o, k, STRING, nil, v)
      elseif t == "boolean" then
        add(o, k, BOOLEAN, v and 1 or 0)
      elseif t == "table" and string_list(v) then
        add(o, k, LIST)
        for i = 1, #v do add(o, k, PUSH, nil, v[i]) end
      elseif t == "table" then
        add(o, k, TABLE)
      else
        error(("bad option '%s' (plain data expected, got a %s)"):format(k, t), 2)
      end
    end
  end
  return o
end

-- Parses tbl for the C stage `module`: its configuration, or nil, err.
function _M.configure(module, tbl)
  if type(module) ~= "string" then error("bad 'module' argument (string expected)", 2) end
  local o = _M.build(tbl or {})
  if C.sl_ffi_stage_configure(module, o, confp, errbuf, ffi.sizeof(errbuf)) ~= 0 then
    return nil, ffi.string(errbuf)
  end
  local conf = confp[0]
  if conf == nil then return nil end
  return ffi.gc(conf, function(c) C.sl_ffi_stage_unconfigure(module, c) end)
end

-- A key for a plain options table: sorted keys, values by type.
local function key_of(module, tbl)
  local keys = {}
  for k in pairs(tbl) do
    if type(k) == "string" then keys[#keys + 1] = k end
  end
  table.sort(keys)
  local parts = { module }
  for _, k in ipairs(keys) do
    local v = tbl[k]
    if type(v) == "table" then
      local items = {}
      for i = 1, #v do items[i] = ("%q"):format(tostring(v[i])) end
      v = "{" .. table.concat(items, ",") .. "}"
    else
      v = type(v) .. ":" .. ("%q"):format(tostring(v))
    end
    parts[#parts + 1] = ("%q=%s"):format(k, v)
  end
  return table.concat(parts, ";")
end

local cache = {}

function _M.cached(module, tbl)
  if type(module) ~= "string" then error("bad 'module' argument (string expected)", 2) end
  tbl = tbl or {}
  local key = key_of(module, tbl)
  local hit = cache[key]
  if hit then return hit.conf end
  local conf, err = _M.configure(module, tbl)
  if err then return nil, err end
  cache[key] = { conf = conf }
  return conf
end

return _M
