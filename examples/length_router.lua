-- examples.length_router: routes length-prefixed frames by a header byte.
--
--   pipeline = { { "examples.length_router", max_frame_length = 65536 } },
--   upstream = "backend",
--
-- A frame is a 4-byte big-endian length N, then N bytes: one header byte
-- and N - 1 bytes of payload.
--
--   +--------+--------+-----------+
--   | N (4B) | header | payload   |   N = 1 + #payload
--   +--------+--------+-----------+
--
-- header 0x01 (ECHO)     the frame is answered here: written back to the
--                        client as it came, and never reaches the upstream;
-- header 0x02 (FORWARD)  the frame goes on to the next stage (with an
--                        upstream, the bridge) as it came;
-- anything else, or N = 0, closes the connection with reason
-- "malformed_frame"; N > max_frame_length (default 65536) with
-- "frame_too_large". Both are logged.
--
-- Frames are cut with sluice.codec.decoder and go either way as retained
-- slices of the bytes the client sent: nothing is copied. The upstream's
-- answers are not frames this stage looks at: they reach the client as they
-- come, so an ECHO answer may overtake the answer to an earlier FORWARD.
local codec = require("sluice.codec")
local log = require("sluice.log")

local ECHO, FORWARD = 0x01, 0x02

-- decode_fn: takes every complete frame from the cumulation `cum` (the
-- decoder's: we read it and never release it).
local function decode(ctx, cum, out)
  local max = ctx.options.max_frame_length or 65536
  local echoed = false
  while #cum >= 4 do
    local ri = cum:reader_index()
    local n = cum:get_u32be(ri)
    local header = #cum >= 5 and cum:get_u8(ri + 4) or nil
    local why
    if n == 0 then
      why = "malformed_frame"
    elseif n > max then
      why = "frame_too_large"
    elseif header == nil then
      break -- the header byte is not here yet
    elseif header ~= ECHO and header ~= FORWARD then
      why = "malformed_frame"
    end
    if why then
      log.warn("%s: %s (length %d, header %s)", ctx:describe(), why, n,
               n > 0 and header and ("0x%02x"):format(header) or "none")
      cum:skip(#cum) -- nothing after a bad frame can be trusted
      if echoed then ctx:flush() end -- the answers before it still go out
      return ctx:close(why)
    end
    if #cum < 4 + n then break end -- the rest of the frame is not here yet
    local frame = cum:read_slice(4 + n):retain() -- a view that owns one reference
    if header == ECHO then
      ctx:write(frame) -- the reference goes to the client's outbound queue
      echoed = true
    else
      out[#out + 1] = frame -- the decoder fires it on; the next stage owns it
    end
  end
  if echoed then ctx:flush() end
end

local stage = codec.decoder(decode)

-- At `sluice --check` and start-up: a misspelt or mistyped option stops the
-- config.
function stage.check_options(options)
  return codec.check_options(options, { max_frame_length = codec.positive_integer })
end

return stage
