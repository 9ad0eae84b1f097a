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
--
-- Access (Netty's ByteBuf; indexes are 0-based from the buffer's first byte,
-- 0 <= reader index <= writer index <= capacity <= max capacity):
--   get_T(index) / set_T(index, value)   at an absolute index, indexes unchanged
--   read_T() / write_T(value)            at the reader / writer index, advancing it
-- for T in u8, i8 and u16, i16, u32, i32, u64, i64 with the suffix be or le.
-- u64/i64 read as uint64_t/int64_t cdata; setters take integers (numbers,
-- or 64-bit integer cdata) in [-2^(w-1), 2^w - 1] and store the low w bits.
-- write_* grows the buffer (ensure_writable) within its max capacity.
--
-- Every accessor checks the handle's generation first (live), then the
-- bounds, in Lua, before it touches a byte; a failed check raises and
-- changes nothing.
--
-- Views and derived buffers share their buffer's memory (Netty's slices):
--   slice, read_slice, duplicate        views: they share the buffer's
--       refcount and die with it; their handles own no reference.
--   retained_slice, read_retained_slice, retained_duplicate
--       derived buffers: their own refcount (1, owned by the new handle),
--       holding one reference on the buffer; released to zero, they let
--       go of it. Decoded frames are derived buffers.
local ffi = require("ffi")
local bit = require("bit")
local C = require("sluice.core")

local ffi_gc = ffi.gc
local ffi_string = ffi.string
local ffi_copy = ffi.copy
local ffi_cast = ffi.cast
local ffi_istype = ffi.istype
local band, rshift, arshift, bswap, tobit = bit.band, bit.rshift, bit.arshift, bit.bswap, bit.tobit
local floor, huge = math.floor, math.huge
local s_format, s_char = string.format, string.char
local concat = table.concat
local error = error
local type = type
local tostring = tostring
local tonumber = tonumber

local lbuf_t = ffi.typeof("sl_lbuf")
local buf_ptr_t = ffi.typeof("sl_buf *")
local u8p = ffi.typeof("uint8_t *")
local cu8p = ffi.typeof("const uint8_t *")
local i8p = ffi.typeof("int8_t *")
local u16p = ffi.typeof("uint16_t *")
local i16p = ffi.typeof("int16_t *")
local u32p = ffi.typeof("uint32_t *")
local i32p = ffi.typeof("int32_t *")
local u64p = ffi.typeof("uint64_t *")
local i64p = ffi.typeof("int64_t *")
local u64_t = ffi.typeof("uint64_t")
local i64_t = ffi.typeof("int64_t")
local errp = ffi.new("const char *[1]")
local atp = ffi.new("size_t[1]")
local needle_byte = ffi.new("uint8_t[1]")
local finalize = C.sl_ffi_buf_finalize

local VIEW = 1                 -- SL_BUF_VIEW
local DERIVED = 4              -- SL_BUF_DERIVED
local MAX_CAPACITY = 2147483647 -- SL_BUF_MAX_CAPACITY
local EXACT = 9007199254740992  -- 2^53
local TWO32 = 4294967296
local TWO63 = 9223372036854775808
local TWO64 = 18446744073709551616

local _M = {}
local methods = {}

-- Who released a dead buffer, for errors: the core keeps it in the header.
local function released_by(h)
  local s = C.sl_ffi_buf_released_by(h.b, h.gen)
  if s ~= nil then return "released by " .. ffi_string(s) end
  return "released; its header has been reused since"
end
_M.released_by = released_by

-- Raised from live(), which methods call: level 4 is the stage's line.
local function dead(h)
  error("buffer used after release (refcnt 0, " .. released_by(h) .. ")", 4)
end

-- The live sl_buf behind h, or a Lua error. A released buffer's header has
-- generation 0 (or, reused, a newer one): one compare tells.
local function live(h)
  local b = h.b
  if b.gen ~= h.gen then dead(h) end
  return b
end
_M.live = live

-- Set by the host while a stage runs: releases then name the stage (and,
-- from leak_detection = "advanced" up, the file and line).
_M.stage = nil
_M.stage_id = 0   -- the running stage's id (0: no stage: a test, the host)
_M.where = false
local debug_getinfo = debug.getinfo
local traceback = debug.traceback
local RECORDED = 2 -- SL_BUF_RECORDED
local HAS_VIEWS = 0x20 -- SL_BUF_HAS_VIEWS (a root without views keeps other things in views)

-- Whether sl_buf b has views (slices, duplicates) sharing its refcount.
function _M.has_views(b)
  return band(b.flags, HAS_VIEWS) ~= 0
end

-- Where a buffer made here came from, for leak reports (recorded buffers only).
local function note_site(b, what)
  if band(b.flags, RECORDED) ~= 0 then C.sl_ffi_buf_set_site(b, traceback(what, 3)) end
end

-- Wraps a +1 sl_buf pointer from C into a handle that owns that reference.
local function wrap(ptr)
  local b = ffi_cast(buf_ptr_t, ptr)
  return ffi_gc(lbuf_t(b, b.gen, 1, 1), finalize)
end

-- Finalizers are attached lazily where that is safe: setting and removing
-- one costs LuaJIT far more than the rest of a hop. The dispatcher wraps the
-- buffers it delivers without one (it holds the handle until the callbacks
-- are done), then adopts those that still own a reference.
function _M.wrap_lazy(ptr)
  local b = ffi_cast(buf_ptr_t, ptr)
  return lbuf_t(b, b.gen, 1, 0)
end

function _M.adopt(h)
  if h.refs > 0 and h.fin == 0 then
    ffi_gc(h, finalize)
    h.fin = 1
  end
end
_M.wrap = wrap

-- Marks one reference of h as given to C; the caller passes h.b on. A
-- handle that owns no reference (it passed its buffer on already, or it is
-- a view that never owned one) cannot give one: C would later release a
-- reference nobody had.
-- Checks that h can pass its buffer on; raises (at level 4: the stage's
-- line) when it owns no reference.
local function foreign(h)
  local o = h.owner
  return o ~= 0 and _M.stage_id ~= 0 and o ~= _M.stage_id
end
_M.foreign = foreign

local function passable(h)
  if foreign(h) then
    error("buffer passed on by a stage that does not own it: it was passed on already, "
          .. "and the next stage owns it now", 4)
  end
  local b = h.b
  if b.gen ~= h.gen then
    error("buffer used after release (refcnt 0, " .. released_by(h) .. ")", 4)
  end
  local refs = h.refs
  if refs <= 0 then
    if band(b.flags, VIEW + DERIVED) == VIEW then
      error("view passed on without a reference: this handle owns none (slice() and "
            .. "duplicate() own none; use retained_slice(), retained_duplicate() or retain()) "
            .. "(refcnt " .. b.root.refcnt .. ")", 3)
    end
    error("buffer passed on twice: this handle no longer owns a reference (refcnt "
          .. b.root.refcnt .. ")", 4)
  end
  return b, refs
end

_M.passable = passable

function _M.give(h)
  local b, refs = passable(h)
  h.refs = refs - 1
  if refs == 1 and h.fin ~= 0 then
    ffi_gc(h, nil)
    h.fin = 0
  end
  return b
end

-- A hop to the next Lua stage lends the reference: until it is delivered
-- (lend_back), the sender owns nothing, so it can neither release it nor
-- pass it again by mistake. The handle stays reachable from the queue, so
-- its finalizer stays in place.
function _M.lend(h)
  local _, refs = passable(h)
  h.refs = refs - 1
end

function _M.lend_back(h)
  h.refs = h.refs + 1
end

---------------------------------------------------------------------------
-- Messages (cold paths only: every helper here raises at level 3, the line
-- that called the method that called it).

local function num(x)
  if type(x) == "number" and x == floor(x) and x > -EXACT and x < EXACT then
    return s_format("%d", x)
  end
  return tostring(x)
end

local function nbytes(n)
  return n == 1 and "1 byte" or num(n) .. " bytes"
end

local function is_int(x)
  return type(x) == "number" and x == floor(x) and x > -huge and x < huge
end

-- "bad 'what' argument (...)" for a value that is not an integer.
local function not_int(what, v)
  if type(v) ~= "number" then
    return s_format("bad '%s' argument (number expected, got %s)", what, type(v))
  end
  return s_format("bad '%s' argument (integer expected, got %s)", what, num(v))
end

-- A count (length, number of bytes): a non-negative integer.
local function count_fail(what, v)
  if type(v) == "number" and is_int(v) then
    error(s_format("bad '%s' argument (non-negative integer expected, got %s)", what, num(v)), 3)
  end
  error(not_int(what, v), 3)
end

local function index_fail(b, i, n, name)
  if not is_int(i) then error(not_int("index", i), 3) end
  error(s_format("index %s out of range: %s needs %s at [%s, %s), capacity %d", num(i), name,
                 nbytes(n), num(i), num(i + n), b.cap), 3)
end

local function read_fail(b, n, name)
  error(s_format("%s: %s needed, %d readable (reader index %d, writer index %d)", name,
                 nbytes(n), b.wr - b.rd, b.rd, b.wr), 3)
end

local function grow_fail(b, n, name, why)
  error(s_format("%s: %s needed, %d writable (writer index %d, capacity %d, max capacity %d): %s",
                 name, nbytes(n), b.cap - b.wr, b.wr, b.cap, b.max_cap, why), 3)
end

-- A value for an 8, 16 or 32-bit setter that the fast check refused: a
-- 64-bit integer cdata in range comes back as a number, the rest raises.
local function narrow_value(v, lo, hi)
  if type(v) == "cdata" then
    if ffi_istype(u64_t, v) then
      if v <= hi then return tonumber(v) end
    elseif ffi_istype(i64_t, v) then
      if v >= lo and v <= hi then return tonumber(v) end
    else
      error("bad 'value' argument (integer expected, got cdata)", 3)
    end
  elseif type(v) ~= "number" then
    error(s_format("bad 'value' argument (integer expected, got %s)", type(v)), 3)
  end
  error(s_format("bad 'value' argument (integer in [%s, %s] expected, got %s)", num(lo), num(hi),
                 num(v)), 3)
end

-- A value for a 64-bit setter as int64_t/uint64_t cdata (numbers in
-- [-2^63, 2^64), or 64-bit integer cdata as they are).
local function wide_value(v)
  if type(v) == "number" then
    if v >= -TWO63 and v < TWO64 and v == floor(v) then
      -- Through int64_t below 2^63: LuaJIT's number -> uint64_t conversion
      -- does not wrap negative numbers.
      if v < TWO63 then return ffi_cast(i64_t, v) end
      return ffi_cast(u64_t, v)
    end
    error(s_format("bad 'value' argument (integer in [-2^63, 2^64) expected, got %s)", num(v)), 3)
  end
  if ffi_istype(u64_t, v) or ffi_istype(i64_t, v) then return v end
  error(s_format("bad 'value' argument (number or 64-bit integer cdata expected, got %s)",
                 type(v)), 3)
end

---------------------------------------------------------------------------
-- Loads and stores at a uint8_t pointer, native (n) and swapped (s) byte
-- order. Unaligned typed access: fine on the targets sluice runs on (x86-64
-- and arm64, where LuaJIT emits plain loads and stores).

local function ld_u8(p) return p[0] end
local function ld_i8(p) return ffi_cast(i8p, p)[0] end
local function st_8(p, v) p[0] = band(v, 0xff) end

local LD = {
  u16 = { function(p) return ffi_cast(u16p, p)[0] end,
          function(p) return rshift(bswap(ffi_cast(u16p, p)[0]), 16) end },
  i16 = { function(p) return ffi_cast(i16p, p)[0] end,
          function(p) return arshift(bswap(ffi_cast(u16p, p)[0]), 16) end },
  u32 = { function(p) return ffi_cast(u32p, p)[0] end,
          function(p) return bswap(ffi_cast(i32p, p)[0]) % TWO32 end },
  i32 = { function(p) return ffi_cast(i32p, p)[0] end,
          function(p) return bswap(ffi_cast(i32p, p)[0]) end },
  u64 = { function(p) return ffi_cast(u64p, p)[0] end,
          function(p) return bswap(ffi_cast(u64p, p)[0]) end },
  i64 = { function(p) return ffi_cast(i64p, p)[0] end,
          function(p) return bswap(ffi_cast(i64p, p)[0]) end },
}
local ST = {
  [16] = { function(p, v) ffi_cast(u16p, p)[0] = band(v, 0xffff) end,
           function(p, v) ffi_cast(u16p, p)[0] = rshift(bswap(v), 16) end },
  [32] = { function(p, v) ffi_cast(i32p, p)[0] = tobit(v) end,
           function(p, v) ffi_cast(i32p, p)[0] = bswap(v) end },
  [64] = { function(p, x) ffi_cast(u64p, p)[0] = x end,
           function(p, x) ffi_cast(u64p, p)[0] = bswap(x) end },
}

---------------------------------------------------------------------------
-- Accessor factories. Each method is its own closure over constants (its
-- width, its load or store), which the JIT folds into the trace.

local function getter(name, n, ld)
  return function(h, i)
    local b = live(h)
    if type(i) ~= "number" or not (i >= 0 and i + n <= b.cap) or i ~= floor(i) then
      index_fail(b, i, n, name)
    end
    return ld(b.data + i)
  end
end

local function setter(name, n, st, lo, hi)
  return function(h, i, v)
    local b = live(h)
    if type(i) ~= "number" or not (i >= 0 and i + n <= b.cap) or i ~= floor(i) then
      index_fail(b, i, n, name)
    end
    if type(v) ~= "number" or not (v >= lo and v <= hi) or v ~= floor(v) then
      v = narrow_value(v, lo, hi)
    end
    st(b.data + i, v)
    return h
  end
end

local function setter64(name, st)
  return function(h, i, v)
    local b = live(h)
    if type(i) ~= "number" or not (i >= 0 and i + 8 <= b.cap) or i ~= floor(i) then
      index_fail(b, i, 8, name)
    end
    st(b.data + i, wide_value(v))
    return h
  end
end

local function reader(name, n, ld)
  return function(h)
    local b = live(h)
    local rd = b.rd
    if b.wr - rd < n then read_fail(b, n, name) end
    local v = ld(b.data + rd)
    b.rd = rd + n
    return v
  end
end

local function writer(name, n, st, lo, hi)
  return function(h, v)
    local b = live(h)
    if type(v) ~= "number" or not (v >= lo and v <= hi) or v ~= floor(v) then
      v = narrow_value(v, lo, hi)
    end
    local wr = b.wr
    if wr + n > b.cap and C.sl_ffi_buf_ensure_writable(h, n, errp) ~= 0 then
      grow_fail(b, n, name, ffi_string(errp[0]))
    end
    st(b.data + wr, v)
    b.wr = wr + n
    return h
  end
end

local function writer64(name, st)
  return function(h, v)
    local b = live(h)
    local x = wide_value(v)
    local wr = b.wr
    if wr + 8 > b.cap and C.sl_ffi_buf_ensure_writable(h, 8, errp) ~= 0 then
      grow_fail(b, 8, name, ffi_string(errp[0]))
    end
    st(b.data + wr, x)
    b.wr = wr + 8
    return h
  end
end

do
  methods.get_u8 = getter("get_u8", 1, ld_u8)
  methods.get_i8 = getter("get_i8", 1, ld_i8)
  methods.set_u8 = setter("set_u8", 1, st_8, -128, 255)
  methods.set_i8 = setter("set_i8", 1, st_8, -128, 255)
  methods.read_u8 = reader("read_u8", 1, ld_u8)
  methods.read_i8 = reader("read_i8", 1, ld_i8)
  methods.write_u8 = writer("write_u8", 1, st_8, -128, 255)
  methods.write_i8 = writer("write_i8", 1, st_8, -128, 255)
  -- Native order first: on a little-endian host le is native, be swapped.
  local order = ffi.abi("le") and { "le", "be" } or { "be", "le" }
  for _, w in ipairs({ 16, 32, 64 }) do
    for _, sign in ipairs({ "u", "i" }) do
      local t = sign .. w
      for k = 1, 2 do
        local sfx = t .. order[k]
        local ld, st = LD[t][k], ST[w][k]
        if w == 64 then
          methods["set_" .. sfx] = setter64("set_" .. sfx, st)
          methods["write_" .. sfx] = writer64("write_" .. sfx, st)
        else
          local lo, hi = -2 ^ (w - 1), 2 ^ w - 1
          methods["set_" .. sfx] = setter("set_" .. sfx, w / 8, st, lo, hi)
          methods["write_" .. sfx] = writer("write_" .. sfx, w / 8, st, lo, hi)
        end
        methods["get_" .. sfx] = getter("get_" .. sfx, w / 8, ld)
        methods["read_" .. sfx] = reader("read_" .. sfx, w / 8, ld)
      end
    end
  end
end

---------------------------------------------------------------------------
-- Sizes and indexes.

function methods.readable_bytes(h)
  local b = live(h)
  return b.wr - b.rd
end

function methods.writable_bytes(h)
  local b = live(h)
  return b.cap - b.wr
end

function methods.capacity(h)
  return live(h).cap
end

function methods.max_capacity(h)
  return live(h).max_cap
end

function methods.refcnt(h)
  local b = h.b
  if b.gen ~= h.gen then return 0 end
  return b.root.refcnt
end

-- reader_index() -> index; reader_index(i) -> h, 0 <= i <= writer index.
function methods.reader_index(h, i)
  local b = live(h)
  if i == nil then return b.rd end
  if type(i) ~= "number" or not (i >= 0 and i <= b.wr) or i ~= floor(i) then
    if not is_int(i) then error(not_int("index", i), 2) end
    error(s_format("index %s out of range: reader_index needs 0 <= index <= writer index %d",
                   num(i), b.wr), 2)
  end
  b.rd = i
  return h
end

-- writer_index() -> index; writer_index(i) -> h, reader index <= i <= capacity.
function methods.writer_index(h, i)
  local b = live(h)
  if i == nil then return b.wr end
  if type(i) ~= "number" or not (i >= b.rd and i <= b.cap) or i ~= floor(i) then
    if not is_int(i) then error(not_int("index", i), 2) end
    error(s_format("index %s out of range: writer_index needs reader index %d <= index <= "
                   .. "capacity %d", num(i), b.rd, b.cap), 2)
  end
  b.wr = i
  return h
end

-- Makes room for n more writable bytes: h, or nil, "out of buffer memory".
-- Raises when the buffer may not grow that far (max capacity) or at all (a
-- view, or a buffer that has views).
function methods.ensure_writable(h, n)
  local b = live(h)
  if type(n) ~= "number" or not (n >= 0 and n < huge) or n ~= floor(n) then
    count_fail("n", n)
  end
  if n <= b.cap - b.wr then return h end
  if n > MAX_CAPACITY then grow_fail(b, n, "ensure_writable", "exceeds max capacity") end
  if C.sl_ffi_buf_ensure_writable(h, n, errp) ~= 0 then
    local why = ffi_string(errp[0])
    if why == "out of buffer memory" then return nil, why end
    grow_fail(b, n, "ensure_writable", why)
  end
  return h
end

-- Moves the readable bytes to index 0 (reader index 0, writer index the
-- readable count). Bytes past the writer index are unspecified afterwards.
function methods.discard_read_bytes(h)
  local b = live(h)
  if b.rd ~= 0 and C.sl_ffi_buf_discard_read_bytes(h, errp) < 0 then
    error(ffi_string(errp[0]), 2)
  end
  return h
end

function methods.clear(h)
  local b = live(h)
  b.rd = 0
  b.wr = 0
  return h
end

---------------------------------------------------------------------------
-- Bytes.

function methods.skip(h, n)
  local b = live(h)
  if type(n) ~= "number" or not (n >= 0) or n ~= floor(n) then count_fail("n", n) end
  local rd = b.rd
  if b.wr - rd < n then read_fail(b, n, "skip") end
  b.rd = rd + n
  return h
end

-- The next n readable bytes as a Lua string (a copy); advances.
function methods.read_bytes(h, n)
  local b = live(h)
  if type(n) ~= "number" or not (n >= 0) or n ~= floor(n) then count_fail("n", n) end
  local rd = b.rd
  if b.wr - rd < n then read_fail(b, n, "read_bytes") end
  local s = ffi_string(b.data + rd, n)
  b.rd = rd + n
  return s
end

-- Appends a string, or a buffer's readable bytes (its indexes unchanged);
-- grows as write_* do. Returns h.
function methods.write_bytes(h, src)
  local b = live(h)
  local sb, n
  if type(src) == "string" then
    n = #src
  elseif type(src) == "cdata" and ffi_istype(lbuf_t, src) then
    sb = live(src)
    n = sb.wr - sb.rd
  else
    error(s_format("bad 'src' argument (string or buffer expected, got %s)", type(src)), 2)
  end
  local wr = b.wr
  if wr + n > b.cap and C.sl_ffi_buf_ensure_writable(h, n, errp) ~= 0 then
    grow_fail(b, n, "write_bytes", ffi_string(errp[0]))
  end
  local dst = b.data + wr
  if sb == nil then
    ffi_copy(dst, src, n)
  else
    local from = sb.data + sb.rd
    if from < dst + n and dst < from + n then
      -- The same memory (the buffer itself, a view of it): overlaps.
      ffi_copy(dst, ffi_string(from, n), n)
    else
      ffi_copy(dst, from, n)
    end
  end
  b.wr = wr + n
  return h
end

-- The absolute index of the first match of needle (a byte 0..255, or a
-- string) in [from, to) (defaults: reader index, writer index), or nil.
function methods.find(h, needle, from, to)
  local b = live(h)
  if from == nil then from = b.rd end
  if to == nil then to = b.wr end
  local p, n
  if type(needle) == "string" then
    p, n = needle, #needle
  elseif type(needle) == "number" then
    if not (needle >= 0 and needle <= 255) or needle ~= floor(needle) then
      error(s_format("bad 'needle' argument (byte 0..255 expected, got %s)", num(needle)), 2)
    end
    needle_byte[0] = needle
    p, n = needle_byte, 1
  else
    error(s_format("bad 'needle' argument (byte or string expected, got %s)", type(needle)), 2)
  end
  if not is_int(from) then error(not_int("from", from), 2) end
  if not is_int(to) then error(not_int("to", to), 2) end
  if not (from >= 0 and from <= to and to <= b.cap) then
    error(s_format("find: range [%s, %s) out of bounds (0 <= from <= to <= capacity %d)",
                   num(from), num(to), b.cap), 2)
  end
  local rc = C.sl_ffi_buf_find(h, from, to, p, n, atp, errp)
  if rc == 1 then return tonumber(atp[0]) end
  if rc == 0 then return nil end
  error(ffi_string(errp[0]), 2)
end

-- Whether the readable bytes equal other's (a buffer's readable bytes, or
-- a string).
function methods.equals(h, other)
  local b = live(h)
  local n = b.wr - b.rd
  local q
  if type(other) == "string" then
    if #other ~= n then return false end
    q = ffi_cast(cu8p, other)
  elseif type(other) == "cdata" and ffi_istype(lbuf_t, other) then
    local o = live(other)
    if o.wr - o.rd ~= n then return false end
    q = o.data + o.rd
  else
    error(s_format("bad 'other' argument (buffer or string expected, got %s)", type(other)), 2)
  end
  local p = b.data + b.rd
  for i = 0, n - 1 do
    if p[i] ~= q[i] then return false end
  end
  return true
end

-- A copy of len readable bytes starting offset bytes after the reader index
-- (defaults: all of them), as a Lua string. The buffer is not consumed.
function methods.tostring(h, offset, len)
  local b = live(h)
  local avail = b.wr - b.rd
  offset = offset or 0
  if len == nil and type(offset) == "number" then len = avail - offset end
  if type(offset) ~= "number" or type(len) ~= "number"
      or not (offset >= 0 and len >= 0 and offset + len <= avail)
      or offset ~= floor(offset) or len ~= floor(len) then
    error(("bad range: offset %s, length %s, readable bytes %d"):format(
      tostring(offset), tostring(len), avail), 2)
  end
  return ffi_string(b.data + b.rd + offset, len)
end

-- The readable bytes as `hexdump -C` shows them (offsets from the reader
-- index, 16 bytes a line, no trailing newline; "" when empty). For
-- debugging: it allocates.
function methods.hexdump(h)
  local b = live(h)
  local n = b.wr - b.rd
  local p = b.data + b.rd
  local lines, hex, asc = {}, {}, {}
  for off = 0, n - 1, 16 do
    local m = n - off
    if m > 16 then m = 16 end
    for k = 0, m - 1 do
      local c = p[off + k]
      hex[k + 1] = s_format(k == 7 and "%02x  " or "%02x ", c)
      asc[k + 1] = (c >= 32 and c < 127) and s_char(c) or "."
    end
    lines[#lines + 1] = s_format("%08x  %-49s |%s|", off, concat(hex, "", 1, m),
                                 concat(asc, "", 1, m))
  end
  return concat(lines, "\n")
end

---------------------------------------------------------------------------
-- Derived buffers.

-- index, len for slice/copy: both given, or neither (the readable bytes).
local function range_args(b, index, len, name)
  if index == nil and len == nil then return b.rd, b.wr - b.rd end
  if not is_int(index) then error(not_int("index", index), 3) end
  if not is_int(len) then error(not_int("len", len), 3) end
  if len < 0 then
    error(s_format("bad 'len' argument (non-negative integer expected, got %s)", num(len)), 3)
  end
  if not (index >= 0 and index + len <= b.cap) then
    error(s_format("%s: range [%s, %s) out of bounds (capacity %d)", name, num(index),
                   num(index + len), b.cap), 3)
  end
  return index, len
end

local function view(v, retained)
  if v == nil then return nil, ffi_string(errp[0]) end
  if retained then return ffi_gc(lbuf_t(v, v.gen, 1, 1), finalize) end
  return lbuf_t(v, v.gen, 0, 0)
end

-- slice(index, len): a view of [index, index + len) of the capacity (reader
-- index 0, writer index len); slice(): of the readable bytes. Shares memory
-- and refcount; its handle owns no reference. nil, err when out of memory.
function methods.slice(h, index, len)
  local b = live(h)
  index, len = range_args(b, index, len, "slice")
  return view(C.sl_ffi_buf_slice(h, index, len, 0, errp), false)
end

-- retained_slice(index, len) / retained_slice(): the same bytes as a derived
-- buffer: its own refcount, 1, owned by the new handle, and one reference on
-- h's buffer, released when the derived buffer's refcount reaches 0.
function methods.retained_slice(h, index, len)
  local b = live(h)
  index, len = range_args(b, index, len, "retained_slice")
  return view(C.sl_ffi_buf_slice(h, index, len, 1, errp), true)
end

-- A view of the next n readable bytes; advances the reader index.
function methods.read_slice(h, n)
  local b = live(h)
  if type(n) ~= "number" or not (n >= 0) or n ~= floor(n) then count_fail("n", n) end
  local rd = b.rd
  if b.wr - rd < n then read_fail(b, n, "read_slice") end
  local v, err = view(C.sl_ffi_buf_slice(h, rd, n, 0, errp), false)
  if v == nil then return nil, err end
  b.rd = rd + n
  return v
end

-- read_retained_slice(n): a derived buffer of the next n readable bytes
-- (as retained_slice); advances the reader index.
function methods.read_retained_slice(h, n)
  local b = live(h)
  if type(n) ~= "number" or not (n >= 0) or n ~= floor(n) then count_fail("n", n) end
  local rd = b.rd
  if b.wr - rd < n then read_fail(b, n, "read_retained_slice") end
  local v, err = view(C.sl_ffi_buf_slice(h, rd, n, 1, errp), true)
  if v == nil then return nil, err end
  b.rd = rd + n
  return v
end

-- A view of the whole capacity with the same indexes (its own from now on).
function methods.duplicate(h)
  live(h)
  return view(C.sl_ffi_buf_duplicate(h, 0, errp), false)
end

-- The same as a derived buffer (see retained_slice).
function methods.retained_duplicate(h)
  live(h)
  return view(C.sl_ffi_buf_duplicate(h, 1, errp), true)
end

-- copy(index, len) / copy(): a new buffer (the caller owns it) holding a copy
-- of [index, index + len) of the capacity, or of the readable bytes; reader
-- index 0, writer index len. nil, err when out of memory.
function methods.copy(h, index, len)
  local b = live(h)
  index, len = range_args(b, index, len, "copy")
  local c = C.sl_ffi_buf_copy(h, index, len, errp)
  if c == nil then return nil, ffi_string(errp[0]) end
  note_site(c, "buf:copy")
  return wrap(c)
end

-- touch(hint): records hint on the buffer for leak reports (from
-- leak_detection = "advanced" up, on recorded buffers). Returns the buffer.
function methods.touch(h, hint)
  local b = live(h)
  if band(b.root.flags, RECORDED) ~= 0 then
    C.sl_ffi_buf_touch(b, hint == nil and "buf:touch()" or tostring(hint))
  end
  return h
end

---------------------------------------------------------------------------
-- References.

local function bad_n(n)
  return type(n) ~= "number" or not (n >= 1 and n <= MAX_CAPACITY) or n ~= floor(n)
end

function methods.retain(h, n)
  n = n or 1
  if bad_n(n) then error("bad 'n' argument (positive number expected)", 2) end
  local b = h.b
  if b.gen ~= h.gen then error("refcnt 0, increment " .. n, 2) end
  if C.sl_ffi_buf_retain(b, n, errp) < 0 then error(ffi_string(errp[0]), 2) end
  if h.fin == 0 then
    ffi_gc(h, finalize)
    h.fin = 1
  end
  h.refs = h.refs + n
  return h
end

-- A handle releases only references it owns. A view from slice(),
-- read_slice() or duplicate() owns none: release the buffer through the
-- handle that owns the reference (or take the view retained).
function methods.release(h, n)
  n = n or 1
  if bad_n(n) then error("bad 'n' argument (positive number expected)", 2) end
  if foreign(h) then
    error(("release of a reference this handle does not own (decrement %d): the buffer was "
           .. "passed on, and the stage it went to owns it now"):format(n), 2)
  end
  local b = h.b
  if b.gen ~= h.gen then
    error("refcnt 0, decrement " .. n .. " (" .. released_by(h) .. ")", 2)
  end
  -- A handle releases only references it owns: after fire_read or write
  -- the reference belongs to whoever took it, who releases it in turn.
  local refcnt = b.root.refcnt
  if refcnt < n then error(("refcnt %d, decrement %d"):format(refcnt, n), 2) end
  local refs = h.refs
  if refs < n then
    error(("release of a reference this handle does not own (it owns %d, refcnt %d, "
           .. "decrement %d): was the buffer passed on?"):format(refs, b.root.refcnt, n), 2)
  end
  local where = nil
  if _M.where then
    local info = debug_getinfo(2, "Sl")
    where = info.short_src .. ":" .. info.currentline
  end
  local rc = C.sl_ffi_buf_release_by(b, n, _M.stage, where, errp)
  if rc < 0 then error(ffi_string(errp[0]), 2) end
  refs = refs - n
  h.refs = refs
  if refs == 0 and h.fin ~= 0 then
    ffi_gc(h, nil)
    h.fin = 0
  end
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

---------------------------------------------------------------------------
-- Creating buffers.

-- Raises (at the caller's caller) unless cap and max_cap are valid sizes.
function _M.check_caps(cap, max_cap)
  if type(cap) ~= "number" then error("bad 'cap' argument (number expected)", 3) end
  if not (cap >= 0 and cap <= MAX_CAPACITY) or cap ~= floor(cap) then
    error(s_format("bad 'cap' argument (integer in [0, %d] expected, got %s)", MAX_CAPACITY,
                   num(cap)), 3)
  end
  if max_cap ~= nil then
    if type(max_cap) ~= "number" or max_cap < cap then
      error("bad 'max_cap' argument (number >= cap expected)", 3)
    end
    if not (max_cap <= MAX_CAPACITY) or max_cap ~= floor(max_cap) then
      error(s_format("bad 'max_cap' argument (integer in [cap, %d] expected, got %s)",
                     MAX_CAPACITY, num(max_cap)), 3)
    end
  end
end

-- No buffer: because there is no pool here, or no memory.
local function no_buffer()
  if C.sl_ffi_leak_level() < 0 then return nil, "no buffer pool on this thread" end
  return nil, "out of buffer memory"
end

-- sluice.buf.alloc(cap [, max_cap]): a new, empty buffer from this worker's
-- pool; the caller owns it (inside a stage, its connection answers for it).
-- Returns nil, err when memory cannot be had.
function _M.alloc(cap, max_cap)
  _M.check_caps(cap, max_cap) -- raises at this function's caller
  local stage = _M.stage
  local b = stage and C.sl_ffi_ctx_alloc(stage, cap, max_cap or cap)
                  or C.sl_ffi_pool_alloc(cap, max_cap or cap)
  if b == nil then return no_buffer() end
  note_site(b, "sluice.buf.alloc")
  return wrap(b)
end

-- sluice.buf.from(str): a new buffer holding a copy of str; the caller owns it.
function _M.from(str)
  if type(str) ~= "string" then error("bad 'str' argument (string expected)", 2) end
  local stage = _M.stage
  local b = stage and C.sl_ffi_ctx_from(stage, str, #str) or C.sl_ffi_pool_from(str, #str)
  if b == nil then return no_buffer() end
  note_site(b, "sluice.buf.from")
  return wrap(b)
end

-- sluice.buf.outstanding([ctx]): buffers and bytes not yet released, in the
-- whole pool or answered for by ctx's connection. Test harnesses use it to
-- fail a test that leaks.
function _M.outstanding(ctx)
  local c, n = ffi.new("uint64_t[1]"), ffi.new("uint64_t[1]")
  if ctx ~= nil and ctx.cptr == nil then return 0, 0 end -- a closed connection
  if C.sl_ffi_buf_outstanding(ctx and ctx.cptr or nil, c, n) ~= 0 then
    return nil, "no buffer pool on this thread"
  end
  return tonumber(c[0]), tonumber(n[0])
end

function _M.is_buf(v)
  return type(v) == "cdata" and ffi_istype(lbuf_t, v)
end

_M.MAX_CAPACITY = MAX_CAPACITY
_M.methods = methods
return _M
