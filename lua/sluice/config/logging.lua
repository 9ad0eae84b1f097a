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

local check = require("sluice.config.check")
local fail, show = check.fail, check.show

require("sluice.config.sandbox").exempt()

local LOG_LEVELS = { "debug", "info", "warn", "error" }
local ACCESS_FORMATS = { "logfmt", "json" }

function _M.check_level(v)
    return check.check_one_of(v, "log_level", LOG_LEVELS, "info")
end

function _M.check_access_format(v)
    return check.check_one_of(v, "access_log_format", ACCESS_FORMATS, "logfmt")
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
