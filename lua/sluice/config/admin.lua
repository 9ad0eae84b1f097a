-- sluice.config.admin: the `admin` table, the admin endpoint (/metrics,
-- /memory, /upstreams, /health); off when absent.
--
--   admin       optional table:
--     listen          required "host:port"; a loopback host (127.0.0.0/8,
--                     [::1], localhost) unless public is true; not the
--                     address of a listener
--     public          optional boolean, default false: allow any address
--
-- Normalized: admin = { listen = address, public } (or nil).

local _M = {}

local type = type

local check = require("sluice.config.check")
local address = require("sluice.config.address")
local fail, show, check_keys = check.fail, check.show, check.check_keys

require("sluice.config.sandbox").exempt()

local ADMIN_KEYS = { "listen", "public" }

-- admin = { listen = "127.0.0.1:9901", public = false }. Returns the
-- normalized table, or nil when absent (no admin endpoint).
function _M.check(a, ctx)
    if a == nil then return nil end
    if type(a) ~= "table" then
        fail("admin", 'expected a table { listen = "127.0.0.1:9901" }, got %s', show(a))
    end
    check_keys(a, "admin", ADMIN_KEYS)
    if a.listen == nil then
        fail("admin.listen", 'expected "host:port" (the admin endpoint\'s address), got nil')
    end
    local listen = address.check(a.listen, "admin.listen", true)
    if a.public ~= nil and type(a.public) ~= "boolean" then
        fail("admin.public", "expected a boolean, got %s", show(a.public))
    end
    local public = a.public == true
    if not public and not address.is_loopback(listen) then
        fail("admin.listen", "expected a loopback address (127.0.0.1, [::1] or localhost) "
             .. "unless admin.public = true, got %s", show(a.listen))
    end
    address.claim(ctx, listen, "admin.listen", "admin.listen", a.listen)
    return { listen = listen, public = public }
end

return _M
