-- A bounded fuzz of the buffer API against a model: random accessor calls
-- with random indexes, lengths and values (negative, huge, fractional, NaN,
-- wrong types) on random buffers and views. The model (plain Lua: a byte
-- table per root, indexes and counts per handle) says for every call whether
-- it must succeed, and with what result, or raise; after every call the
-- buffer's bytes, indexes and counts must equal the model's, and the bytes
-- between its capacity and the end of its block must be untouched.
-- SLUICE_FUZZ_SEED and SLUICE_FUZZ_ITERATIONS override the defaults;
-- SLUICE_FUZZ_TRACE=1 prints each call to stderr before it is made.
local ffi = require("ffi")
local bit = require("bit")
local sluice = require("sluice")
local pool, buf = sluice.pool, sluice.buf

local random, floor, huge, abs = math.random, math.floor, math.huge, math.abs
local s_char, s_format, unpack = string.char, string.format, unpack

local SEED = tonumber(os.getenv("SLUICE_FUZZ_SEED")) or 20261122
local ITERATIONS = tonumber(os.getenv("SLUICE_FUZZ_ITERATIONS")) or 20000
local TRACE = os.getenv("SLUICE_FUZZ_TRACE") == "1"

local TYPES = { -- name, width, signed, most significant byte first
  { "u8", 1, false, true }, { "i8", 1, true, true },
  { "u16be", 2, false, true }, { "u16le", 2, false, false },
  { "i16be", 2, true, true }, { "i16le", 2, true, false },
  { "u32be", 4, false, true }, { "u32le", 4, false, false },
  { "i32be", 4, true, true }, { "i32le", 4, true, false },
  { "u64be", 8, false, true }, { "u64le", 8, false, false },
  { "i64be", 8, true, true }, { "i64le", 8, true, false },
}

local SPECIAL = { 0 / 0, huge, -huge, 0.5, -0.5, 2 ^ 31 - 1, 2 ^ 31, 2 ^ 32, 2 ^ 32 + 1, 2 ^ 53,
                  2 ^ 53 + 2, 2 ^ 63, 2 ^ 64, 1e300, -1e300, -2 ^ 31, -2 ^ 32, -1, -0.0, "0", "1",
                  true, false, {} }
local BAD_VALUES = { 0 / 0, huge, -huge, 0.5, -1.5, "1", true, {}, ffi.new("double", 1) }

local function is_int(x)
  return type(x) == "number" and x == floor(x) and x > -huge and x < huge
end

local function show(v)
  if type(v) == "string" then return s_format("%q", v) end
  return tostring(v)
end

-- An index or length around [0, limit], or something that is not one.
local function rand_index(limit)
  local r = random(100)
  if r <= 80 then return random(-2, limit + 2) end
  if r <= 85 then return random(0, limit) + (random(2) == 1 and 0.5 or -0.25) end
  if r <= 88 then return nil end
  return SPECIAL[random(#SPECIAL)]
end

local function rand_value(t)
  local n, w = t[2], 8 * t[2]
  local r = random(100)
  if r <= 70 then
    if n < 8 then return floor(random() * (2 ^ w + 2 ^ (w - 1))) - 2 ^ (w - 1) end
    local k = random(4)
    if k == 1 then return floor(random() * 2 ^ 53) * (random(2) == 1 and 1 or -1) end
    if k == 2 or k == 3 then
      local x = k == 2 and 0ULL or 0LL
      for _ = 1, 8 do x = x * 256 + random(0, 255) end
      return x
    end
    return 2 ^ 63 + floor(random() * 2 ^ 52) * 2 ^ 11
  end
  if r <= 80 then -- just out of range
    if n < 8 then return random(2) == 1 and 2 ^ w or -2 ^ (w - 1) - 1 end
    return random(2) == 1 and 2 ^ 64 or -2 ^ 63 - 2 ^ 11
  end
  if r <= 88 and n < 8 then -- 64-bit cdata for a narrow setter, in range or not
    local hi, c = 2 ^ w - 1, random(4)
    if c == 1 then return ffi.new("uint64_t", random(0, hi)) end
    if c == 2 then return ffi.new("uint64_t", hi) + random(1, 5) end
    if c == 3 then return ffi.new("int64_t", -2 ^ (w - 1)) - random(0, 1) end
    return ffi.new("int64_t", random(-2 ^ (w - 1), hi))
  end
  if r <= 92 then return nil end
  return BAD_VALUES[random(#BAD_VALUES)]
end

-- The bytes a setter must store for v, in memory order, or nil when it must
-- refuse v. Arithmetic only: independent of the implementation's casts.
local function encode(t, v)
  local n, w = t[2], 8 * t[2]
  local lsb = {}
  if n < 8 then
    local x
    if type(v) == "number" then
      if not (is_int(v) and v >= -2 ^ (w - 1) and v <= 2 ^ w - 1) then return nil end
      x = v
    elseif type(v) == "cdata" and ffi.istype("uint64_t", v) then
      if v > 2 ^ w - 1 then return nil end
      x = tonumber(v)
    elseif type(v) == "cdata" and ffi.istype("int64_t", v) then
      if v < -2 ^ (w - 1) or v > 2 ^ w - 1 then return nil end
      x = tonumber(v)
    else
      return nil
    end
    x = x % 2 ^ w
    for k = 0, n - 1 do lsb[k + 1] = floor(x / 256 ^ k) % 256 end
  else
    if type(v) == "number" then
      if not (is_int(v) and v >= -2 ^ 63 and v < 2 ^ 64) then return nil end
      local m = abs(v)
      for k = 0, 7 do lsb[k + 1] = floor(m / 256 ^ k) % 256 end
      if v < 0 then -- two's complement of the magnitude
        local carry = 1
        for k = 1, 8 do
          local y = 255 - lsb[k] + carry
          lsb[k], carry = y % 256, y >= 256 and 1 or 0
        end
      end
    elseif type(v) == "cdata" and (ffi.istype("uint64_t", v) or ffi.istype("int64_t", v)) then
      for k = 0, 7 do lsb[k + 1] = tonumber(bit.band(bit.rshift(v, 8 * k), 0xff)) end
    else
      return nil
    end
  end
  if not t[4] then return lsb end
  local msb = {}
  for k = 1, n do msb[k] = lsb[n - k + 1] end
  return msb
end

local H = require("helpers")

describe("sluice.buf fuzz", function()
  H.with_pool()

  it(("keeps every buffer equal to its model over %d random calls (seed %d)"):format(
    ITERATIONS, SEED), function()
    collectgarbage()
    local base = pool.stats()
    math.randomseed(SEED)

    local ctx = ""
    local function check(cond, fmt, ...)
      if not cond then error(ctx .. ": " .. s_format(fmt, ...), 2) end
    end

    -- Model: a root R = { mem (1-based bytes of [0, cap)), refcnt, nviews,
    -- dead, shared, guard, node, nodes }; a node (a handle) = { h, root,
    -- holder, base, cap, max, rd, wr, refs, view }. A holder is what owns the
    -- refcount a handle's references count on: R itself, or for a derived
    -- buffer (retained_*) and the views made from it, a holder of its own
    -- { refcnt, dead, parent } that holds one reference on its parent's.
    local nodes, nroots = {}, 0
    local release_holder
    local stats = { calls = 0, ok = 0, raised = 0, grown = 0 }

    local function node_bytes(nd)
      return s_char(unpack(nd.root.mem, nd.base + 1, nd.base + nd.cap))
    end
    local function readable(nd)
      return node_bytes(nd):sub(nd.rd + 1, nd.wr)
    end
    local function mset(nd, i, bytes)
      for k = 1, #bytes do nd.root.mem[nd.base + i + k] = bytes[k] end
    end

    -- The root's bytes past its writer index after it grew (or was made)
    -- are unspecified: give them known values, in the buffer and the model.
    local function settle(R)
      local nd = R.node
      local b = nd.h.b
      local cap = b.cap
      for k = nd.wr, cap - 1 do
        local v = random(0, 255)
        b.data[k] = v
        R.mem[k + 1] = v
      end
      nd.cap = cap
      R.guard = ffi.string(b.data + cap, b.block_size - cap)
      R.data = tonumber(ffi.cast("uintptr_t", b.data))
    end

    local function check_root(R)
      if R.dead then
        for _, nd in ipairs(R.nodes) do
          check(nd.h.b.gen ~= nd.h.gen, "a handle of a released buffer is still live")
        end
        return
      end
      local h = R.node.h
      local b = h.b
      check(b.gen == h.gen, "the buffer died while the model holds %d references", R.refcnt)
      check(b.refcnt == R.refcnt, "refcnt %d, model %d", b.refcnt, R.refcnt)
      check(R.refcnt > 0, "the model's root died but not the buffer")
      local cap = R.node.cap
      check(b.cap == cap, "capacity %d, model %d", b.cap, cap)
      check(tonumber(ffi.cast("uintptr_t", b.data)) == R.data, "the block moved")
      check(ffi.string(b.data, cap) == s_char(unpack(R.mem, 1, cap)), "bytes differ from the model")
      check(ffi.string(b.data + cap, b.block_size - cap) == R.guard,
            "bytes past the capacity changed")
      for _, nd in ipairs(R.nodes) do
        local v = nd.h.b
        if nd.holder.dead then
          check(v.gen ~= nd.h.gen, "a handle of a released derived buffer is still live")
          goto continue
        end
        check(v.gen == nd.h.gen, "a view died while its buffer lives")
        check(v.root.refcnt == nd.holder.refcnt, "refcnt %d, model %d", v.root.refcnt,
              nd.holder.refcnt)
        check(v.rd == nd.rd and v.wr == nd.wr and v.cap == nd.cap and v.max_cap == nd.max,
              "indexes (%d, %d, %d, %d), model (%d, %d, %d, %d)", v.rd, v.wr, v.cap, v.max_cap,
              nd.rd, nd.wr, nd.cap, nd.max)
        check(tonumber(v.data - b.data) == nd.base, "a view's offset moved")
        check(nd.h.refs == nd.refs, "handle owns %d, model %d", nd.h.refs, nd.refs)
        ::continue::
      end
    end

    -- A root whose capacity or block may have changed (it grew): the
    -- model allows it only where may_grow said so.
    local function after_growth(R, allowed)
      local b = R.node.h.b
      if b.cap ~= R.node.cap or tonumber(ffi.cast("uintptr_t", b.data)) ~= R.data then
        check(allowed, "capacity %d -> %d without a reason to grow", R.node.cap, b.cap)
        check(b.cap > R.node.cap and b.cap <= R.node.max and b.cap >= R.node.wr,
              "grew to %d (max %d, writer index %d)", b.cap, R.node.max, R.node.wr)
        stats.grown = stats.grown + 1
        settle(R)
      end
    end

    -- A root grows without views and while no derived buffer made from it
    -- lives.
    local function may_grow(nd, n)
      local R = nd.root
      return not nd.view and R.nviews == 0 and (R.nderived or 0) == 0 and nd.wr + n <= nd.max
    end

    -- m references of holder H (of root R) are released: at zero it dies
    -- and lets go of its parent's reference, up to the root.
    function release_holder(R, H, m)
      while H do
        H.refcnt = H.refcnt - m
        if H.refcnt > 0 then return end
        H.dead = true
        if H == R then
          nroots = nroots - 1
          return
        end
        H, m = H.parent, 1
        H.nderived = H.nderived - 1
      end
    end

    local function add_root(h, mem, max)
      local R = { mem = mem, refcnt = 1, nviews = 0, dead = false, nodes = {} }
      local nd = { h = h, root = R, holder = R, base = 0, cap = #mem, max = max, rd = h.b.rd,
                   wr = h.b.wr, refs = 1, view = false }
      R.node, R.nodes[1] = nd, nd
      nodes[#nodes + 1] = nd
      nroots = nroots + 1
      settle(R)
      return nd
    end

    local function add_view(parent, h, base, cap, rd, wr, retained)
      local R = parent.root
      local holder = parent.holder
      if retained then -- a derived buffer: a holder of its own
        holder.refcnt = holder.refcnt + 1
        holder.nderived = (holder.nderived or 0) + 1
        holder = { refcnt = 1, dead = false, parent = holder }
      elseif holder == R then
        R.nviews = R.nviews + 1
      end
      local nd = { h = h, root = R, holder = holder, base = base, cap = cap, max = cap, rd = rd,
                   wr = wr, refs = retained and 1 or 0, view = true }
      R.nodes[#R.nodes + 1] = nd
      nodes[#nodes + 1] = nd
      return nd
    end

    local function new_root()
      if random(3) == 1 then
        local len = random(0, 100)
        local t = {}
        for k = 1, len do t[k] = random(0, 255) end
        local h = assert(buf.from(s_char(unpack(t, 1, len))))
        check(h.b.cap == len and h.b.wr == len and h.b.max_cap == len, "from(): wrong shape")
        return add_root(h, t, len)
      end
      local cap = random(0, 200)
      local max = random(2) == 1 and random(cap, 600) or nil
      local h = assert(buf.alloc(cap, max))
      local real = h.b.cap
      check(real >= cap and real <= (max or cap) and h.b.max_cap == (max or cap),
            "alloc(%d, %s): capacity %d, max %d", cap, tostring(max), real, h.b.max_cap)
      local t = {}
      for k = 1, real do t[k] = 0 end -- settle() gives them values
      return add_root(h, t, max or cap)
    end

    -- Results: a call on a dead handle raises "buffer used after release";
    -- one the model refuses raises; the rest succeed.
    local function expect(ok, err, valid, is_dead)
      stats.calls = stats.calls + 1
      if is_dead then
        check(not ok, "succeeded through a dead handle")
        check(tostring(err):find("buffer used after release", 1, true), "raised %s", tostring(err))
      elseif valid then
        check(ok, "raised where the model says it must succeed: %s", tostring(err))
      else
        check(not ok, "succeeded where the model says it must raise")
        check(type(err) == "string", "raised a %s", type(err))
      end
      if ok then stats.ok = stats.ok + 1 else stats.raised = stats.raised + 1 end
      return ok and valid and not is_dead
    end

    local function model_get(nd, i, t)
      local n = t[2]
      local msb = {}
      for k = 1, n do
        local at = t[4] and k or n - k + 1
        msb[k] = nd.root.mem[nd.base + i + at]
      end
      if n < 8 then
        local x = 0
        for k = 1, n do x = x * 256 + msb[k] end
        if t[3] and x >= 2 ^ (8 * n - 1) then x = x - 2 ^ (8 * n) end
        return x
      end
      local x = 0ULL
      for k = 1, 8 do x = x * 256 + msb[k] end
      if t[3] then return ffi.cast("int64_t", x) end
      return x
    end

    local function same_value(t, got, want)
      if t[2] < 8 then return type(got) == "number" and got == want end
      return ffi.istype(t[3] and "int64_t" or "uint64_t", got) and tostring(got) == tostring(want)
    end

    local function valid_count(n, limit)
      return is_int(n) and n >= 0 and n <= limit
    end

    local ops = {}
    local pcall = function(f, ...)
      if TRACE then io.stderr:write(ctx, "\n") end
      return pcall(f, ...)
    end

    function ops.get(nd, dead)
      local t = TYPES[random(#TYPES)]
      local i = rand_index(nd.cap)
      ctx = ctx .. " get_" .. t[1] .. "(" .. show(i) .. ")"
      local ok, v = pcall(nd.h["get_" .. t[1]], nd.h, i)
      local valid = is_int(i) and i >= 0 and i + t[2] <= nd.cap
      if expect(ok, v, valid, dead) then
        local want = model_get(nd, i, t)
        check(same_value(t, v, want), "got %s, model %s", tostring(v), tostring(want))
      end
    end

    function ops.set(nd, dead)
      local t = TYPES[random(#TYPES)]
      local i, v = rand_index(nd.cap), rand_value(t)
      ctx = ctx .. " set_" .. t[1] .. "(" .. show(i) .. ", " .. show(v) .. ")"
      local ok, err = pcall(nd.h["set_" .. t[1]], nd.h, i, v)
      local bytes = encode(t, v)
      local valid = is_int(i) and i >= 0 and i + t[2] <= nd.cap and bytes ~= nil
      if expect(ok, err, valid, dead) then
        check(err == nd.h, "set_* returns the buffer")
        mset(nd, i, bytes)
      end
    end

    function ops.read(nd, dead)
      local t = TYPES[random(#TYPES)]
      ctx = ctx .. " read_" .. t[1] .. "()"
      local ok, v = pcall(nd.h["read_" .. t[1]], nd.h)
      if expect(ok, v, nd.wr - nd.rd >= t[2], dead) then
        local want = model_get(nd, nd.rd, t)
        check(same_value(t, v, want), "got %s, model %s", tostring(v), tostring(want))
        nd.rd = nd.rd + t[2]
      end
    end

    function ops.write(nd, dead)
      local t = TYPES[random(#TYPES)]
      local v = rand_value(t)
      ctx = ctx .. " write_" .. t[1] .. "(" .. show(v) .. ")"
      local ok, err = pcall(nd.h["write_" .. t[1]], nd.h, v)
      local bytes = encode(t, v)
      local n = t[2]
      local fits = nd.wr + n <= nd.cap
      local valid = bytes ~= nil and (fits or may_grow(nd, n))
      if expect(ok, err, valid, dead) then
        if not fits then
          for k = #nd.root.mem + 1, nd.h.b.cap do nd.root.mem[k] = 0 end
        end
        mset(nd, nd.wr, bytes)
        nd.wr = nd.wr + n
        if not fits then after_growth(nd.root, true) end
      end
    end

    function ops.indexes(nd, dead)
      local which = random(2) == 1 and "reader_index" or "writer_index"
      local i
      if random(4) ~= 1 then i = rand_index(nd.cap) end
      ctx = ctx .. " " .. which .. "(" .. show(i) .. ")"
      local ok, r = pcall(nd.h[which], nd.h, i)
      local valid
      if i == nil then
        valid = true
      elseif which == "reader_index" then
        valid = is_int(i) and i >= 0 and i <= nd.wr
      else
        valid = is_int(i) and i >= nd.rd and i <= nd.cap
      end
      if expect(ok, r, valid, dead) then
        if i == nil then
          check(r == (which == "reader_index" and nd.rd or nd.wr), "returned %s", tostring(r))
        elseif which == "reader_index" then
          nd.rd = i
        else
          nd.wr = i
        end
      end
    end

    function ops.ensure_writable(nd, dead)
      local n = rand_index(nd.max - nd.wr + 4)
      ctx = ctx .. " ensure_writable(" .. show(n) .. ")"
      local ok, err = pcall(nd.h.ensure_writable, nd.h, n)
      local valid = is_int(n) and n >= 0 and (n <= nd.cap - nd.wr or may_grow(nd, n))
      if expect(ok, err, valid, dead) then
        check(nd.h.b.cap - nd.wr >= n, "no room after ensure_writable")
        after_growth(nd.root, true)
      end
    end

    function ops.discard(nd, dead)
      ctx = ctx .. " discard_read_bytes()"
      local ok, err = pcall(nd.h.discard_read_bytes, nd.h)
      if expect(ok, err, true, dead) then
        local s = readable(nd)
        local bytes = { s:byte(1, -1) }
        mset(nd, 0, bytes)
        nd.wr, nd.rd = nd.wr - nd.rd, 0
      end
    end

    function ops.clear(nd, dead)
      ctx = ctx .. " clear()"
      local ok, err = pcall(nd.h.clear, nd.h)
      if expect(ok, err, true, dead) then nd.rd, nd.wr = 0, 0 end
    end

    function ops.bytes(nd, dead)
      local which = ({ "read_bytes", "skip", "read_slice" })[random(3)]
      local n = rand_index(nd.wr - nd.rd)
      ctx = ctx .. " " .. which .. "(" .. show(n) .. ")"
      local ok, r = pcall(nd.h[which], nd.h, n)
      if expect(ok, r, valid_count(n, nd.wr - nd.rd), dead) then
        if which == "read_bytes" then
          check(r == readable(nd):sub(1, n), "read %s", show(r))
        elseif which == "read_slice" then
          check(r.refs == 0 and r.b.rd == 0 and r.b.wr == n and r.b.cap == n, "bad view")
          add_view(nd, r, nd.base + nd.rd, n, 0, n, false)
        end
        nd.rd = nd.rd + n
      end
    end

    function ops.write_bytes(nd, dead)
      local src, src_dead, bytes
      if random(2) == 1 then
        local len = random(0, 40)
        local t = {}
        for k = 1, len do t[k] = random(0, 255) end
        src = s_char(unpack(t, 1, len))
        bytes = src
        ctx = ctx .. " write_bytes(" .. show(src) .. ")"
      else
        local other = nodes[random(#nodes)]
        if random(4) == 1 then other = nd end
        src, src_dead = other.h, other.holder.dead
        bytes = not src_dead and readable(other) or ""
        ctx = ctx .. " write_bytes(a buffer of " .. #bytes .. " readable bytes)"
      end
      local ok, err = pcall(nd.h.write_bytes, nd.h, src)
      local n = #bytes
      local fits = nd.wr + n <= nd.cap
      local valid = fits or may_grow(nd, n)
      if expect(ok, err, valid, dead or src_dead) then
        if not fits then
          for k = #nd.root.mem + 1, nd.h.b.cap do nd.root.mem[k] = 0 end
        end
        mset(nd, nd.wr, { bytes:byte(1, -1) })
        nd.wr = nd.wr + n
        if not fits then after_growth(nd.root, true) end
      end
    end

    function ops.find(nd, dead)
      local needle
      local r = random(10)
      if r <= 3 then
        needle = random(0, 255)
      elseif r <= 7 and nd.cap > 0 and not dead then
        local s = node_bytes(nd)
        local a = random(1, nd.cap)
        needle = s:sub(a, a + random(0, 3))
      elseif r <= 9 then
        needle = s_char(random(0, 255), random(0, 255)):sub(1, random(0, 2))
      else
        needle = ({ 256, -1, 1.5, 0 / 0, {}, true })[random(6)]
      end
      local from, to
      if random(3) ~= 1 then from = rand_index(nd.cap) end
      if random(3) ~= 1 then to = rand_index(nd.cap) end
      ctx = ctx .. " find(" .. show(needle) .. ", " .. show(from) .. ", " .. show(to) .. ")"
      local ok, at = pcall(nd.h.find, nd.h, needle, from, to)
      local f, t = from, to
      if f == nil then f = nd.rd end
      if t == nil then t = nd.wr end
      local valid = (type(needle) == "string" or (is_int(needle) and needle >= 0 and needle <= 255))
        and is_int(f) and is_int(t) and f >= 0 and f <= t and t <= nd.cap
      if expect(ok, at, valid, dead) then
        if type(needle) == "number" then needle = s_char(needle) end
        local hit = node_bytes(nd):sub(f + 1, t):find(needle, 1, true)
        local want = hit and f + hit - 1 or nil
        check(at == want, "found %s, model %s", tostring(at), tostring(want))
      end
    end

    function ops.equals(nd, dead)
      local other, other_dead, want
      if random(2) == 1 then
        local o = nodes[random(#nodes)]
        other, other_dead = o.h, o.holder.dead
        want = not dead and not other_dead and readable(nd) == readable(o)
      else
        other = not dead and readable(nd) or ""
        if random(2) == 1 then other = other .. "x" end
        want = not dead and other == readable(nd)
      end
      ctx = ctx .. " equals(...)"
      local ok, r = pcall(nd.h.equals, nd.h, other)
      if expect(ok, r, true, dead or other_dead) then
        check(r == want, "equals said %s", tostring(r))
      end
    end

    function ops.tostring(nd, dead)
      local avail = nd.wr - nd.rd
      local offset, len
      if random(3) ~= 1 then offset = rand_index(avail) end
      if random(3) ~= 1 then len = rand_index(avail) end
      ctx = ctx .. " tostring(" .. show(offset) .. ", " .. show(len) .. ")"
      local ok, s = pcall(nd.h.tostring, nd.h, offset, len)
      local o, l = offset or 0, len
      if l == nil and type(o) == "number" then l = avail - o end
      local valid = is_int(o) and is_int(l) and o >= 0 and l >= 0 and o + l <= avail
      if expect(ok, s, valid, dead) then
        check(s == readable(nd):sub(o + 1, o + l), "tostring gave %s", show(s))
      end
    end

    function ops.hexdump(nd, dead)
      ctx = ctx .. " hexdump()"
      local ok, s = pcall(nd.h.hexdump, nd.h)
      if expect(ok, s, true, dead) then
        local n = nd.wr - nd.rd
        local lines = s == "" and 0 or select(2, s:gsub("\n", "")) + 1
        check(lines == math.ceil(n / 16), "%d lines for %d bytes", lines, n)
      end
    end

    function ops.derive(nd, dead)
      local which = ({ "slice", "retained_slice", "duplicate", "retained_duplicate", "copy" })
        [random(5)]
      local index, len
      if (which == "slice" or which == "retained_slice" or which == "copy")
          and random(4) ~= 1 then
        index, len = rand_index(nd.cap), rand_index(nd.cap)
      end
      ctx = ctx .. " " .. which .. "(" .. show(index) .. ", " .. show(len) .. ")"
      local ok, v = pcall(nd.h[which], nd.h, index, len)
      local valid = true
      if which ~= "duplicate" and which ~= "retained_duplicate" then
        if index == nil and len == nil then
          index, len = nd.rd, nd.wr - nd.rd
        else
          valid = is_int(index) and is_int(len) and index >= 0 and len >= 0
            and index + len <= nd.cap
        end
      end
      if expect(ok, v, valid, dead) then
        check(v ~= nil, "no buffer")
        local retained = which:sub(1, 9) == "retained_"
        if which == "copy" then
          local t = { node_bytes(nd):sub(index + 1, index + len):byte(1, -1) }
          check(v.b.wr == len and v.b.rd == 0 and v.refs == 1, "copy: wrong shape")
          for k = len + 1, v.b.cap do t[k] = 0 end
          local max = nd.max > len and nd.max or len
          check(v.b.max_cap == max, "copy: max capacity %d, model %d", v.b.max_cap, max)
          add_root(v, t, max)
        elseif which == "duplicate" or which == "retained_duplicate" then
          add_view(nd, v, nd.base, nd.cap, nd.rd, nd.wr, retained)
        else
          add_view(nd, v, nd.base + index, len, 0, len, retained)
        end
      end
    end

    function ops.refs(nd, dead)
      local which = random(3) == 1 and "retain" or "release"
      local n = random(8) == 1 and SPECIAL[random(#SPECIAL)] or random(1, 2)
      if random(10) == 1 then n = nil end
      ctx = ctx .. " " .. which .. "(" .. show(n) .. ")"
      local R = nd.root
      local H = nd.holder
      local ok, r = pcall(nd.h[which], nd.h, n)
      local m = n or 1
      local good_n = is_int(m) and m >= 1 and m <= 2 ^ 31 - 1
      stats.calls = stats.calls + 1
      local valid
      if which == "retain" then
        valid = good_n and not dead and H.refcnt + m <= 2 ^ 31 - 1
      else
        valid = good_n and not dead and m <= H.refcnt and m <= nd.refs
      end
      check(ok == valid, "%s where the model says it must %s: %s", ok and "succeeded" or "raised",
            valid and "succeed" or "raise", tostring(r))
      if not valid then
        stats.raised = stats.raised + 1
        return
      end
      stats.ok = stats.ok + 1
      if which == "retain" then
        H.refcnt, nd.refs = H.refcnt + m, nd.refs + m
      else
        nd.refs = nd.refs - m
        check(r == (H.refcnt == m), "release returned %s", tostring(r))
        release_holder(R, H, m)
      end
    end

    -- Releases every reference the model's handles own on R.
    local function drop(R)
      for _, nd in ipairs(R.nodes) do
        if nd.refs > 0 then
          local m = nd.refs
          local freed = nd.h:release(m)
          nd.refs = 0
          check(freed == (nd.holder.refcnt == m), "release returned %s", tostring(freed))
          release_holder(R, nd.holder, m)
        end
      end
      check(R.dead, "references left")
    end

    local WEIGHTS = {
      { ops.get, 14 }, { ops.set, 12 }, { ops.read, 10 }, { ops.write, 12 }, { ops.indexes, 8 },
      { ops.ensure_writable, 3 }, { ops.discard, 2 }, { ops.clear, 1 }, { ops.bytes, 6 },
      { ops.write_bytes, 5 }, { ops.find, 4 }, { ops.equals, 2 }, { ops.tostring, 3 },
      { ops.hexdump, 1 }, { ops.derive, 5 }, { ops.refs, 3 },
    }
    local total = 0
    for _, w in ipairs(WEIGHTS) do total = total + w[2] end
    local function pick_op()
      local r = random(total)
      for _, w in ipairs(WEIGHTS) do
        r = r - w[2]
        if r <= 0 then return w[1] end
      end
    end

    -- On a failure, give back what the handles own before the pool closes
    -- (a finalizer running after pool.close() would read unmapped headers).
    finally(function()
      for _, nd in ipairs(nodes or {}) do
        if nd.refs > 0 and nd.h.b.gen == nd.h.gen then pcall(nd.h.release, nd.h, nd.refs) end
      end
    end)

    for _ = 1, 3 do new_root() end
    for it = 1, ITERATIONS do
      ctx = "iteration " .. it
      if nroots < 2 or (nroots < 8 and random(40) == 1) then new_root() end
      if nroots > 6 and random(20) == 1 then
        for _, nd in ipairs(nodes) do
          if not nd.root.dead and not nd.view then
            drop(nd.root)
            break
          end
        end
      end
      -- Forget released buffers now and then (their handles are dead).
      if #nodes > 60 then
        local keep = {}
        for _, nd in ipairs(nodes) do
          if not nd.root.dead or random(8) == 1 then keep[#keep + 1] = nd end
        end
        nodes = keep
      end
      local nd = nodes[random(#nodes)]
      if nd.holder.dead and random(4) ~= 1 then -- mostly live handles
        for _ = 1, 10 do
          nd = nodes[random(#nodes)]
          if not nd.holder.dead then break end
        end
      end
      ctx = ctx .. ", a " .. (nd.view and "view" or "buffer") .. " [rd " .. nd.rd .. ", wr "
            .. nd.wr .. ", cap " .. nd.cap .. ", max " .. nd.max .. "]"
      local R = nd.root
      pick_op()(nd, nd.holder.dead)
      check_root(R)
      if it % 500 == 0 then
        for _, x in ipairs(nodes) do check_root(x.root) end
      end
    end

    for _, nd in ipairs(nodes) do
      check_root(nd.root)
      if not nd.root.dead then drop(nd.root) end
    end
    nodes = nil
    collectgarbage()
    collectgarbage()
    local now = pool.stats()
    assert.are.equal(base.blocks_in_use, now.blocks_in_use)
    assert.are.equal(base.bytes_in_use, now.bytes_in_use)
    -- The fuzz did what it says: plenty of both outcomes, and growth.
    assert.is_true(stats.calls >= ITERATIONS)
    assert.is_true(stats.ok > ITERATIONS / 4, "successes: " .. stats.ok)
    assert.is_true(stats.raised > ITERATIONS / 10, "errors: " .. stats.raised)
    assert.is_true(stats.grown > 0, "no growth")
  end)
end)
