-- sluice.config.sandbox: where the user code that a configuration runs (the
-- file, the stage modules it names, their check_options) runs: its
-- environment, and the instruction limit.
--
-- A load or a validation runs that code on the thread that also takes
-- sluice's signals, so one that never ends would hang `--check`, the start,
-- or a reload together with the SIGTERM after it. It runs with the JIT off
-- (compiled code runs no hooks) under a count hook: once user code has run
-- past the limit (opts.instruction_limit, default 100 million) it fails with
-- `still running after N Lua instructions (a loop that never ends?)`. The
-- validation's own work (the code of the files that call exempt()) is not
-- counted.

local _M = {}

local error = error
local pcall = pcall
local setmetatable = setmetatable
local format = string.format
local ceil = math.ceil
local unpack = unpack
local maxn = table.maxn
local gethook, sethook, getinfo = debug.gethook, debug.sethook, debug.getinfo
local jit = jit
local _G = _G

-- About a quarter of a second of interpreted Lua here: thousands of times
-- what a configuration and its stage modules take.
_M.DEFAULT_INSTRUCTION_LIMIT = 100000000
local HOOK_STEP = 100000

-- The environment that configuration files and stage modules run in: reads
-- fall through to the real globals, writes (including `_G.x = ...`) stay in
-- the sandbox. Library tables (string, math, ...) are shared, not copied.
function _M.env()
    local env = setmetatable({}, { __index = _G })
    env._G = env
    return env
end

local own_sources = {}  -- source -> true: sluice.config's own files

-- Marks the file that calls it as sluice.config's own code: instructions
-- run there do not count against the limit.
function _M.exempt()
    own_sources[getinfo(2, "S").source] = true
end
_M.exempt()

-- Is `source` (debug.getinfo's) one of sluice.config's own files?
function _M.is_own(source)
    return own_sources[source] == true
end

local bounded_depth = 0  -- > 0 while a bounded call runs (validate inside load)

-- Calls fn(...) under the instruction limit `limit`. Returns what fn
-- returns, or nil, "config error: <where>: still running ..." when the limit
-- was reached. The hook fires every HOOK_STEP instructions and counts a step
-- only when it finds code outside sluice.config's own files running: the
-- validation itself, however large the configuration, is not user code and
-- is never stopped. Past the limit the hook fires at every instruction while
-- user code runs and raises each time, so a pcall in user code cannot
-- swallow it; back in sluice.config's own code it steps again. Other errors
-- pass through.
function _M.bounded(where, limit, fn, ...)
    if bounded_depth > 0 then return fn(...) end
    local msg = format("still running after %d Lua instructions (a loop that never ends?)",
                       limit)
    local steps, max_steps, over, each = 0, ceil(limit / HOOK_STEP), false, false
    local function hook()
        if own_sources[getinfo(2, "S").source] then
            if each then
                each = false
                sethook(hook, "", HOOK_STEP)
            end
            return
        end
        if not over then
            steps = steps + 1
            if steps < max_steps then return end
            over = true
        end
        if not each then
            each = true
            sethook(hook, "", 1)
        end
        error(msg, 0)
    end
    local old_hook, old_mask, old_count = gethook()
    local jit_on = jit.status()
    jit.off()
    bounded_depth = bounded_depth + 1
    sethook(hook, "", HOOK_STEP)
    local res = { pcall(fn, ...) }
    sethook(old_hook, old_mask, old_count)
    bounded_depth = bounded_depth - 1
    if jit_on then jit.on() end
    if res[1] then return unpack(res, 2, maxn(res)) end
    if res[2] == msg then return nil, format("config error: %s: %s", where, msg) end
    error(res[2], 0)
end

return _M
