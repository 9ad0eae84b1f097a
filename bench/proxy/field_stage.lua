-- bench.proxy.field_stage: the Lua row of the proxy benchmark. Reads a
-- 4-byte big-endian field at the start of every chunk a client sends (when
-- the chunk holds 4 bytes) and passes the chunk on: the least a protocol
-- check does, so the row measures the cost of entering Lua once per chunk.
local bxor = require("bit").bxor

local seen = 0

return {
  channel_read = function(ctx, buf)
    if #buf >= 4 then
      seen = bxor(seen, buf:get_u32be(buf:reader_index()))
    end
    ctx:fire_read(buf)
  end,
}
