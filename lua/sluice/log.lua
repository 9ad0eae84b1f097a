-- sluice.log: leveled log records through the core's logger.
--   log.info("chunk of %d bytes", n)   -- string.format arguments
local C = require("sluice.core")

local format = string.format
local select = select
local tostring = tostring

local _M = {}

local function emitter(level)
  return function(fmt, ...)
    if C.sl_ffi_log_enabled(level) == 0 then return end
    local msg = select("#", ...) > 0 and format(fmt, ...) or tostring(fmt)
    C.sl_ffi_log(level, msg)
  end
end

_M.debug = emitter(0)
_M.info = emitter(1)
_M.warn = emitter(2)
_M.error = emitter(3)

return _M
