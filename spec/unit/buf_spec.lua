-- The buffer API (sluice.buf handles): sizes and indexes, typed access at
-- absolute and reader/writer indexes, bytes, derived buffers and the rules
-- for their references; in-process against the real core (SLUICE_CORE_LIB).
local ffi = require("ffi")
local sluice = require("sluice")
local pool, buf = sluice.pool, sluice.buf

local TYPES = { -- name, width
  { "u8", 1 }, { "i8", 1 },
  { "u16be", 2 }, { "u16le", 2 }, { "i16be", 2 }, { "i16le", 2 },
  { "u32be", 4 }, { "u32le", 4 }, { "i32be", 4 }, { "i32le", 4 },
  { "u64be", 8 }, { "u64le", 8 }, { "i64be", 8 }, { "i64le", 8 },
}

-- Everything about a buffer a failed call must leave alone.
local function state(b)
  local h = b.b
  return { bytes = ffi.string(h.data, h.cap), rd = h.rd, wr = h.wr, cap = h.cap,
           max = h.max_cap, data = tonumber(ffi.cast("uintptr_t", h.data)) }
end

-- The message of the error fn raises, without its position, and the position.
local function raised(fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error")
  local where, msg = tostring(err):match("^(.-:%d+): (.*)$")
  return msg or err, where
end

-- A root of n bytes 0x00, 0x01, ... with writer index n.
local function counting(n, max)
  local b = buf.alloc(n, max)
  for i = 0, n - 1 do b:write_u8(i % 256) end
  return b
end

local H = require("helpers")

describe("sluice.buf access", function()
  H.with_pool() -- every spec ends with the pool where it started

  -- Sizes and indexes ------------------------------------------------------

  it("reports sizes: #buf, readable_bytes, writable_bytes, capacity, max_capacity", function()
    local b = buf.alloc(16, 100)
    assert.are.equal(16, b:capacity())
    assert.are.equal(100, b:max_capacity())
    assert.are.same({ 0, 0, 16 }, { #b, b:readable_bytes(), b:writable_bytes() })
    b:write_bytes("abcde"):skip(2)
    assert.are.same({ 3, 3, 11 }, { #b, b:readable_bytes(), b:writable_bytes() })
    local small = buf.alloc(12) -- at least cap; max_cap (default cap) bounds it
    assert.are.same({ 12, 12 }, { small:capacity(), small:max_capacity() })
    small:release()
    assert.are.same({ 2, 5 }, { b:reader_index(), b:writer_index() })
    b:release()
  end)

  it("sets the reader and writer indexes within 0 <= reader <= writer <= capacity", function()
    local b = counting(8)
    b:ensure_writable(0)
    assert.are.equal(b, b:reader_index(3))
    assert.are.equal(3, b:reader_index())
    assert.are.equal(b, b:writer_index(b:capacity()))
    assert.are.equal(b:capacity(), b:writer_index())
    b:writer_index(3)
    assert.are.equal(0, #b)
    b:reader_index(0):writer_index(8)
    assert.are.equal("\0\1\2\3\4\5\6\7", b:tostring())
    b:release()
  end)

  it("refuses indexes out of order with the bounds, changing nothing", function()
    local b = buf.alloc(12)
    b:write_bytes("abcdefgh"):skip(2)
    local s = state(b)
    assert.are.equal("index 9 out of range: reader_index needs 0 <= index <= writer index 8",
                     raised(b.reader_index, b, 9))
    assert.are.equal("index -1 out of range: reader_index needs 0 <= index <= writer index 8",
                     raised(b.reader_index, b, -1))
    assert.are.equal("index 13 out of range: writer_index needs reader index 2 <= index <= "
                     .. "capacity 12", raised(b.writer_index, b, 13))
    assert.are.equal("index 1 out of range: writer_index needs reader index 2 <= index <= "
                     .. "capacity 12", raised(b.writer_index, b, 1))
    assert.are.equal("bad 'index' argument (number expected, got string)",
                     raised(b.reader_index, b, "1"))
    assert.are.equal("bad 'index' argument (integer expected, got 1.5)",
                     raised(b.writer_index, b, 1.5))
    assert.are.equal("bad 'index' argument (integer expected, got nan)",
                     raised(b.writer_index, b, 0 / 0))
    assert.are.same(s, state(b))
    b:release()
  end)

  it("ensure_writable grows within max capacity, moving the bytes to a larger block", function()
    local b = buf.alloc(16, 1000)
    b:write_bytes("0123456789abcdef"):skip(3)
    local before = state(b)
    local blocks = pool.stats().blocks_in_use
    assert.are.equal(b, b:ensure_writable(100))
    assert.is_true(b:writable_bytes() >= 100)
    assert.is_true(b:capacity() <= 1000)
    assert.are.equal(1000, b:max_capacity())
    assert.are_not.equal(before.data, state(b).data) -- a larger pooled block
    assert.are.equal(blocks, pool.stats().blocks_in_use) -- the old one went back
    assert.are.same({ 3, 16 }, { b:reader_index(), b:writer_index() })
    assert.are.equal("3456789abcdef", b:tostring())
    assert.are.equal("012", ffi.string(b.b.data, 3)) -- bytes before the reader index too
    assert.are.equal(b, b:ensure_writable(0))
    b:release()
  end)

  it("ensure_writable refuses beyond max capacity, on views and on buffers with views", function()
    local b = buf.alloc(16, 32)
    b:write_bytes(("x"):rep(16))
    local s = state(b)
    assert.are.equal("ensure_writable: 17 bytes needed, 0 writable (writer index 16, capacity 16, "
                     .. "max capacity 32): exceeds max capacity", raised(b.ensure_writable, b, 17))
    assert.are.equal("ensure_writable: 1099511627776 bytes needed, 0 writable (writer index 16, "
                     .. "capacity 16, max capacity 32): exceeds max capacity",
                     raised(b.ensure_writable, b, 2 ^ 40))
    assert.are.equal("bad 'n' argument (non-negative integer expected, got -1)",
                     raised(b.ensure_writable, b, -1))
    assert.are.equal("bad 'n' argument (number expected, got string)",
                     raised(b.ensure_writable, b, "1"))
    assert.are.equal("bad 'n' argument (integer expected, got inf)",
                     raised(b.ensure_writable, b, math.huge))
    assert.are.same(s, state(b))
    local v = b:slice(0, 4)
    assert.are.equal("ensure_writable: 1 byte needed, 0 writable (writer index 4, capacity 4, "
                     .. "max capacity 4): a view cannot grow", raised(v.ensure_writable, v, 1))
    assert.are.equal("ensure_writable: 1 byte needed, 0 writable (writer index 16, capacity 16, "
                     .. "max capacity 32): a buffer with views cannot grow",
                     raised(b.ensure_writable, b, 1))
    assert.are.same(s, state(b))
    b:clear()
    assert.are.equal(b, b:ensure_writable(16)) -- room enough: nothing to grow
    b:release()
  end)

  it("discard_read_bytes moves the readable bytes to index 0", function()
    local b = buf.alloc(16)
    b:write_bytes("headerPAYLOAD")
    b:skip(6)
    assert.are.equal(b, b:discard_read_bytes())
    assert.are.same({ 0, 7 }, { b:reader_index(), b:writer_index() })
    assert.are.equal("PAYLOAD", b:tostring())
    assert.are.equal(9, b:writable_bytes())
    b:discard_read_bytes() -- nothing read: nothing moves
    assert.are.equal("PAYLOAD", b:tostring())
    b:skip(7):discard_read_bytes()
    assert.are.same({ 0, 0 }, { b:reader_index(), b:writer_index() })
    b:release()
  end)

  it("clear sets both indexes to 0 and leaves the bytes", function()
    local b = buf.from("abc")
    b:skip(1)
    assert.are.equal(b, b:clear())
    assert.are.same({ 0, 0, 3 }, { b:reader_index(), b:writer_index(), b:writable_bytes() })
    assert.are.equal("abc", ffi.string(b.b.data, 3))
    b:release()
  end)

  -- Typed access -----------------------------------------------------------

  it("round-trips u8 and i8 through get/set and read/write, negative i8 included", function()
    local b = buf.alloc(8)
    b:write_u8(0):write_u8(255):write_i8(-1):write_i8(-128):write_i8(127):write_u8(0x80)
    assert.are.equal("\0\255\255\128\127\128", b:tostring())
    assert.are.same({ 0, 255, 255, 128, 127, 128 },
                    { b:get_u8(0), b:get_u8(1), b:get_u8(2), b:get_u8(3), b:get_u8(4),
                      b:get_u8(5) })
    assert.are.same({ 0, -1, -1, -128, 127, -128 },
                    { b:get_i8(0), b:get_i8(1), b:get_i8(2), b:get_i8(3), b:get_i8(4),
                      b:get_i8(5) })
    assert.are.same({ 0, 255, -1, -128 }, { b:read_u8(), b:read_u8(), b:read_i8(), b:read_i8() })
    assert.are.equal(b, b:set_u8(6, 200):set_i8(7, -56))
    assert.are.same({ 200, 200, -56, -56 }, { b:get_u8(6), b:get_u8(7), b:get_i8(6), b:get_i8(7) })
    b:release()
  end)

  it("round-trips u16 and i16 big and little endian, in that byte order", function()
    local b = buf.alloc(64)
    for _, v in ipairs({ 0, 1, 0x1234, 0x8000, 0xffff }) do
      b:clear()
      b:write_u16be(v):write_u16le(v)
      assert.are.equal(string.char(math.floor(v / 256), v % 256, v % 256, math.floor(v / 256)),
                       b:tostring())
      assert.are.same({ v, v }, { b:get_u16be(0), b:get_u16le(2) })
      assert.are.same({ v, v }, { b:read_u16be(), b:read_u16le() })
      b:set_u16le(0, v):set_u16be(2, v)
      assert.are.same({ v, v }, { b:get_u16le(0), b:get_u16be(2) })
    end
    for _, v in ipairs({ 0, -1, -2, -32768, 32767, 0x1234 }) do
      b:clear()
      b:write_i16be(v):write_i16le(v)
      assert.are.same({ v, v }, { b:get_i16be(0), b:get_i16le(2) })
      assert.are.same({ v, v }, { b:read_i16be(), b:read_i16le() })
      b:set_i16le(4, v):set_i16be(6, v)
      assert.are.same({ v, v }, { b:get_i16le(4), b:get_i16be(6) })
      assert.are.equal(v % 65536, b:get_u16be(0))
    end
    b:clear():write_i16be(-2)
    assert.are.equal("\255\254", b:tostring())
    b:release()
  end)

  it("round-trips u32 and i32 big and little endian, in that byte order", function()
    local b = buf.alloc(64)
    for _, v in ipairs({ 0, 1, 0x01020304, 0xdeadbeef, 2 ^ 31, 2 ^ 32 - 1 }) do
      b:clear()
      b:write_u32be(v):write_u32le(v)
      assert.are.same({ v, v }, { b:get_u32be(0), b:get_u32le(4) })
      assert.are.same({ v, v }, { b:read_u32be(), b:read_u32le() })
      b:set_u32le(8, v):set_u32be(12, v)
      assert.are.same({ v, v }, { b:get_u32le(8), b:get_u32be(12) })
    end
    b:clear():write_u32be(0x01020304):write_u32le(0x01020304)
    assert.are.equal("\1\2\3\4\4\3\2\1", b:tostring())
    for _, v in ipairs({ 0, -1, -2 ^ 31, 2 ^ 31 - 1, -123456789, 123456789 }) do
      b:clear()
      b:write_i32be(v):write_i32le(v)
      assert.are.same({ v, v }, { b:get_i32be(0), b:get_i32le(4) })
      assert.are.same({ v, v }, { b:read_i32be(), b:read_i32le() })
      b:set_i32le(8, v):set_i32be(12, v)
      assert.are.same({ v, v }, { b:get_i32le(8), b:get_i32be(12) })
      assert.are.equal(v % 2 ^ 32, b:get_u32be(0))
    end
    b:release()
  end)

  it("round-trips u64 and i64 exactly as 64-bit cdata, above 2^53 and negative", function()
    local b = buf.alloc(64)
    local u = { 0ULL, 1ULL, 9007199254740993ULL, 0x0102030405060708ULL, 0xfedcba9876543210ULL,
                0xffffffffffffffffULL }
    for _, v in ipairs(u) do
      b:clear()
      b:write_u64be(v):write_u64le(v)
      local x, y = b:get_u64be(0), b:get_u64le(8)
      assert.is_true(ffi.istype("uint64_t", x) and ffi.istype("uint64_t", y))
      assert.are.equal(tostring(v), tostring(x))
      assert.are.equal(tostring(v), tostring(y))
      assert.are.equal(tostring(v), tostring(b:read_u64be()))
      assert.are.equal(tostring(v), tostring(b:read_u64le()))
      b:set_u64le(16, v):set_u64be(24, v)
      assert.are.equal(tostring(v), tostring(b:get_u64le(16)))
      assert.are.equal(tostring(v), tostring(b:get_u64be(24)))
    end
    b:clear():write_u64be(0x0102030405060708ULL):write_u64le(0x0102030405060708ULL)
    assert.are.equal("\1\2\3\4\5\6\7\8\8\7\6\5\4\3\2\1", b:tostring())
    local i = { 0LL, -1LL, -9223372036854775807LL - 1, 9223372036854775807LL,
                -9007199254740993LL, 0x0102030405060708LL }
    for _, v in ipairs(i) do
      b:clear()
      b:write_i64be(v):write_i64le(v)
      local x = b:get_i64be(0)
      assert.is_true(ffi.istype("int64_t", x))
      assert.are.equal(tostring(v), tostring(x))
      assert.are.equal(tostring(v), tostring(b:get_i64le(8)))
      assert.are.equal(tostring(v), tostring(b:read_i64be()))
      assert.are.equal(tostring(v), tostring(b:read_i64le()))
      b:set_i64le(16, v):set_i64be(24, v)
      assert.are.equal(tostring(v), tostring(b:get_i64le(16)))
      assert.are.equal(tostring(v), tostring(b:get_i64be(24)))
    end
    -- Lua numbers too, negative and at or above 2^63 included.
    b:clear():write_u64be(-1):write_i64le(2 ^ 63):write_u64le(2 ^ 53):write_i64be(-2 ^ 63)
    assert.are.equal("18446744073709551615ULL", tostring(b:read_u64be()))
    assert.are.equal("-9223372036854775808LL", tostring(b:read_i64le()))
    assert.are.equal("9007199254740992ULL", tostring(b:read_u64le()))
    assert.are.equal("9223372036854775808ULL", tostring(b:read_u64be()))
    b:release()
  end)

  it("setters take the signed and unsigned range of their width, or 64-bit cdata", function()
    local b = buf.alloc(16)
    b:set_u8(0, -1):set_i8(1, 255):set_u16be(2, -1):set_u32le(4, -2 ^ 31):set_i32be(8, 2 ^ 32 - 1)
    assert.are.same({ 255, -1, 0xffff, 2 ^ 31, -1 },
                    { b:get_u8(0), b:get_i8(1), b:get_u16be(2), b:get_u32le(4), b:get_i32be(8) })
    b:set_u16le(0, 513ULL):set_i32le(4, -5LL):set_u8(8, 7ULL)
    assert.are.same({ 513, -5, 7 }, { b:get_u16le(0), b:get_i32le(4), b:get_u8(8) })
    local s = state(b)
    assert.are.equal("bad 'value' argument (integer in [-128, 255] expected, got 256)",
                     raised(b.set_u8, b, 0, 256))
    assert.are.equal("bad 'value' argument (integer in [-32768, 65535] expected, got -32769)",
                     raised(b.set_i16le, b, 0, -32769))
    assert.are.equal("bad 'value' argument (integer in [-2147483648, 4294967295] expected, "
                     .. "got 1.5)",
                     raised(b.set_u32be, b, 0, 1.5))
    assert.are.equal("bad 'value' argument (integer in [-2147483648, 4294967295] expected, "
                     .. "got nan)",
                     raised(b.write_u32be, b, 0 / 0))
    assert.are.equal("bad 'value' argument (integer in [-128, 255] expected, got 256ULL)",
                     raised(b.set_u8, b, 0, 256ULL))
    assert.are.equal("bad 'value' argument (integer in [-128, 255] expected, got -129LL)",
                     raised(b.write_i8, b, -129LL))
    assert.are.equal("bad 'value' argument (integer expected, got string)",
                     raised(b.set_u16be, b, 0, "1"))
    assert.are.equal("bad 'value' argument (integer expected, got nil)", raised(b.write_u8, b))
    assert.are.equal("bad 'value' argument (integer expected, got cdata)",
                     raised(b.set_u8, b, 0, ffi.new("double", 1)))
    assert.are.equal("bad 'value' argument (integer in [-2^63, 2^64) expected, got 1.5)",
                     raised(b.set_u64be, b, 0, 1.5))
    assert.are.equal("bad 'value' argument (integer in [-2^63, 2^64) expected, "
                     .. "got 1.844674407371e+19)",
                     raised(b.write_i64le, b, 2 ^ 64))
    assert.are.equal("bad 'value' argument (number or 64-bit integer cdata expected, got string)",
                     raised(b.set_i64be, b, 0, "1"))
    assert.are.same(s, state(b))
    b:release()
  end)

  it("write_* grows the buffer within max capacity, as Netty's writeInt does", function()
    local b = buf.alloc(4, 4096)
    b:write_u32be(1)
    local blocks = pool.stats().blocks_in_use
    for k = 2, 300 do b:write_u32be(k) end
    assert.are.equal(1200, #b)
    assert.is_true(b:capacity() >= 1200 and b:capacity() <= 4096)
    assert.are.equal(blocks, pool.stats().blocks_in_use)
    for k = 1, 300 do assert.are.equal(k, b:read_u32be()) end
    b:write_u64le(7ULL):write_u16be(1):write_u8(1):write_bytes(("z"):rep(100))
    assert.are.equal(111, #b)
    b:release()
  end)

  -- Bytes --------------------------------------------------------------------

  it("read_bytes returns a string and advances; write_bytes appends a string", function()
    local b = buf.alloc(8, 64)
    assert.are.equal(b, b:write_bytes("hello, "):write_bytes("world\0!"))
    assert.are.equal(14, #b)
    assert.are.equal("hello", b:read_bytes(5))
    assert.are.equal("", b:read_bytes(0))
    assert.are.equal(", world\0!", b:read_bytes(9))
    assert.are.equal(0, #b)
    assert.are.equal("read_bytes: 1 byte needed, 0 readable (reader index 14, writer index 14)",
                     raised(b.read_bytes, b, 1))
    assert.are.equal("bad 'n' argument (non-negative integer expected, got -1)",
                     raised(b.read_bytes, b, -1))
    assert.are.equal("bad 'src' argument (string or buffer expected, got number)",
                     raised(b.write_bytes, b, 1))
    local cap = b:capacity() -- at least 14 (one size class, or grown)
    assert.are.equal(("write_bytes: 51 bytes needed, %d writable (writer index 14, capacity %d, "
                      .. "max capacity 64): exceeds max capacity"):format(cap - 14, cap),
                     raised(b.write_bytes, b, ("x"):rep(51)))
    b:release()
  end)

  it("write_bytes appends a buffer's readable bytes without moving its indexes", function()
    local src = buf.from("..payload..")
    src:skip(2):writer_index(9)
    local dst = buf.alloc(4, 64)
    dst:write_bytes("<"):write_bytes(src):write_bytes(">")
    assert.are.equal("<payload>", dst:tostring())
    assert.are.same({ 2, 9 }, { src:reader_index(), src:writer_index() })
    dst:write_bytes(dst) -- itself: the readable bytes as they were
    assert.are.equal("<payload><payload>", dst:tostring())
    local v = dst:slice(1, 7)
    local d2 = buf.alloc(64)
    d2:write_bytes(v)
    assert.are.equal("payload", d2:tostring())
    dst:writer_index(1):write_bytes(v) -- overlapping: its own memory
    assert.are.equal("<payload", dst:tostring())
    local o = buf.alloc(16)
    o:write_bytes("01234567")
    local whole = o:duplicate() -- [0, 8) of the same memory
    o:writer_index(4):write_bytes(whole) -- into [4, 12): overlaps its source
    assert.are.equal("012301234567", o:tostring())
    o:release()
    src:release()
    dst:release()
    d2:release()
  end)

  it("skip advances the reader index and refuses to pass the writer index", function()
    local b = buf.from("abcdef")
    assert.are.equal(b, b:skip(2))
    assert.are.equal("cdef", b:tostring())
    b:skip(0)
    local s = state(b)
    assert.are.equal("skip: 5 bytes needed, 4 readable (reader index 2, writer index 6)",
                     raised(b.skip, b, 5))
    assert.are.equal("bad 'n' argument (integer expected, got 0.5)", raised(b.skip, b, 0.5))
    assert.are.equal("bad 'n' argument (number expected, got nil)", raised(b.skip, b))
    assert.are.same(s, state(b))
    b:skip(4)
    assert.are.equal(0, #b)
    b:release()
  end)

  it("find locates a byte or a string in [from, to), by default the readable bytes", function()
    local b = buf.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.are.equal(14, b:find(13))
    assert.are.equal(14, b:find("\r\n"))
    assert.are.equal(23, b:find("\r\n\r\n"))
    assert.are.equal(3, b:find(" "))
    assert.are.equal(5, b:find(" ", 4))
    assert.is_nil(b:find(" ", 6, 14))
    assert.are.equal(16, b:find("Host", 0, 20))
    assert.is_nil(b:find("Host", 0, 19)) -- the match must end before to
    assert.is_nil(b:find("zz"))
    assert.are.equal(0, b:find(""))
    b:skip(4) -- absolute indexes; the default range starts at the reader index
    assert.are.equal(5, b:find(" "))
    assert.is_nil(b:find("GET"))
    assert.are.equal(0, b:find("GET", 0))
    b:writer_index(10)
    assert.is_nil(b:find("\r")) -- ... and ends at the writer index
    assert.are.equal(14, b:find("\r", 4, b:capacity()))
    assert.are.equal("find: range [10, 5) out of bounds (0 <= from <= to <= capacity 27)",
                     raised(b.find, b, "x", 10, 5))
    assert.are.equal("find: range [0, 28) out of bounds (0 <= from <= to <= capacity 27)",
                     raised(b.find, b, "x", 0, 28))
    assert.are.equal("find: range [-1, 10) out of bounds (0 <= from <= to <= capacity 27)",
                     raised(b.find, b, "x", -1))
    assert.are.equal("bad 'from' argument (integer expected, got 1.5)", raised(b.find, b, "x", 1.5))
    assert.are.equal("bad 'to' argument (number expected, got string)",
                     raised(b.find, b, "x", 1, "9"))
    assert.are.equal("bad 'needle' argument (byte 0..255 expected, got 256)",
                     raised(b.find, b, 256))
    assert.are.equal("bad 'needle' argument (byte or string expected, got table)",
                     raised(b.find, b, {}))
    b:release()
  end)

  it("equals compares the readable bytes with a buffer's or a string", function()
    local a, b = buf.from("xxhello"), buf.from("hello!")
    a:skip(2)
    assert.is_false(a:equals(b))
    b:writer_index(5)
    assert.is_true(a:equals(b))
    assert.is_true(b:equals(a))
    assert.is_true(a:equals("hello"))
    assert.is_false(a:equals("hellp"))
    assert.is_false(a:equals("hell"))
    b:set_u8(4, 0x21)
    assert.is_false(a:equals(b))
    a:skip(5)
    assert.is_true(a:equals(""))
    assert.are.equal("bad 'other' argument (buffer or string expected, got nil)",
                     raised(a.equals, a))
    a:release()
    b:release()
  end)

  it("hexdump shows the readable bytes as hexdump -C does", function()
    local b = buf.from("..0123456789abcdefXY\0\n")
    b:skip(2)
    assert.are.equal(
      "00000000  30 31 32 33 34 35 36 37  38 39 61 62 63 64 65 66  |0123456789abcdef|\n"
      .. "00000010  58 59 00 0a                                       |XY..|", b:hexdump())
    b:reader_index(2):writer_index(10)
    assert.are.equal("00000000  30 31 32 33 34 35 36 37                           |01234567|",
                     b:hexdump())
    b:clear()
    assert.are.equal("", b:hexdump())
    b:release()
  end)

  it("tostring stays relative to the reader index and refuses bad ranges", function()
    local b = buf.from("xxhello")
    b:skip(2)
    assert.are.equal("hello", b:tostring())
    assert.are.equal("ell", b:tostring(1, 3))
    assert.are.equal("llo", b:tostring(2))
    assert.are.equal("bad range: offset 1, length 5, readable bytes 5", raised(b.tostring, b, 1, 5))
    -- NaN once went through the check and read far outside the buffer.
    assert.are.equal("bad range: offset nan, length 1, readable bytes 5",
                     raised(b.tostring, b, 0 / 0, 1))
    assert.are.equal("bad range: offset 0, length nan, readable bytes 5",
                     raised(b.tostring, b, 0, 0 / 0))
    assert.are.equal("bad range: offset 0.5, length 1, readable bytes 5",
                     raised(b.tostring, b, 0.5, 1))
    b:release()
  end)

  -- Derived buffers ------------------------------------------------------------

  it("slice shares memory and refcount with its buffer", function()
    local b = counting(16)
    local v = b:slice(4, 8)
    assert.are.same({ 0, 8, 8, 8 }, { v:reader_index(), v:writer_index(), v:capacity(), #v })
    assert.are.equal(8, v:max_capacity())
    assert.are.equal(4, v:get_u8(0))
    v:set_u8(0, 0xaa) -- write through the view, read through the buffer
    assert.are.equal(0xaa, b:get_u8(4))
    b:set_u32be(8, 0x01020304) -- and the other way round
    assert.are.equal(0x01020304, v:get_u32be(4))
    assert.are.equal(1, v:refcnt())
    b:retain()
    assert.are.equal(2, v:refcnt())
    b:release()
    local w = v:slice(2, 4) -- a view of a view: the same memory, the same count
    w:set_u8(0, 0xbb)
    assert.are.equal(0xbb, b:get_u8(6))
    assert.are.equal(1, w:refcnt())
    assert.are.equal(1, b:refcnt())
    b:release()
  end)

  it("slice() defaults to the readable bytes and checks its range", function()
    local b = buf.alloc(12)
    b:write_bytes("abcdefgh"):skip(3)
    local v = b:slice()
    assert.are.equal("defgh", v:tostring())
    assert.are.equal(5, v:capacity())
    v = b:slice(10, 2) -- past the writer index, within the capacity
    assert.are.equal(2, #v)
    local s = state(b)
    assert.are.equal("slice: range [10, 15) out of bounds (capacity 12)", raised(b.slice, b, 10, 5))
    assert.are.equal("slice: range [-1, 1) out of bounds (capacity 12)", raised(b.slice, b, -1, 2))
    assert.are.equal("bad 'len' argument (non-negative integer expected, got -1)",
                     raised(b.slice, b, 0, -1))
    assert.are.equal("bad 'len' argument (number expected, got nil)", raised(b.slice, b, 1))
    assert.are.equal("bad 'index' argument (integer expected, got nan)",
                     raised(b.slice, b, 0 / 0, 1))
    assert.are.equal("retained_slice: range [0, 13) out of bounds (capacity 12)",
                     raised(b.retained_slice, b, 0, 13))
    assert.are.same(s, state(b))
    assert.are.equal(1, b:refcnt())
    b:release()
  end)

  it("read_slice gives a view of the next n readable bytes and advances", function()
    local b = buf.from("\0\5hello\0\3abc")
    local n = b:read_u16be()
    local body = b:read_slice(n)
    assert.are.equal("hello", body:tostring())
    assert.are.equal(7, b:reader_index())
    body:set_u8(0, 0x48) -- the same memory
    assert.are.equal("Hello", ffi.string(b.b.data + 2, 5))
    assert.are.equal("read_slice: 6 bytes needed, 5 readable (reader index 7, writer index 12)",
                     raised(b.read_slice, b, 6))
    assert.are.equal(7, b:reader_index())
    local e = b:read_slice(0)
    assert.are.equal(0, #e)
    b:release()
  end)

  it("duplicate shares the whole capacity with the same indexes, then has its own", function()
    local b = buf.alloc(16)
    b:write_bytes("abcdef"):skip(2)
    local d = b:duplicate()
    assert.are.same({ 2, 6, 16 }, { d:reader_index(), d:writer_index(), d:capacity() })
    assert.are.equal("cdef", d:read_bytes(4))
    assert.are.equal(2, b:reader_index()) -- its own indexes
    d:write_bytes("gh")
    assert.are.equal(6, b:writer_index())
    assert.are.equal("gh", ffi.string(b.b.data + 6, 2)) -- shared memory
    assert.are.equal(1, d:refcnt())
    b:release()
  end)

  it("retained_slice and retained_duplicate are derived buffers: own refcount, one reference on the buffer", function()
    local b = buf.from("0123456789")
    local v = b:retained_slice(2, 3)
    assert.are.same({ 2, 1 }, { b:refcnt(), v:refcnt() })
    local d = b:retained_duplicate()
    assert.are.same({ 3, 1 }, { b:refcnt(), d:refcnt() })
    local r = b:retained_slice() -- the readable bytes
    assert.are.same({ 4, 1 }, { b:refcnt(), r:refcnt() })
    assert.are.same({ 1, 1, 1, 1 }, { b.refs, v.refs, d.refs, r.refs })
    v:retain() -- its own count: the buffer's does not move
    assert.are.same({ 4, 2 }, { b:refcnt(), v:refcnt() })
    assert.is_false(v:release())
    assert.is_false(b:release()) -- the parent handle lets go first
    assert.are.equal("234", v:tostring()) -- the derived buffers keep the memory
    assert.are.equal("0123456789", d:tostring())
    assert.is_true(v:release()) -- v is gone; the buffer stays for d and r
    assert.has_error(function() return #v end)
    assert.are.equal("0123456789", r:tostring())
    assert.is_true(r:release())
    assert.are.equal(1, d:refcnt())
    local blocks = pool.stats().blocks_in_use
    assert.is_true(d:release()) -- the last: the memory goes back
    assert.are.equal(blocks - 1, pool.stats().blocks_in_use)
  end)

  it("read_retained_slice gives a derived buffer of the next n readable bytes and advances", function()
    local b = buf.from("headbodytail")
    b:skip(4)
    local body = b:read_retained_slice(4)
    assert.are.same({ "body", 8, 2, 1 }, { body:tostring(), b:reader_index(), b:refcnt(), body:refcnt() })
    assert.are.equal("read_retained_slice: 5 bytes needed, 4 readable (reader index 8, writer index 12)",
                     raised(b.read_retained_slice, b, 5))
    local v = body:slice(1, 2) -- a view of the derived buffer shares its count
    assert.are.same({ "od", 1 }, { v:tostring(), v:refcnt() })
    assert.is_false(b:release())
    assert.are.equal("body", body:tostring())
    assert.is_true(body:release())
    assert.matches("^buffer used after release", raised(v.get_u8, v, 0))
  end)

  it("a derived buffer passed on gives its own reference away", function()
    local b = buf.from("abcdef")
    local d = b:retained_slice(0, 3)
    assert.are.equal(d.b, buf.give(d))
    assert.are.equal("buffer passed on twice: this handle no longer owns a reference (refcnt 1)",
                     raised(function() return buf.give(d) end))
    -- what took it releases it
    local err = require("ffi").new("const char *[1]")
    assert.are.equal(1, require("sluice.core").sl_ffi_buf_release(d.b, 1, err))
    assert.are.equal(1, b:refcnt())
    b:release()
  end)

  it("write_bytes from a derived buffer into its own buffer copies overlapping bytes safely", function()
    local b = buf.alloc(8, 32)
    b:write_bytes("abcdefgh")
    b:skip(2)
    local d = b:retained_slice(0, 8)
    b:writer_index(4)
    b:write_bytes(d) -- d's readable bytes [0, 8) onto [4, 12): overlapping memory
    assert.are.equal("cdabcdefgh", b:tostring())
    d:release()
    b:release()
  end)

  it("copy is an independent new buffer the caller owns", function()
    local b = buf.alloc(16, 64)
    b:write_bytes("xxpayload"):skip(2)
    local blocks = pool.stats().blocks_in_use
    local c = b:copy()
    assert.are.equal(blocks + 1, pool.stats().blocks_in_use)
    assert.are.same({ 0, 7, "payload" }, { c:reader_index(), c:writer_index(), c:tostring() })
    assert.are.equal(64, c:max_capacity())
    assert.are.equal(1, c:refcnt())
    assert.are.equal(1, b:refcnt())
    c:set_u8(0, 0x50)
    assert.are.equal("payload", b:tostring())
    local part = b:copy(0, 4)
    assert.are.equal("xxpa", part:tostring())
    local tail = b:copy(9, 7) -- beyond the writer index, within the capacity
    assert.are.equal(7, #tail)
    assert.are.equal("copy: range [10, 20) out of bounds (capacity 16)", raised(b.copy, b, 10, 10))
    assert.is_true(b:release())
    assert.are.equal("Payload", c:tostring()) -- outlives its source
    c:release()
    part:release()
    tail:release()
  end)

  it("a view from slice or duplicate owns no reference: release it through its owner", function()
    local b = buf.from("abcdef")
    local v, d, r = b:slice(1, 2), b:duplicate(), b:read_slice(3)
    assert.are.same({ 0, 0, 0 }, { v.refs, d.refs, r.refs })
    for _, view in ipairs({ v, d, r }) do
      assert.are.equal("release of a reference this handle does not own (it owns 0, refcnt 1, "
                       .. "decrement 1): was the buffer passed on?", raised(view.release, view))
    end
    assert.are.equal("view passed on without a reference: this handle owns none (slice() and "
                     .. "duplicate() own none; use retained_slice(), retained_duplicate() or "
                     .. "retain()) (refcnt 1)", raised(buf.give, v))
    assert.are.equal(1, b:refcnt())
    v:retain() -- a view that retains owns what it retained
    assert.are.equal(2, b:refcnt())
    assert.is_false(v:release())
    assert.is_true(b:release())
  end)

  it("has_views is the flag, whatever a root without views keeps in the field", function()
    for _, n in ipairs({ 100, 5000, 40000 }) do -- a small class, a cached and an uncached normal one
      local b = buf.alloc(n, 2 * n)
      assert.is_false(buf.has_views(b.b))
      assert.is_true(b:ensure_writable(n + 1) == b) -- grows into another block
      assert.is_false(buf.has_views(b.b))
      local d = b:retained_duplicate()
      assert.is_false(buf.has_views(b.b))
      assert.is_false(buf.has_views(d.b))
      local v = d:slice(0, 1)
      assert.is_true(buf.has_views(d.b))
      assert.is_false(buf.has_views(v.b))
      d:release()
      local w = b:duplicate()
      assert.is_true(buf.has_views(b.b))
      assert.is_false(buf.has_views(w.b))
      b:release()
    end
  end)

  it("views die with their buffer: access through them raises", function()
    local b = buf.from("abcdef")
    local v, d = b:slice(0, 3), b:duplicate()
    b:release()
    for _, view in ipairs({ v, d }) do
      assert.are.equal(0, view:refcnt())
      assert.matches("^buffer used after release", raised(view.get_u8, view, 0))
      assert.matches("^buffer used after release", raised(view.slice, view))
      assert.are.equal("refcnt 0, decrement 1 (released by Lua code outside a stage)",
                       raised(view.release, view))
    end
  end)

  it("a retained view whose handle is dropped is reclaimed by its finalizer", function()
    local b = buf.from("abcdef")
    do
      local v = b:retained_slice(0, 2) -- never released
      assert.are.same({ 1, 2 }, { v:refcnt(), b:refcnt() })
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(1, b:refcnt())
    b:release()
  end)

  -- Errors for every accessor family --------------------------------------------

  it("get_* out of range raise with the index and the bounds, for every width", function()
    local b = counting(12)
    local s = state(b)
    for _, t in ipairs(TYPES) do
      local name, n = "get_" .. t[1], t[2]
      local at = 12 - n + 1
      assert.are.equal(("index %d out of range: %s needs %s at [%d, %d), capacity 12"):format(
        at, name, n == 1 and "1 byte" or n .. " bytes", at, at + n), raised(b[name], b, at))
      assert.are.equal(("index -1 out of range: %s needs %s at [-1, %d), capacity 12"):format(
        name, n == 1 and "1 byte" or n .. " bytes", n - 1), raised(b[name], b, -1))
      assert.are.equal(("index 1e+300 out of range: %s needs %s at [1e+300, 1e+300), capacity 12")
        :format(name, n == 1 and "1 byte" or n .. " bytes"), raised(b[name], b, 1e300))
      assert.are.equal("bad 'index' argument (integer expected, got 0.5)", raised(b[name], b, 0.5))
      assert.are.equal("bad 'index' argument (integer expected, got inf)",
                       raised(b[name], b, math.huge))
      assert.are.equal("bad 'index' argument (number expected, got nil)", raised(b[name], b))
      b[name](b, 12 - n) -- the last one that fits
    end
    assert.are.same(s, state(b))
    b:release()
  end)

  it("set_* out of range raise with the index and the bounds, for every width", function()
    local b = counting(12)
    local s = state(b)
    for _, t in ipairs(TYPES) do
      local name, n = "set_" .. t[1], t[2]
      local at = 12 - n + 1
      assert.are.equal(("index %d out of range: %s needs %s at [%d, %d), capacity 12"):format(
        at, name, n == 1 and "1 byte" or n .. " bytes", at, at + n), raised(b[name], b, at, 1))
      assert.are.equal(("index -2 out of range: %s needs %s at [-2, %d), capacity 12"):format(
        name, n == 1 and "1 byte" or n .. " bytes", n - 2), raised(b[name], b, -2, 1))
      assert.are.equal("bad 'index' argument (integer expected, got nan)",
                       raised(b[name], b, 0 / 0, 1))
      assert.are.equal("bad 'index' argument (number expected, got string)",
                       raised(b[name], b, "0", 1))
    end
    assert.are.same(s, state(b))
    b:release()
  end)

  it("read_* past the writer index raise with both indexes, for every width", function()
    local b = counting(12)
    for _, t in ipairs(TYPES) do
      local name, n = "read_" .. t[1], t[2]
      b:reader_index(0):writer_index(12)
      b:skip(12 - n + 1)
      local s = state(b)
      assert.are.equal(("%s: %s needed, %d readable (reader index %d, writer index 12)"):format(
        name, n == 1 and "1 byte" or n .. " bytes", n - 1, 12 - n + 1), raised(b[name], b))
      assert.are.same(s, state(b))
      b:reader_index(12 - n)
      b[name](b) -- fits exactly
      assert.are.equal(0, #b)
    end
    b:release()
  end)

  it("write_* past the max capacity, or on a view, raise and change nothing", function()
    local b = buf.alloc(12)
    for _, t in ipairs(TYPES) do
      local name, n = "write_" .. t[1], t[2]
      b:clear():writer_index(12 - n + 1)
      local s = state(b)
      assert.are.equal(("%s: %s needed, %d writable (writer index %d, capacity 12, "
                        .. "max capacity 12): exceeds max capacity"):format(
        name, n == 1 and "1 byte" or n .. " bytes", n - 1, 12 - n + 1), raised(b[name], b, 1))
      assert.are.same(s, state(b))
      b:writer_index(12 - n)
      b[name](b, 1)
      assert.are.equal(12, b:writer_index())
    end
    local v = b:slice(0, 4)
    v:clear()
    v:write_u32be(7)
    local s = state(b)
    assert.are.equal("write_u8: 1 byte needed, 0 writable (writer index 4, capacity 4, "
                     .. "max capacity 4): a view cannot grow", raised(v.write_u8, v, 1))
    assert.are.same(s, state(b))
    b:release()
  end)

  it("raises bad arguments at the caller's line", function()
    local b = buf.alloc(4)
    local line = debug.getinfo(1, "l").currentline
    local _, where = raised(function() b:get_u32be("x") end)
    assert.matches("buf_spec%.lua:" .. (line + 1) .. "$", where)
    _, where = raised(function() b:read_u32be() end)
    assert.matches("buf_spec%.lua:" .. (line + 3) .. "$", where)
    _, where = raised(function() b:set_u8(0, {}) end)
    assert.matches("buf_spec%.lua:" .. (line + 5) .. "$", where)
    _, where = raised(function() b:slice(9, 9) end)
    assert.matches("buf_spec%.lua:" .. (line + 7) .. "$", where)
    b:release()
    _, where = raised(function() b:get_u8(0) end)
    assert.matches("buf_spec%.lua:" .. (line + 10) .. "$", where)
  end)

  it("every accessor raises through a dead handle", function()
    local b = counting(16)
    local other = buf.from("x")
    b:release()
    local calls = {
      { "readable_bytes" }, { "writable_bytes" }, { "capacity" }, { "max_capacity" },
      { "reader_index" }, { "reader_index", 0 }, { "writer_index" }, { "writer_index", 0 },
      { "ensure_writable", 1 }, { "discard_read_bytes" }, { "clear" }, { "skip", 0 },
      { "read_bytes", 0 }, { "write_bytes", "x" }, { "find", 0 }, { "equals", "x" },
      { "tostring" }, { "hexdump" }, { "slice" }, { "slice", 0, 1 }, { "retained_slice" },
      { "read_slice", 0 }, { "duplicate" }, { "retained_duplicate" }, { "copy" },
      { "copy", 0, 1 },
    }
    for _, t in ipairs(TYPES) do
      calls[#calls + 1] = { "get_" .. t[1], 0 }
      calls[#calls + 1] = { "set_" .. t[1], 0, 1 }
      calls[#calls + 1] = { "read_" .. t[1] }
      calls[#calls + 1] = { "write_" .. t[1], 1 }
    end
    for _, c in ipairs(calls) do
      local ok, err = pcall(b[c[1]], b, select(2, unpack(c)))
      assert(not ok, c[1] .. " did not raise")
      assert(tostring(err):find("buffer used after release", 1, true),
             c[1] .. " raised: " .. tostring(err))
    end
    assert.matches("buffer used after release", select(2, pcall(function() return #b end)))
    -- A live handle with a dead source raises too.
    assert.matches("buffer used after release", raised(other.write_bytes, other, b))
    assert.matches("buffer used after release", raised(other.equals, other, b))
    assert.are.equal("refcnt 0, increment 1", raised(b.retain, b))
    assert.are.equal("refcnt 0, decrement 1 (released by Lua code outside a stage)",
                     raised(b.release, b))
    assert.are.equal(0, b:refcnt())
    other:release()
  end)

  it("counts references exactly: retain and release take positive integers only", function()
    local b = buf.from("x")
    for _, n in ipairs({ 0, -1, 1.5, 0 / 0, 2 ^ 31, "1" }) do
      assert.are.equal("bad 'n' argument (positive number expected)", raised(b.retain, b, n))
      assert.are.equal("bad 'n' argument (positive number expected)", raised(b.release, b, n))
    end
    assert.are.same({ 1, 1 }, { b:refcnt(), b.refs })
    b:retain(2)
    assert.is_false(b:release(2))
    assert.is_true(b:release())
  end)

  it("alloc takes integer sizes up to the maximum capacity", function()
    assert.are.equal("bad 'cap' argument (number expected)", raised(buf.alloc, "1"))
    assert.are.equal("bad 'cap' argument (integer in [0, 2147483647] expected, got nan)",
                     raised(buf.alloc, 0 / 0))
    assert.are.equal("bad 'cap' argument (integer in [0, 2147483647] expected, got 1.5)",
                     raised(buf.alloc, 1.5))
    assert.are.equal("bad 'cap' argument (integer in [0, 2147483647] expected, got 4294967296)",
                     raised(buf.alloc, 2 ^ 32))
    assert.are.equal("bad 'max_cap' argument (number >= cap expected)", raised(buf.alloc, 8, 4))
    assert.are.equal("bad 'max_cap' argument (integer in [cap, 2147483647] expected, "
                     .. "got 4294967296)",
                     raised(buf.alloc, 8, 2 ^ 32))
    local b = buf.alloc(0, 16)
    assert.are.equal(16, b:max_capacity())
    b:write_bytes("grows")
    assert.are.equal("grows", b:tostring())
    b:release()
  end)
end)
