-- Upstream servers given by host name, through the real binary and the
-- system's resolver (getaddrinfo). sluice runs in a mount namespace of its
-- own (unshare) where /etc/hosts is a file of the spec's and
-- /etc/resolv.conf names no server, so the names and their addresses are
-- the spec's, on loopback, and nothing leaves the machine.
local H = require("helpers")

-- Whether this machine lets a process have a mount namespace of its own.
local function namespaces_work()
  local _, rc = H.sh("unshare -rm sh -c 'mount --bind /dev/null /etc/resolv.conf' 2>/dev/null")
  return rc == 0
end

-- Runs `cmd` (a shell command line) with /etc/hosts from hosts_path and an
-- empty /etc/resolv.conf; exec keeps the PID, so signals reach sluice.
local function in_namespace(hosts_path, cmd)
  local resolv = H.tmpfile("resolv.conf", "")
  return ("unshare -rm sh -c %s"):format(H.shq(("mount --bind %s /etc/hosts && mount --bind %s "
    .. "/etc/resolv.conf && exec %s"):format(H.shq(hosts_path), H.shq(resolv), cmd)))
end

local function sluice_cmd(cfg)
  return ("env SLUICE_ROOT=%s %s %s -c %s"):format(H.shq(H.root), H.wrapper, H.shq(H.bin),
                                                  H.shq(cfg))
end

local function start(hosts_path, config_text)
  local cfg = H.tmpfile("sluice.lua", config_text)
  local p = H.spawn(in_namespace(hosts_path, sluice_cmd(cfg)), "sluice")
  assert(H.wait_for(function()
    return H.read(p.log):find("started with", 1, true) or not H.alive(p)
  end, 30) and H.alive(p), "sluice did not start:\n" .. H.read(p.log))
  p.config = cfg
  return p
end

local function config(port, servers, extra)
  local list = {}
  for i, s in ipairs(servers) do list[i] = ("%q"):format(s) end
  return ([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { %s }, %s } },
}
]]):format(port, table.concat(list, ", "), extra or "")
end

-- What n connections to port were answered, counted by answer.
local function answers(port, n)
  local seen = {}
  for _ = 1, n do
    local out = H.exchange(port, "", 10)
    seen[out] = (seen[out] or 0) + 1
  end
  return seen
end


-- Whether this machine lets the spec make a network namespace of its own
-- (for a DNS server on 127.0.0.1 that never answers); marks the test
-- pending when it does not.
local function netns_permitted()
  local _, rc = H.sh("unshare -rmn sh -c 'ip link set lo up && mount --bind /dev/null "
                     .. "/etc/resolv.conf' 2>/dev/null")
  if rc ~= 0 then
    pending("unshare -rmn is not permitted here: no network namespace for a silent DNS server")
  end
  return rc == 0
end
describe("upstream servers given by host name", function()
  local peers = H.killed_after_each()
  local usable = namespaces_work()

  -- Whether this test cannot run here (it is then pending).
  local function skipped()
    if usable then return false end
    pending("unshare -rm is not permitted here: no mount namespace for a hosts file of the spec's")
    return true
  end


  -- A peer that answers with its name, then closes.
  local function peer(name)
    local p = H.start_peer("printf " .. name)
    peers[#peers + 1] = p
    return p
  end

  it("are resolved at start, each name's address serving in turn", function()
    if skipped() then return end
    local a, b = peer("A"), peer("B")
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.1 alpha.sluice.test\n"
                                     .. "127.0.0.1 beta.sluice.test\n")
    local port = H.free_port()
    local p = start(hosts, config(port, { "alpha.sluice.test:" .. a.port,
                                          "beta.sluice.test:" .. b.port }))
    local seen = answers(port, 4)
    local log = H.stop_sluice(p)
    assert.are.same({ A = 2, B = 2 }, seen, log)
    assert.matches(("upstream back: alpha.sluice.test:%d is 127.0.0.1:%d"):format(a.port, a.port),
                   log, 1, true)
    assert.matches(("upstream back: beta.sluice.test:%d is 127.0.0.1:%d"):format(b.port, b.port),
                   log, 1, true)
  end)

  it("become one server per address a name has, and one address reached twice is one server",
    function()
      if skipped() then return end
      -- Two peers on one port, at two loopback addresses of one name.
      local port_b = H.free_port()
      for _, pe in ipairs({ { "127.0.0.2", "A" }, { "127.0.0.3", "B" } }) do
        local q = H.spawn(("socat TCP-LISTEN:%d,bind=%s,reuseaddr,fork SYSTEM:%s")
                            :format(port_b, pe[1], H.shq("printf " .. pe[2])), "peer")
        peers[#peers + 1] = q
      end
      assert(H.wait_for(function()
        local _, a = H.sh(("socat -T1 /dev/null TCP:127.0.0.2:%d,connect-timeout=1"):format(port_b))
        local _, b = H.sh(("socat -T1 /dev/null TCP:127.0.0.3:%d,connect-timeout=1"):format(port_b))
        return a == 0 and b == 0
      end, 10), "the peers did not start")
      -- The name's addresses in the file out of order: servers are in
      -- address order (an answer whose order rotates is the same answer).
      local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.3 multi.sluice.test\n"
                                       .. "127.0.0.2 multi.sluice.test\n127.0.0.3 other.sluice.test\n")
      local port = H.free_port()
      local p = start(hosts, config(port, { "multi.sluice.test:" .. port_b,
                                            "other.sluice.test:" .. port_b }, "tries = 5"))
      local seen = answers(port, 4)
      local log = H.stop_sluice(p)
      assert.are.same({ A = 2, B = 2 }, seen, log)
      assert.matches(("upstream back: multi.sluice.test:%d is 127.0.0.2:%d, 127.0.0.3:%d")
                       :format(port_b, port_b, port_b), log, 1, true)
    end)

  it("are resolved again at each reload, and a name that no longer resolves refuses it", function()
    if skipped() then return end
    local a = peer("A")
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.1 alpha.sluice.test\n")
    local port = H.free_port()
    local p = start(hosts, config(port, { "alpha.sluice.test:" .. a.port }))
    assert.are.equal("A", (H.exchange(port, "", 10)))
    -- The name goes away: the file is rewritten in place (the mount follows
    -- the file, not its name), and the reload is refused.
    local f = assert(io.open(hosts, "w"))
    f:write("127.0.0.1 localhost\n")
    f:close()
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("reload refused", 1, true)
    end, 10), H.read(p.log))
    assert.matches('upstreams.back.servers[1]: cannot resolve "alpha.sluice.test"', H.read(p.log), 1,
                   true)
    assert.are.equal("A", (H.exchange(port, "", 10)))   -- the old configuration serves on
    -- The name is back, for another port: the reload takes it.
    local b = peer("B")
    f = assert(io.open(hosts, "w"))
    f:write("127.0.0.1 localhost\n127.0.0.1 alpha.sluice.test\n")
    f:close()
    local cfg = assert(io.open(p.config, "w"))
    cfg:write(config(port, { "alpha.sluice.test:" .. b.port }))
    cfg:close()
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.equal("B", (H.exchange(port, "", 10)))
    local log = H.stop_sluice(p)
    assert.matches(("upstream back: alpha.sluice.test:%d is 127.0.0.1:%d"):format(b.port, b.port),
                   log, 1, true)
  end)

  -- Peers on one port at two loopback addresses: each says its name, then
  -- echoes what it gets.
  local function named_peers(port, list)
    for _, pe in ipairs(list) do
      local q = H.spawn(("socat TCP-LISTEN:%d,bind=%s,reuseaddr,fork SYSTEM:%s")
                          :format(port, pe[1], H.shq("printf " .. pe[2] .. "; exec cat")), "peer")
      peers[#peers + 1] = q
    end
    assert(H.wait_for(function()
      for _, pe in ipairs(list) do
        local _, rc = H.sh(("socat -T1 /dev/null TCP:%s:%d,connect-timeout=1"):format(pe[1], port))
        if rc ~= 0 then return false end
      end
      return true
    end, 10), "the peers did not start")
  end

  -- Peers A on 127.0.0.2 and B on 127.0.0.3, on one port (returned).
  local function peers_ab()
    local port_b = H.free_port()
    named_peers(port_b, { { "127.0.0.2", "A" }, { "127.0.0.3", "B" } })
    return port_b
  end

  local function rewrite(path, text)
    local f = assert(io.open(path, "w"))   -- in place: the mount follows the file
    f:write(text)
    f:close()
  end

  it("are resolved again while running: new connections get the new address, open ones and "
     .. "the Lua stages stay", function()
    if skipped() then return end
    local port_b = peers_ab()
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.2 svc.sluice.test\n")
    local port, admin = H.free_port(), H.free_port()
    local p = start(hosts, ([[
return {
  workers = 1,
  log_level = "debug",
  admin = { listen = "127.0.0.1:%d" },
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back",
                  pipeline = { "examples.stages.upper" } } },
  upstreams = { back = { servers = { "svc.sluice.test:%d" }, resolve_interval_ms = 100 } },
}
]]):format(admin, port, port_b))
    assert.are.equal(0, H.metric(admin, "sluice_upstream_dns_changes_total"))
    local held = H.connect(port)
    assert.are.equal("A", held.recv(1))
    held.send("ab")
    assert.are.equal("AB", held.recv(2))
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 svc.sluice.test\n")
    assert.is_truthy(H.wait_for(function() return H.exchange(port, "x", 5) == "BX" end, 15),
                     H.read(p.log))
    assert.matches(("upstream back: host names resolved again: servers 127.0.0.3:%d (were "
                    .. "127.0.0.2:%d); new connections use them"):format(port_b, port_b),
                   H.read(p.log), 1, true)
    -- The connection opened before goes on to its server.
    held.send("cd")
    assert.are.equal("CD", held.recv(2))
    held.close()
    -- Its configuration is let go; the stages it shares with the new one stay.
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("has no connection left", 1, true)
    end, 15), H.read(p.log))
    assert.are.equal("BY", (H.exchange(port, "y", 5)))
    -- The name goes away: a warning, and the servers keep their addresses.
    rewrite(hosts, "127.0.0.1 localhost\n")
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("upstream host svc.sluice.test: cannot resolve it again", 1, true)
    end, 15), H.read(p.log))
    assert.are.equal("BZ", (H.exchange(port, "z", 5)))
    -- It comes back with the first address, and a SIGHUP still reloads.
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.2 svc.sluice.test\n")
    assert.is_truthy(H.wait_for(function() return H.exchange(port, "w", 5) == "AW" end, 15),
                     H.read(p.log))
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.equal("AV", (H.exchange(port, "v", 5)))
    assert.are.equal(2, H.metric(admin, "sluice_upstream_dns_changes_total"))
    local log = H.stop_sluice(p)
    assert.matches("upstream host svc.sluice.test: resolves again", log, 1, true)
  end)

  it("are resolved again per upstream, keep what a reload resolved, and leave other servers' "
     .. "health alone", function()
    if skipped() then return end
    local port_b, dead = H.free_port(), H.free_port()
    named_peers(port_b, { { "127.0.0.2", "A" }, { "127.0.0.3", "B" } })
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.2 x.sluice.test y.sluice.test "
                                     .. "z.sluice.test\n")
    local pa, pb, pc, admin = H.free_port(), H.free_port(), H.free_port(), H.free_port()
    local p = start(hosts, ([[
return {
  workers = 1,
  admin = { listen = "127.0.0.1:%d" },
  listeners = {
    { name = "fa", listen = "127.0.0.1:%d", upstream = "a" },
    { name = "fb", listen = "127.0.0.1:%d", upstream = "b" },
    { name = "fc", listen = "127.0.0.1:%d", upstream = "c" },
  },
  upstreams = {
    a = { servers = { "x.sluice.test:%d" }, resolve_interval_ms = 0 },
    b = { servers = { "y.sluice.test:%d" }, resolve_interval_ms = 100 },
    c = { servers = { "z.sluice.test:%d", "127.0.0.1:%d" }, resolve_interval_ms = 600000,
          max_fails = 1, fail_timeout_ms = 600000 },
  },
}
]]):format(admin, pa, pb, pc, port_b, port_b, port_b, dead))
    local function failures()
      return H.metric(admin, "sluice_upstream_server_connect_failures_total",
                      ('upstream="c",server="127.0.0.1:%d",reason="refused"'):format(dead)) or 0
    end
    -- c's closed port fails once and is skipped from then on.
    assert.are.same({ "Aq", "Aq" }, { (H.exchange(pc, "q", 5)), (H.exchange(pc, "q", 5)) })
    assert.are.equal(1, failures())
    -- x (never again while running) and y (every 100 ms) move.
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 x.sluice.test y.sluice.test\n"
                   .. "127.0.0.2 z.sluice.test\n")
    assert.is_truthy(H.wait_for(function() return H.exchange(pb, "q", 5) == "Bq" end, 15),
                     H.read(p.log))
    assert.are.equal("Aq", (H.exchange(pa, "q", 5)))
    -- c's closed port is still skipped under the new servers.
    assert.are.same({ "Aq", "Aq" }, { (H.exchange(pc, "q", 5)), (H.exchange(pc, "q", 5)) })
    assert.are.equal(1, failures())
    -- A reload resolves z (and x) now; y's next change must not bring z's
    -- answer from before the reload back.
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 x.sluice.test y.sluice.test z.sluice.test\n")
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.same({ "Bq", "Bq" }, { (H.exchange(pa, "q", 5)), (H.exchange(pc, "q", 5)) })
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 x.sluice.test z.sluice.test\n"
                   .. "127.0.0.2 y.sluice.test\n")
    assert.is_truthy(H.wait_for(function() return H.exchange(pb, "q", 5) == "Aq" end, 15),
                     H.read(p.log))
    assert.are.same({ "Bq", "Bq", "Bq" },
                    { (H.exchange(pc, "q", 5)), (H.exchange(pc, "q", 5)), (H.exchange(pa, "q", 5)) })
    local log = H.stop_sluice(p)
    assert.is_falsy(log:find("new answers not used", 1, true), log)
  end)

  it("given with backup = true are backups at every address, resolved again or reloaded",
     function()
    if skipped() then return end
    local port_b = peers_ab()
    local primary = H.start_peer("printf P; exec cat")
    peers[#peers + 1] = primary
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.2 bk.sluice.test\n")
    local port = H.free_port()
    local p = start(hosts, ([[
return {
  workers = 1,
  listeners = { { name = "front", listen = "127.0.0.1:%d", upstream = "back" } },
  upstreams = { back = { servers = { "127.0.0.1:%d", { "bk.sluice.test:%d", backup = true } },
                         resolve_interval_ms = 100 } },
}
]]):format(port, primary.port, port_b))
    local function replies(n)
      local out = {}
      for i = 1, n do out[i] = (H.exchange(port, "x", 5)) end
      return table.concat(out, " ")
    end
    assert.are.equal("Px Px Px Px", replies(4))
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 bk.sluice.test\n")
    local changed = ("upstream back: host names resolved again: servers 127.0.0.1:%d, "
                     .. "127.0.0.3:%d (backup) (were 127.0.0.1:%d, 127.0.0.2:%d (backup)); new "
                     .. "connections use them"):format(primary.port, port_b, primary.port, port_b)
    assert.is_truthy(H.wait_for(function() return H.read(p.log):find(changed, 1, true) end, 15),
                     H.read(p.log))
    -- The new address is a backup too: the primary still takes everything.
    assert.are.equal("Px Px Px Px", replies(4))
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.equal("Px Px Px Px", replies(4))
    -- Without the primary, the backup at the new address answers.
    H.stop(primary, "KILL")
    assert.are.equal("Bx Bx", replies(2))
    local log = H.stop_sluice(p)
    assert.matches("no primary server available (down: 127.0.0.1:" .. primary.port .. ")", log, 1,
                   true)
  end)

  it("are not resolved again with resolve_interval_ms = 0", function()
    if skipped() then return end
    local port_b = peers_ab()
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.2 svc.sluice.test\n")
    local port = H.free_port()
    local p = start(hosts, config(port, { "svc.sluice.test:" .. port_b }, "resolve_interval_ms = 0"))
    assert.are.equal("AX", (H.exchange(port, "X", 5)))
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 svc.sluice.test\n")
    H.sleep(1)
    assert.are.equal("AX", (H.exchange(port, "X", 5)))
    local log = H.stop_sluice(p)
    assert.is_falsy(log:find("resolved again", 1, true), log)
  end)

  it("also work in ctx:connect: looked up off the worker, their answers kept for "
     .. "resolve_cache_ms", function()
    if skipped() then return end
    local port_b = peers_ab()
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.2 svc.sluice.test "
                                     .. "multi.sluice.test\n127.0.0.3 multi.sluice.test\n")
    local port = H.free_port()
    local p = start(hosts, ([[
return {
  workers = 1,
  resolve_cache_ms = 600000,
  listeners = { { name = "front", listen = "127.0.0.1:%d",
                  pipeline = { { "spec.fixtures.upstream.router",
                                 routes = { s = "svc.sluice.test:%d", m = "multi.sluice.test:%d",
                                            x = "nowhere.sluice.test:%d" } } } } },
}
]]):format(port, port_b, port_b, port_b))
    -- The router connects from channel_read: the bytes it passes on wait
    -- in the bridge for the lookup, then go out.
    assert.are.equal("As1", (H.exchange(port, "s1", 5)))
    -- A name with two addresses: its connects take them in turn.
    local m1, m2, m3 = H.exchange(port, "m1", 5), H.exchange(port, "m2", 5), H.exchange(port, "m3", 5)
    assert.matches("^[AB]m1$", m1)
    assert.are.equal((m1:sub(1, 1) == "A" and "B" or "A") .. "m2", m2)
    assert.are.equal(m1:sub(1, 1) .. "m3", m3)
    -- One that does not resolve closes its client.
    assert.are.equal("", (H.exchange(port, "x1", 5)))
    -- Kept: a new answer is not asked for until resolve_cache_ms has passed,
    -- or a reload.
    rewrite(hosts, "127.0.0.1 localhost\n127.0.0.3 svc.sluice.test\n")
    assert.are.equal("As2", (H.exchange(port, "s2", 5)))
    H.sh("kill -HUP " .. p.pid)
    assert.is_truthy(H.wait_for(function()
      return H.read(p.log):find("configuration reloaded", 1, true)
    end, 10), H.read(p.log))
    assert.are.equal("Bs3", (H.exchange(port, "s3", 5)))
    local log = H.stop_sluice(p)
    assert.matches("ctx:connect: cannot resolve nowhere.sluice.test: ", log, 1, true)
    assert.matches('routed "s" to svc.sluice.test:' .. port_b, log, 1, true)
  end)

  it("in ctx:connect: a client closed during its lookup, a connect that fails at once after "
     .. "one, and a stop during one, lose nothing", function()
    -- A network namespace of the spec's own, with a DNS server on 127.0.0.1
    -- that never answers: lookups wait for the resolver's timeout (3 s).
    -- Everything, clients included, runs in it, from one script.
    if not netns_permitted() then return end
    -- unreach: an address with no route in the namespace (the connect
    -- after the lookup fails at once).
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n10.9.9.9 unreach.sluice.test\n")
    local resolv = H.tmpfile("resolv.conf", "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n")
    local nss = H.tmpfile("nsswitch.conf", "hosts: files dns\n")
    local log = H.tmpfile("sluice.log", "")
    local cfg = H.tmpfile("sluice.lua", [[
local router = { "spec.fixtures.upstream.router",
                 routes = { s = "silent.sluice.test:7001", u = "unreach.sluice.test:7001" } }
return {
  workers = 1,
  listeners = {
    { name = "front", listen = "127.0.0.1:7000", idle_timeout_ms = 300, pipeline = { router } },
    { name = "held", listen = "127.0.0.1:7002", pipeline = { router } },
  },
}
]])
    local script = ([[
ip link set lo up || exit 90
mount --bind %s /etc/hosts && mount --bind %s /etc/resolv.conf && mount --bind %s /etc/nsswitch.conf || exit 91
# Nothing in the background keeps the spec's pipe open; all of it ends with the script.
trap 'kill $DNS $SL $A $B 2>/dev/null' EXIT
socat -u UDP-RECV:53,bind=127.0.0.1 /dev/null >/dev/null 2>&1 & DNS=$!
env SLUICE_ROOT=%s %s %s -c %s >/dev/null 2>%s & SL=$!
i=0; until grep -q "started with" %s; do i=$((i+1)); [ $i -gt 300 ] && exit 92; sleep 0.1; done
printf u1 | timeout 10 socat - TCP:127.0.0.1:7002 >/dev/null 2>&1
# One client is closed by its idle timeout while its lookup waits; the
# other is open at the stop, which waits for its answer.
(printf s1; sleep 30) | timeout 40 socat - TCP:127.0.0.1:7000 >/dev/null 2>&1 & A=$!
(printf s2; sleep 30) | timeout 40 socat - TCP:127.0.0.1:7002 >/dev/null 2>&1 & B=$!
i=0; until grep -q "on held: routed" %s && grep -q "on front closed: idle_timeout" %s; do
  i=$((i+1)); [ $i -gt 300 ] && exit 93; sleep 0.1
done
kill -TERM $SL; wait $SL; echo "exit=$?"
]]):format(H.shq(hosts), H.shq(resolv), H.shq(nss), H.shq(H.root), H.wrapper, H.shq(H.bin),
           H.shq(cfg), H.shq(log), H.shq(log), H.shq(log), H.shq(log))
    local out = H.sh(("timeout 90 unshare -rmn sh -c %s 2>&1"):format(H.shq(script)))
    local text = H.read(log)
    assert.matches("exit=0", out, 1, true)
    assert.matches("on front closed: idle_timeout", text, 1, true)
    assert.matches("on held: ctx:connect: cannot resolve silent.sluice.test: ", text, 1, true)
    assert.matches("on held closed: upstream_unavailable", text, 1, true)
    assert.matches("upstream unavailable after 1 try: 10.9.9.9:7001 (Network is unreachable)", text,
                   1, true)
    assert.is_falsy(text:find("on front: ctx:connect", 1, true), text)   -- its answer found no one
    assert.matches("worker 0: pool clean at exit", text, 1, true)
    assert.is_falsy(text:find("LEAK", 1, true), text)
    assert.matches("%] stopped\n?$", text)
  end)

  it("in ctx:connect: a name whose DNS server does not answer holds up no other name", function()
    if not netns_permitted() then return end
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n127.0.0.1 near.sluice.test\n")
    local resolv = H.tmpfile("resolv.conf", "nameserver 127.0.0.1\noptions timeout:5 attempts:1\n")
    local nss = H.tmpfile("nsswitch.conf", "hosts: files dns\n")
    local log, answer, before = H.tmpfile("sluice.log", ""), H.tmpfile("answer"), H.tmpfile("before")
    local cfg = H.tmpfile("sluice.lua", [[
local router = { "spec.fixtures.upstream.router",
                 routes = { s = "silent.sluice.test:7001", n = "near.sluice.test:7001" } }
return {
  workers = 1,
  listeners = { { name = "held", listen = "127.0.0.1:7002", pipeline = { router } } },
}
]])
    -- silent's lookup waits 5 s for the DNS server; near is in the hosts
    -- file. near's answer must come while silent's lookup still waits.
    local script = ([[
ip link set lo up || exit 90
mount --bind %s /etc/hosts && mount --bind %s /etc/resolv.conf && mount --bind %s /etc/nsswitch.conf || exit 91
trap 'kill $DNS $ECHO $SL $A 2>/dev/null' EXIT
socat -u UDP-RECV:53,bind=127.0.0.1 /dev/null >/dev/null 2>&1 & DNS=$!
socat TCP-LISTEN:7001,bind=127.0.0.1,reuseaddr,fork EXEC:cat >/dev/null 2>&1 & ECHO=$!
env SLUICE_ROOT=%s %s %s -c %s >/dev/null 2>%s & SL=$!
i=0; until grep -q "started with" %s; do i=$((i+1)); [ $i -gt 300 ] && exit 92; sleep 0.1; done
(printf s1; sleep 30) | timeout 40 socat - TCP:127.0.0.1:7002 >/dev/null 2>&1 & A=$!
i=0; until grep -q 'routed "s"' %s; do i=$((i+1)); [ $i -gt 300 ] && exit 93; sleep 0.1; done
printf n1 | timeout 30 socat -t 30 - TCP:127.0.0.1:7002 > %s 2>/dev/null
grep -c "cannot resolve silent" %s > %s
i=0; until grep -q "cannot resolve silent" %s; do i=$((i+1)); [ $i -gt 300 ] && exit 94; sleep 0.1; done
kill -TERM $SL; wait $SL; echo "exit=$?"
]]):format(H.shq(hosts), H.shq(resolv), H.shq(nss), H.shq(H.root), H.wrapper, H.shq(H.bin),
           H.shq(cfg), H.shq(log), H.shq(log), H.shq(log), H.shq(answer), H.shq(log), H.shq(before),
           H.shq(log))
    local out = H.sh(("timeout 90 unshare -rmn sh -c %s 2>&1"):format(H.shq(script)))
    local text = H.read(log)
    assert.matches("exit=0", out, 1, true)
    assert.are.equal("n1", H.read(answer), text)
    assert.are.equal("0", (H.read(before):gsub("%s", "")), text)
    assert.matches("on held: ctx:connect: cannot resolve silent.sluice.test: ", text, 1, true)
    assert.matches("worker 0: pool clean at exit", text, 1, true)
    assert.is_falsy(text:find("LEAK", 1, true), text)
    assert.matches("%] stopped\n?$", text)
  end)

  it("that do not resolve stop the start and --check with exit 2, naming the key", function()
    if skipped() then return end
    local hosts = H.tmpfile("hosts", "127.0.0.1 localhost\n")
    local cfg = H.tmpfile("bad.lua", config(H.free_port(), { "127.0.0.1:1", "nowhere.sluice.test:80" }))
    for _, flag in ipairs({ "--check", "-c" }) do
      local out, rc = H.sh(in_namespace(hosts, ("env SLUICE_ROOT=%s %s %s %s 2>&1"):format(
        H.shq(H.root), H.wrapper, H.shq(H.bin), flag) .. " " .. H.shq(cfg)))
      assert.are.equal(2, rc, out)
      assert.matches('config error: upstreams.back.servers[2]: cannot resolve "nowhere.sluice.test": ',
                     out, 1, true)
    end
  end)
end)
