-- sluice.config.allocator: the buffer allocator and its leak detection.
--
--   allocator   optional table (every key optional):
--     type            "pooled" (default) or "unpooled"
--     arenas          positive integer at most 256; absent (0): one
--                     per worker
--     page_size       power of two, 4 KiB-1 MiB, default 8 KiB
--     chunk_size      power of two, at least 16 pages, 64 KiB-32 MiB,
--                     default 4 MiB
--     small_cache     integer 0-65536, default 256
--     normal_cache    integer 0-65536, default 64
--     max_cached      integer 0-chunk_size, default 32768
--     trim_interval   positive integer, default 8192
--     trim_idle_ms    positive integer, default 10000
--     max_memory      integer, 0 (the default: no limit) or chunk_size-2^53
--   leak_detection  optional "disabled", "simple" (default), "advanced",
--               "paranoid", or { level = ..., sample_rate = 128 }
--
-- Normalized: allocator = { every key above, defaults filled in },
-- leak_detection = { level, sample_rate }.

local _M = {}

local type = type
local concat = table.concat

local check = require("sluice.config.check")
local fail, show, check_keys = check.fail, check.show, check.check_keys
local check_positive_int, check_count, check_pow2 =
    check.check_positive_int, check.check_count, check.check_pow2
local set_of = check.set_of

require("sluice.config.sandbox").exempt()

local ALLOCATOR_KEYS = { "type", "arenas", "page_size", "chunk_size", "small_cache",
                         "normal_cache", "max_cached", "trim_interval", "trim_idle_ms",
                         "max_memory" }
local LEAK_LEVELS = { "disabled", "simple", "advanced", "paranoid" }
local LEAK_KEYS = { "level", "sample_rate" }

-- leak_detection = "simple" or { level = "simple", sample_rate = 128 }.
function _M.check_leak_detection(v)
    local level, rate = "simple", 128
    if type(v) == "table" then
        check_keys(v, "leak_detection", LEAK_KEYS)
        level = v.level == nil and level or v.level
        rate = check_positive_int(v.sample_rate, "leak_detection.sample_rate", 128)
        if type(level) ~= "string" or not set_of(LEAK_LEVELS)[level] then
            fail("leak_detection.level", 'expected one of "%s", got %s',
                 concat(LEAK_LEVELS, '", "'), show(level))
        end
    elseif v ~= nil then
        if type(v) ~= "string" or not set_of(LEAK_LEVELS)[v] then
            fail("leak_detection", 'expected one of "%s" or a table { level = ..., sample_rate = ... }, got %s',
                 concat(LEAK_LEVELS, '", "'), show(v))
        end
        level = v
    end
    return { level = level, sample_rate = rate }
end

-- Returns the normalized allocator section (every key filled in).
function _M.check(a)
    if a == nil then a = {} end
    if type(a) ~= "table" then
        fail("allocator", "expected a table, got %s", show(a))
    end
    check_keys(a, "allocator", ALLOCATOR_KEYS)
    local out = {}
    if a.type ~= nil and a.type ~= "pooled" and a.type ~= "unpooled" then
        fail("allocator.type", 'expected "pooled" or "unpooled", got %s', show(a.type))
    end
    out.type = a.type or "pooled"
    out.arenas = check_positive_int(a.arenas, "allocator.arenas", 0)
    if out.arenas > 256 then
        fail("allocator.arenas", "expected at most 256, got %s", show(a.arenas))
    end
    out.page_size = check_pow2(a.page_size, "allocator.page_size", 8192, 4096, 1048576)
    out.chunk_size = check_pow2(a.chunk_size, "allocator.chunk_size", 4194304,
                                65536, 33554432)
    if out.chunk_size < 16 * out.page_size then
        fail("allocator.chunk_size", "expected at least 16 pages (%d), got %s",
             16 * out.page_size, show(out.chunk_size))
    end
    out.small_cache = check_count(a.small_cache, "allocator.small_cache", 256, 65536)
    out.normal_cache = check_count(a.normal_cache, "allocator.normal_cache", 64, 65536)
    out.max_cached = check_count(a.max_cached, "allocator.max_cached", 32768, out.chunk_size)
    out.trim_interval = check_positive_int(a.trim_interval, "allocator.trim_interval", 8192)
    out.trim_idle_ms = check_positive_int(a.trim_idle_ms, "allocator.trim_idle_ms", 10000)
    out.max_memory = check_count(a.max_memory, "allocator.max_memory", 0, 2 ^ 53)
    if out.max_memory ~= 0 and out.max_memory < out.chunk_size then
        fail("allocator.max_memory", "expected 0 (no limit) or at least chunk_size (%d), got %s",
             out.chunk_size, show(a.max_memory))
    end
    return out
end

return _M
