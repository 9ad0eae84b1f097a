-- sluice.config.resolver: the `resolver` table, the DNS servers that look
-- up host names (upstream servers, ctx:connect), with the answers' TTLs.
-- Absent: the system's resolver (getaddrinfo), at resolve_interval_ms and
-- resolve_cache_ms.
--
--   resolver    optional table:
--     servers         required array of 1 to 8 addresses, "ip", "ip:port",
--                     "[ip6]" or "[ip6]:port" (port 53 when absent); no
--                     host names
--     timeout_ms      optional integer 100-60000, default 1000: each try
--     tries           optional integer 1-10, default 2: tries of each server
--     valid_ms        optional integer 1000-2^31-1: keep answers this long
--                     whatever their TTL (nginx's `resolver ... valid=`)
--
-- Normalized: resolver = { servers = "ip:port,[ip6]:port" (c-ares' list),
-- list = { text, ... }, timeout_ms, tries, valid_ms (0: the TTL) } (or nil).

local _M = {}

local type = type
local concat = table.concat

local check = require("sluice.config.check")
local address = require("sluice.config.address")
local fail, show, check_keys = check.fail, check.show, check.check_keys
local MAX_INT = check.MAX_INT

require("sluice.config.sandbox").exempt()

local RESOLVER_KEYS = { "servers", "timeout_ms", "tries", "valid_ms" }
local MAX_SERVERS = 8
local DEFAULT_TIMEOUT_MS, MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 1000, 100, 60000
local DEFAULT_TRIES, MAX_TRIES = 2, 10
local MIN_VALID_MS = 1000

local function check_range(v, path, default, lo, hi)
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or v ~= math.floor(v) or v < lo or v > hi then
        fail(path, "expected an integer from %d to %d, got %s", lo, hi, show(v))
    end
    return v
end

-- One server: an address with the DNS port when none is given.
local function check_server(v, path)
    if type(v) ~= "string" then
        fail(path, 'expected an address "ip" or "ip:port" ([ip6] in brackets), got %s', show(v))
    end
    local given = v
    if v:find("^%d+%.%d+%.%d+%.%d+$") or v:find("^%[.*%]$") then v = v .. ":53" end
    local addr = address.check(v, path, false)
    if addr.family == "name" then
        fail(path, "expected an IP address (a DNS server is not found by name), got %s",
             show(given))
    end
    return addr.text
end

function _M.check(r)
    if r == nil then return nil end
    if type(r) ~= "table" then
        fail("resolver", 'expected a table { servers = { "127.0.0.1:53" } }, got %s', show(r))
    end
    check_keys(r, "resolver", RESOLVER_KEYS)
    local servers = r.servers
    if type(servers) ~= "table" then
        fail("resolver.servers", 'expected an array of DNS server addresses '
             .. '{ "10.0.0.2", "10.0.0.3:53" }, got %s', show(servers))
    end
    local n = check.check_array(servers, "resolver.servers")
    if n == 0 or n > MAX_SERVERS then
        fail("resolver.servers", "expected 1 to %d addresses, got %d", MAX_SERVERS, n)
    end
    local list = {}
    for i = 1, n do
        local text = check_server(servers[i], "resolver.servers[" .. i .. "]")
        for j = 1, #list do
            if list[j] == text then
                fail("resolver.servers[" .. i .. "]", "expected a unique address, got %s "
                     .. "(also resolver.servers[%d])", show(servers[i]), j)
            end
        end
        list[i] = text
    end
    return {
        servers = concat(list, ","),
        list = list,
        timeout_ms = check_range(r.timeout_ms, "resolver.timeout_ms", DEFAULT_TIMEOUT_MS,
                                 MIN_TIMEOUT_MS, MAX_TIMEOUT_MS),
        tries = check_range(r.tries, "resolver.tries", DEFAULT_TRIES, 1, MAX_TRIES),
        valid_ms = check_range(r.valid_ms, "resolver.valid_ms", 0, MIN_VALID_MS, MAX_INT),
    }
end

return _M
