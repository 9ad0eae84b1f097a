-- bench.lua.field_stage: reads a 4-byte big-endian field at the start of
-- every chunk and passes the chunk on (the typical cheap protocol check).
local sink = 0
return {
  channel_read = function(ctx, buf)
    sink = sink + buf:get_u32be(0)
    ctx:fire_read(buf)
  end,
}
