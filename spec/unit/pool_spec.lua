-- Buffer handles and the pool, in-process: the real core library through
-- the FFI (SLUICE_CORE_LIB), no sockets.
local sluice = require("sluice")
local pool, buf = sluice.pool, sluice.buf

local H = require("helpers")

describe("sluice.pool and buffer handles", function()
  local guard = H.with_pool() -- every spec ends with the pool where it started

  it("counts a buffer from allocation to release", function()
    local b = buf.alloc(1000)
    local st = pool.stats()
    assert.are.equal(guard.base.blocks_in_use + 1, st.blocks_in_use)
    assert.are.equal(guard.base.bytes_in_use + 1024, st.bytes_in_use) -- the 1024-byte class
    assert.are.equal(1, b:refcnt())
    assert.is_true(b:release())
    assert.are.equal(guard.base.blocks_in_use, pool.stats().blocks_in_use)
  end)

  it("reports per size class", function()
    local b = buf.alloc(100)
    local st = pool.stats()
    local c
    for _, k in ipairs(st.classes) do if k.size == 112 then c = k end end
    assert.is_not_nil(c)
    assert.is_true(c.active >= 1)
    b:release()
  end)

  it("copies a string into a buffer", function()
    local b = buf.from("hello")
    assert.are.equal(5, #b)
    assert.are.equal("hello", b:tostring())
    assert.are.equal("ell", b:tostring(1, 3))
    b:release()
  end)

  it("refuses to release a released buffer: refcnt 0, decrement 1, and says who released it", function()
    local b = buf.from("x")
    b:release()
    assert.has_error(function() b:release() end,
                     "refcnt 0, decrement 1 (released by Lua code outside a stage)")
  end)

  it("refuses an over-release without changing the count", function()
    local b = buf.from("x")
    assert.has_error(function() b:release(2) end, "refcnt 1, decrement 2")
    assert.are.equal(1, b:refcnt())
    b:release()
  end)

  it("raises on any access through a dead handle, even after its header is reused", function()
    local b = buf.from("abc")
    b:release()
    local again = buf.from("xyz") -- a header released from Lua is not reused at once
    assert.has_error(function() return #b end,
                     "buffer used after release (refcnt 0, released by Lua code outside a stage)")
    again:release()
    -- After enough other releases its header is reused: the error says so.
    for _ = 1, 100 do buf.from("q"):release() end
    assert.has_error(function() return #b end,
                     "buffer used after release (refcnt 0, released; its header has been reused since)")
    assert.has_error(function() return b:tostring() end,
                     "buffer used after release (refcnt 0, released; its header has been reused since)")
    assert.are.equal(0, b:refcnt())
  end)

  it("counts retains: the memory goes back with the last release", function()
    local b = buf.from("abc")
    b:retain()
    assert.are.equal(2, b:refcnt())
    assert.is_false(b:release())
    assert.is_true(b:release())
  end)

  it("reclaims a buffer whose handle was dropped, and the pool shows it", function()
    local before = pool.stats().blocks_in_use
    do
      local lost = buf.alloc(4096) -- never released
      assert.are.equal(before + 1, pool.stats().blocks_in_use)
      lost = nil -- luacheck: ignore
    end
    collectgarbage()
    collectgarbage()
    assert.are.equal(before, pool.stats().blocks_in_use)
  end)

  it("caches freed blocks and serves the next allocation of the class from the cache", function()
    local b = buf.alloc(2048)
    b:release()
    local hits = pool.stats().cache_hits
    local c = buf.alloc(2048)
    assert.are.equal(hits + 1, pool.stats().cache_hits)
    c:release()
  end)

  it("a handle that passed its buffer on can neither release it nor pass it again", function()
    local ffi = require("ffi")
    local C = require("sluice.core")
    local b = buf.from("abc")
    local ptr = buf.give(b) -- what ctx:fire_read / ctx:write do toward C
    assert.has_error(function() b:release() end,
      "release of a reference this handle does not own (it owns 0, refcnt 1, decrement 1): "
      .. "was the buffer passed on?")
    assert.has_error(function() buf.give(b) end,
      "buffer passed on twice: this handle no longer owns a reference (refcnt 1)")
    assert.are.equal(1, b:refcnt())
    assert.are.equal("abc", b:tostring()) -- reading while someone owns it is fine
    -- The new owner releases.
    assert.are.equal(1, C.sl_ffi_buf_release(ptr, 1, ffi.new("const char *[1]")))
  end)

  it("tells how many buffers and bytes are outstanding", function()
    local n0, b0 = buf.outstanding()
    local b = buf.alloc(3000)
    local n1, b1 = buf.outstanding()
    assert.are.equal(n0 + 1, n1)
    assert.are.equal(b0 + 3072, b1)
    b:release()
    assert.are.same({ n0, b0 }, { buf.outstanding() })
  end)
end)
