-- sluice.promise: the result of a write (Netty's ChannelPromise).
--
--   local p = ctx:write(buf)
--   p:on_complete(function(ok, err) ... end)   -- err: "closed", "reset",
--                                              -- "timeout", "outbound_limit"
--
-- A promise completes once: ok when the last byte of the write left through
-- the socket, or with the reason the write failed. Callbacks registered
-- after completion run at once. C reports completions by id; ids of
-- promises nobody holds any more are forgotten (weak table), but a pending
-- promise with a callback is held until it completes (`ctx:write(b):on_complete(fn)`
-- keeps no reference of its own).
--
-- A promise handed to a Lua stage's write callback is in that stage's hands
-- (a set of its own, see hand()) until the stage passes it on or completes
-- it. C never hears of one the stage drops: when the stage leaves its
-- pipeline (at the latest when the connection closes), fail_all() fails
-- what is still in its hands with "closed", so that nothing is held forever.
local setmetatable, type, tostring, next, pairs = setmetatable, type, tostring, next, pairs
local xpcall, traceback = xpcall, debug.traceback

local _M = {}

local Promise = {}
Promise.__index = Promise

local live = setmetatable({}, { __mode = "v" }) -- id -> promise
local held = {} -- id -> pending promise with callbacks
local next_id = 0

function _M.new()
  local id = next_id + 1
  if id >= 4294967295 then id = 1 end
  next_id = id
  local p = setmetatable({ id = id }, Promise)
  live[id] = p
  return p
end

function _M.id(p) return p.id end

function _M.is_promise(v) return getmetatable(v) == Promise end

-- Takes p out of the hands of the stage that has it (it moves on).
local function take(p)
  local at = p.at
  if at then
    at[p] = nil
    p.at = nil
  end
end
_M.take = take

-- p is in the hands of a stage now: `set` is that stage's (from hands()).
-- A promise in no stage's hands is C's, or its writer's.
function _M.hand(p, set)
  local at = p.at
  if at then at[p] = nil end
  p.at = set
  set[p] = true
end

local weak_keys = { __mode = "k" }
-- A new set of promises in a stage's hands: a promise that nobody refers to
-- any more (no callback, no variable) goes with the garbage.
function _M.hands() return setmetatable({}, weak_keys) end

local function complete(p, ok, err)
  if p.done then return end
  p.done, p.ok, p.err = true, ok, err
  live[p.id] = nil
  held[p.id] = nil
  take(p)
  local cbs = p.cbs
  if cbs then
    p.cbs = nil
    for i = 1, #cbs do cbs[i](ok, err) end
  end
end

function _M.fail(p, reason) complete(p, false, reason) end

-- Fails with `reason` every promise still in the set's hands (the stage
-- that has them leaves its pipeline), in no set order. Each completion is
-- protected on its own: a callback that raises is given to on_error (with
-- its traceback), and the other promises still fail.
function _M.fail_all(set, reason, on_error)
  if next(set) == nil then return end
  local list, n = {}, 0
  for p in pairs(set) do
    n = n + 1
    list[n] = p
  end
  for i = 1, n do
    local ok, err = xpcall(complete, traceback, list[i], false, reason) -- takes it out of the set
    if not ok then on_error(err) end
  end
end
function _M.succeed(p) complete(p, true, nil) end

-- C reports write `id` done (err nil) or failed.
function _M.settle(id, err)
  local p = live[id]
  if p then complete(p, err == nil, err) end
end

function Promise:on_complete(fn)
  if type(fn) ~= "function" then
    error(("bad 'fn' argument (function expected, got %s)"):format(type(fn)), 2)
  end
  if self.done then
    fn(self.ok, self.err)
  else
    local cbs = self.cbs
    if cbs then cbs[#cbs + 1] = fn else self.cbs = { fn } end
    held[self.id] = self
  end
  return self
end

function Promise:is_done() return self.done == true end
function Promise:is_success() return self.done == true and self.ok end
function Promise:cause() return self.err end

Promise.__tostring = function(p)
  return "promise " .. tostring(p.id) .. (p.done and (p.ok and " (done)" or " (failed: " .. tostring(p.err) .. ")") or " (pending)")
end

return _M
