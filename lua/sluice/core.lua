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

-- Outside the binary: $SLUICE_CORE_LIB, else the library scripts/run and
-- scripts/test build (build/libsluice_core.so under the current folder or
-- $SLUICE_ROOT), so that `busted` works from the top folder after a build.
local path = os.getenv("SLUICE_CORE_LIB")
if not path or path == "" then
  local root = os.getenv("SLUICE_ROOT") or "."
  local candidate = root .. "/build/libsluice_core.so"
  local f = io.open(candidate, "rb")
  if f then
    f:close()
    path = candidate
  else
    error("sluice.core: not inside the sluice binary, SLUICE_CORE_LIB is not set and "
          .. candidate .. " does not exist (build with scripts/run or scripts/test)", 2)
  end
end
return ffi.load(path)
