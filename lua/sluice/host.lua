-- sluice.host: the Lua side of a worker's pipelines. The C host calls
-- dispatch() for every event that reaches a Lua stage; between neighbouring
-- Lua stages events go directly, in Lua, without returning to C.
--
-- A stage's callback runs under xpcall: if it raises, the error is logged
-- with its traceback, the buffer the stage was handed is released (when the
-- stage still owned it), and that connection is closed. Never the process.
local ffi = require("ffi")
local bit = require("bit")
local C = require("sluice.core")
local buf = require("sluice.buf")
local log = require("sluice.log")

local bor, band, lshift = bit.bor, bit.band, bit.lshift
local ffi_cast = ffi.cast
local is_buf, wrap, give = buf.is_buf, buf.wrap, buf.give
local wrap_lazy, adopt = buf.wrap_lazy, buf.adopt
local traceback = debug.traceback
local xpcall, type, tostring, tonumber, setmetatable = xpcall, type, tostring, tonumber, setmetatable

-- Event codes: src/pipeline/pipeline.h (sl_event) and src/lua/host.c.
local ACTIVE, INACTIVE, READ, READ_COMPLETE, WRITABILITY, USER_EVENT, ERROR, WRITE, FLUSH, CLOSE =
  0, 1, 2, 3, 4, 5, 6, 7, 8, 9
local ADDED, REMOVED = 100, 101

local CALLBACK = {
  [ACTIVE] = "channel_active", [INACTIVE] = "channel_inactive", [READ] = "channel_read",
  [READ_COMPLETE] = "channel_read_complete", [WRITABILITY] = "channel_writability_changed",
  [USER_EVENT] = "user_event", [ERROR] = "error", [WRITE] = "write", [FLUSH] = "flush",
  [CLOSE] = "close",
}
local USER_EVENT_NAME = { [1] = "input_closed" }
local USER_EVENT_CODE = { input_closed = 1 }

local ctx_ptr_t = ffi.typeof("sl_ctx *")
local buf_ptr_t = ffi.typeof("sl_buf *")
local errp = ffi.new("const char *[1]")

local _M = {}
local stages = {}   -- key -> { name, mod, options }
local ctxs = {}     -- Lua id -> ctx
_M.contexts = ctxs

local Ctx = {}
Ctx.__index = Ctx

local invoke

local function stage_failed(ctx, ev, arg, err)
  log.error("stage %s raised in %s on %s: %s", ctx.name, CALLBACK[ev],
            ctx.cptr and ffi.string(C.sl_ffi_ctx_describe(ctx.cptr)) or "a closed channel",
            tostring(err))
  -- The pipeline releases what the stage was handed and still owned.
  if is_buf(arg) and arg.refs > 0 and arg.b.gen == arg.gen then
    arg:release(arg.refs)
  end
  if ctx.cptr then
    local first = tostring(err):match("^[^\n]*")
    C.sl_ffi_ctx_fire_text(ctx.cptr, CLOSE, "stage " .. ctx.name .. " failed: " .. first)
  end
end

local RECORDED = 2 -- SL_BUF_RECORDED
local touching = false -- leak_detection advanced or paranoid: record each hop

-- Records a hop into a Lua stage on a buffer leak tracking follows (hops
-- from C are recorded by the C pipeline; this covers Lua to Lua).
local function touch(ctx, arg)
  if is_buf(arg) and arg.b.gen == arg.gen and band(arg.b.root.flags, RECORDED) ~= 0 then
    C.sl_ffi_buf_touch(arg.b, ctx.name)
  end
end

-- Events from a Lua stage to the next Lua stage are queued and delivered
-- when the callback that sent them has returned, in order, by a tail call:
-- the Lua stack does not grow with the number of stages, and no trace has
-- to return into a stage's frame (which LuaJIT cannot compile).
local hop_ctx, hop_ev, hop_arg = {}, {}, {}
local hop_head, hop_tail = 1, 0

local lend, lend_back = buf.lend, buf.lend_back

local function hop(ctx, ev, arg)
  local t = hop_tail + 1
  hop_tail = t
  if is_buf(arg) then lend(arg) end
  hop_ctx[t], hop_ev[t], hop_arg[t] = ctx, ev, arg
end

function invoke(ctx, ev, arg)
  buf.stage = ctx.cptr  -- releases in this callback name this stage
  local ok, err = xpcall(ctx.stage.mod[CALLBACK[ev]], traceback, ctx, arg)
  if not ok then stage_failed(ctx, ev, arg, err) end
  buf.stage = nil
  local i = hop_head
  if i <= hop_tail then
    local nctx, nev, narg = hop_ctx[i], hop_ev[i], hop_arg[i]
    hop_ctx[i], hop_arg[i] = nil, nil
    if i == hop_tail then hop_head, hop_tail = 1, 0 else hop_head = i + 1 end
    if is_buf(narg) then lend_back(narg) end
    return invoke(nctx, nev, narg)
  end
end

-- A buffer for C: handles give a reference away, strings are copied in.
-- Where a buffer made by a stage came from, for leak reports (recorded
-- buffers only: 1 in sample_rate, or all at paranoid).
local function note_site(b, ctx, what)
  if band(b.flags, RECORDED) ~= 0 then
    C.sl_ffi_buf_set_site(b, traceback(what .. " in stage " .. ctx.name, 3))
  end
end

local function to_c(ctx, msg, what)
  if is_buf(msg) then return give(msg) end
  if type(msg) == "string" then
    local b = C.sl_ffi_ctx_from(ctx.cptr, msg, #msg)
    if b == nil then error("out of buffer memory", 3) end
    note_site(b, ctx, "ctx:" .. what .. "(string)")
    return b
  end
  error(("bad argument to %s (buffer or string expected, got %s)"):format(what, type(msg)), 3)
end

-- Drops msg when the channel is gone.
local function drop(msg)
  if is_buf(msg) and msg.refs > 0 and msg.b.gen == msg.gen then msg:release(msg.refs) end
  return nil, "closed"
end

-- The next handler of ev when it is a Lua stage (nil when it is C). A
-- pipeline does not change while its connection lives, so each context
-- remembers the answer per event (false: C).
local function next_lua(ctx, ev)
  local nx = ctx.next
  local n = nx[ev]
  if n == nil then
    local id = C.sl_ffi_ctx_next(ctx.cptr, ev)
    n = id ~= 0 and ctxs[id] or false
    nx[ev] = n
  end
  return n or nil
end

function Ctx:fire_read(msg)
  if not self.cptr then return drop(msg) end
  local n = next_lua(self, READ)
  if n then
    if touching then touch(n, msg) end
    return hop(n, READ, msg)
  end
  C.sl_ffi_ctx_fire_read(self.cptr, to_c(self, msg, "fire_read"))
end

function Ctx:write(msg)
  if not self.cptr then return drop(msg) end
  local n = next_lua(self, WRITE)
  if n then
    if touching then touch(n, msg) end
    return hop(n, WRITE, msg)
  end
  C.sl_ffi_ctx_write(self.cptr, to_c(self, msg, "write"))
end

local function fire_simple(ev)
  return function(self)
    if not self.cptr then return end
    local n = next_lua(self, ev)
    if n then return hop(n, ev) end
    C.sl_ffi_ctx_fire(self.cptr, ev, 0)
  end
end

Ctx.flush = fire_simple(FLUSH)
Ctx.fire_read_complete = fire_simple(READ_COMPLETE)
Ctx.fire_active = fire_simple(ACTIVE)
Ctx.fire_inactive = fire_simple(INACTIVE)

function Ctx:write_and_flush(msg)
  self:write(msg)
  self:flush()
end

function Ctx:fire_writability_changed(writable)
  if not self.cptr then return end
  local n = next_lua(self, WRITABILITY)
  if n then return hop(n, WRITABILITY, writable and true or false) end
  C.sl_ffi_ctx_fire(self.cptr, WRITABILITY, writable and 1 or 0)
end

function Ctx:fire_user_event(event)
  if not self.cptr then return end
  local n = next_lua(self, USER_EVENT)
  if n then return hop(n, USER_EVENT, event) end
  local code = USER_EVENT_CODE[event]
  if code then C.sl_ffi_ctx_fire(self.cptr, USER_EVENT, code) end
end

function Ctx:fire_error(err)
  if not self.cptr then return end
  local n = next_lua(self, ERROR)
  if n then return hop(n, ERROR, err) end
  C.sl_ffi_ctx_fire_text(self.cptr, ERROR, tostring(err))
end

function Ctx:close(reason)
  if not self.cptr then return end
  reason = reason and tostring(reason) or ("closed by stage " .. self.name)
  local n = next_lua(self, CLOSE)
  if n then return hop(n, CLOSE, reason) end
  C.sl_ffi_ctx_fire_text(self.cptr, CLOSE, reason)
end

function Ctx:alloc(cap, max_cap)
  buf.check_caps(cap, max_cap)
  if not self.cptr then return nil, "closed" end
  local b = C.sl_ffi_ctx_alloc(self.cptr, cap, max_cap or cap)
  if b == nil then return nil, "out of buffer memory" end
  note_site(b, self, "ctx:alloc")
  return wrap(b)
end

function Ctx:is_writable()
  return self.cptr ~= nil and C.sl_ffi_ctx_is_writable(self.cptr) ~= 0
end

function Ctx:set_autoread(on)
  if self.cptr then C.sl_ffi_ctx_set_autoread(self.cptr, on and 1 or 0) end
end

-- Buffers and bytes this connection answers for now (leak tracking).
function Ctx:outstanding()
  if not self.cptr then return 0, 0 end
  local c, n = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
  C.sl_ffi_buf_outstanding(self.cptr, c, n)
  return tonumber(c[0]), tonumber(n[0])
end

-- Connects this connection to an upstream (a name from the config) or to
-- "host:port", as OpenResty's balancer_by_lua chooses a peer: call it in
-- channel_active before ctx:fire_active(). true while connecting, or nil, err.
function Ctx:connect(target)
  if type(target) ~= "string" then
    error(("bad argument to connect (string expected, got %s)"):format(type(target)), 2)
  end
  if not self.cptr then return nil, "closed" end
  if C.sl_ffi_ctx_connect(self.cptr, target, errp) ~= 0 then return nil, ffi.string(errp[0]) end
  return true
end

function Ctx:describe()
  if not self.cptr then return "closed channel" end
  return ffi.string(C.sl_ffi_ctx_describe(self.cptr))
end

function _M.init(worker_id)
  _M.worker_id = worker_id
  touching = C.sl_ffi_leak_level() >= 2
  buf.where = touching  -- releases record file:line from "advanced" up
end

-- Loads a stage module for this worker. Returns its key and the mask of the
-- events it handles.
function _M.load_stage(name, file, options)
  local mod = require(name)
  if type(mod) ~= "table" then
    error(("module %q from %s did not return a table of callbacks"):format(name, file))
  end
  local mask = 0
  for ev, cb in pairs(CALLBACK) do
    if type(mod[cb]) == "function" then mask = bor(mask, lshift(1, ev)) end
  end
  stages[#stages + 1] = { name = name, mod = mod, options = options or {} }
  return #stages, mask
end

function _M.dispatch(ev, id, ptr, n, str)
  if ev == ADDED then
    local stage = stages[n]
    ctxs[id] = setmetatable({
      cptr = ffi_cast(ctx_ptr_t, ptr), id = id, stage = stage, name = stage.name,
      options = stage.options, state = {}, next = {},
    }, Ctx)
    return
  end
  local ctx = ctxs[id]
  if ev == REMOVED then
    if ctx then
      ctxs[id] = nil
      ctx.cptr = nil
    end
    return
  end
  if ctx == nil then
    -- Delivered after the stage left: nobody can own the buffer but us.
    if ptr and (ev == READ or ev == WRITE) then
      C.sl_ffi_buf_release(ffi_cast(buf_ptr_t, ptr), 1, errp)
    end
    return
  end
  local arg
  if ev == READ or ev == WRITE then
    arg = wrap_lazy(ptr)
  elseif ev == WRITABILITY then
    arg = (n or 0) ~= 0 -- n is left out when 0
  elseif ev == USER_EVENT then
    arg = USER_EVENT_NAME[n] or n
  elseif ev == ERROR or ev == CLOSE then
    arg = str
  end
  invoke(ctx, ev, arg)
  -- Still owned by a script once every callback is done (kept in a table,
  -- say): from now on the garbage collector may find it, so it needs its
  -- finalizer.
  if arg ~= nil and is_buf(arg) then adopt(arg) end
end

return _M
