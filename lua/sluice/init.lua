-- sluice: the library a stage requires.
--   local sluice = require("sluice")
--   sluice.log.info(...), sluice.buf.alloc(n), sluice.buf.from(s), sluice.pool.stats()
--   sluice.simple_inbound(fn), sluice.codec.decoder(fn)
local buf = require("sluice.buf")
local is_buf = buf.is_buf

local _M = {
  log = require("sluice.log"),
  buf = buf,
  pool = require("sluice.pool"),
}

-- A stage that hands each inbound message to fn(ctx, msg) and releases a
-- buffer once fn returns, unless fn passed it on or retained it (Netty's
-- SimpleChannelInboundHandler).
function _M.simple_inbound(fn)
  if type(fn) ~= "function" then
    error(("bad 'fn' argument (function expected, got %s)"):format(type(fn)), 2)
  end
  return {
    channel_read = function(ctx, msg)
      fn(ctx, msg)
      -- Still this stage's (not passed on to a Lua stage that owns it now).
      if is_buf(msg) and msg.refs > 0 and msg.b.gen == msg.gen and
         (msg.owner == 0 or msg.owner == ctx.sid) then
        msg:release()
      end
    end,
  }
end

setmetatable(_M, { __index = function(t, k)
  if k == "codec" then
    local codec = require("sluice.codec")
    rawset(t, k, codec)
    return codec
  end
end })

return _M
