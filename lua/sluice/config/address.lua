-- sluice.config.address: "host:port" addresses, as listeners, admin and
-- upstream servers give them.
--
--   "host:port": IPv4 (dotted quad, no leading zeros), [IPv6] (in brackets;
--   "::" compression and an IPv4 tail allowed, no zone ids, not an
--   IPv4-mapped address such as [::ffff:127.0.0.1]), localhost
--   (becomes 127.0.0.1), for a listening address * / 0.0.0.0 / [::], and
--   for an address to connect to a host name (letters, digits, "-" and
--   "." in labels of 1 to 63, 253 at most, not all digits; a final "."
--   allowed), which sluice.config.upstreams resolves; port 1-65535.
--
-- Normalized: address = { host (no brackets), port, text ("h:p" or
-- "[h6]:p"), family = "inet" or "inet6" }; IPv6 hosts in RFC 5952 form. A
-- host name: { name, port, text = "name:port", family = "name" }.

local _M = {}

local ipairs = ipairs
local type = type
local tonumber = tonumber
local format = string.format
local concat = table.concat
local floor = math.floor

local check = require("sluice.config.check")
local fail, show = check.fail, check.show

require("sluice.config.sandbox").exempt()

-- Returns the canonical text of a dotted-quad IPv4 address, or nil.
-- Octets are 0-255 without leading zeros (inet_pton rejects them too).
local function parse_ipv4(s)
    local o = { s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
    if #o ~= 4 then return nil end
    for i = 1, 4 do
        if #o[i] > 3 or (#o[i] > 1 and o[i]:sub(1, 1) == "0")
           or tonumber(o[i]) > 255 then
            return nil
        end
        o[i] = tonumber(o[i])
    end
    return concat(o, "."), o
end

-- Appends the 16-bit groups of "h:h:...:h" (or "") to out. Returns false on
-- a malformed group.
local function hex_groups(s, out)
    if s == "" then return true end
    for g in (s .. ":"):gmatch("([^:]*):") do
        if not g:find("^%x%x?%x?%x?$") then return false end
        out[#out + 1] = tonumber(g, 16)
    end
    return true
end

-- Returns the canonical (RFC 5952: lower case, no leading zeros, longest run
-- of two or more zero groups as "::") text of an IPv6 address, or nil.
-- Accepts "::" compression and an embedded IPv4 tail; no zone ids.
local function parse_ipv6(s)
    if s:find("[^%x:%.]") then return nil end
    local groups, tail = {}, {}
    if s:find(".", 1, true) then  -- embedded IPv4 tail: "...:a.b.c.d"
        local head, v4 = s:match("^(.*:)([^:]*)$")
        local _, octets = parse_ipv4(v4 or "")
        if not octets then return nil end
        tail = { octets[1] * 256 + octets[2], octets[3] * 256 + octets[4] }
        s = head:find("::$") and head or head:sub(1, -2)
    end
    local want = 8 - #tail
    local a, b = s:find("::", 1, true)
    if a then
        if s:find("::", b, true) then return nil end  -- "::" twice, or ":::"
        local left, right = {}, {}
        if not hex_groups(s:sub(1, a - 1), left)
           or not hex_groups(s:sub(b + 1), right)
           or #left + #right >= want then
            return nil
        end
        groups = left
        for _ = 1, want - #left - #right do groups[#groups + 1] = 0 end
        for _, g in ipairs(right) do groups[#groups + 1] = g end
    elseif not hex_groups(s, groups) or #groups ~= want then
        return nil
    end
    for _, g in ipairs(tail) do groups[#groups + 1] = g end

    -- Longest run of zero groups (leftmost on ties), if at least two long.
    local best_at, best_len, run_at = nil, 1, nil
    for i = 1, 9 do
        if groups[i] == 0 then
            run_at = run_at or i
        elseif run_at then
            if i - run_at > best_len then best_at, best_len = run_at, i - run_at end
            run_at = nil
        end
    end
    local text = {}
    for i = 1, 8 do text[i] = format("%x", groups[i]) end
    if not best_at then return concat(text, ":") end
    return concat(text, ":", 1, best_at - 1) .. "::"
           .. concat(text, ":", best_at + best_len, 8)
end

-- Whether s is a host name: dot-separated labels of letters, digits and
-- "-" (not first or last), 1 to 63 bytes each, 253 in all (a final dot
-- aside), and not only digits and dots (that is a malformed IPv4 address).
local function is_host_name(s)
    local bare = s:gsub("%.$", "")
    if #bare == 0 or #bare > 253 or not bare:find("[%a%-]") then return false end
    for label in (bare .. "."):gmatch("([^.]*)%.") do
        if #label == 0 or #label > 63 or label:find("[^%w%-]")
           or label:find("^%-") or label:find("%-$") then
            return false
        end
    end
    return true
end

-- Returns the IPv4 address (dotted quad) of an IPv4-mapped IPv6 address in
-- canonical form ("::ffff:7f00:1" for ::ffff:127.0.0.1), or nil. sluice
-- refuses those: listening on one fails (IPv6 listeners are IPv6-only), and
-- connecting to one from an IPv6 socket works only while the system maps
-- IPv4 into IPv6 (net.ipv6.bindv6only = 0), as a server apart from the
-- same IPv4 address.
local function v4_of_mapped(host)
    local hi, lo = host:match("^::ffff:(%x+):(%x+)$")
    if not hi then return nil end
    hi, lo = tonumber(hi, 16), tonumber(lo, 16)
    return format("%d.%d.%d.%d", floor(hi / 256), hi % 256, floor(lo / 256), lo % 256)
end

-- Parses a "host:port" string. `listen` allows the wildcard hosts `*` and
-- 0.0.0.0 (and [::]); servers may not use them.
-- Returns { host, port, text, family } or nil, <what was expected>.
local function parse_address(s, listen)
    local expected = '"host:port"'
    if type(s) ~= "string" then return nil, expected end
    local host, port, bracketed = s:match("^%[([^%]]*)%]:(.*)$")
    if host then
        bracketed = true
    elseif s:find("^%[") then
        return nil, expected
    elseif s:find(":.*:") then
        return nil, expected .. ' with an IPv6 host in brackets, as "[::1]:80"'
    else
        host, port = s:match("^([^:]*):(.*)$")
        if not host then return nil, expected end
    end
    port = port:find("^%d+$") and tonumber(port)
    if not port or port < 1 or port > 65535 then
        return nil, expected .. " with a port from 1 to 65535"
    end

    local family, text
    if bracketed then
        host, family = parse_ipv6(host), "inet6"
    elseif host == "localhost" then
        host, family = "127.0.0.1", "inet"
    elseif host == "*" then
        host, family = "0.0.0.0", "inet"
    elseif not listen and not parse_ipv4(host) and is_host_name(host) then
        return { name = host, port = port, text = format("%s:%d", host, port), family = "name" }
    else
        host, family = parse_ipv4(host), "inet"
    end
    if not host and bracketed then
        return nil, expected .. " with a valid IPv6 address in the brackets"
    end
    local mapped = family == "inet6" and v4_of_mapped(host)
    if mapped then
        return nil, format('%s with an IPv4 address written as itself, not IPv4-mapped '
                           .. '(write "%s:%d")', expected, mapped, port)
    elseif not host then
        return nil, expected .. (listen
            and " with host an IPv4 address, [IPv6 address], localhost or *"
            or " with host an IPv4 address, [IPv6 address], localhost or a host name")
    end
    if not listen and (host == "0.0.0.0" or host == "::") then
        return nil, expected .. " with a host to connect to (not *, 0.0.0.0 or [::])"
    end
    if family == "inet6" then
        text = format("[%s]:%d", host, port)
    else
        text = format("%s:%d", host, port)
    end
    return { host = host, port = port, text = text, family = family }
end

local function is_wildcard(addr) return addr.host == "0.0.0.0" or addr.host == "::" end

-- Records that `owner` listens on addr, or fails when something already
-- does: the same address, or the same port where either is the wildcard of
-- the family (the kernel would refuse the second bind at start-up).
-- (IPv6 listeners are IPv6-only, so the families do not overlap.)
function _M.claim(ctx, addr, owner, path, given)
    local other = ctx.addresses[addr.text]
    if other then
        fail(path, "expected a unique address, got %s (%s is also used by %s)",
             show(given), addr.text, other)
    end
    ctx.listening = ctx.listening or {}
    for _, o in ipairs(ctx.listening) do
        if o.addr.family == addr.family and o.addr.port == addr.port
           and (is_wildcard(o.addr) or is_wildcard(addr)) then
            fail(path, "expected an address that does not overlap another, got %s "
                 .. "(%s overlaps %s used by %s)", show(given), addr.text, o.addr.text, o.owner)
        end
    end
    ctx.addresses[addr.text] = owner
    ctx.listening[#ctx.listening + 1] = { addr = addr, owner = owner }
end

-- Returns the normalized address at `path`, or fails.
function _M.check(v, path, listen)
    local addr, expected = parse_address(v, listen)
    if not addr then fail(path, "expected %s, got %s", expected, show(v)) end
    return addr
end

-- Is the normalized address on the loopback interface?
function _M.is_loopback(addr)
    if addr.family == "inet6" then return addr.host == "::1" end
    return addr.host:find("^127%.") ~= nil
end

return _M
