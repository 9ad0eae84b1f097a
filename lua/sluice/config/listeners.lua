-- sluice.config.listeners: the `listeners` array, the addresses sluice
-- accepts connections on and what it does with them.
--
--   listeners   required non-empty array of listeners:
--     name            required non-empty string of letters, digits, "_", "-"
--                     and ".", unique
--     listen          required "host:port" (sluice.config.address): IPv4,
--                     [IPv6], localhost (becomes 127.0.0.1) or * / 0.0.0.0;
--                     port 1-65535; unique, and not overlapping another
--                     (nor admin.listen)
--     upstream        optional name of an upstream
--     pipeline        optional array of stages (sluice.config.stages):
--                     "module.name" or { "module.name", option = value, ... }
--     low_water_mark  optional positive integer, default 524288 (or
--                     high_water_mark when that is smaller)
--     high_water_mark optional positive integer, default 1048576
--     outbound_limit  optional positive integer, at least high_water_mark,
--                     default 16777216: a connection whose outbound queue
--                     would grow above it is closed (reason outbound_limit)
--     write_spin_count optional positive integer, default 16: sendmsg calls
--                     per connection per loop iteration
--     max_bytes_per_gathering_write optional positive integer: bytes per
--                     sendmsg call; absent, it adapts (from 2 x SO_SNDBUF)
--     max_connections optional positive integer: open client connections
--                     of this listener (all workers together) at which
--                     accepting pauses; default 0 (no limit)
--     max_connections_per_client optional positive integer: open client
--                     connections of this listener from one IP address
--                     (all workers together); one more is closed at once
--                     ("max_connections_per_client"); default 0 (no limit)
--     max_connection_rate optional integer from 1 to 1000000: connections
--                     accepted per second (all workers together); above
--                     it accepting pauses; default 0 (no limit)
--     idle_timeout_ms optional positive integer: a client connection with
--                     no bytes either way for this long is closed; default
--                     0 (none)
--     write_timeout_ms optional positive integer: a connection (client or
--                     upstream side) whose flushed bytes wait this long for
--                     its socket without one being taken is closed (reason
--                     write_timeout); default 0 (none)
--     connect_timeout_ms optional positive integer: overrides the upstream's
--                     connect timeout for this listener's connections
--     defer_accept    optional boolean, default false: TCP_DEFER_ACCEPT
--                     (1 s), the kernel hands over a connection once its
--                     client has sent something (for protocols where the
--                     client speaks first)
--     splice          optional boolean or "auto", default "auto": a
--                     pass-through connection (no pipeline) moves bulk
--                     bytes socket to socket with splice(2), without
--                     copying them; "auto" splices only into a peer that
--                     is not on the loopback interface
--     half_close      optional boolean, default true: a FIN from either
--                     side is passed on and the other direction goes on
--                     (a half-close); false: the first FIN ends the
--                     connection (each side closes once it has written
--                     what is queued for it)
--     half_close_timeout_ms optional positive integer: once one direction
--                     has ended (a FIN either way), the idle timeout of the
--                     client connection becomes this when shorter; default
--                     0 (idle_timeout_ms goes on)
--     tcp_keepalive   optional boolean or table { idle_ms, interval_ms,
--                     count } (each optional; the system's setting when
--                     absent): TCP keepalive on the client and upstream
--                     sockets; default false
--     backlog         optional integer 1..65535, default 511: the length of
--                     the queue of connections the kernel has completed
--                     and sluice has not accepted yet (listen(2); the
--                     kernel caps it at net.core.somaxconn)
--     tls             optional table (sluice.config.tls): TLS on the client
--                     side of this listener's connections
--     (and at least an upstream or a non-empty pipeline)
--
-- Listeners are checked in array order; inside each, the keys in the order
-- above from name to max_bytes_per_gathering_write, then low <= high, then
-- high <= outbound_limit, then the other keys, then "an upstream or a
-- pipeline".
--
-- Normalized: listeners = { { name, listen = address, upstream (or nil),
-- pipeline = { stage entries }, low_water_mark, high_water_mark,
-- outbound_limit, write_spin_count, max_bytes_per_gathering_write (or nil:
-- adaptive), max_connections, max_connections_per_client,
-- max_connection_rate, idle_timeout_ms,
-- write_timeout_ms, connect_timeout_ms,
-- defer_accept, splice, half_close, half_close_timeout_ms, tcp_keepalive (false or
-- { idle_ms, interval_ms, count }, 0: the system's), backlog, tls (or nil) } }

local _M = {}

local type = type
local ipairs = ipairs
local next = next
local format = string.format
local concat = table.concat

local check = require("sluice.config.check")
local address = require("sluice.config.address")
local stages = require("sluice.config.stages")
local tls = require("sluice.config.tls")
local fail, show = check.fail, check.show
local check_keys, check_array, check_positive_int =
    check.check_keys, check.check_array, check.check_positive_int

require("sluice.config.sandbox").exempt()

-- 1 MiB: a read burst (16 reads of up to 64 KiB) goes out in one gathered
-- write instead of one write per read; see docs/operations.md (Tuning).
local DEFAULT_LOW_WATER_MARK = 524288
local DEFAULT_HIGH_WATER_MARK = 1048576
local DEFAULT_OUTBOUND_LIMIT = 16 * 1024 * 1024
local DEFAULT_WRITE_SPIN_COUNT = 16

local LISTENER_KEYS = { "name", "listen", "upstream", "pipeline",
                        "low_water_mark", "high_water_mark", "outbound_limit",
                        "write_spin_count", "max_bytes_per_gathering_write",
                        "max_connections", "max_connections_per_client", "max_connection_rate",
                        "idle_timeout_ms", "write_timeout_ms", "connect_timeout_ms",
                        "defer_accept", "splice", "half_close", "half_close_timeout_ms",
                        "tcp_keepalive", "backlog", "tls" }
local KEEPALIVE_KEYS = { "idle_ms", "interval_ms", "count" }
local DEFAULT_BACKLOG = 511   -- nginx's on Linux
local MAX_BACKLOG = 65535
local MAX_CONNECTION_RATE = 1000000
local MAX_KEEPALIVE_MS = 32767000  -- TCP_KEEPIDLE and TCP_KEEPINTVL take up to 32767 s
local MAX_KEEPALIVE_COUNT = 127

-- tcp_keepalive: false (off), true (on, the system's settings) or a table of
-- idle_ms, interval_ms and count (each optional). Normalized to false or
-- { idle_ms, interval_ms, count } with 0 for "the system's".
local function check_keepalive(v, path)
    if v == nil or v == false then return false end
    if v == true then return { idle_ms = 0, interval_ms = 0, count = 0 } end
    if type(v) ~= "table" then
        fail(path, "expected a boolean or a table { idle_ms, interval_ms, count }, got %s", show(v))
    end
    check_keys(v, path, KEEPALIVE_KEYS)
    local out = {}
    for _, k in ipairs({ "idle_ms", "interval_ms" }) do
        out[k] = check_positive_int(v[k], path .. "." .. k, 0)
        if out[k] > MAX_KEEPALIVE_MS then
            fail(path .. "." .. k, "expected at most %d, got %s", MAX_KEEPALIVE_MS, show(v[k]))
        end
    end
    out.count = check_positive_int(v.count, path .. ".count", 0)
    if out.count > MAX_KEEPALIVE_COUNT then
        fail(path .. ".count", "expected at most %d, got %s", MAX_KEEPALIVE_COUNT, show(v.count))
    end
    return out
end

-- Returns the normalized listener at `path`. ctx.names and
-- ctx.addresses map names and listen texts to the path that used them first.
local function check_listener(l, path, ctx)
    if type(l) ~= "table" then
        fail(path, "expected a listener table, got %s", show(l))
    end
    check_keys(l, path, LISTENER_KEYS)

    local name = l.name
    if type(name) ~= "string" or name == "" then
        fail(path .. ".name", "expected a non-empty string, got %s", show(name))
    end
    -- The name goes unquoted into log lines, the access log's logfmt and
    -- metric labels: a space, a quote or a newline would break them.
    if not name:find("^[%w_%-%.]+$") then
        fail(path .. ".name", 'expected a name made of letters, digits, "_", "-" and ".", got %s',
             show(name))
    end
    if ctx.names[name] then
        fail(path .. ".name", "expected a unique name, got %s (also %s)",
             show(name), ctx.names[name])
    end
    ctx.names[name] = path

    local listen = address.check(l.listen, path .. ".listen", true)
    address.claim(ctx, listen, path, path .. ".listen", l.listen)

    local upstream = l.upstream
    if upstream ~= nil and (type(upstream) ~= "string" or not ctx.upstreams[upstream]) then
        fail(path .. ".upstream", "expected the name of an upstream (%s), got %s",
             #ctx.upstream_names == 0 and "no upstreams are defined"
             or "one of: " .. concat(ctx.upstream_names, ", "),
             show(upstream))
    end

    local pipeline = stages.check_pipeline(l.pipeline, path, ctx)

    local low = check_positive_int(l.low_water_mark, path .. ".low_water_mark", nil)
    local high = check_positive_int(l.high_water_mark, path .. ".high_water_mark",
                                    DEFAULT_HIGH_WATER_MARK)
    local limit = check_positive_int(l.outbound_limit, path .. ".outbound_limit",
                                     DEFAULT_OUTBOUND_LIMIT)
    local spin = check_positive_int(l.write_spin_count, path .. ".write_spin_count",
                                    DEFAULT_WRITE_SPIN_COUNT)
    local gather = check_positive_int(l.max_bytes_per_gathering_write,
                                      path .. ".max_bytes_per_gathering_write", nil)
    if low == nil then
        -- The default low mark never exceeds an explicit, smaller high one.
        low = DEFAULT_LOW_WATER_MARK < high and DEFAULT_LOW_WATER_MARK or high
    elseif low > high then
        fail(path .. ".low_water_mark", "expected at most high_water_mark (%d), got %s",
             high, show(low))
    end
    if limit < high then
        fail(path .. ".outbound_limit", "expected at least high_water_mark (%d), got %s",
             high, show(limit))
    end

    local max_connections = check_positive_int(l.max_connections,
                                               path .. ".max_connections", 0)
    local per_client = check_positive_int(l.max_connections_per_client,
                                          path .. ".max_connections_per_client", 0)
    local max_rate = check_positive_int(l.max_connection_rate,
                                        path .. ".max_connection_rate", 0)
    if max_rate > MAX_CONNECTION_RATE then
        fail(path .. ".max_connection_rate", "expected an integer from 1 to %d, got %s",
             MAX_CONNECTION_RATE, show(l.max_connection_rate))
    end
    local idle_timeout_ms = check_positive_int(l.idle_timeout_ms,
                                               path .. ".idle_timeout_ms", 0)
    local write_timeout_ms = check_positive_int(l.write_timeout_ms,
                                                path .. ".write_timeout_ms", 0)
    local connect_timeout_ms = check_positive_int(l.connect_timeout_ms,
                                                  path .. ".connect_timeout_ms", 0)
    if l.defer_accept ~= nil and type(l.defer_accept) ~= "boolean" then
        fail(path .. ".defer_accept", "expected a boolean, got %s", show(l.defer_accept))
    end
    if l.splice ~= nil and type(l.splice) ~= "boolean" and l.splice ~= "auto" then
        fail(path .. ".splice", 'expected a boolean or "auto", got %s', show(l.splice))
    end
    if l.half_close ~= nil and type(l.half_close) ~= "boolean" then
        fail(path .. ".half_close", "expected a boolean, got %s", show(l.half_close))
    end
    local half_close_timeout_ms = check_positive_int(l.half_close_timeout_ms,
                                                     path .. ".half_close_timeout_ms", 0)
    local keepalive = check_keepalive(l.tcp_keepalive, path .. ".tcp_keepalive")
    local backlog = check_positive_int(l.backlog, path .. ".backlog", DEFAULT_BACKLOG)
    if backlog > MAX_BACKLOG then
        fail(path .. ".backlog", "expected an integer from 1 to %d, got %s", MAX_BACKLOG,
             show(l.backlog))
    end
    local tls_cfg = tls.check(l.tls, path .. ".tls", ctx.config_dir)
    -- One header: the one before the TLS bytes, or one inside them.
    if tls_cfg and tls_cfg.proxy_protocol and pipeline[1]
        and pipeline[1].module == "sluice.proxy_protocol" then
        fail(path .. ".tls.proxy_protocol", 'expected no stage "sluice.proxy_protocol" in the '
             .. "pipeline with it (the header is read before the TLS handshake), got both")
    end

    if upstream == nil and #pipeline == 0 then
        fail(path, "expected an upstream or a pipeline")
    end

    return {
        name = name,
        listen = listen,
        upstream = upstream,
        pipeline = pipeline,
        low_water_mark = low,
        high_water_mark = high,
        outbound_limit = limit,
        write_spin_count = spin,
        max_bytes_per_gathering_write = gather,
        max_connections = max_connections,
        max_connections_per_client = per_client,
        max_connection_rate = max_rate,
        idle_timeout_ms = idle_timeout_ms,
        write_timeout_ms = write_timeout_ms,
        connect_timeout_ms = connect_timeout_ms,
        defer_accept = l.defer_accept == true,
        splice = l.splice == nil and "auto" or l.splice,
        half_close = l.half_close ~= false,
        half_close_timeout_ms = half_close_timeout_ms,
        tcp_keepalive = keepalive,
        backlog = backlog,
        tls = tls_cfg,
    }
end

-- Returns the normalized listeners array. ctx.upstreams and
-- ctx.upstream_names are the upstreams already checked.
function _M.check(ls, ctx)
    if type(ls) ~= "table" or next(ls) == nil then
        fail("listeners", "expected a non-empty array of listener tables, got %s", show(ls))
    end
    local out = {}
    for i = 1, check_array(ls, "listeners") do
        out[i] = check_listener(ls[i], format("listeners[%d]", i), ctx)
    end
    return out
end

return _M
