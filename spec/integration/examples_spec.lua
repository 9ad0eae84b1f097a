-- The examples through the real binary, with their own configuration files
-- (examples/config/), a real redis-server, redis-cli, redis-benchmark and
-- socat peers on loopback.
local ffi = require("ffi")
local H = require("helpers")

pcall(ffi.cdef, "long write(int fd, const void *buf, unsigned long n);")

local CONFIGS = { "redis_guard", "line_rewrite", "length_router", "redis_pool", "behind_balancer" }

local function config_path(name) return H.root .. "/examples/config/" .. name .. ".lua" end

-- Starts sluice on an example's configuration file, listening on a fresh
-- port and forwarding to upstream_port. Returns the process and the port.
local function start_example(name, upstream_port)
  local port = H.free_port()
  local p = H.start_sluice(H.read(config_path(name)),
    ("SLUICE_EXAMPLE_LISTEN=127.0.0.1:%d SLUICE_EXAMPLE_UPSTREAM=127.0.0.1:%d")
      :format(port, upstream_port))
  return p, port
end


local function cli(port, args)
  local out, rc = H.sh(("timeout 20 redis-cli -p %d %s 2>&1"):format(port, args))
  assert.are.equal(0, rc)
  return (out:gsub("%s+$", ""))
end

-- A client on 127.0.0.1:port that sends `data` at once (a pipeline), then
-- reads until `want` bytes came back, the connection closed, or nothing
-- came for 20 s. Returns what it read.
local function converse(port, data, want)
  local fd = ffi.C.socket(2, 1, 0)
  local sa = ffi.new("struct sl_spec_sockaddr_in")
  sa.family = 2
  sa.addr = 0x0100007f
  sa.port = bit.bor(bit.lshift(port % 256, 8), math.floor(port / 256))
  assert(ffi.C.connect(fd, sa, ffi.sizeof(sa)) == 0, "connect failed")
  local off = 0
  while off < #data do
    local n = tonumber(ffi.C.write(fd, ffi.cast("const char *", data) + off, #data - off))
    assert(n > 0, "write failed")
    off = off + n
  end
  local got, chunk = {}, ffi.new("char[65536]")
  local have = 0
  local p = ffi.new("struct sl_spec_pollfd[1]")
  while have < want do
    p[0].fd, p[0].events = fd, 1
    if ffi.C.poll(p, 1, 20000) ~= 1 then break end
    local n = tonumber(ffi.C.read(fd, chunk, 65536))
    if n <= 0 then break end
    got[#got + 1] = ffi.string(chunk, n)
    have = have + n
  end
  ffi.C.close(fd)
  return table.concat(got)
end

local resp = require("resp").command

local function denied(name) return "-ERR command '" .. name .. "' is not allowed\r\n" end

-- Waits until sluice's log (read while it runs) matches `pattern` (plain).
local function log_shows(p, pattern)
  return H.wait_for(function() return H.read(p.log):find(pattern, 1, true) end, 20)
end

-- One sluice (and its peers) per example, shared by that example's tests;
-- stopping it checks the pool is clean and no leak was reported.
describe("examples through the binary", function()
  for _, name in ipairs(CONFIGS) do
    it("sluice --check accepts examples/config/" .. name .. ".lua", function()
      local out, rc = H.sh(H.shq(H.bin) .. " --check " .. H.shq(config_path(name)) .. " 2>&1")
      assert.are.equal(0, rc, out)
      assert.matches("config ok", out, 1, true)
    end)
  end

  describe("redis_tls: plain RESP in, TLS with a client certificate to redis-server", function()
    it("serves redis through sluice to a redis-server that speaks only TLS", function()
      local d = H.tmpdir() .. "/redis-tls"
      H.sh("mkdir -p " .. H.shq(d))
      local ca, ca_key = H.make_ca(d, "ca")
      local crt, key = H.make_signed_cert(d, "redis", ca, ca_key, "IP:127.0.0.1")
      H.make_signed_cert(d, "sluice", ca, ca_key, "IP:127.0.0.1")
      local rport = H.free_port()
      local redis = H.spawn(("redis-server --port 0 --bind 127.0.0.1 --tls-port %d "
        .. "--tls-cert-file %s --tls-key-file %s --tls-ca-cert-file %s --save '' --appendonly no")
        :format(rport, H.shq(crt), H.shq(key), H.shq(ca)), "redis-tls")
      assert(H.wait_for(function() return H.port_open(rport) end, 10),
             "redis-server did not start:\n" .. H.read(redis.log))
      local port = H.free_port()
      local p = H.start_sluice(H.read(config_path("redis_tls")),
        ("SLUICE_EXAMPLE_LISTEN=127.0.0.1:%d SLUICE_EXAMPLE_UPSTREAM=127.0.0.1:%d "
         .. "SLUICE_EXAMPLE_TLS_DIR=%s"):format(port, rport, H.shq(d)))
      assert.are.equal("OK", cli(port, "SET k v"))
      assert.are.equal("v", cli(port, "GET k"))
      assert.matches("not allowed", cli(port, "FLUSHALL"), 1, true)
      -- A bounded redis-benchmark run: every request answered.
      local out, rc = H.sh(("timeout 60 redis-benchmark -p %d -n 2000 -c 4 -P 16 -t set,get -q "
        .. "2>&1"):format(port))
      assert.are.equal(0, rc, out)
      assert.matches("SET: ", out, 1, true)
      assert.matches("GET: ", out, 1, true)
      assert.not_matches("[Ee]rror", out)
      -- Without sluice, a plain client gets nothing from this server.
      local plain = H.sh(("timeout 5 redis-cli -p %d PING 2>&1"):format(rport))
      assert.not_matches("PONG", plain, 1, true)
      H.stop_sluice(p)
      H.stop(redis)
    end)
  end)

  describe("behind_balancer: the PROXY protocol from edge to inner, then redis", function()
    it("serves redis through both, and inner logs the client edge saw", function()
      local redis = H.start_redis()
      local port, inner = H.free_port(), H.free_port()
      local p = H.start_sluice(H.read(config_path("behind_balancer")),
        ("SLUICE_EXAMPLE_LISTEN=127.0.0.1:%d SLUICE_EXAMPLE_INNER=127.0.0.1:%d "
         .. "SLUICE_EXAMPLE_UPSTREAM=127.0.0.1:%d"):format(port, inner, redis.port))
      assert.are.equal("OK", cli(port, "SET k v"))
      assert.are.equal("v", cli(port, "GET k"))
      assert.matches("not allowed", cli(port, "FLUSHALL"), 1, true)
      local log = H.stop_sluice(p)
      H.stop(redis)
      local n = 0
      for cport in log:gmatch("client 127%.0%.0%.1:(%d+) on edge closed") do
        assert.matches("client 127%.0%.0%.1:" .. cport .. " on inner closed", log)
        n = n + 1
      end
      assert.are.equal(3, n)
    end)
  end)

  describe("examples.redis_guard in front of redis-server", function()
    local redis, p, port
    setup(function()
      redis = H.start_redis()
      p, port = start_example("redis_guard", redis.port)
    end)
    teardown(function()
      if p then H.stop_sluice(p) end
      if redis then H.stop(redis) end
    end)

    it("passes SET and GET, refuses FLUSHALL and KEYS, and the data stays", function()
      assert.are.equal("OK", cli(port, "SET k v"))
      assert.are.equal("v", cli(port, "GET k"))
      assert.are.equal("ERR command 'FLUSHALL' is not allowed", cli(port, "FLUSHALL"))
      assert.are.equal("ERR command 'KEYS' is not allowed", cli(port, "keys '*'"))
      -- inline forms redis-server reads as FLUSHALL; then one it reads as PING
      local tricks = '"\\x46LUSHALL"\r\nFLUSH"ALL"\r\n\'flushall\' async\r\n"\\x50ING"\r\n'
      local want = denied("FLUSHALL"):rep(3) .. "+PONG\r\n"
      assert.are.equal(want, converse(port, tricks, #want))
      assert.are.equal("v", cli(port, "GET k"))
      assert.are.equal("v", cli(redis.port, "GET k")) -- asked of the server itself
      assert.are.equal("1", cli(redis.port, "EXISTS k"))
    end)

    it("keeps a pipeline's replies in order, the refused commands answered in their place", function()
      local sent, want = {}, {}
      for i = 1, 400 do
        local v = ("value-%d-"):format(i) .. string.rep("x", i % 50)
        if i % 2 == 0 then
          sent[#sent + 1] = resp("SET", "p" .. i, v) .. resp("GET", "p" .. i)
        else
          sent[#sent + 1] = ("SET p%d %s\r\nGET p%d\r\n"):format(i, v, i) -- inline
        end
        want[#want + 1] = "+OK\r\n$" .. #v .. "\r\n" .. v .. "\r\n"
        if i % 7 == 0 then
          sent[#sent + 1] = resp("FLUSHALL")
          want[#want + 1] = denied("FLUSHALL")
        end
        if i % 11 == 0 then
          sent[#sent + 1] = "KEYS *\r\n" .. resp("flushall", "ASYNC")
          want[#want + 1] = denied("KEYS") .. denied("FLUSHALL")
        end
      end
      sent[#sent + 1] = resp("EXISTS", "p1", "p200", "p400", "nope")
      want[#want + 1] = ":3\r\n"
      want = table.concat(want)
      local got = converse(port, table.concat(sent), #want)
      assert.are.equal(#want, #got)
      assert.are.equal(want, got)
    end)

    it("runs redis-benchmark (SET and GET, 16 pipelined, 10 clients) without an error", function()
      local out, rc = H.sh(("timeout 240 redis-benchmark -p %d -n 20000 -P 16 -c 10 -t set,get -q 2>&1")
        :format(port))
      assert.are.equal(0, rc, out)
      assert.matches("SET: [%d.]+ requests per second", out)
      assert.matches("GET: [%d.]+ requests per second", out)
      assert.is_nil(out:find("rror"), out)
      assert.are.equal("ERR command 'FLUSHALL' is not allowed", cli(port, "FLUSHALL"))
      assert.are.equal("1", cli(redis.port, "EXISTS key:__rand_int__"))
      assert.is_nil(H.read(p.log):find("malformed", 1, true))
    end)

    it("closes a client that sends bytes that are not RESP, with malformed_frame", function()
      local out = converse(port, "*1\r\n:1\r\n", 1)
      assert.are.equal("", out)
      assert.are.equal("PONG", cli(port, "PING")) -- the others carry on
      assert.truthy(log_shows(p, "malformed RESP from the client (expected '$')"))
      assert.matches("client 127%.0%.0%.1:%d+ on redis_guard closed: malformed_frame", H.read(p.log))
    end)
  end)

  describe("examples.line_rewrite in front of a socat echo peer", function()
    local echo, p, port
    setup(function()
      echo = H.start_echo()
      p, port = start_example("line_rewrite", echo.port)
    end)
    teardown(function()
      if p then H.stop_sluice(p) end
      if echo then H.stop(echo) end
    end)

    it("rewrites the lines its rules match, across any chunking", function()
      local out, rc = H.exchange(port, "PING 1\r\nPASS hunter2\nhello\n", 20)
      assert.are.equal(0, rc)
      assert.are.equal("PONG 1\r\nPASS *****\nhello\n", out)
      local sent, want = {}, {}
      for i = 1, 20000 do
        local kind = i % 3
        if kind == 0 then
          sent[i], want[i] = "PING " .. i .. "\n", "PONG " .. i .. "\n"
        elseif kind == 1 then
          sent[i], want[i] = "PASS secret" .. i .. "\r\n", "PASS *****\r\n"
        else
          sent[i] = "line " .. i .. " PING PASS\n"
          want[i] = sent[i]
        end
      end
      local got = H.exchange(port, table.concat(sent), 60)
      assert.are.equal(table.concat(want), got)
    end)

    it("closes a client whose line is longer than max_length, with frame_too_large", function()
      H.exchange(port, string.rep("z", 9000), 20)
      assert.truthy(log_shows(p, "on line_rewrite closed: frame_too_large"))
      assert.matches("line longer than 8192 bytes", H.read(p.log), 1, true)
    end)
  end)

  describe("examples.length_router in front of a socat peer", function()
    local function u32(n)
      return string.char(0, 0, math.floor(n / 256) % 256, n % 256)
    end
    local function frame(header, payload) return u32(1 + #payload) .. string.char(header) .. payload end

    -- The frames in s, in order.
    local function frames(s)
      local out, i = {}, 1
      while i <= #s do
        local n = s:byte(i + 2) * 256 + s:byte(i + 3)
        out[#out + 1] = s:sub(i, i + 3 + n)
        i = i + 4 + n
      end
      return out
    end

    -- The peer upper-cases what it gets: forwarded frames come back in capitals.
    local peer, p, port
    setup(function()
      peer = H.start_peer("tr a-z A-Z")
      p, port = start_example("length_router", peer.port)
    end)
    teardown(function()
      if p then H.stop_sluice(p) end
      if peer then H.stop(peer) end
    end)

    it("answers ECHO frames itself and forwards FORWARD frames to the peer", function()
      local sent, echoes, forwards = {}, {}, {}
      for i = 1, 300 do
        local payload = ("frame %d "):format(i) .. string.rep("q", i % 40) -- length < 97: no letter
        if i % 2 == 0 then
          sent[#sent + 1] = frame(0x01, payload)
          echoes[#echoes + 1] = frame(0x01, payload)
        else
          sent[#sent + 1] = frame(0x02, payload)
          forwards[#forwards + 1] = frame(0x02, payload:upper())
        end
      end
      local out, rc = H.exchange(port, table.concat(sent), 30)
      assert.are.equal(0, rc)
      local got_echo, got_forward = {}, {}
      for _, f in ipairs(frames(out)) do
        if f:byte(5) == 0x01 then got_echo[#got_echo + 1] = f else got_forward[#got_forward + 1] = f end
      end
      assert.are.same(echoes, got_echo)
      assert.are.same(forwards, got_forward)
    end)

    it("closes a client that sends an unknown header, with malformed_frame", function()
      local out = H.exchange(port, frame(0x01, "ok") .. frame(0x09, "bad") .. frame(0x01, "late"), 20)
      assert.are.equal(frame(0x01, "ok"), out)
      assert.truthy(log_shows(p, "on length_router closed: malformed_frame"))
      assert.matches("malformed_frame (length 4, header 0x09)", H.read(p.log), 1, true)
    end)
  end)
end)
