-- sluice.pool: the buffer pool of the running worker.
--
--   local st = sluice.pool.stats()
--   st.bytes_in_use, st.blocks_in_use, st.cache_hits, st.classes[i].active, ...
local ffi = require("ffi")
local C = require("sluice.core")

local tonumber = tonumber

local _M = {}

local stats_t = ffi.typeof("sl_ffi_pool_stats")

local FIELDS = {
  "bytes_in_use", "blocks_in_use", "allocs", "frees", "alloc_failures", "cache_hits",
  "cache_misses", "cached_blocks", "cached_bytes", "trims", "idle_trims", "reserved_bytes",
}

-- Returns a table of the pool's counters (see docs/operations.md), or
-- nil, err outside a worker.
function _M.stats()
  local s = stats_t()
  if C.sl_ffi_pool_stats_get(s) ~= 0 then return nil, "no buffer pool on this thread" end
  local t = { arena = s.arena, type = s.unpooled ~= 0 and "unpooled" or "pooled" }
  t.leaks = { count = tonumber(s.leaks), bytes = tonumber(s.leaked_bytes),
              recorded = tonumber(s.leak_recorded), sample_rate = s.leak_sample,
              level = ({ [0] = "disabled", "simple", "advanced", "paranoid" })[s.leak_level] }
  for _, k in ipairs(FIELDS) do t[k] = tonumber(s[k]) end
  t.headers = { total = tonumber(s.headers_total), free = tonumber(s.headers_free),
                region_resets = tonumber(s.region_resets) }
  t.recycler = { size = tonumber(s.recycler_size), cap = tonumber(s.recycler_cap),
                 overflows = tonumber(s.recycler_overflows) }
  t.return_queue = { cap = tonumber(s.return_queue_cap), queued = tonumber(s.remote_queued),
                     direct = tonumber(s.remote_direct) }
  t.chunks = { live = tonumber(s.chunks), created = tonumber(s.chunks_created),
               released = tonumber(s.chunks_released), bytes = tonumber(s.chunk_bytes),
               used_bytes = tonumber(s.chunk_used_bytes) }
  t.huge = { allocs = tonumber(s.huge_allocs), frees = tonumber(s.huge_frees),
             bytes = tonumber(s.huge_bytes) }
  local classes = {}
  for i = 0, tonumber(s.nclasses) - 1 do
    local a, f = tonumber(s.class_allocs[i]), tonumber(s.class_frees[i])
    classes[i + 1] = { size = tonumber(s.class_size[i]), allocs = a, frees = f,
                       active = a - f, arena_allocs = tonumber(s.arena_allocs[i]),
                       arena_frees = tonumber(s.arena_frees[i]) }
  end
  t.classes = classes
  return t
end

-- Outside a worker (specs, tools): give this thread a pool of its own.
function _M.open()
  if C.sl_ffi_pool_open() ~= 0 then error("cannot create a buffer pool", 2) end
end

-- Closes the pool open() made; returns the number of buffers still
-- outstanding (leaked) at that moment.
function _M.close()
  -- Handles that are garbage already are finalized while the pool exists.
  collectgarbage()
  collectgarbage()
  return tonumber(C.sl_ffi_pool_close())
end

return _M
