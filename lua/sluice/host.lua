-- sluice.host: the Lua side of a worker's pipelines.
--
-- C queues every event meant for a Lua stage (src/lua/host.c); run() pops
-- them through an FFI call and runs the callbacks, so one C-to-Lua
-- transition delivers everything a channel's read loop produced. Between
-- neighbouring Lua stages, events never leave Lua: they are direct calls.
--
-- One protected call guards the whole loop, not each callback: when a
-- callback raises, the caller knows which stage and event was running,
-- logs the error with its traceback, releases the buffer that stage was
-- handed (when it still owned it), closes that connection, and runs the
-- loop again for the next event. Never the process.
local ffi = require("ffi")
local bit = require("bit")
local C = require("sluice.core")
local buf = require("sluice.buf")
local log = require("sluice.log")
local promise = require("sluice.promise")
local is_promise = promise.is_promise
local options = require("sluice.options")

local bor, band, lshift = bit.bor, bit.band, bit.lshift
local ffi_cast, ffi_string = ffi.cast, ffi.string
local is_buf, wrap, give = buf.is_buf, buf.wrap, buf.give
local wrap_lazy, adopt, passable = buf.wrap_lazy, buf.adopt, buf.passable
local traceback = debug.traceback
local xpcall, pcall, type, tostring, setmetatable, pairs = xpcall, pcall, type, tostring, setmetatable, pairs
local getmetatable, rawget, rawset = debug.getmetatable, rawget, rawset
local hand, hands, take = promise.hand, promise.hands, promise.take
local floor = math.floor

-- Event codes: src/pipeline/pipeline.h (sl_event) and src/lua/host.c.
local ACTIVE, INACTIVE, READ, READ_COMPLETE, WRITABILITY, USER_EVENT, ERROR, WRITE, FLUSH, CLOSE,
  READ_REQUEST = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
local ADDED, REMOVED, PROMISE, TIMER = 100, 101, 102, 103

local CALLBACK = {
  [ACTIVE] = "channel_active", [INACTIVE] = "channel_inactive", [READ] = "channel_read",
  [READ_COMPLETE] = "channel_read_complete", [WRITABILITY] = "channel_writability_changed",
  [USER_EVENT] = "user_event", [ERROR] = "error", [WRITE] = "write", [FLUSH] = "flush",
  [CLOSE] = "close", [READ_REQUEST] = "read",
}
local USER_EVENT_NAME = { [1] = "input_closed" }
local USER_EVENT_CODE = { input_closed = 1 }

local ctx_ptr_t = ffi.typeof("sl_ctx *")
local buf_ptr_t = ffi.typeof("sl_buf *")
local errp = ffi.new("const char *[1]")
local ctx_out = ffi.new("sl_ctx *[1]")
local event = ffi.new("sl_lua_event[1]")

local _M = {}
local stages = {}   -- key -> { name, mod, options }
local keys = {}     -- stage table -> key (stages added while running)
local ctxs = {}     -- Lua id -> ctx
_M.contexts = ctxs
_M.stages = stages
local host          -- sl_lua_host * of this state
-- Writes that carry a promise id (the outbound queue reports them done).
local write_p = (function()
  local ok, f = pcall(function() return C.sl_ffi_ctx_write_p end)
  return ok and f or nil
end)()
local epoch = 0     -- bumped whenever a running pipeline changes

local Ctx = {}
Ctx.__index = Ctx
_M.Ctx = Ctx

---------------------------------------------------------------------------
-- The loop

-- What runs now, for the error handler.
local cur_ctx, cur_ev, cur_arg = nil, nil, nil
-- An event was popped and has not reached its stage yet: an error now is
-- sluice's own (out of Lua memory), and the event's connection closes.
local pending = false
-- Resolved once: the error path may have no Lua memory to resolve it.
local host_abandon = C.sl_ffi_host_abandon
-- lua_memory_limit (src/lua/host.c, sl_lua_alloc): the allocator raises
-- heap_over[0] when the heap grows past the limit; once the event is done,
-- over_limit() collects in full and stops the stage it was delivered to
-- if the heap is still above. oom_waiting: stages stopped for memory whose
-- connection has not let them go yet; what they hold is not garbage yet,
-- so no other stage is stopped meanwhile.
local heap_over = ffi.new("int32_t[1]")
local oom_waiting = 0
local OOM = "not enough memory"  -- LuaJIT's message for a refused allocation
-- The buffer the current queued event delivered: adopted (given its
-- finalizer) once every callback it caused is done, if a script kept it;
-- the event it came with; true while it is being adopted.
local top_arg = nil
local top_ev = READ
local adopting = false

local touching = false -- leak_detection advanced or paranoid: record each hop
-- The pool's holder table (buf/holder.h) and header region start (as an
-- sl_buf *: header address - hdr_base is the slot), or nil when holders are
-- not recorded (set by init).
local holders, hdr_base = nil, nil
local RECORDED = 2 -- SL_BUF_RECORDED

local function touch(ctx, arg)
  if is_buf(arg) and arg.b.gen == arg.gen and band(arg.b.root.flags, RECORDED) ~= 0 then
    C.sl_ffi_buf_touch(arg.b, ctx.name)
  end
end

-- An event from a Lua stage to the next Lua stage is a direct call, as in
-- Netty: the next stage has handled it (and whatever it caused) when
-- fire_read returns. A stage that raises ends the whole event: the error
-- goes to run()'s caller, which knows the innermost stage from cur_ctx.
-- A buffer handed on belongs to the receiving stage: the sender can no
-- longer release it or pass it again (the handle records its owner).
local function hop(ctx, ev, arg, p)
  local pc, pe, pa = cur_ctx, cur_ev, cur_arg
  if is_buf(arg) then
    passable(arg)
    arg.owner = ctx.sid
    if holders then
      -- The memory summary's "held by": buf/holder.h's sl_buf_hold, inline.
      local r = arg.b.root
      local h = holders[r - hdr_base] -- the header's slot (64-byte headers)
      h.who, h.gen = ctx.cptr, r.gen
    end
  end
  if p then
    -- The write's promise is in this stage's hands until it passes it on.
    local hp = ctx.promises
    if not hp then
      hp = hands()
      ctx.promises = hp
    end
    hand(p, hp)
  end
  cur_ctx, cur_ev, cur_arg = ctx, ev, arg
  buf.stage, buf.stage_id = ctx.cptr, ctx.sid
  ctx.fns[ev + 1](ctx, arg, p)
  cur_ctx, cur_ev, cur_arg = pc, pe, pa
  if pc then buf.stage, buf.stage_id = pc.cptr, pc.sid else buf.stage, buf.stage_id = nil, 0 end
end

-- Drops msg when the channel is gone.
local function drop(msg, p)
  if is_buf(msg) and msg.refs > 0 and msg.b.gen == msg.gen then msg:release(msg.refs) end
  if p then promise.fail(p, "closed") end
  return p
end
local function dropped(_, msg, p) return drop(msg, p) end

-- A failed stage's callbacks: its own code is not called again on that
-- connection but for the cleanup its connection's end brings
-- (channel_inactive, then removed: it lets go of what it holds). Reads and
-- writes still coming to it (the rest of a read burst, or what a Lua stage
-- next to it passes on) are dropped; every other event goes on to the next
-- stage, as past a stage without that callback, so that a close from the
-- stages after it reaches the head.
local FAILED = {
  [ACTIVE + 1] = function(ctx) return ctx:fire_active() end,
  [INACTIVE + 1] = function(ctx) return ctx:fire_inactive() end,
  [READ + 1] = dropped,
  [READ_COMPLETE + 1] = function(ctx) return ctx:fire_read_complete() end,
  [WRITABILITY + 1] = function(ctx, w) return ctx:fire_writability_changed(w) end,
  [USER_EVENT + 1] = function(ctx, name) return ctx:fire_user_event(name) end,
  [ERROR + 1] = function(ctx, err) return ctx:fire_error(err) end,
  [WRITE + 1] = dropped,
  [FLUSH + 1] = function(ctx) return ctx:flush() end,
  [CLOSE + 1] = function(ctx, reason) return ctx:close(reason) end,
  [READ_REQUEST + 1] = function(ctx) return ctx:read() end,
}

-- The callbacks of a stage once it failed (made at its first failure).
local function failed_fns(stage)
  local fns = stage.failed_fns
  if not fns then
    fns = {}
    for k, f in pairs(FAILED) do fns[k] = f end
    fns[INACTIVE + 1] = stage.fns[INACTIVE + 1] or FAILED[INACTIVE + 1]
    stage.failed_fns = fns
  end
  return fns
end

-- The text of an error value, whatever it is. A string is itself. The
-- __tostring of an error object is the stage's code, and may raise, return
-- something else than a string, or call tostring on its own object (in
-- LuaJIT a tail call: a loop that no stack overflow ends). It is called
-- once, protected, with its metatable's __tostring taken away meanwhile: a
-- tostring of the same object inside it finds none.
local function error_text(err)
  if type(err) == "string" then return err end
  -- (Only a table's: a cdata's metatable is the FFI's own, left alone.)
  local mt = type(err) == "table" and getmetatable(err)
  local f = type(mt) == "table" and rawget(mt, "__tostring")
  if not f then
    local ok, s = pcall(tostring, err)
    return ok and type(s) == "string" and s or "(an error object that tostring refuses)"
  end
  rawset(mt, "__tostring", nil)
  local ok, s = pcall(f, err)
  rawset(mt, "__tostring", f)
  if ok and type(s) == "string" then return s end
  return ("(an error object whose __tostring failed: %s)"):format(
    ok and "it returned a " .. type(s) or type(s) == "string" and s or "it raised a " .. type(s))
end
_M.error_text = error_text

-- Logs an error at error level: the head and the error's message on one
-- line, then its traceback (debug.traceback's "stack traceback:" and the
-- lines after it) as it is.
local TRACEBACK = "\nstack traceback:\n"
local function log_error(head, text)
  -- The last one: a message may quote another traceback (or forge one).
  local at, from = nil, 1
  while true do
    local i = text:find(TRACEBACK, from, true)
    if not i then break end
    at, from = i, i + 1
  end
  if at then
    log.error_traced(head .. text:sub(1, at - 1), text:sub(at))
  else
    log.error("%s", head .. text)
  end
end

-- An error in a promise's on_complete callback: it closes no connection.
local function promise_failed(err)
  log_error("Lua dispatch: ", error_text(err))
end

-- The stage of ctx has left its pipeline (or failed in removed): forget it.
-- The promises still in its hands, which it neither passed on nor
-- completed, fail with "closed" (nobody else would complete them).
local function forget(ctx)
  ctxs[ctx.id] = nil
  ctx.cptr = nil
  epoch = epoch + 1
  if ctx.oom then
    -- Stopped for memory, and gone: what it held is garbage now.
    ctx.oom = nil
    oom_waiting = oom_waiting - 1
    C.sl_ffi_host_collect(host)
  end
  local hp = ctx.promises
  if hp then
    ctx.promises = nil
    promise.fail_all(hp, "closed", promise_failed)
  end
end

-- how: what the stage did, "raised in" unless given. A stage that failed
-- already on this connection (raising again in its channel_inactive or
-- removed) has the error logged, and counted and closed no more.
local function stage_failed(ctx, ev, arg, err, how)
  local again = ctx.failed
  -- First what must happen whatever the error is (converting it runs the
  -- stage's code, in its __tostring): the pipeline releases what the stage
  -- was handed and still owned. (Only while the failing stage still owns
  -- it: a buffer it passed on to a Lua stage that kept it belongs to that
  -- stage now.)
  if is_buf(arg) and arg.refs > 0 and arg.b.gen == arg.gen and
     (arg.owner == 0 or arg.owner == ctx.sid) then
    arg:release(arg.refs)
  end
  -- Its connection is closing: from now on the stage is not called with
  -- what was already queued for it (the rest of a read burst) nor with what
  -- a Lua stage next to it passes on (direct calls).
  ctx.failed = true
  ctx.fns = failed_fns(ctx.stage)
  local text = error_text(err)
  -- Stopped by lua_timeout_ms (src/lua/host.c, sl_lua_timeout_hook).
  local slow = not how and type(err) == "string" and
               err:match("^[^\n]-(ran longer than lua_timeout_ms %(%d+ ms%))")
  if slow then how = slow .. " in" end
  if err == OOM and ctx.cptr and not ctx.oom then
    ctx.oom = true
    oom_waiting = oom_waiting + 1
  end
  if host ~= nil and not again then C.sl_ffi_host_stage_error(host, ctx.name) end
  local what = CALLBACK[ev] or (ev == TIMER and "a timer") or (ev == PROMISE and "a promise callback")
               or (ev == REMOVED and "removed") or (ev == ADDED and "added") or tostring(ev)
  log_error(("stage %s %s %s on %s: "):format(ctx.name, how or "raised in", what,
            ctx.cptr and ffi_string(C.sl_ffi_ctx_describe(ctx.cptr)) or "a closed channel"), text)
  if ctx.cptr and not again then
    C.sl_ffi_ctx_fire_text(ctx.cptr, CLOSE, "stage " .. ctx.name .. " failed: " .. text:match("^[^\n]*"))
  end
  -- Failed in removed: it has left all the same.
  if ev == REMOVED then forget(ctx) end
end

-- Between events: the heap grew past lua_memory_limit (heap_over). A full
-- collection first (garbage is nobody's fault); if the heap is still above
-- the limit, the stage the event was delivered to fails as if it had
-- raised "not enough memory", and its connection closes.
local function over_limit(ctx, ev)
  heap_over[0] = 0
  -- (No stage to stop: the collection at the end of the drain will do.)
  if oom_waiting > 0 or ctx == nil or ctx.failed or ctx.cptr == nil then return end
  -- A finalized cdata goes one cycle after its finalizer ran, the value of
  -- a weak key one cycle after the key: collect again while that frees.
  local kb = collectgarbage("count")
  for _ = 1, 3 do
    collectgarbage()
    local now = collectgarbage("count")
    if C.sl_ffi_host_heap_above(host) == 0 or now >= kb then break end
    kb = now
  end
  if C.sl_ffi_host_heap_above(host) == 0 then return end
  C.sl_ffi_host_heap_stopped(host)
  stage_failed(ctx, ev, nil, OOM, "held more than lua_memory_limit after")
end

local function call(ctx, ev, arg, p)
  cur_ctx, cur_ev, cur_arg = ctx, ev, arg
  buf.stage, buf.stage_id = ctx.cptr, ctx.sid  -- releases in this callback name this stage
  ctx.fns[ev + 1](ctx, arg, p)
  buf.stage, buf.stage_id = nil, 0
  cur_ctx = nil
end

local run_timers, on_added, on_removed

-- Delivers one event popped from C.
local function deliver(e)
  local ev = e.ev
  if ev == PROMISE then
    local err = e.str ~= nil and ffi_string(e.str) or nil
    pending = false  -- an error in an on_complete callback closes no connection
    return promise.settle(e.n, err)
  elseif ev == TIMER then
    return run_timers()
  elseif ev == ADDED then
    return on_added(e.id, e.ptr, e.n)
  end
  local ctx = ctxs[e.id]
  if ev == REMOVED then
    if ctx then return on_removed(ctx) end
    return
  end
  if ctx == nil then
    -- Delivered after the stage left: nobody can own the buffer but us.
    -- (A failed stage's reads and writes go to its drop callbacks.)
    if e.ptr ~= nil and (ev == READ or ev == WRITE) then
      C.sl_ffi_buf_release(ffi_cast(buf_ptr_t, e.ptr), 1, errp)
    end
    return
  end
  local arg
  if ev == READ or ev == WRITE then
    arg = wrap_lazy(e.ptr)
    arg.owner = ctx.sid
    top_arg, top_ev = arg, ev
  elseif ev == WRITABILITY then
    arg = e.n ~= 0
  elseif ev == USER_EVENT then
    arg = USER_EVENT_NAME[e.n] or e.n
  elseif ev == ERROR or ev == CLOSE then
    arg = e.str ~= nil and ffi_string(e.str) or nil
  end
  return call(ctx, ev, arg, nil)
end

-- Delivers every queued event, looping by tail calls (LuaJIT compiles tail
-- recursion into a loop). `event` itself stays referenced here: a reference
-- to event[0] would not keep it alive.
local function run()
  if top_arg ~= nil then
    adopting = true
    adopt(top_arg)
    adopting, top_arg = false, nil
  end
  if C.sl_ffi_host_next(host, event) == 0 then return end
  pending = true
  local e = event[0]
  deliver(e)
  pending = false
  if heap_over[0] ~= 0 then over_limit(ctxs[e.id], e.ev) end
  return run()
end

-- A callback raised (err carries its traceback): contain it.
local function failed(err)
  buf.stage, buf.stage_id = nil, 0
  local ctx, ev, arg = cur_ctx, cur_ev, cur_arg
  cur_ctx = nil
  local undelivered, kept = pending, adopting and top_arg
  pending, adopting = false, false
  if kept then
    -- A handle a stage kept could not be given its finalizer (out of Lua
    -- memory): once dropped, nothing would release its buffer, and trying
    -- again fails again for as long as the stage holds its memory. Its
    -- references are released now, and the stage that owns it fails.
    top_arg = nil
    local owner = nil
    for _, c in pairs(ctxs) do
      if c.sid == kept.owner then owner = c end
    end
    if kept.refs > 0 and kept.b.gen == kept.gen then kept:release(kept.refs) end
    if owner and not owner.failed then stage_failed(owner, top_ev, nil, err) end
    return
  end
  if ctx then
    stage_failed(ctx, ev, arg, err)
  else
    -- Before anything that allocates: the event's buffer and connection
    -- must not wait for Lua memory.
    if undelivered then host_abandon(host, type(err) == "string" and err or "error") end
    log_error("Lua dispatch: ", error_text(err))
  end
end

-- C drives run() itself (lua_pcall with a traceback handler, failed() on
-- an error, again until it returns): the trace returns straight to C.
_M.run, _M.failed = run, failed

-- Runs every queued event in Lua (sluice.testing drives its channels this
-- way, after each operation).
function _M.drain()
  while true do
    local ok, err = xpcall(run, traceback)
    if ok then return end
    failed(err)
  end
end

---------------------------------------------------------------------------
-- Contexts

-- The next handler of ev when it is a Lua stage (nil when it is C). Each
-- context remembers the answer per event until a pipeline changes.
local function next_lua(ctx, ev)
  local nx = ctx.next
  if ctx.epoch ~= epoch then
    nx = {}
    ctx.next, ctx.epoch = nx, epoch
  end
  local n = nx[ev]
  if n == nil then
    local id = C.sl_ffi_ctx_next(ctx.cptr, ev)
    n = id ~= 0 and ctxs[id] or false
    nx[ev] = n
  end
  return n or nil
end

local next_sid = 0
local function new_ctx(id, cptr, key)
  local stage = stages[key]
  next_sid = next_sid < 2147483647 and next_sid + 1 or 1
  local ctx = setmetatable({
    cptr = ffi_cast(ctx_ptr_t, cptr), id = id, stage = stage, mod = stage.mod, fns = stage.fns,
    -- (next: made at the first event it passes on; epoch -1 is never current.)
    name = stage.name, options = stage.options, state = {}, next = false, epoch = -1,
    sid = next_sid,
  }, Ctx)
  ctxs[id] = ctx
  return ctx
end

function on_added(id, cptr, key)
  local ctx = new_ctx(id, cptr, key)
  if ctx.mod.added then
    cur_ctx, cur_ev, cur_arg = ctx, ADDED, nil
    ctx.mod.added(ctx)
    cur_ctx = nil
  end
end

-- Runs a stage's added callback as a worker does, containing an error
-- (sluice.testing adds its stages this way).
function _M.added(ctx)
  if not ctx.mod.added then return end
  cur_ctx, cur_ev, cur_arg = ctx, ADDED, nil
  local ok, err = xpcall(ctx.mod.added, traceback, ctx)
  if ok then cur_ctx = nil else failed(err) end
end

-- (A failed stage gets removed too: it lets go of what it holds there.)
function on_removed(ctx)
  if ctx.mod.removed then
    cur_ctx, cur_ev, cur_arg = ctx, REMOVED, nil
    buf.stage = ctx.cptr
    ctx.mod.removed(ctx)
    buf.stage = nil
    cur_ctx = nil
  end
  forget(ctx)
end

-- A buffer for C: handles give a reference away, strings are copied in.
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
  return nil
end


function Ctx:fire_read(msg)
  if not self.cptr then return drop(msg) end
  local n = next_lua(self, READ)
  if n then
    if touching then touch(n, msg) end
    return hop(n, READ, msg)
  end
  local b = to_c(self, msg, "fire_read")
  if b == nil then
    -- Not bytes: only Lua stages can take it. The tail (or a C stage)
    -- drops it, as Netty's tail drops what nobody handled.
    C.sl_ffi_ctx_unhandled(self.cptr)
    if C.sl_ffi_log_enabled(0) ~= 0 then
      log.debug("%s: a %s fired by stage %s reached a C stage or the tail and was dropped",
                ffi_string(C.sl_ffi_ctx_describe(self.cptr)), type(msg), self.name)
    end
    return
  end
  C.sl_ffi_ctx_fire_read(self.cptr, b)
end

-- Writes msg towards the head. Returns the write's promise: the one given,
-- or a new one; `false` asks for none (the cheapest write).
function Ctx:write(msg, p)
  if p == nil then
    p = promise.new()
  elseif p == false then
    p = nil
  elseif not is_promise(p) then
    -- Checked before a string is copied into a buffer that nobody would own.
    error(("bad 'promise' argument (promise, false or nil expected, got %s)"):format(type(p)), 2)
  end
  if not self.cptr then return drop(msg, p) end
  local n = next_lua(self, WRITE)
  if n then
    if touching then touch(n, msg) end
    hop(n, WRITE, msg, p)
    return p
  end
  local b = to_c(self, msg, "write")
  if b == nil then
    error(("bad argument to write (buffer or string expected, got %s): a C stage or the "
           .. "socket is next"):format(type(msg)), 2)
  end
  if p and write_p then
    take(p) -- C completes it now
    write_p(self.cptr, b, promise.id(p))
  else
    C.sl_ffi_ctx_write(self.cptr, b)
  end
  return p
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

function Ctx:write_and_flush(msg, p)
  p = self:write(msg, p)
  self:flush()
  return p
end

function Ctx:fire_writability_changed(writable)
  if not self.cptr then return end
  local n = next_lua(self, WRITABILITY)
  if n then return hop(n, WRITABILITY, writable and true or false) end
  C.sl_ffi_ctx_fire(self.cptr, WRITABILITY, writable and 1 or 0)
end

function Ctx:fire_user_event(ev)
  if not self.cptr then return end
  local n = next_lua(self, USER_EVENT)
  if n then return hop(n, USER_EVENT, ev) end
  local code = USER_EVENT_CODE[ev]
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

-- Asks for one more read when autoread is off (Netty's ChannelHandlerContext.read).
function Ctx:read()
  if not self.cptr then return end
  local n = next_lua(self, READ_REQUEST)
  if n then return hop(n, READ_REQUEST) end
  C.sl_ffi_ctx_fire(self.cptr, READ_REQUEST, 0)
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
  -- (C would read the target only up to the NUL.)
  if target:find("\0", 1, true) then
    return nil, 'expected the name of an upstream or "host:port", not a string holding a NUL byte'
  end
  if C.sl_ffi_ctx_connect(self.cptr, target, errp) ~= 0 then return nil, ffi_string(errp[0]) end
  return true
end

function Ctx:describe()
  if not self.cptr then return "closed channel" end
  return ffi_string(C.sl_ffi_ctx_describe(self.cptr))
end

-- The channel as a stage sees it.
local Channel = {}
Channel.__index = Channel

function Ctx:channel()
  local ch = self.chan
  if ch == nil then
    ch = setmetatable({ ctx = self }, Channel)
    self.chan = ch
  end
  return ch
end

function Channel:is_active()
  local c = self.ctx.cptr
  return c ~= nil and C.sl_ffi_ctx_is_open(c) ~= 0
end
function Channel:is_writable() return self.ctx:is_writable() end
function Channel:set_autoread(on) return self.ctx:set_autoread(on) end
function Channel:read() return self.ctx:read() end
function Channel:close(reason) return self.ctx:close(reason) end
function Channel:describe() return self.ctx:describe() end
function Channel:remote_address()
  local c = self.ctx.cptr
  return c and ffi_string(C.sl_ffi_ctx_address(c, 1)) or nil
end
function Channel:local_address()
  local c = self.ctx.cptr
  return c and ffi_string(C.sl_ffi_ctx_address(c, 0)) or nil
end
function Channel:tls_version()
  local c = self.ctx.cptr
  local v = c and C.sl_ffi_ctx_tls_version(c)
  return v ~= nil and ffi_string(v) or nil
end
function Channel:tls_server_name()
  local c = self.ctx.cptr
  local v = c and C.sl_ffi_ctx_tls_server_name(c)
  return v ~= nil and ffi_string(v) or nil
end
function Channel:tls_peer_subject()
  local c = self.ctx.cptr
  local v = c and C.sl_ffi_ctx_tls_peer_subject(c)
  return v ~= nil and ffi_string(v) or nil
end

---------------------------------------------------------------------------
-- Stages

-- The events a stage handles; and HAS_ADDED when it has an added callback
-- (without one, C lets its contexts' added events wait for the next entry
-- into Lua).
local HAS_ADDED = 0x40000000 -- host.c's SL_LUA_HAS_ADDED
local function mask_of(mod)
  local mask = 0
  for ev, cb in pairs(CALLBACK) do
    if type(mod[cb]) == "function" then mask = bor(mask, lshift(1, ev)) end
  end
  if type(mod.added) == "function" then mask = bor(mask, HAS_ADDED) end
  return mask
end

-- The stage's callbacks by event code + 1 (an array the JIT indexes
-- directly); read once, when the stage is loaded.
local function fns_of(mod)
  local fns = {}
  for ev = 0, READ_REQUEST do fns[ev + 1] = mod[CALLBACK[ev]] or false end
  return fns
end

local function register(name, mod, options)
  local key = C.sl_ffi_host_register_stage(host, mask_of(mod))
  if key == 0 then error("out of memory registering stage " .. tostring(name)) end
  stages[key] = { name = name, mod = mod, fns = fns_of(mod), options = options or {} }
  return key
end
_M.register = register

-- Loads a stage module named in the config for this worker under `key`.
-- Returns the key and the mask of the events it handles.
function _M.load_stage(name, file, options, key)
  local mod = require(name)
  if type(mod) ~= "table" then
    error(("module %q from %s did not return a table of callbacks"):format(name, file))
  end
  stages[key] = { name = name, mod = mod, fns = fns_of(mod), options = options or {} }
  return key, mask_of(mod)
end

-- Forgets the stage loaded under `key` (contexts that use it keep it).
function _M.unload_stage(key)
  stages[key] = nil
end

-- A stage given while running: a table of callbacks, a module name, or
-- { "module.name", option = value }. Returns the Lua key, or nil and the
-- builtin C stage's name.
local unnamed = 0 -- table stages given without a name: stage1, stage2, ...
local function resolve(stage, name)
  local opts
  if type(stage) == "table" and type(stage[1]) == "string" then
    opts = {}
    for k, v in pairs(stage) do if k ~= 1 then opts[k] = v end end
    stage = stage[1]
  end
  if type(stage) == "string" then
    local ok, mod = pcall(require, stage)
    if not ok then
      -- Only a name that no module has is looked up among the builtin C
      -- stages: a module that is there but fails to load says why.
      local missing = "module '" .. stage .. "' not found"
      if type(mod) == "string" and mod:sub(1, #missing) == missing then
        return nil, stage, opts
      end
      package.loaded[stage] = nil -- the next try runs it again ("loop or previous error" else)
      error(("cannot add stage %q: module failed to load: %s"):format(stage, tostring(mod)), 4)
    end
    if type(mod) ~= "table" then
      error(("cannot add stage %q: the module returned %s, not a table of callbacks")
            :format(stage, type(mod)), 4)
    end
    name = name or stage
    local k = opts == nil and keys[mod]
    if not k then
      k = register(name, mod, opts)
      if opts == nil then keys[mod] = k end
    end
    return k, name
  end
  if type(stage) ~= "table" then
    error(("bad stage (table of callbacks or module name expected, got %s)"):format(type(stage)), 3)
  end
  local k = keys[stage]
  if not k or (name and stages[k].name ~= name) then
    unnamed = unnamed + 1
    k = register(name or ("stage" .. unnamed), stage, nil)
    keys[stage] = k
  end
  return k, stages[k].name
end
_M.resolve = resolve

---------------------------------------------------------------------------
-- Changing a running pipeline (Netty's ChannelPipeline add/remove/replace)

local Pipeline = {}
Pipeline.__index = Pipeline

function Ctx:pipeline()
  return setmetatable({ ctx = self }, Pipeline)
end

local names_out = ffi.new("const char *[64]")
local ctxs_out = ffi.new("sl_ctx *[64]")

local function stage_list(self)
  local cptr = self.ctx.cptr
  if cptr == nil then error("the channel is closed", 3) end
  local n = C.sl_ffi_ctx_stages(cptr, names_out, ctxs_out, 64)
  if n > 64 then n = 64 end
  return n
end

function Pipeline:names()
  local out = {}
  for i = 0, stage_list(self) - 1 do out[#out + 1] = ffi_string(names_out[i]) end
  return out
end

local function find(self, name)
  local n = stage_list(self)
  for i = 0, n - 1 do
    if ffi_string(names_out[i]) == name then return ctxs_out[i], i, n end
  end
  error(("no stage named %q in this pipeline"):format(tostring(name)), 3)
end

local function insert(at, after, stage, name)
  local key, cname, opts = resolve(stage, name)
  epoch = epoch + 1
  if key then
    local id = C.sl_ffi_ctx_insert_lua(at, after and 1 or 0, key, cname, ctx_out)
    if id == 0 then error("out of memory adding a stage", 3) end
    local ctx = new_ctx(id, ctx_out[0], key)
    ctx.name = cname
    if ctx.mod.added then ctx.mod.added(ctx) end
    return ctx
  end
  -- A C stage: its options parsed once per set of options, kept for the
  -- life of this state (pipelines that use it may outlive any one stage).
  local conf, err = options.cached(cname, opts)
  if err then error(("cannot add stage %q: %s"):format(cname, err), 3) end
  local c = C.sl_ffi_ctx_insert_c(at, after and 1 or 0, cname, conf, errp)
  if c == nil then error(("cannot add stage %q: %s"):format(cname, ffi_string(errp[0])), 3) end
  return nil
end

function Pipeline:add_last(stage, name)
  local n = stage_list(self)
  if n == 0 then error("an empty pipeline has no stage to add next to", 2) end
  return insert(ctxs_out[n - 1], true, stage, name)
end

function Pipeline:add_first(stage, name)
  if stage_list(self) == 0 then error("an empty pipeline has no stage to add next to", 2) end
  return insert(ctxs_out[0], false, stage, name)
end

function Pipeline:add_before(base, stage, name)
  return insert((find(self, base)), false, stage, name)
end

function Pipeline:add_after(base, stage, name)
  return insert((find(self, base)), true, stage, name)
end

function Pipeline:remove(name)
  local c = find(self, name)
  epoch = epoch + 1
  C.sl_ffi_ctx_remove(c)
end

function Pipeline:replace(old, stage, name)
  local c = find(self, old)
  local added = insert(c, true, stage, name)
  C.sl_ffi_ctx_remove(c)
  return added
end

---------------------------------------------------------------------------
-- Timers: one heap per state, one C timer armed at the earliest deadline.

local heap, nheap = {}, 0
local armed_at = nil
_M.clock = function(ctx) return C.sl_ffi_ctx_now(ctx.cptr) end

local function heap_up(i)
  local t = heap[i]
  while i > 1 do
    local p = floor(i / 2)
    if heap[p].due <= t.due then break end
    heap[i] = heap[p]
    heap[i].slot = i
    i = p
  end
  heap[i] = t
  t.slot = i
end

local function heap_down(i)
  local t = heap[i]
  while true do
    local c = i * 2
    if c > nheap then break end
    if c < nheap and heap[c + 1].due < heap[c].due then c = c + 1 end
    if heap[c].due >= t.due then break end
    heap[i] = heap[c]
    heap[i].slot = i
    i = c
  end
  heap[i] = t
  t.slot = i
end

local function heap_pop()
  local top = heap[1]
  heap[1] = heap[nheap]
  heap[nheap] = nil
  nheap = nheap - 1
  if nheap > 0 then heap_down(1) end
  top.slot = nil
  return top
end

local function rearm(now)
  if host == nil then return end
  if nheap == 0 then
    if armed_at then C.sl_ffi_host_arm_timer(host, -1) end
    armed_at = nil
  elseif armed_at ~= heap[1].due then
    armed_at = heap[1].due
    C.sl_ffi_host_arm_timer(host, armed_at - now > 0 and armed_at - now or 0)
  end
end

local Timer = {}
Timer.__index = Timer

function Timer:cancel()
  local i = self.slot
  if not i then return false end
  local last = heap[nheap]
  heap[nheap] = nil
  nheap = nheap - 1
  self.slot = nil
  if i <= nheap then
    heap[i] = last
    last.slot = i
    heap_up(i)
    heap_down(last.slot)
  end
  return true
end

-- Runs fn(ctx) once, ms milliseconds from now, unless cancelled or the
-- stage leaves the pipeline first. Returns the timer.
function Ctx:after(ms, fn)
  -- not (ms >= 0): NaN too, whose deadline would break the timer heap's order.
  if type(ms) ~= "number" or not (ms >= 0) then
    error(("bad 'ms' argument (non-negative number expected, got %s)"):format(tostring(ms)), 2)
  end
  if type(fn) ~= "function" then
    error(("bad 'fn' argument (function expected, got %s)"):format(type(fn)), 2)
  end
  if not self.cptr then return nil, "closed" end
  local now = _M.clock(self)
  local t = setmetatable({ due = now + ms, ctx = self, fn = fn }, Timer)
  nheap = nheap + 1
  heap[nheap] = t
  heap_up(nheap)
  rearm(now)
  return t
end

-- Runs the timers due at `now` (the C timer fired, or a test's virtual
-- clock moved).
function run_timers(now)
  while nheap > 0 do
    local t = heap[1]
    local ctx = t.ctx
    now = now or (ctx.cptr and _M.clock(ctx))
    if now and t.due > now then break end
    heap_pop()
    if ctx.cptr and not ctx.failed and C.sl_ffi_ctx_is_open(ctx.cptr) ~= 0 then
      -- Each timer is protected on its own: one that raises closes its
      -- connection and the others still run.
      buf.stage, buf.stage_id = ctx.cptr, ctx.sid
      if host ~= nil then C.sl_ffi_host_step(host) end -- lua_timeout_ms: per timer
      local ok, err = xpcall(t.fn, traceback, ctx)
      buf.stage, buf.stage_id = nil, 0
      if not ok then stage_failed(ctx, TIMER, nil, err)
      elseif heap_over[0] ~= 0 then over_limit(ctx, TIMER) end
    end
  end
  armed_at = nil
  if nheap > 0 then
    local ctx = heap[1].ctx
    rearm(now or (ctx.cptr and _M.clock(ctx)) or heap[1].due)
  end
end
_M.run_timers = run_timers

---------------------------------------------------------------------------

_M.new_ctx = new_ctx

-- Forgets every stage and context (sluice.testing, after its in-memory
-- worker was made anew).
function _M.reset()
  for k in pairs(stages) do stages[k] = nil end
  for k in pairs(keys) do keys[k] = nil end
  for k in pairs(ctxs) do ctxs[k] = nil end
  heap, nheap, armed_at = {}, 0, nil
  epoch = epoch + 1
end

function _M.init(worker_id, h)
  -- Events between Lua stages are direct calls through the same few
  -- functions (Ctx:fire_read -> the next stage -> Ctx:fire_read ...): let
  -- the JIT inline that chain across several stages instead of treating it
  -- as recursion after two.
  jit.opt.start("recunroll=6")
  _M.worker_id = worker_id
  host = ffi_cast("sl_lua_host *", h)
  heap_over = C.sl_ffi_host_heap_over(host)
  local base = ffi.new("uintptr_t[1]")
  local t = C.sl_ffi_host_holders(host, base)
  if t ~= nil then holders, hdr_base = t, ffi_cast(buf_ptr_t, base[0]) else holders, hdr_base = nil, nil end
  touching = C.sl_ffi_leak_level() >= 2
  buf.where = touching  -- releases record file:line from "advanced" up
end

return _M
