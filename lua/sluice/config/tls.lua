-- sluice.config.tls: a listener's `tls` table, TLS termination on the
-- client side (_M.check), and an upstream's `tls` table, TLS from sluice
-- to the upstream's servers (_M.check_client, below).
--
--   tls                   optional table:
--     certificate         required non-empty string: a PEM file holding the
--                         certificate, then its chain; relative to the
--                         configuration file's folder
--     key                 required non-empty string: a PEM file holding its
--                         private key (no passphrase); relative as above
--     ocsp_response       optional non-empty string: a DER file holding
--                         an OCSP response for certificate, stapled for
--                         clients that ask (status_request); relative as
--                         above
--     certificates        optional non-empty array of { certificate, key,
--                         ocsp_response } (the same rules): more
--                         certificates, each shown to the clients whose SNI
--                         names one of its DNS names; the others get
--                         certificate
--     client_ca           optional non-empty string: a PEM file of the CAs
--                         whose client certificates are accepted (mutual
--                         TLS); relative as above
--     client_certificate  optional "required" (default) or "optional", only
--                         with client_ca: whether a client without a
--                         certificate is let in
--     crl                 optional non-empty string, only with client_ca: a
--                         PEM file of certificate revocation lists the
--                         client certificates are checked against;
--                         relative as above
--     ticket_keys         optional non-empty array of non-empty strings:
--                         files of session ticket keys (80 or 48 bytes,
--                         nginx's ssl_session_ticket_key format), the first
--                         encrypts, all decrypt; relative as above
--     ciphers             optional non-empty string: TLS 1.2 ciphers, in
--                         OpenSSL's cipher list syntax; default OpenSSL's
--     ciphersuites        optional non-empty string: TLS 1.3 suites, in
--                         OpenSSL's syntax ("TLS_AES_128_GCM_SHA256:...");
--                         default OpenSSL's
--     min_version         optional "TLSv1.2" or "TLSv1.3", default "TLSv1.2"
--     alpn                optional non-empty array of protocol names (1 to
--                         255 bytes each, e.g. "h2", "http/1.1"): the first
--                         of them, in this order, that a client offers is
--                         selected; none in common, none is
--     handshake_timeout_ms optional positive integer, default 10000: a
--                         handshake not done by then closes the connection
--                         (reason tls_handshake_timeout)
--     proxy_protocol      optional boolean, default false: a PROXY protocol
--                         header (v1 or v2) comes first on each connection,
--                         before the client's TLS bytes (a load balancer
--                         that passes TLS through); read with the parser of
--                         sluice.proxy_protocol, within handshake_timeout_ms,
--                         its address becomes the client's. Not with the
--                         stage sluice.proxy_protocol in the same listener
--                         (listeners.lua refuses that).
--
-- Checked in the order above. That the files can be read, that the key
-- belongs to the certificate and that OpenSSL takes the cipher lists is
-- checked by the core when it builds the TLS context (src/io/tls.c), with
-- the error at listeners[N].tls.KEY as well.
--
-- Normalized: nil, or { certificate, key (paths made absolute against the
-- configuration's folder when relative), ocsp_response (absolute, or nil),
-- certificates (or nil: an array of { certificate, key, ocsp_response },
-- absolute), client_ca (absolute, or nil), client_certificate ("required",
-- "optional", or nil without client_ca), crl (absolute, or nil),
-- ticket_keys (array of absolute paths, or nil), ciphers (or nil),
-- ciphersuites (or nil), min_version, alpn (array, or nil),
-- handshake_timeout_ms, proxy_protocol }.

-- An upstream's tls (_M.check_client): sluice is the TLS client.
--
--   tls                   optional: true (every default) or a table:
--     server_name         optional non-empty string: the host name sent in
--                         the ClientHello (SNI) and the name the servers'
--                         certificates must be for; default: for a server
--                         given as a host name, that name; for an address,
--                         no SNI and the address itself (an IP entry of
--                         the certificate)
--     verify              optional boolean, default true: the servers'
--                         certificates are verified (chain and name); false
--                         takes any certificate (encryption without
--                         authentication)
--     ca                  optional non-empty string: a PEM file of the
--                         certificates to trust; default the system's
--                         (/etc/ssl/certs, Debian's ca-certificates);
--                         relative to the configuration file's folder; not
--                         with verify = false
--     crl                 optional non-empty string: a PEM file of
--                         certificate revocation lists the servers'
--                         certificates are checked against; relative as
--                         ca; not with verify = false
--     certificate, key    optional non-empty strings, both or neither: the
--                         client certificate (then its chain) and its key,
--                         shown to servers that ask for one (mutual TLS)
--     ciphers, ciphersuites, min_version, alpn   as for a listener (alpn:
--                         the protocols offered, in this order)
--     session_reuse       optional boolean, default true: each worker keeps
--                         the last session of each server and resumes it
--
-- Checked in the order above. Normalized: nil, or { server_name (or nil),
-- verify, ca (absolute, or nil), crl (absolute, or nil), certificate, key (absolute, or nil),
-- ciphers, ciphersuites, min_version, alpn, session_reuse }.

local _M = {}

local type = type
local check = require("sluice.config.check")
local fail, show = check.fail, check.show
local check_keys, check_array, check_positive_int, check_one_of =
    check.check_keys, check.check_array, check.check_positive_int, check.check_one_of

require("sluice.config.sandbox").exempt()

local TLS_KEYS = { "certificate", "key", "ocsp_response", "certificates", "client_ca",
                   "client_certificate", "crl", "ticket_keys", "ciphers", "ciphersuites",
                   "min_version", "alpn", "handshake_timeout_ms", "proxy_protocol" }
local CLIENT_KEYS = { "server_name", "verify", "ca", "crl", "certificate", "key", "ciphers",
                      "ciphersuites", "min_version", "alpn", "session_reuse" }
local DEFAULT_HANDSHAKE_TIMEOUT_MS = 10000

local function check_string(v, path, required)
    if v == nil and not required then return nil end
    if type(v) ~= "string" or v == "" then
        fail(path, "expected a non-empty string, got %s", show(v))
    end
    return v
end

local function absolute(p, dir)
    if p:sub(1, 1) == "/" or dir == nil then return p end
    return (dir:gsub("/$", "")) .. "/" .. p
end

local function check_alpn(v, path)
    if v == nil then return nil end
    if type(v) ~= "table" or v[1] == nil then
        fail(path, "expected a non-empty array of protocol names, got %s", show(v))
    end
    local out = {}
    for i = 1, check_array(v, path) do
        local p = v[i]
        if type(p) ~= "string" or #p < 1 or #p > 255 then
            fail(path .. "[" .. i .. "]", "expected a string of 1 to 255 bytes, got %s", show(p))
        end
        out[i] = p
    end
    return out
end

local function check_certificates(v, path, config_dir)
    if v == nil then return nil end
    if type(v) ~= "table" or v[1] == nil then
        fail(path, "expected a non-empty array of { certificate = file, key = file }, got %s",
             show(v))
    end
    local out = {}
    for i = 1, check_array(v, path) do
        local e, epath = v[i], path .. "[" .. i .. "]"
        if type(e) ~= "table" then
            fail(epath, "expected a table { certificate = file, key = file }, got %s", show(e))
        end
        check_keys(e, epath, { "certificate", "key", "ocsp_response" })
        local ocsp = check_string(e.ocsp_response, epath .. ".ocsp_response", false)
        out[i] = {
            certificate = absolute(check_string(e.certificate, epath .. ".certificate", true),
                                   config_dir),
            key = absolute(check_string(e.key, epath .. ".key", true), config_dir),
            ocsp_response = ocsp and absolute(ocsp, config_dir),
        }
    end
    return out
end

local function check_ticket_keys(v, path, config_dir)
    if v == nil then return nil end
    if type(v) ~= "table" or v[1] == nil then
        fail(path, "expected a non-empty array of key files (the first encrypts), got %s",
             show(v))
    end
    local out = {}
    for i = 1, check_array(v, path) do
        out[i] = absolute(check_string(v[i], path .. "[" .. i .. "]", true), config_dir)
    end
    return out
end

-- Returns the normalized tls table of a listener (nil when absent).
-- config_dir: the configuration's folder (relative paths start there).
function _M.check(t, path, config_dir)
    if t == nil then return nil end
    if type(t) ~= "table" then
        fail(path, "expected a table { certificate, key, ... }, got %s", show(t))
    end
    check_keys(t, path, TLS_KEYS)
    local cert = check_string(t.certificate, path .. ".certificate", true)
    local key = check_string(t.key, path .. ".key", true)
    local ocsp = check_string(t.ocsp_response, path .. ".ocsp_response", false)
    local out = {
        certificate = absolute(cert, config_dir),
        key = absolute(key, config_dir),
        ocsp_response = ocsp and absolute(ocsp, config_dir),
        certificates = check_certificates(t.certificates, path .. ".certificates", config_dir),
        client_ca = check_string(t.client_ca, path .. ".client_ca", false),
        ciphers = check_string(t.ciphers, path .. ".ciphers", false),
        ciphersuites = check_string(t.ciphersuites, path .. ".ciphersuites", false),
        min_version = check_one_of(t.min_version, path .. ".min_version",
                                   { "TLSv1.2", "TLSv1.3" }, "TLSv1.2"),
        alpn = check_alpn(t.alpn, path .. ".alpn"),
        handshake_timeout_ms = check_positive_int(t.handshake_timeout_ms,
                                                  path .. ".handshake_timeout_ms",
                                                  DEFAULT_HANDSHAKE_TIMEOUT_MS),
    }
    if t.proxy_protocol ~= nil and type(t.proxy_protocol) ~= "boolean" then
        fail(path .. ".proxy_protocol", "expected a boolean, got %s", show(t.proxy_protocol))
    end
    out.proxy_protocol = t.proxy_protocol == true
    if out.client_ca then
        out.client_ca = absolute(out.client_ca, config_dir)
        out.client_certificate = check_one_of(t.client_certificate, path .. ".client_certificate",
                                              { "required", "optional" }, "required")
    elseif t.client_certificate ~= nil then
        fail(path .. ".client_certificate", "expected it only with client_ca (the CAs that "
             .. "issue client certificates), got %s", show(t.client_certificate))
    end
    local crl = check_string(t.crl, path .. ".crl", false)
    if crl and not out.client_ca then
        fail(path .. ".crl", "expected it only with client_ca (it revokes client "
             .. "certificates), got %s", show(crl))
    end
    out.crl = crl and absolute(crl, config_dir)
    out.ticket_keys = check_ticket_keys(t.ticket_keys, path .. ".ticket_keys", config_dir)
    return out
end

local function check_boolean(v, path, default)
    if v == nil then return default end
    if type(v) ~= "boolean" then fail(path, "expected a boolean, got %s", show(v)) end
    return v
end

-- Returns the normalized tls table of an upstream (nil when absent).
-- config_dir: the configuration's folder (relative paths start there).
function _M.check_client(t, path, config_dir)
    if t == nil or t == false then return nil end
    if t == true then t = {} end
    if type(t) ~= "table" then
        fail(path, "expected true or a table { server_name, ca, ... }, got %s", show(t))
    end
    check_keys(t, path, CLIENT_KEYS)
    local name = check_string(t.server_name, path .. ".server_name", false)
    -- A host name: SNI never carries an address (RFC 6066); a server
    -- given as an address is verified against it without server_name.
    if name and (#name > 253 or not name:find("^[%w_%-%.]+$") or name:find("^[%d%.]+$")) then
        fail(path .. ".server_name", "expected a host name (not an address), got %s", show(name))
    end
    local verify = check_boolean(t.verify, path .. ".verify", true)
    local ca = check_string(t.ca, path .. ".ca", false)
    if ca and not verify then
        fail(path .. ".ca", "expected no ca with verify = false (nothing is verified), got %s",
             show(ca))
    end
    local crl = check_string(t.crl, path .. ".crl", false)
    if crl and not verify then
        fail(path .. ".crl", "expected no crl with verify = false (nothing is verified), got %s",
             show(crl))
    end
    local cert = check_string(t.certificate, path .. ".certificate", false)
    local key = check_string(t.key, path .. ".key", cert ~= nil)
    if key and not cert then
        fail(path .. ".certificate", "expected the client certificate that goes with key, got nil")
    end
    return {
        server_name = name,
        verify = verify,
        ca = ca and absolute(ca, config_dir),
        crl = crl and absolute(crl, config_dir),
        certificate = cert and absolute(cert, config_dir),
        key = key and absolute(key, config_dir),
        ciphers = check_string(t.ciphers, path .. ".ciphers", false),
        ciphersuites = check_string(t.ciphersuites, path .. ".ciphersuites", false),
        min_version = check_one_of(t.min_version, path .. ".min_version",
                                   { "TLSv1.2", "TLSv1.3" }, "TLSv1.2"),
        alpn = check_alpn(t.alpn, path .. ".alpn"),
        session_reuse = check_boolean(t.session_reuse, path .. ".session_reuse", true),
    }
end

return _M
