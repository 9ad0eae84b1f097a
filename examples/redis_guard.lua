-- examples.redis_guard: a Redis proxy stage that refuses some commands.
--
--   pipeline = { { "examples.redis_guard", deny = { "FLUSHALL", "KEYS" } } },
--   upstream = "redis",
--
-- What the client sends is decoded with sluice.codec.decoder: RESP arrays of
-- bulk strings (what redis-cli and redis-benchmark send) and inline commands
-- ("PING\r\n"). Allowed commands go on to the server as slices of the bytes
-- the client sent: nothing is copied or re-encoded, and consecutive allowed
-- commands go on as one slice. A denied command never reaches the server;
-- the client gets
--
--   -ERR command 'FLUSHALL' is not allowed
--
-- Replies must reach the client in the order of its commands, pipelining
-- included: a client may send many commands before it reads any reply, so a
-- denied command in the middle of a pipeline must have its error delivered
-- after the replies to the commands before it, which are still on their way
-- from the server. So the stage watches the replies too. With an upstream,
-- the bridge comes after the listed stages, and what the server answers
-- travels back to the client as writes through this stage: `write` below
-- counts the complete RESP replies going by and slips each error in at its
-- place. Per connection, a queue holds what the client is owed, in order: a
-- number n means "n replies from the server", a string is a reply of ours.
--
-- Bytes that are not RESP close the connection with reason "malformed_frame"
-- (logged). Limits: a command the server answers with no reply or with
-- several (CLIENT REPLY OFF, SUBSCRIBE to several channels) puts the count
-- out; replies that arrive while the queue expects none (pub/sub messages)
-- pass through untouched.
local codec = require("sluice.codec")
local log = require("sluice.log")

local byte, char, upper, type = string.byte, string.char, string.upper, type
local concat = table.concat

local CR, LF, STAR, DOLLAR, MINUS = 13, 10, 42, 36, 45
local MAX_ARGS = 1048576        -- the limits redis-server applies itself
local MAX_BULK = 536870912
local MAX_INLINE = 65536
local MAX_DEPTH = 32            -- nesting of the replies we count

---------------------------------------------------------------------------
-- Reading RESP in place: every index is absolute (buf:find, buf:get_u8),
-- and nothing is copied but the command name.

-- The integer written in [from, cr), which must be followed by "\r".
-- Returns nil when it is not one.
local function int_at(b, from, cr)
  if cr <= from or cr - from > 12 or b:get_u8(cr) ~= CR then return nil end
  -- One or two digits without a loop (see uint_line).
  local d1 = b:get_u8(from) - 48
  if d1 >= 0 and d1 <= 9 then
    if cr - from == 1 then return d1 end
    local d2 = b:get_u8(from + 1) - 48
    if cr - from == 2 and d2 >= 0 and d2 <= 9 then return d1 * 10 + d2 end
  end
  local neg = b:get_u8(from) == MINUS
  if neg then from = from + 1 end
  if from == cr then return nil end
  local n = 0
  for k = from, cr - 1 do
    local d = b:get_u8(k) - 48
    if d < 0 or d > 9 then return nil end
    n = n * 10 + d
  end
  return neg and -n or n
end

-- The line "<digits>\r\n" starting at index from (digits only, at most 12):
-- returns its value and the index just past its "\n"; nil when it goes on
-- past w (more bytes needed); false when it is not such a line. One pass
-- over the bytes, without searching for the "\n" first.
local function uint_line(b, from, w)
  -- One or two digits, the common case, without a loop: a loop that runs
  -- once or twice inside the hot loops above makes LuaJIT's traces abort
  -- ("inner loop in root trace") and may leave the parser interpreted.
  if from + 3 < w then
    local d1, c2 = b:get_u8(from) - 48, b:get_u8(from + 1)
    if d1 >= 0 and d1 <= 9 then
      if c2 == CR then
        if b:get_u8(from + 2) ~= LF then return false end
        return d1, from + 3
      end
      local c3 = b:get_u8(from + 2)
      if c2 >= 48 and c2 <= 57 and c3 == CR then
        if b:get_u8(from + 3) ~= LF then return false end
        return d1 * 10 + c2 - 48, from + 4
      end
    end
  end
  local n, k = 0, from
  local last = from + 12
  while k < w do
    local d = b:get_u8(k) - 48
    if d < 0 or d > 9 then
      if d ~= CR - 48 or k == from then return false end
      if k + 1 >= w then return nil end
      if b:get_u8(k + 1) ~= LF then return false end
      return n, k + 2
    end
    if k == last then return false end
    n = n * 10 + d
    k = k + 1
  end
  return nil
end

-- The first word of an inline command as redis-server reads it (its
-- sdssplitargs), so that "\x46LUSHALL", 'flushall' and FLUSH"ALL" are all
-- FLUSHALL. Returns nil for an empty line, "" for unbalanced quotes (the
-- server answers those with an error).
local ISSPACE = { [32] = true, [9] = true, [10] = true, [11] = true, [12] = true, [13] = true }
local ENDS_WORD = { [32] = true, [9] = true, [10] = true, [13] = true, [0] = true }
local ESCAPES = { [110] = 10, [114] = 13, [116] = 9, [98] = 8, [97] = 7 } -- \n \r \t \b \a

local function inline_name(line)
  local j, n = 1, #line
  while j <= n and ISSPACE[byte(line, j)] do j = j + 1 end
  if j > n or byte(line, j) == 0 then return nil end
  local name, quote = {}, nil
  while j <= n do
    local c = byte(line, j)
    if quote == nil then
      if ENDS_WORD[c] then break end
      if c == 34 or c == 39 then quote, c = c, nil end -- " or ': a quoted part begins
    elseif c == quote then -- it ends, and must end the word too
      local after = byte(line, j + 1)
      if after and after ~= 0 and not ISSPACE[after] then return "" end
      return concat(name)
    elseif c == 0 then
      return ""
    elseif c == 92 and quote == 34 and j < n then -- a backslash escape in "..."
      local hex = line:match("^x(%x%x)", j + 1)
      if hex then
        c, j = tonumber(hex, 16), j + 3
      else
        j = j + 1
        c = ESCAPES[byte(line, j)] or byte(line, j)
      end
    elseif c == 92 and quote == 39 and byte(line, j + 1) == 39 then -- \' in '...'
      c, j = 39, j + 1
    end
    if c then name[#name + 1] = char(c) end
    j = j + 1
  end
  if quote then return "" end
  return concat(name)
end

-- An inline command starting at index i of b (w is the writer index, ri
-- the reader index): words up to "\n" (or "\r\n"). Returns the index just
-- past it and its name in upper case (nil for an empty line, which
-- redis-server ignores without a reply); nil when the line is not complete
-- yet; false and a reason when it is too long.
local function parse_inline(b, i, w, ri)
  local nl = b:find(LF, i, w)
  if nl == nil then
    if w - i > MAX_INLINE then return false, "inline command too long" end
    return nil
  end
  local stop = nl -- redis-server drops the "\r" before the "\n"
  if stop > i and b:get_u8(stop - 1) == CR then stop = stop - 1 end
  local name = inline_name(b:tostring(i - ri, stop - i))
  return nl + 1, name and upper(name)
end

-- The header "*<n>\r\n" of a command at index i: n and the index past it;
-- nil when it is not complete yet; false when malformed.
local function array_header(b, i, w)
  local nl = b:find(LF, i, w)
  if nl == nil then
    if w - i > 16 then return false end
    return nil
  end
  local n = int_at(b, i + 1, nl - 1)
  if n == nil or n > MAX_ARGS then return false end
  return n, nl + 1
end

---------------------------------------------------------------------------
-- Counting the server's replies as they stream by, across chunks. The
-- scanner `rs` keeps: skip (bytes of a bulk string still to pass), part (a
-- header line cut by the end of a chunk), and a stack of the elements still
-- expected by each open array (left[1..depth]).

local SIMPLE = { [43] = true, [45] = true, [58] = true, [95] = true, -- + - : _
                 [44] = true, [35] = true, [40] = true }              -- , # (
local BULK = { [36] = true, [33] = true, [61] = true }                -- $ ! =
local ARRAY = { [42] = 1, [126] = 1, [62] = 1, [37] = 2, [124] = 2 }  -- * ~ > % |

-- One element ended: returns true when that completed a whole reply.
local function element_done(rs)
  local left, d = rs.left, rs.depth
  while d > 0 do
    if left[d] > 1 then
      left[d] = left[d] - 1
      rs.depth = d
      return false
    end
    d = d - 1
  end
  rs.depth = 0
  return true
end

-- Scans one element of a reply at index i of b (w the writer index):
-- returns the index just past it and whether it completed a reply; nil when
-- it goes on in the next chunk (the scanner keeps its place); false when the
-- bytes are not RESP. The caller loops (one element per turn, no loop
-- nested in it for the common replies).
local function scan_element(rs, b, i, w)
  if rs.skip > 0 then
    if w - i < rs.skip then
      rs.skip = rs.skip - (w - i)
      return nil
    end
    i = i + rs.skip
    rs.skip = 0
    return i, element_done(rs)
  end
  local nl = b:find(LF, i, w)
  if nl == nil then -- the header line goes on in the next chunk
    rs.part = (rs.part or "") .. b:tostring(i - b:reader_index(), w - i)
    if #rs.part > MAX_INLINE then return false end
    return nil
  end
  local t, n
  if rs.part then
    local line = rs.part .. b:tostring(i - b:reader_index(), nl + 1 - i)
    rs.part = nil
    t, n = byte(line), tonumber(line:sub(2, -3))
  else
    t = b:get_u8(i)
    if not SIMPLE[t] then n = int_at(b, i + 1, nl - 1) end
  end
  i = nl + 1
  if SIMPLE[t] then return i, element_done(rs) end
  if BULK[t] and n then
    if n < 0 then return i, element_done(rs) end
    rs.skip = n + 2 -- the bytes and their "\r\n"
    return i, false
  end
  if ARRAY[t] and n then
    if n <= 0 then return i, element_done(rs) end
    if rs.depth == MAX_DEPTH then return false end
    rs.depth = rs.depth + 1
    rs.left[rs.depth] = n * ARRAY[t]
    return i, false
  end
  return false
end

---------------------------------------------------------------------------
-- What the client is owed, in order (g.q[g.head .. g.tail]).

local function owe_server(g, n)
  if n == 0 then return end
  local q, t = g.q, g.tail
  if t >= g.head and type(q[t]) == "number" then
    q[t] = q[t] + n
  else
    g.tail = t + 1
    q[t + 1] = n
  end
end

-- A reply of ours: written at once when nothing is owed before it.
local function owe_local(ctx, g, reply)
  if g.tail < g.head then
    ctx:write_and_flush(reply)
  else
    g.tail = g.tail + 1
    g.q[g.tail] = reply
  end
end

-- A reply from the server went by. Returns our replies that are due right
-- after it (a string), or nil.
local function server_replied(g)
  local q, h = g.q, g.head
  local n = q[h]
  if n == nil then return nil end -- not expected: passes through
  if n > 1 then
    q[h] = n - 1
    return nil
  end
  q[h] = nil
  h = h + 1
  local due
  while type(q[h]) == "string" do
    due = (due or "") .. q[h]
    q[h] = nil
    h = h + 1
  end
  if h > g.tail then h, g.tail = 1, 0 end
  g.head = h
  return due
end

---------------------------------------------------------------------------
-- Per-connection state, and the deny list made a set (once per options table).

local deny_sets = setmetatable({}, { __mode = "k" })

local function deny_set(options)
  local set = deny_sets[options]
  if set then return set end
  local list = options.deny or {}
  if type(list) ~= "table" then
    error("examples.redis_guard: option 'deny' must be a list of command names", 0)
  end
  set = { lens = {} }
  for i, name in ipairs(list) do
    if type(name) ~= "string" then
      error(("examples.redis_guard: deny[%d] must be a string"):format(i), 0)
    end
    set[upper(name)] = true
    set.lens[#name] = true
  end
  deny_sets[options] = set
  return set
end

local function guard(ctx)
  local g = ctx.state.guard
  if g == nil then
    g = { deny = deny_set(ctx.options), q = {}, head = 1, tail = 0, pieces = {},
          rs = { skip = 0, part = nil, depth = 0, left = {} } }
    ctx.state.guard = g
  end
  return g
end

local function malformed(ctx, g, what, why)
  log.warn("%s: malformed RESP %s (%s)", ctx:describe(), what, why)
  g.closed = true
  ctx:close("malformed_frame")
end

---------------------------------------------------------------------------
-- The client's commands: decode_fn for sluice.codec.decoder. It takes every
-- complete command in the cumulation `cum` (the decoder owns cum; we only
-- read from it). Allowed commands become retained slices in `out`, which the
-- decoder fires on to the bridge; the bridge owns them from then on.

local function decode(ctx, cum, out)
  local g = guard(ctx)
  if g.closed then return cum:skip(#cum) end -- closing: drop the rest
  local lens = g.deny.lens
  local ri, w = cum:reader_index(), cum:writer_index()
  -- [ri, done) holds `run` allowed commands not passed on yet; a command
  -- starts at `done`, of which `left` bulk strings are still to be read.
  -- One token (a header, a bulk string or an inline line) per turn of one
  -- loop: no loop nested in it on the common path, so that LuaJIT compiles
  -- it as one trace.
  local i, done, run, left, name, first = ri, ri, 0, 0, nil, false
  while i < w do
    local e, why
    if left == 0 then -- a command starts at i
      if cum:get_u8(i) ~= STAR then
        e, why = parse_inline(cum, i, w, ri)
        if e == nil then break end -- wait for more bytes
        name = why
      else
        local n, at = array_header(cum, i, w)
        if n == nil then break end
        if n == false then e, why = false, "bad array header"
        elseif n <= 0 then e, name = at, nil -- empty: no reply
        else
          left, name, first, i = n, "", true, at
        end
      end
    elseif cum:get_u8(i) ~= DOLLAR then -- one bulk string of the command
      e, why = false, "expected '$'"
    else
      local len, at = uint_line(cum, i + 1, w)
      if len == nil then break end
      if len == false or len > MAX_BULK then
        e, why = false, "bad bulk length"
      elseif w - at < len + 2 then
        break
      elseif cum:get_u8(at + len) ~= CR or cum:get_u8(at + len + 1) ~= LF then
        e, why = false, "bulk string not followed by CRLF"
      else
        -- The name is read only when a denied one is that long.
        if first and lens[len] then name = upper(cum:tostring(at - ri, len)) end
        first, left, i = false, left - 1, at + len + 2
        if left == 0 then e = i end
      end
    end
    if e == false then
      if done > ri then -- the complete commands before it go on first
        out[#out + 1] = cum:read_slice(done - ri):retain()
        owe_server(g, run)
      end
      return malformed(ctx, g, "from the client", why)
    end
    if e then -- the command [done, e) is complete
      if name and g.deny[name] then
        if done > ri then -- the allowed commands before it go on first
          out[#out + 1] = cum:read_slice(done - ri):retain()
          owe_server(g, run)
        end
        cum:skip(e - done) -- the denied command's bytes are dropped
        owe_local(ctx, g, "-ERR command '" .. name .. "' is not allowed\r\n")
        ri, run = e, 0
      elseif name then
        run = run + 1
      end -- an empty command goes on too, and the server answers nothing
      done, i = e, e
    end
  end
  if done > ri then
    out[#out + 1] = cum:read_slice(done - ri):retain()
    owe_server(g, run)
  end
end

local stage = codec.decoder(decode, { max_cumulation = 8388608 })

-- The server's replies on their way to the client. A chunk that completes
-- the replies a local error waits for is split there: slices of the chunk
-- and the error go out in order, and the chunk itself is released.
function stage.write(ctx, msg, p)
  local g = guard(ctx)
  local ri, w = msg:reader_index(), msg:writer_index()
  local from, i = ri, ri -- [ri, from) already went out as slices
  local pieces = g.pieces
  while i < w and not g.closed do
    local e, complete = scan_element(g.rs, msg, i, w)
    if e == nil then break end
    if e == false then
      malformed(ctx, g, "from the server", "not a RESP reply")
      break
    end
    local due = complete and server_replied(g)
    if due then
      pieces[#pieces + 1] = msg:retained_slice(from, e - from)
      pieces[#pieces + 1] = due
      from = e
    end
    i = e
  end
  if from == ri then return ctx:write(msg, p) end -- the common case: as it came
  if from < w then pieces[#pieces + 1] = msg:retained_slice(from, w - from) end
  msg:release() -- each piece holds its own reference now
  local n = #pieces
  for k = 1, n do
    ctx:write(pieces[k], k == n and p or false)
    pieces[k] = nil
  end
end

-- Checked by `sluice --check` and at start-up: the key at fault and what it
-- expected, or nothing.
function stage.check_options(options)
  local list = options.deny
  if list == nil then return end
  if type(list) ~= "table" then return "deny", "a list of command names" end
  for i = 1, #list do
    if type(list[i]) ~= "string" or list[i] == "" then return "deny", "a list of command names" end
  end
  for k in pairs(list) do
    if type(k) ~= "number" then return "deny", "a list of command names" end
  end
  for k in pairs(options) do
    if k ~= "deny" then return k, nil, "deny" end
  end
end

return stage
