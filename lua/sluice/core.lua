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

-- Outside the binary: $SLUICE_CORE_LIB; else the library scripts/run and
-- scripts/test build (build/libsluice_core.so under the current folder or
-- $SLUICE_ROOT), so that `busted` works from the top folder after a build;
-- else, for an installed tree (this file in PREFIX/share/sluice/lua), the
-- one in PREFIX/lib, or the system's library path.
local path = os.getenv("SLUICE_CORE_LIB")
if path and path ~= "" then return ffi.load(path) end
local tried = {}
local function exists(file)
  tried[#tried + 1] = file
  local f = io.open(file, "rb")
  if f then f:close() end
  return f ~= nil
end
local candidate = (os.getenv("SLUICE_ROOT") or ".") .. "/build/libsluice_core.so"
if exists(candidate) then return ffi.load(candidate) end
local prefix = debug.getinfo(1, "S").source:match("^@(.+)/share/sluice/lua/sluice/core%.lua$")
if prefix then
  candidate = prefix .. "/lib/libsluice_core.so"
  if exists(candidate) then return ffi.load(candidate) end
  local ok, lib = pcall(ffi.load, "sluice_core")
  if ok then return lib end
  tried[#tried + 1] = "libsluice_core.so on the system's library path"
end
error("sluice.core: not inside the sluice binary, SLUICE_CORE_LIB is not set and no core "
      .. "library was found (tried " .. table.concat(tried, ", ")
      .. "); build with scripts/run or scripts/test", 2)
