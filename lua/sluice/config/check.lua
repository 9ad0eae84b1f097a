-- sluice.config.check: the error format of sluice.config and the checks of
-- plain values that every part of the configuration uses.
--
-- A failed check raises a Failure (see fail); sluice.config's validate
-- catches it and returns nil and its one line:
--
--   config error: <key path>: expected <what>, got <value>
--
-- <key path> is written as Lua would index it (`listeners[1].listen`,
-- `upstreams["my-up"].servers[2]`), or `top level` for the table itself.
-- <value> is shown as Lua would write it: strings double-quoted and escaped,
-- numbers and booleans as is, `nil`, `a table` (`an empty table`),
-- `a function`.
--
-- Unknown keys are errors at every level: inside each table they are checked
-- first, and the smallest one is reported (numbers before strings).
--
-- Positive integers are 1..2^31-1 so that they fit a C int.

local _M = {}

local type = type
local pairs = pairs
local ipairs = ipairs
local next = next
local error = error
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local format = string.format
local byte = string.byte
local concat = table.concat
local sort = table.sort
local floor = math.floor

require("sluice.config.sandbox").exempt()

local Failure = {}  -- metatable tagging the error objects thrown by fail()

local MAX_INT = 2147483647  -- integers must fit a C int
_M.MAX_INT = MAX_INT

function _M.set_of(list)
    local set = {}
    for _, v in ipairs(list) do set[v] = true end
    return set
end
local set_of = _M.set_of


---------------------------------------------------------------------------
-- Formatting
---------------------------------------------------------------------------

local ESCAPES = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n',
                  ['\r'] = '\\r', ['\t'] = '\\t' }

-- Returns s in double quotes, escaped so the result stays on one line.
function _M.quote(s)
    return '"' .. s:gsub('[%c"\\]', function(c)
        return ESCAPES[c] or format("\\%03d", byte(c))
    end) .. '"'
end
local quote = _M.quote

-- Returns a one-line rendering of any value for the "got ..." part.
function _M.show(v)
    local t = type(v)
    if t == "string" then
        return quote(v)
    elseif t == "number" or t == "boolean" or t == "nil" then
        return tostring(v)
    elseif t == "table" then
        return next(v) == nil and "an empty table" or "a table"
    end
    return "a " .. t  -- function, userdata, thread
end
local show = _M.show

-- Returns the path of `key` inside the table at `parent` ("" = top level).
function _M.key_path(parent, key)
    if type(key) == "string" and key:find("^[%a_][%w_]*$") then
        return parent == "" and key or parent .. "." .. key
    elseif type(key) == "number" and key == floor(key) then
        return format("%s[%d]", parent, key)
    end
    return format("%s[%s]", parent, show(key))
end
local key_path = _M.key_path

-- A total order on table keys of mixed types, for deterministic reports.
local function key_less(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    if ta == "boolean" then return not a and b end
    return tostring(a) < tostring(b)
end

-- Returns the keys of t (those for which filter(k, v) holds, if given) in
-- the order of key_less.
function _M.sorted_keys(t, filter)
    local keys = {}
    for k, v in pairs(t) do
        if not filter or filter(k, v) then keys[#keys + 1] = k end
    end
    sort(keys, key_less)
    return keys
end
local sorted_keys = _M.sorted_keys

function _M.one_line(s)
    return (s:gsub("%s*\n%s*", " "))
end
local one_line = _M.one_line

-- Raises a validation failure at `path` (a key path, "" = top level).
-- Caught by sluice.config's validate, which turns it into `nil, msg`.
function _M.fail(path, fmt, ...)
    local msg = format("config error: %s: %s",
                       path == "" and "top level" or path, format(fmt, ...))
    error(setmetatable({ msg = one_line(msg) }, Failure), 0)
end
local fail = _M.fail

-- Is err (an error caught by pcall) a failure raised by fail()?
function _M.is_failure(err)
    return getmetatable(err) == Failure
end


---------------------------------------------------------------------------
-- Scalar checks
---------------------------------------------------------------------------

-- Raises unless every key of t is in `known` (a list). Smallest key first.
function _M.check_keys(t, path, known)
    local set = set_of(known)
    local unknown = sorted_keys(t, function(k) return not set[k] end)
    if unknown[1] ~= nil then
        fail(key_path(path, unknown[1]), "unknown key (expected one of: %s)",
             concat(known, ", "))
    end
end

-- Raises unless the keys of table t are exactly 1..n. Returns n.
function _M.check_array(t, path)
    local n = 0
    for _ in pairs(t) do n = n + 1 end
    local bad = sorted_keys(t, function(k)
        return type(k) ~= "number" or k < 1 or k > n or k ~= floor(k)
    end)
    if bad[1] ~= nil then
        fail(key_path(path, bad[1]),
             "unknown key (expected an array: keys 1, 2, ... without gaps)")
    end
    return n
end

-- Returns v if it is an integer in 1..MAX_INT, `default` if v is nil.
function _M.check_positive_int(v, path, default)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v < 1 or v ~= floor(v) then
        fail(path, "expected a positive integer, got %s", show(v))
    end
    if v > MAX_INT then
        fail(path, "expected a positive integer no larger than %d, got %s",
             MAX_INT, show(v))
    end
    return v
end

-- Returns v if it is an integer in 0..max, `default` if v is nil.
function _M.check_count(v, path, default, max)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v < 0 or v ~= floor(v) or v > max then
        fail(path, "expected an integer from 0 to %d, got %s", max, show(v))
    end
    return v
end

-- Returns v if it is one of the strings of list, `default` if v is nil.
function _M.check_one_of(v, path, list, default)
    if v == nil then return default end
    for i = 1, #list do
        if v == list[i] then return v end
    end
    fail(path, 'expected one of "%s", got %s', table.concat(list, '", "'), show(v))
end

-- Returns v if it is a power of two in lo..hi, `default` if v is nil.
function _M.check_pow2(v, path, default, lo, hi)
    if v == nil then return default end
    local ok = type(v) == "number" and v >= lo and v <= hi and v == floor(v)
    if ok then
        local x = v
        while x > 1 and x % 2 == 0 do x = x / 2 end
        ok = x == 1
    end
    if not ok then
        fail(path, "expected a power of two from %d to %d, got %s", lo, hi, show(v))
    end
    return v
end

return _M
