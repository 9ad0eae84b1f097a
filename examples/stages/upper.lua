-- examples.stages.upper: upper-cases the ASCII letters of every chunk a client
-- sends and passes the result on.
--
-- It consumes each buffer: the bytes are copied into a Lua string, the buffer
-- is released at once, and the transformed string goes on. A string handed
-- to ctx:fire_read is copied into a new buffer when the next stage is written
-- in C (the next Lua stage would get the string itself).
local upper = string.upper

return {
  channel_read = function(ctx, buf)
    local s = buf:tostring()
    buf:release()
    ctx:fire_read(upper(s))
  end,
}
