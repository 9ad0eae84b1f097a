-- sluice.buf: buffer handles into pooled memory.
--
-- A handle (sl_lbuf) points at a C sl_buf and remembers its generation; a
-- released buffer's generation moves on, so every access through a stale
-- handle is caught instead of reading freed or reused memory. A handle also
-- counts the references it owns (refs); while it owns any it carries a
-- finalizer, and a handle collected with references is a leak: reported,
-- and its memory given back.
--
-- Ownership: a handle given to C (ctx:fire_read toward a C stage, ctx:write)
-- gives one of its references away. retain() adds one, release() drops one.
local ffi = require("ffi")
local C = require("sluice.core")

local ffi_gc = ffi.gc
local ffi_string = ffi.string
local error = error
local type = type

local lbuf_t = ffi.typeof("sl_lbuf")
local errp = ffi.new("const char *[1]")
local finalize = C.sl_ffi_buf_finalize

local _M = {}
local methods = {}

-- Raised from live(), which methods call: level 4 is the stage's line.
local function dead()
  error("buffer used after release (refcnt 0)", 4)
end

-- The live sl_buf behind h, or a Lua error. A released buffer's header has
-- generation 0 (or, reused, a newer one): one compare tells.
local function live(h)
  local b = h.b
  if b.gen ~= h.gen then dead() end
  return b
end
_M.live = live

-- Wraps a +1 sl_buf pointer from C into a handle that owns that reference.
function _M.wrap(ptr)
  local b = ffi.cast("sl_buf *", ptr)
  return ffi_gc(lbuf_t(b, b.gen, 1), finalize)
end

-- Marks one reference of h as given to C; the caller passes h.b on. A
-- handle that owns no reference (it passed its buffer on already) cannot
-- give one: C would later release a reference nobody had.
function _M.give(h)
  local b = h.b
  if b.gen ~= h.gen then error("buffer used after release (refcnt 0)", 3) end
  local refs = h.refs
  if refs <= 0 then
    error("buffer passed on twice: this handle no longer owns a reference (refcnt "
          .. b.root.refcnt .. ")", 3)
  end
  h.refs = refs - 1
  if refs == 1 then ffi_gc(h, nil) end
  return b
end

function methods.readable_bytes(h)
  local b = live(h)
  return b.wr - b.rd
end

function methods.capacity(h)
  return live(h).cap
end

function methods.refcnt(h)
  local b = h.b
  if b.gen ~= h.gen then return 0 end
  return b.root.refcnt
end

function methods.tostring(h, offset, len)
  local b = live(h)
  local avail = b.wr - b.rd
  offset = offset or 0
  len = len or (avail - offset)
  if type(offset) ~= "number" or type(len) ~= "number" or offset < 0 or len < 0
      or offset + len > avail then
    error(("bad range: offset %s, length %s, readable bytes %d"):format(
      tostring(offset), tostring(len), avail), 2)
  end
  return ffi_string(b.data + b.rd + offset, len)
end

function methods.retain(h, n)
  n = n or 1
  if type(n) ~= "number" or n < 1 then error("bad 'n' argument (positive number expected)", 2) end
  local b = h.b
  if b.gen ~= h.gen then error("refcnt 0, increment " .. n, 2) end
  if C.sl_ffi_buf_retain(b, n, errp) < 0 then error(ffi_string(errp[0]), 2) end
  if h.refs == 0 then ffi_gc(h, finalize) end
  h.refs = h.refs + n
  return h
end

function methods.release(h, n)
  n = n or 1
  if type(n) ~= "number" or n < 1 then error("bad 'n' argument (positive number expected)", 2) end
  local b = h.b
  if b.gen ~= h.gen then error("refcnt 0, decrement " .. n, 2) end
  -- A handle releases only references it owns: after fire_read or write
  -- the reference belongs to whoever took it, who releases it in turn.
  local refcnt = b.root.refcnt
  if refcnt < n then error(("refcnt %d, decrement %d"):format(refcnt, n), 2) end
  local refs = h.refs
  if refs < n then
    error(("release of a reference this handle does not own (it owns %d, refcnt %d, "
           .. "decrement %d): was the buffer passed on?"):format(refs, b.root.refcnt, n), 2)
  end
  local rc = C.sl_ffi_buf_release(b, n, errp)
  if rc < 0 then error(ffi_string(errp[0]), 2) end
  refs = refs - n
  h.refs = refs
  if refs == 0 then ffi_gc(h, nil) end
  return rc == 1
end

local mt = {
  __index = methods,
  __len = function(h)
    local b = live(h)
    return b.wr - b.rd
  end,
  __tostring = function(h)
    local b = h.b
    if b.gen ~= h.gen then return "sl_buf (released)" end
    return ("sl_buf (%d readable, capacity %d, refcnt %d)"):format(b.wr - b.rd, b.cap,
                                                                   b.root.refcnt)
  end,
}
ffi.metatype(lbuf_t, mt)

-- sluice.buf.alloc(cap [, max_cap]): a new, empty buffer from this worker's
-- pool; the caller owns it. Returns nil, err when memory cannot be had.
function _M.alloc(cap, max_cap)
  if type(cap) ~= "number" or cap < 0 then error("bad 'cap' argument (number expected)", 2) end
  if max_cap ~= nil and (type(max_cap) ~= "number" or max_cap < cap) then
    error("bad 'max_cap' argument (number >= cap expected)", 2)
  end
  local b = C.sl_ffi_pool_alloc(cap, max_cap or cap)
  if b == nil then return nil, "out of buffer memory" end
  return _M.wrap(b)
end

-- sluice.buf.from(str): a new buffer holding a copy of str; the caller owns it.
function _M.from(str)
  if type(str) ~= "string" then error("bad 'str' argument (string expected)", 2) end
  local b = C.sl_ffi_pool_from(str, #str)
  if b == nil then return nil, "out of buffer memory" end
  return _M.wrap(b)
end

function _M.is_buf(v)
  return type(v) == "cdata" and ffi.istype(lbuf_t, v)
end

_M.methods = methods
return _M
