-- The `resolver` key: host names looked up on named DNS servers, through
-- the real binary and a real DNS server (dnsmasq, answering from a hosts
-- file of the spec's on 127.0.0.1 with the TTL the test gives), and the
-- answers' TTLs deciding when a name is looked up again.
local H = require("helpers")

describe("host names looked up on the resolver's DNS servers", function()
  local peers = H.killed_after_each()

  -- A dnsmasq on a fresh port of 127.0.0.1 answering for *.sluice.test from
  -- a hosts file (hosts_text) with TTL ttl, and nothing else (no upstream
  -- servers: other names are not found). Logs every query.
  local function start_dns(hosts_text, ttl)
    local hosts = H.tmpfile("dns-hosts", hosts_text)
    local port = H.free_port()
    -- As the spec's own user (run as root, dnsmasq would become nobody, who
    -- cannot read the spec's files).
    local user = H.sh("id -un"):gsub("%s+$", "")
    local p = H.spawn(("dnsmasq -k -C /dev/null -p %d --listen-address=127.0.0.1 "
      .. "--bind-interfaces -R -h --addn-hosts=%s --local-ttl=%d --local=/sluice.test/ "
      .. "--user=%s --log-facility=- --log-queries"):format(port, H.shq(hosts), ttl, H.shq(user)),
      "dnsmasq")
    peers[#peers + 1] = p
    assert(H.wait_for(function() return H.read(p.log):find("- 1 names", 1, true) end, 10),
           "dnsmasq did not start:\n" .. H.read(p.log))
    p.port, p.hosts = port, hosts
    return p
  end

  -- Gives the name new addresses: the hosts file again, and SIGHUP, which
  -- makes dnsmasq read it and forget what it cached.
  local function rewrite(dns, hosts_text)
    local f = assert(io.open(dns.hosts, "w"))
    f:write(hosts_text)
    f:close()
    local before = select(2, H.read(dns.log):gsub("read [^\n]* names", ""))
    H.sh("kill -HUP " .. dns.pid)
    assert(H.wait_for(function()
      return select(2, H.read(dns.log):gsub("read [^\n]* names", "")) > before
    end, 10), "dnsmasq did not read its hosts file again:\n" .. H.read(dns.log))
  end

  -- Peers A on 127.0.0.2 and B on 127.0.0.3, on one port (returned): each
  -- says its name, then echoes what it gets.
  local function peers_ab()
    local port = H.free_port()
    for _, pe in ipairs({ { "127.0.0.2", "A" }, { "127.0.0.3", "B" } }) do
      peers[#peers + 1] = H.spawn(("socat TCP-LISTEN:%d,bind=%s,reuseaddr,fork SYSTEM:%s")
        :format(port, pe[1], H.shq("printf " .. pe[2] .. "; exec cat")), "peer")
    end
    assert(H.wait_for(function()
      for _, host in ipairs({ "127.0.0.2", "127.0.0.3" }) do
        local _, rc = H.sh(("socat -T1 /dev/null TCP:%s:%d,connect-timeout=1"):format(host, port))
        if rc ~= 0 then return false end
      end
      return true
    end, 10), "the peers did not start")
    return port
  end

  local function proxy_config(port, dns_port, server, extra)
    return ([[
return {
  workers = 1,
  resolver = { servers = { "127.0.0.1:%d" }, timeout_ms = 500 %s },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { %q }, resolve_interval_ms = 600000 } },
}
]]):format(dns_port, extra or "", port, server)
  end

  -- Waits (bounded) until a connection to port answers `want` to "x".
  local function answers(port, want)
    local got
    local ok = H.wait_for(function()
      got = H.exchange(port, "x", 5)
      return got == want
    end, 20)
    return ok, got
  end

  it("moves new connections to a name's new address when its answer's TTL runs out, long "
     .. "before resolve_interval_ms", function()
    local port_b = peers_ab()
    local dns = start_dns("127.0.0.2 svc.sluice.test\n", 1)
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, dns.port, "svc.sluice.test:" .. port_b))
    assert.are.equal("Ax", (H.exchange(port, "x", 5)))
    rewrite(dns, "127.0.0.3 svc.sluice.test\n")
    local ok, got = answers(port, "Bx")
    local log = H.stop_sluice(p)
    assert.is_true(ok, "still " .. tostring(got) .. ":\n" .. log)
    assert.matches(("upstream back: svc.sluice.test:%d is 127.0.0.2:%d"):format(port_b, port_b),
                   log, 1, true)
    assert.matches(("host names resolved again: servers 127.0.0.3:%d (were 127.0.0.2:%d)")
                     :format(port_b, port_b), log, 1, true)
    -- Asked of the named server, A and AAAA.
    local queries = H.read(dns.log)
    assert.matches("query%[A%] svc%.sluice%.test from 127%.0%.0%.1", queries)
    assert.matches("query%[AAAA%] svc%.sluice%.test from 127%.0%.0%.1", queries)
  end)

  it("keeps answers for valid_ms whatever their TTL", function()
    local port_b = peers_ab()
    local dns = start_dns("127.0.0.2 svc.sluice.test\n", 3600)
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, dns.port, "svc.sluice.test:" .. port_b,
                                          ", valid_ms = 1000"))
    assert.are.equal("Ax", (H.exchange(port, "x", 5)))
    rewrite(dns, "127.0.0.3 svc.sluice.test\n")
    local ok, got = answers(port, "Bx")
    local log = H.stop_sluice(p)
    assert.is_true(ok, "still " .. tostring(got) .. ":\n" .. log)
  end)

  it("keeps a long TTL's answer until resolve_interval_ms", function()
    local port_b = peers_ab()
    local dns = start_dns("127.0.0.2 svc.sluice.test\n", 3600)
    local port = H.free_port()
    local p = H.start_sluice(proxy_config(port, dns.port, "svc.sluice.test:" .. port_b))
    assert.are.equal("Ax", (H.exchange(port, "x", 5)))
    -- Looked up at the load, and once more when the running configuration
    -- begins to watch it.
    local function asked() return select(2, H.read(dns.log):gsub("query%[A%] svc", "")) end
    assert.is_truthy(H.wait_for(function() return asked() >= 2 end, 10), H.read(dns.log))
    local before = asked()
    rewrite(dns, "127.0.0.3 svc.sluice.test\n")
    H.sleep(2.5)
    assert.are.equal("Ax", (H.exchange(port, "x", 5)))
    local log = H.stop_sluice(p)
    -- Then not before its TTL (an hour) or the interval.
    assert.are.equal(before, asked())
    assert.is_falsy(log:find("resolved again", 1, true), log)
  end)

  it("in ctx:connect: keeps an answer for its TTL when that is shorter than resolve_cache_ms",
    function()
      local port_b = peers_ab()
      local dns = start_dns("127.0.0.2 svc.sluice.test\n", 1)
      local port = H.free_port()
      local admin = H.free_port()
      local p = H.start_sluice(([[
return {
  workers = 1,
  resolve_cache_ms = 600000,
  admin = { listen = "127.0.0.1:%d" },
  resolver = { servers = { "127.0.0.1:%d" } },
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { { "spec.fixtures.upstream.router",
                                 routes = { s = "svc.sluice.test:%d",
                                            x = "nowhere.sluice.test:%d" } } } } },
}
]]):format(admin, dns.port, port, port_b, port_b))
      assert.are.equal("As1", (H.exchange(port, "s1", 5)))
      rewrite(dns, "127.0.0.3 svc.sluice.test\n")
      local got
      local ok = H.wait_for(function()
        got = H.exchange(port, "s2", 5)
        return got == "Bs2"
      end, 20)
      -- A name the server does not know closes its client, with the reason.
      assert.are.equal("", (H.exchange(port, "x1", 5)))
      -- Counted: the lookups of svc (at least the first and the one after
      -- the change) and the one of nowhere.
      local text = select(3, H.admin_get(admin, "/metrics"))
      local ok_n = H.sample(text, "sluice_dns_lookups_total", 'result="ok"')
      local nf = H.sample(text, "sluice_dns_lookups_total", 'result="not_found"')
      local timeouts = H.sample(text, "sluice_dns_lookups_total", 'result="timeout"')
      local seconds = H.sample(text, "sluice_dns_lookup_seconds_total")
      local log = H.stop_sluice(p)
      assert.is_true(ok, "still " .. tostring(got) .. ":\n" .. log)
      assert.matches("ctx:connect: cannot resolve nowhere.sluice.test: Domain name not found",
                     log, 1, true)
      local svc_queries = select(2, H.read(dns.log):gsub("query%[A%] svc", ""))
      assert.are.equal(svc_queries, ok_n, text)
      assert.are.equal(1, nf, text)
      assert.are.equal(0, timeouts, text)
      assert.is_true(seconds > 0, text)
    end)

  local function check(config_text)
    local cfg = H.tmpfile("sluice.lua", config_text)
    return H.sh(("SLUICE_ROOT=%s %s %s --check %s 2>&1"):format(H.shq(H.root), H.wrapper,
                                                               H.shq(H.bin), H.shq(cfg)))
  end

  it("refuses a configuration whose name the server does not know, naming the entry", function()
    local dns = start_dns("127.0.0.2 svc.sluice.test\n", 1)
    local out, rc = check(proxy_config(H.free_port(), dns.port, "gone.sluice.test:80"))
    assert.are.equal(2, rc, out)
    assert.matches('config error: upstreams.back.servers[1]: cannot resolve "gone.sluice.test": '
                   .. "Domain name not found", out, 1, true)
  end)

  it("refuses a configuration when the server does not answer, after its tries", function()
    -- A UDP socket that takes queries and never answers.
    local port = H.free_port()
    local silent = H.spawn(("socat -u UDP-RECV:%d,bind=127.0.0.1 /dev/null"):format(port),
                           "silent")
    peers[#peers + 1] = silent
    H.sleep(0.3)
    local out, rc = check(proxy_config(H.free_port(), port, "svc.sluice.test:80",
                                       ", tries = 1"):gsub("timeout_ms = 500", "timeout_ms = 200"))
    assert.are.equal(2, rc, out)
    assert.matches('cannot resolve "svc.sluice.test": Timeout while contacting DNS servers',
                   out, 1, true)
    -- Running: a ctx:connect whose lookup times out closes its client, and
    -- is counted as a timeout.
    local admin, front = H.free_port(), H.free_port()
    local p = H.start_sluice(([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  resolver = { servers = { "127.0.0.1:%d" }, timeout_ms = 200, tries = 1 },
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { { "spec.fixtures.upstream.router",
                                 routes = { s = "svc.sluice.test:80" } } } } },
}
]]):format(admin, port, front))
    assert.are.equal("", (H.exchange(front, "s1", 10)))
    local text = select(3, H.admin_get(admin, "/metrics"))
    local log = H.stop_sluice(p)
    assert.matches("ctx:connect: cannot resolve svc.sluice.test: Timeout while contacting DNS "
                   .. "servers", log, 1, true)
    assert.are.equal(1, H.sample(text, "sluice_dns_lookups_total", 'result="timeout"'), text)
    assert.are.equal(0, H.sample(text, "sluice_dns_lookups_total", 'result="ok"'), text)
  end)

  it("waits timeout_ms at each try of a silent server, the last try as the first", function()
    -- A UDP socket of the spec's that notes when each query comes and never
    -- answers. Each try asks A and AAAA at once: tries pairs of queries,
    -- timeout_ms apart (not twice as long at each try: 5 tries would then
    -- wait 31 x timeout_ms).
    local ffi = require("ffi")
    local port = H.free_port()
    local fd = ffi.C.socket(2, 2, 0) -- AF_INET, SOCK_DGRAM
    assert(fd >= 0, "socket() failed")
    local sa = ffi.new("struct sl_spec_sockaddr_in")
    sa.family = 2
    sa.addr = 0x0100007f
    sa.port = bit.bor(bit.lshift(bit.band(port, 0xff), 8), bit.rshift(port, 8))
    assert(ffi.C.bind(fd, sa, ffi.sizeof(sa)) == 0, "bind() failed")
    local cfg = H.tmpfile("sluice.lua", proxy_config(H.free_port(), port, "svc.sluice.test:80",
                                                      ", tries = 5"):gsub("timeout_ms = 500",
                                                                          "timeout_ms = 200"))
    local p = H.spawn(("SLUICE_ROOT=%s %s %s --check %s"):format(H.shq(H.root), H.wrapper,
                                                                H.shq(H.bin), H.shq(cfg)), "check")
    peers[#peers + 1] = p
    local at, buf = {}, ffi.new("uint8_t[512]")
    local pfd = ffi.new("struct sl_spec_pollfd[1]")
    pfd[0].fd, pfd[0].events = fd, 1 -- POLLIN
    local function take(ms)
      while ffi.C.poll(pfd, 1, ms) > 0 and ffi.C.read(fd, buf, 512) > 0 do at[#at + 1] = H.now() end
    end
    -- Until --check exits (bounded: 31 x 200 ms and the start, many times over).
    H.wait_for(function()
      take(20)
      return H.read(p.rc_file) ~= ""
    end, 120)
    take(0)
    ffi.C.close(fd)
    assert.are.equal("2", (H.read(p.rc_file):gsub("%s+$", "")), H.read(p.log))
    assert.matches('cannot resolve "svc.sluice.test": Timeout while contacting DNS servers',
                   H.read(p.log), 1, true)
    assert.are.equal(10, #at, "queries: " .. #at)
    local first, last = at[3] - at[1], at[9] - at[7]
    assert.is_true(last < 3 * first, ("the last try waited %.3f s, the first %.3f s")
      :format(last, first))
  end)
end)
