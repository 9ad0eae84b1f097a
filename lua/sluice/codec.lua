-- sluice.codec: decoders written in Lua (Netty's ByteToMessageDecoder).
--
--   local codec = require("sluice.codec")
--   return codec.decoder(function(ctx, cum, out)
--     if #cum < 4 then return end                  -- wait for more bytes
--     local n = cum:get_u32be(cum:reader_index())
--     if #cum < 4 + n then return end
--     cum:skip(4)
--     out[#out + 1] = cum:read_slice(n):retain()   -- or a string, a table...
--   end, { max_cumulation = 1048576 })
--
-- Incoming buffers are cumulated: the first becomes the cumulation as it is
-- (no copy); later ones are copied onto its end (into a larger pooled
-- buffer when it cannot grow in place, or when slices of it are alive).
-- decode_fn(ctx, cum, out) is called until it stops making progress (it
-- neither reads from cum nor adds to out); every message it appends to out
-- is fired to the next stage, in order, and belongs to that stage. The
-- cumulation belongs to the decoder: decode_fn reads from it and never
-- releases it. Read bytes are discarded every `discard_after` reads (16).
-- When the peer half-closes (input_closed) or the channel goes inactive,
-- what is left is decoded once more with decode_fn(ctx, cum, out, true)
-- (Netty's decodeLast), then released. Without opts, max_cumulation and
-- discard_after come from the stage's options in the config (ctx.options).
-- The decoder keeps its state apart from ctx.state, which stays the stage's.
-- A cumulation longer than max_cumulation (default 1 MiB) closes the
-- connection with reason "frame_too_large" and releases everything.
-- When the stage is removed from a running pipeline, the bytes it still
-- holds are passed on to the next stage.
local buf = require("sluice.buf")

local is_buf = buf.is_buf
local has_views = buf.has_views
local type, error = type, error

local _M = {}

local DEFAULTS = { max_cumulation = 1048576, discard_after = 16 }

local function check_opts(opts)
  local o = { max_cumulation = DEFAULTS.max_cumulation, discard_after = DEFAULTS.discard_after }
  if opts == nil then return o end
  if type(opts) ~= "table" then
    error(("bad 'opts' argument (table expected, got %s)"):format(type(opts)), 3)
  end
  for k, v in pairs(opts) do
    if DEFAULTS[k] == nil then error(("bad option %q (max_cumulation or discard_after)"):format(tostring(k)), 3) end
    if type(v) ~= "number" or v < 1 or v ~= math.floor(v) then
      error(("bad option %s (positive integer expected, got %s)"):format(k, tostring(v)), 3)
    end
    o[k] = v
  end
  return o
end

-- For a stage built on the decoder to define check_options (see the
-- configuration reference): checks options against the decoder's own keys
-- and the stage's, given as key -> function(value) that returns nothing
-- when the value is fine, else what was expected. A missing key is never
-- checked (defaults apply). Returns nothing, or the key at fault and what
-- was expected (nil for a key that is no option, then the options there are).
function _M.check_options(options, own)
  for k, v in pairs(options) do
    local check = own[k]
    if check ~= nil then
      local expected = check(v)
      if expected ~= nil then return k, expected end
    elseif DEFAULTS[k] ~= nil then
      if type(v) ~= "number" or v < 1 or v ~= math.floor(v) then return k, "a positive integer" end
    else
      local keys = {}
      for name in pairs(own) do keys[#keys + 1] = name end
      for name in pairs(DEFAULTS) do keys[#keys + 1] = name end
      table.sort(keys)
      return k, nil, table.concat(keys, ", ")
    end
  end
end

-- A check for codec.check_options: a positive integer.
function _M.positive_integer(v)
  if type(v) ~= "number" or v < 1 or v ~= math.floor(v) then return "a positive integer" end
end

local function release(b)
  if b ~= nil and b.refs > 0 and b.b.gen == b.gen then b:release(b.refs) end
end

-- Appends msg's bytes to the cumulation (msg is released). Returns the
-- cumulation, or nil and an error.
local function cumulate(ctx, cum, msg)
  local n = #msg
  local b = cum.b
  local exclusive = cum:refcnt() == 1 and not has_views(b) and b.root == b
  if exclusive and b.wr + n <= b.max_cap then
    local ok = cum:ensure_writable(n)
    if ok then
      cum:write_bytes(msg)
      msg:release()
      return cum
    end
  end
  local have = #cum
  local size = have + n
  local cap = size < 4096 and 4096 or size
  local bigger, err = ctx:alloc(cap, cap * 2 > 16777216 and cap or cap * 2)
  if not bigger then
    msg:release()
    return nil, err
  end
  bigger:write_bytes(cum)
  bigger:write_bytes(msg)
  cum:release()
  msg:release()
  return bigger
end

function _M.decoder(decode_fn, opts)
  if type(decode_fn) ~= "function" then
    error(("bad 'decode_fn' argument (function expected, got %s)"):format(type(decode_fn)), 2)
  end
  local fixed = opts ~= nil and check_opts(opts) or nil

  -- The decoder's own state per connection, apart from ctx.state (which
  -- belongs to the stage built on it). Without opts, the limits come from
  -- the stage's options in the config (ctx.options), else the defaults.
  local states = setmetatable({}, { __mode = "k" })
  local function state(ctx)
    local st = states[ctx]
    if st == nil then
      local o = fixed
      if o == nil then
        local co = ctx.options or {}
        o = check_opts({ max_cumulation = co.max_cumulation, discard_after = co.discard_after })
      end
      st = { out = {}, reads = 0, max_cum = o.max_cumulation, discard_after = o.discard_after }
      states[ctx] = st
    end
    return st
  end

  -- Runs decode_fn until it makes no progress, firing what it produces.
  -- last: no more bytes will come (Netty's decodeLast).
  local function decode(ctx, st, last)
    local cum = st.cum
    local out = st.out
    if cum ~= nil and cum.b.gen ~= cum.gen then -- released when a decode raised
      st.cum = nil
      return
    end
    while cum ~= nil and ctx.cptr ~= nil do
      local before = #cum
      local nout = #out
      decode_fn(ctx, cum, out, last)
      local produced = #out - nout
      for i = nout + 1, #out do
        local m = out[i]
        out[i] = nil
        ctx:fire_read(m)
      end
      if cum ~= st.cum then return end -- the stage was removed meanwhile
      local left = #cum
      if produced == 0 then
        if left == before then break end
      elseif left == before then
        error("decode_fn produced a message without reading any byte", 2)
      end
      if left == 0 then break end
    end
  end

  local function settle(st)
    local cum = st.cum
    if cum == nil then return end
    if #cum == 0 then
      st.cum = nil
      st.reads = 0
      cum:release()
      return
    end
    st.reads = st.reads + 1
    if st.reads >= st.discard_after and cum:refcnt() == 1 and not has_views(cum.b) then
      cum:discard_read_bytes()
      st.reads = 0
    end
  end

  local stage = {}

  function stage.added(ctx)
    state(ctx)
  end

  function stage.channel_read(ctx, msg)
    if not is_buf(msg) then return ctx:fire_read(msg) end
    local st = state(ctx)
    if st.cum == nil then
      st.cum = msg
    else
      local cum, err = cumulate(ctx, st.cum, msg)
      if cum == nil then
        release(st.cum)
        st.cum = nil
        return ctx:close(err)
      end
      st.cum = cum
    end
    if #st.cum > st.max_cum then
      release(st.cum)
      st.cum = nil
      return ctx:close("frame_too_large")
    end
    decode(ctx, st)
    settle(st)
  end

  function stage.channel_read_complete(ctx)
    ctx:fire_read_complete()
  end

  -- No more bytes will come: decode what is left, then let it go.
  local function finish(ctx, st)
    if st.cum ~= nil then
      decode(ctx, st, true)
      release(st.cum)
      st.cum = nil
    end
  end

  function stage.user_event(ctx, ev)
    if ev == "input_closed" then finish(ctx, state(ctx)) end
    ctx:fire_user_event(ev)
  end

  function stage.channel_inactive(ctx)
    finish(ctx, state(ctx))
    ctx:fire_inactive()
  end

  function stage.removed(ctx)
    local st = state(ctx)
    states[ctx] = nil
    local cum = st.cum
    st.cum = nil
    if cum == nil then return end
    if ctx.cptr ~= nil and #cum > 0 then
      ctx:fire_read(cum) -- the bytes not decoded yet go on to the next stage
    else
      release(cum)
    end
  end

  return stage
end

return _M
