-- sluice.core: the namespace the FFI shims live in. Inside the sluice binary
-- they are exported by the executable itself (ffi.C); elsewhere (busted
-- specs that exercise the core in-process) the shared library is loaded from
-- $SLUICE_CORE_LIB.
local ffi = require("ffi")
require("sluice.cdef")

local ok = pcall(function() return ffi.C.sl_ffi_abi end)
if ok then
  return ffi.C
end

local path = os.getenv("SLUICE_CORE_LIB")
if not path or path == "" then
  error("sluice.core: not inside the sluice binary and SLUICE_CORE_LIB is not set", 2)
end
return ffi.load(path)
