-- sluice.testing: an in-memory channel for busted (Netty's EmbeddedChannel).
--
--   local testing = require("sluice.testing")
--   local ch = testing.channel{ my_stage, "sluice.stages.echo", { "my.module", opt = 1 } }
--   ch:write_inbound("PING\r\n")
--   assert.outbound(ch, "+PONG\r\n")
--   assert.is_false(ch:finish())      -- raises with the leak report on a leak
--
-- It runs the real pipeline (C and Lua stages, the real outbound queue with
-- its water marks) on a channel without a socket. Messages that reach the
-- end of the pipeline wait for read_inbound(); bytes flushed towards the
-- socket wait for read_outbound(). Whoever reads a buffer owns it.
local ffi = require("ffi")
local C = require("sluice.core")
local buf = require("sluice.buf")
local host = require("sluice.host")
local options = require("sluice.options")

local is_buf, wrap = buf.is_buf, buf.wrap
local ffi_string = ffi.string
local type, tostring, error, setmetatable = type, tostring, error, setmetatable

local READ, READ_COMPLETE, USER_EVENT, ERROR, WRITE, FLUSH, CLOSE = 2, 3, 5, 6, 7, 8, 9
local USER_EVENT_CODE = { input_closed = 1 }

local _M = {}

local errp = ffi.new("const char *[1]")
local ctx_out = ffi.new("sl_ctx *[1]")
local u64a, u64b = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")

-- The virtual clock every in-memory channel shares (ms).
local now = 0
local host_ptr = nil

local function ensure_host()
  local h = C.sl_ffi_embedded_host()
  if h == nil then error("sluice.testing: cannot create the in-memory worker", 3) end
  if host_ptr ~= h then
    host.reset()
    host.init(0, h)
    host.clock = function() return now end
    host_ptr = h
  end
end

local harness_of = setmetatable({}, { __mode = "k" }) -- capture ctx -> channel

-- The stage at the end of every in-memory pipeline: it keeps what reaches it.
local capture = {
  channel_read = function(ctx, msg)
    local ch = harness_of[ctx]
    -- (after the reads so far: read_inbound leaves the front of the list empty)
    ch.nend = ch.nend + 1
    ch.inbound[ch.nend] = msg
  end,
  user_event = function(ctx, ev)
    local ch = harness_of[ctx]
    ch.events[#ch.events + 1] = ev
  end,
  error = function(ctx, err)
    local ch = harness_of[ctx]
    ch.errors[#ch.errors + 1] = err
  end,
}

local Channel = {}
Channel.__index = Channel

local function add_stage(self, spec, i)
  local key, name, opts = host.resolve(spec)
  if key then
    local id = C.sl_ffi_embedded_add_lua(self.ch, key, name, ctx_out)
    if id == 0 then error("out of memory adding stage " .. tostring(name), 3) end
    local ctx = host.new_ctx(id, ctx_out[0], key)
    ctx.name = name
    host.added(ctx) -- as a worker does for its stages: an error closes the channel
    return ctx
  end
  -- A C stage: its options parsed as the config reader does; the channel
  -- keeps the configuration for as long as it lives.
  local conf, err = options.configure(name, opts or {})
  if err then error(("stage %d (%s): %s"):format(i, tostring(name), err), 3) end
  self.confs[#self.confs + 1] = conf
  local c = C.sl_ffi_embedded_add_c(self.ch, name, conf, errp)
  if c == nil then
    error(("stage %d (%s): %s"):format(i, tostring(name), ffi_string(errp[0])), 3)
  end
end

-- A new in-memory channel with the given stages, active at once.
-- opts: low_water_mark, high_water_mark (32768 and 65536 otherwise, Netty's
-- defaults: small enough that a stage test sees writability change).
function _M.channel(stages, opts)
  if type(stages) ~= "table" then
    error(("bad 'stages' argument (table expected, got %s)"):format(type(stages)), 2)
  end
  opts = opts or {}
  ensure_host()
  local ch = C.sl_ffi_embedded_open("test", opts.low_water_mark or 32768,
                                    opts.high_water_mark or 65536)
  if ch == nil then error("out of memory creating a channel", 2) end
  local self = setmetatable({ ch = ch, inbound = {}, events = {}, errors = {}, nin = 1, nend = 0,
                              confs = {} }, Channel)
  -- A stage may close the channel from added (or fail there): as in a
  -- worker, the stages after it are not added and the channel never
  -- becomes active.
  local function open() host.drain() return C.sl_ffi_embedded_is_open(ch) ~= 0 end
  for i = 1, #stages do
    if not open() then break end
    add_stage(self, stages[i], i)
  end
  if open() then
    local cap = add_stage(self, capture, #stages + 1)
    harness_of[cap] = self
    self.capture = cap
  end
  if open() then C.sl_ffi_embedded_activate(ch) end
  host.drain()
  return self
end

local function to_buf(v, what)
  if is_buf(v) then return buf.give(v) end
  if type(v) == "string" then
    local b = C.sl_ffi_pool_from(v, #v)
    if b == nil then error("out of buffer memory", 3) end
    return b
  end
  error(("bad argument to %s (buffer or string expected, got %s)"):format(what, type(v)), 3)
end

-- Delivers everything queued and the timers that are due.
function Channel:run_pending()
  host.drain()
  host.run_timers(now)
  host.drain()
end

-- Each argument is read from the channel (one read each), then
-- read_complete. Returns true when something reached the end.
function Channel:write_inbound(...)
  local before = self.nend
  for i = 1, select("#", ...) do
    local b = to_buf((select(i, ...)), "write_inbound")
    C.sl_ffi_embedded_fire(self.ch, READ, b, 0, nil)
    host.drain()
  end
  C.sl_ffi_embedded_fire(self.ch, READ_COMPLETE, nil, 0, nil)
  self:run_pending()
  return self.nend > before
end

-- Writes each argument from the end of the pipeline, then flushes; what
-- reached the socket side waits for read_outbound().
function Channel:write_outbound(...)
  for i = 1, select("#", ...) do
    local b = to_buf((select(i, ...)), "write_outbound")
    C.sl_ffi_embedded_fire(self.ch, WRITE, b, 0, nil)
    host.drain()
  end
  C.sl_ffi_embedded_fire(self.ch, FLUSH, nil, 0, nil)
  self:run_pending()
end

-- The next message that reached the end of the pipeline (the caller owns a
-- buffer), or nil.
function Channel:read_inbound()
  local i = self.nin
  local m = self.inbound[i]
  if m == nil then return nil end
  self.inbound[i] = nil
  self.nin = i + 1
  return m
end

-- The next buffer flushed towards the socket (the caller owns it), or nil.
function Channel:read_outbound()
  local b = C.sl_ffi_embedded_take(self.ch)
  if b == nil then return nil end
  host.drain() -- the queue may have fallen below its low water mark
  return wrap(b)
end

-- Every byte flushed towards the socket so far, as a string (the buffers
-- are read and released).
function Channel:outbound_string()
  local parts = {}
  while true do
    local b = self:read_outbound()
    if b == nil then break end
    parts[#parts + 1] = b:tostring()
    b:release()
  end
  return table.concat(parts)
end

function Channel:fire_user_event(ev)
  C.sl_ffi_embedded_fire(self.ch, USER_EVENT, nil, USER_EVENT_CODE[ev] or 0, nil)
  self:run_pending()
end

function Channel:fire_error(err)
  C.sl_ffi_embedded_fire(self.ch, ERROR, nil, 0, tostring(err))
  self:run_pending()
end

function Channel:set_writable(on)
  C.sl_ffi_embedded_set_writable(self.ch, on and 1 or 0)
  self:run_pending()
end

-- Moves the virtual clock and runs the timers that fall due.
function Channel:advance_time(ms)
  now = now + ms
  self:run_pending()
end

function Channel:is_open() return self.ch ~= nil and C.sl_ffi_embedded_is_open(self.ch) ~= 0 end

function Channel:close_reason()
  if self.ch == nil then return self.reason end
  if C.sl_ffi_embedded_is_open(self.ch) ~= 0 then return nil end
  return ffi_string(C.sl_ffi_embedded_reason(self.ch))
end

function Channel:close(reason)
  if self:is_open() then
    C.sl_ffi_embedded_fire(self.ch, CLOSE, nil, 0, reason or "closed by the test")
    self:run_pending()
  end
end

-- Buffers the channel answers for now, and their bytes.
function Channel:outstanding()
  if self.ch == nil then return 0, 0 end
  C.sl_ffi_embedded_owned(self.ch, u64a, u64b)
  return tonumber(u64a[0]), tonumber(u64b[0])
end

-- Closes the channel and checks it: raises an error carrying the leak
-- report when a buffer created through it is still outstanding; otherwise
-- returns whether inbound or outbound messages were left unread (they are
-- released).
function Channel:finish()
  if self.ch == nil then error("finish() called twice", 2) end
  if self:is_open() then
    C.sl_ffi_embedded_close(self.ch, "finish")
    self:run_pending()
  end
  self.reason = ffi_string(C.sl_ffi_embedded_reason(self.ch))
  local unread = false
  while true do
    local m = self:read_inbound()
    if m == nil then break end
    unread = true
    if is_buf(m) and m.b.gen == m.gen and m.refs > 0 then m:release(m.refs) end
  end
  while true do
    local b = self:read_outbound()
    if b == nil then break end
    unread = true
    b:release()
  end
  local count, bytes = self:outstanding()
  local report = ffi.new("char[?]", 16384)
  local n = C.sl_ffi_embedded_release(self.ch, report, 16384)
  self.ch = nil
  if count > 0 then
    error(("%d buffer%s (%d bytes) still outstanding when the channel finished:\n%s")
          :format(count, count == 1 and "" or "s", bytes, ffi_string(report, n)), 2)
  end
  return unread
end

-- Buffers outstanding in the whole pool (the harness baseline is 0).
function _M.outstanding()
  return buf.outstanding()
end

-- luassert assertions: assert.no_leaks(), assert.outbound(ch, "bytes").
local ok_say, say = pcall(require, "say")
local ok_la, luassert = pcall(require, "luassert")
if ok_say and ok_la then
  say:set("assertion.no_leaks.positive", "Expected no outstanding buffers, found %s")
  say:set("assertion.no_leaks.negative", "Expected outstanding buffers, found none")
  luassert:register("assertion", "no_leaks", function(state, args)
    local n = buf.outstanding()
    args[1] = n
    args.n = 1
    return n == 0
  end, "assertion.no_leaks.positive", "assertion.no_leaks.negative")

  say:set("assertion.outbound.positive", "Expected the channel to have flushed:\n%s\nIt flushed:\n%s")
  say:set("assertion.outbound.negative", "Expected the channel not to have flushed:\n%s")
  luassert:register("assertion", "outbound", function(state, args)
    local ch, want = args[1], args[2]
    local got = ch:outbound_string()
    args[1], args[2] = want, got
    args.n = 2
    return got == want
  end, "assertion.outbound.positive", "assertion.outbound.negative")
end

return _M
