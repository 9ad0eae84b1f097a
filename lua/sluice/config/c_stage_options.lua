-- sluice.config.c_stage_options: the options of the built-in C stages.
--
-- The C stages parse them again at load (src/pipeline/codec/*.c) and word
-- their errors the same way; checking them here too makes `--check` and a
-- reload refuse them before anything starts. Keys, in check order, with
-- their defaults:
--
--   sluice.codec.length_field  max_frame_length (required), length_field_offset
--       (0), length_field_length (1, 2, 3, 4 or 8; 4), byte_order ("big" or
--       "little"; "big"), length_adjustment (0), initial_bytes_to_strip (0),
--       fail_fast (true)
--   sluice.codec.line          max_length (required), strip_delimiter (true),
--       fail_fast (false)
--   sluice.codec.delimiter     delimiters (required: non-empty strings),
--       max_frame_length (required), strip_delimiter (true), fail_fast (true)
--   sluice.codec.fixed_length  frame_length (required)
--   sluice.codec.length_field_prepender  length_field_length, byte_order,
--       length_adjustment (as length_field)
--   sluice.proxy_protocol      none
--
-- A C stage not listed here takes any options.

local _M = {}

local type = type
local pairs = pairs
local ipairs = ipairs
local floor = math.floor

local check = require("sluice.config.check")
local fail, show, quote, key_path = check.fail, check.show, check.quote, check.key_path
local sorted_keys, check_keys = check.sorted_keys, check.check_keys
local MAX_INT = check.MAX_INT

require("sluice.config.sandbox").exempt()

-- Checks of one option value: (value, path), raising when it is bad.
local function opt_int(lo, hi, what, required)
    return function(v, path)
        if v == nil and not required then return end
        if type(v) ~= "number" or v ~= v or v < lo or v > hi or v ~= floor(v) then
            fail(path, "expected %s, got %s", what, show(v))
        end
    end
end

local function opt_bool(v, path)
    if v ~= nil and type(v) ~= "boolean" then
        fail(path, "expected true or false, got %s", show(v))
    end
end

local function opt_byte_order(v, path)
    if v ~= nil and v ~= "big" and v ~= "little" then
        fail(path, 'expected "big" or "little", got %s', show(v))
    end
end

local function opt_field_length(v, path)
    if v ~= nil and v ~= 1 and v ~= 2 and v ~= 3 and v ~= 4 and v ~= 8 then
        fail(path, "expected 1, 2, 3, 4 or 8, got %s", show(v))
    end
end

local function opt_delimiters(v, path)
    local ok = type(v) == "table" and #v > 0
    if ok then
        local n = 0
        for _, d in pairs(v) do
            n = n + 1
            ok = ok and type(d) == "string" and #d > 0
        end
        ok = ok and n == #v
    end
    if not ok then
        fail(path, "expected a non-empty list of non-empty strings, got %s", show(v))
    end
end

local POSITIVE = opt_int(1, MAX_INT, "a positive integer", true)
local COUNT = opt_int(0, MAX_INT, "an integer from 0 to 2147483647")
local ADJUSTMENT = opt_int(-MAX_INT - 1, MAX_INT, "an integer from -2147483648 to 2147483647")

-- For each stage, its keys in check order and a check per key; `after`
-- checks what depends on several keys.
local C_STAGE_OPTIONS = {
    ["sluice.codec.length_field"] = {
        { "max_frame_length", POSITIVE }, { "length_field_offset", COUNT },
        { "length_field_length", opt_field_length }, { "byte_order", opt_byte_order },
        { "length_adjustment", ADJUSTMENT }, { "initial_bytes_to_strip", COUNT },
        { "fail_fast", opt_bool },
        after = function(o, path)
            local max, len = o.max_frame_length, o.length_field_length or 4
            if (o.length_field_offset or 0) > max - len then
                fail(path .. ".length_field_offset",
                     "expected at most max_frame_length - length_field_length (%d), got %d",
                     max - len, o.length_field_offset)
            end
        end,
    },
    ["sluice.codec.line"] = {
        { "max_length", POSITIVE }, { "strip_delimiter", opt_bool }, { "fail_fast", opt_bool },
    },
    ["sluice.codec.delimiter"] = {
        { "delimiters", opt_delimiters }, { "max_frame_length", POSITIVE },
        { "strip_delimiter", opt_bool }, { "fail_fast", opt_bool },
    },
    ["sluice.codec.fixed_length"] = {
        { "frame_length", POSITIVE },
    },
    ["sluice.codec.length_field_prepender"] = {
        { "length_field_length", opt_field_length }, { "byte_order", opt_byte_order },
        { "length_adjustment", ADJUSTMENT },
    },
    -- None: an option such as a list of trusted balancers would be a
    -- restriction that is not there (any client may send a header).
    ["sluice.proxy_protocol"] = {},
}

-- Checks the options of C stage `name` (those without a schema take any).
function _M.check(name, options, path)
    local schema = C_STAGE_OPTIONS[name]
    if not schema then return end
    if schema[1] == nil then
        local given = sorted_keys(options, function() return true end)
        if given[1] ~= nil then
            fail(key_path(path, given[1]), "unknown key (%s takes no options)", quote(name))
        end
        return
    end
    local keys = {}
    for i, spec in ipairs(schema) do keys[i] = spec[1] end
    check_keys(options, path, keys)
    for _, spec in ipairs(schema) do
        spec[2](options[spec[1]], key_path(path, spec[1]))
    end
    if schema.after then schema.after(options, path) end
end

return _M
