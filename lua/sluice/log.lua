-- sluice.log: leveled log records through the core's logger.
--   log.info("chunk of %d bytes", n)   -- string.format arguments
--
-- One call, one line: control characters in the message (a newline, a
-- carriage return, a tab, NUL...) become spaces, as in a close reason, so
-- that bytes a stage logs cannot start a line that reads as another record.
local C = require("sluice.core")

local format, find, gsub = string.format, string.find, string.gsub
local select = select
local tostring = tostring

local _M = {}

local CONTROL = "[%z\1-\31\127]"

-- s with its control characters turned into spaces.
local function one_line(s)
  if find(s, CONTROL) then s = gsub(s, CONTROL, " ") end
  return s
end
_M.one_line = one_line

local function emitter(level)
  return function(fmt, ...)
    if C.sl_ffi_log_enabled(level) == 0 then return end
    local msg = select("#", ...) > 0 and format(fmt, ...) or tostring(fmt)
    C.sl_ffi_log(level, one_line(msg))
  end
end

_M.debug = emitter(0)
_M.info = emitter(1)
_M.warn = emitter(2)
_M.error = emitter(3)

-- An error record followed by its traceback (sluice.host's stage errors):
-- msg on one line, then the traceback's own lines, as debug.traceback made
-- them ("stack traceback:" and lines that start with a tab).
function _M.error_traced(msg, traceback)
  if C.sl_ffi_log_enabled(3) == 0 then return end
  C.sl_ffi_log(3, one_line(msg) .. traceback)
end

return _M
