-- sluice.config.logging: where sluice logs, and how much.
--
--   log_level   optional "debug", "info", "warn" or "error", default "info"
--   error_log   optional "stderr" or a file path, default "stderr"
--   access_log  optional "off", "stderr" or a file path, default "off"
--   access_log_format  optional "logfmt" or "json", default "logfmt"
--
-- Normalized: the same strings, defaults filled in.

local _M = {}

local type = type
local concat = table.concat

local check = require("sluice.config.check")
local fail, show = check.fail, check.show

require("sluice.config.sandbox").exempt()

local DEFAULT_LOG_LEVEL = "info"
local LOG_LEVELS = { "debug", "info", "warn", "error" }
local LOG_LEVEL_SET = check.set_of(LOG_LEVELS)

function _M.check_level(v)
    if v == nil then return DEFAULT_LOG_LEVEL end
    if not LOG_LEVEL_SET[v] then
        fail("log_level", 'expected one of "%s", got %s',
             concat(LOG_LEVELS, '", "'), show(v))
    end
    return v
end

local ACCESS_FORMATS = { "logfmt", "json" }
local ACCESS_FORMAT_SET = check.set_of(ACCESS_FORMATS)

function _M.check_access_format(v)
    if v == nil then return "logfmt" end
    if not ACCESS_FORMAT_SET[v] then
        fail("access_log_format", 'expected one of "%s", got %s',
             concat(ACCESS_FORMATS, '", "'), show(v))
    end
    return v
end

-- A log destination: "stderr", "off" (when allowed) or a file path, which
-- is opened for appending when sluice starts (not here).
function _M.check_target(v, path, may_be_off)
    local default = may_be_off and "off" or "stderr"
    if v == nil then return default end
    if type(v) ~= "string" or v == "" or v:find("[%z\n]")
       or (v == "off" and not may_be_off) then
        fail(path, 'expected %s or a file path, got %s',
             may_be_off and '"stderr", "off"' or '"stderr"', show(v))
    end
    return v
end

return _M
