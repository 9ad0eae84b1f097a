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
-- slices of the bytes the client sent: nothing is copied. The upstream
-- answers in frames too, but its bytes come as its sends and the network
-- cut them: they go on to the client only as whole frames (a frame cut
-- short waits here for its rest), so that an ECHO answer written meanwhile
-- lands between two of the upstream's frames, never inside one. An ECHO
-- answer may still overtake the answer to an earlier FORWARD.
local buf = require("sluice.buf")
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

-- The length of the whole frames at the start of b's readable bytes (a
-- frame longer than max: -1).
local function whole_frames(b, max)
  local ri, size, k = b:reader_index(), #b, 0
  while size - k >= 4 do
    local n = b:get_u32be(ri + k)
    if n > max then return -1 end
    if size - k < 4 + n then break end
    k = k + 4 + n
  end
  return k
end

-- Outbound (the upstream's answers on their way to the client): only whole
-- frames go on; the bytes of a frame cut short wait in ctx.state.tail,
-- with the next answer's bytes added behind them. A write with a promise
-- (from a stage after this one) goes on as it is.
function stage.write(ctx, msg, promise)
  if promise ~= nil or not buf.is_buf(msg) then return ctx:write(msg, promise) end
  local st = ctx.state
  local tail = st.tail
  if tail ~= nil then
    st.tail = nil
    local joined, err = ctx:alloc(#tail + #msg)
    if joined == nil then
      tail:release()
      msg:release()
      return ctx:close(err)
    end
    joined:write_bytes(tail)
    joined:write_bytes(msg)
    tail:release()
    msg:release()
    msg = joined
  end
  local max = ctx.options.max_frame_length or 65536
  local k = whole_frames(msg, max)
  if k < 0 then
    log.warn("%s: the upstream sent a frame longer than %d bytes", ctx:describe(), max)
    msg:release()
    return ctx:close("frame_too_large")
  end
  if k == #msg then return ctx:write(msg) end
  if k > 0 then ctx:write(msg:read_slice(k):retain()) end
  st.tail = msg   -- its reader index is past the frames written
end

-- The connection is done: a frame the upstream never finished is dropped.
local decoder_removed = stage.removed
function stage.removed(ctx)
  local tail = ctx.state.tail
  ctx.state.tail = nil
  if tail ~= nil then tail:release() end
  decoder_removed(ctx)
end

-- At `sluice --check` and start-up: a misspelt or mistyped option stops the
-- config.
function stage.check_options(options)
  return codec.check_options(options, { max_frame_length = codec.positive_integer })
end

return stage
