-- TLS to a redis-server that speaks only TLS and asks for client
-- certificates, for clients that speak plain RESP (an application without
-- TLS support, or redis-benchmark): sluice verifies the server's
-- certificate against a private CA, shows its own client certificate, and
-- resumes each worker's last session with the server on its next
-- connection. examples.redis_guard still sees every command in plaintext.
--
--   # A CA, a certificate for the server (for 127.0.0.1) and one for sluice:
--   mkdir -p /tmp/redis-tls && cd /tmp/redis-tls
--   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
--     -keyout ca.key -out ca.crt -subj /CN=example-ca \
--     -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign
--   for n in redis sluice; do
--     openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
--       -keyout $n.key -out $n.csr -subj /CN=$n
--     printf 'subjectAltName=IP:127.0.0.1\n' > $n.ext
--     openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
--       -days 30 -extfile $n.ext -out $n.crt
--   done
--   redis-server --port 0 --tls-port 6380 --tls-cert-file redis.crt \
--     --tls-key-file redis.key --tls-ca-cert-file ca.crt --save '' &
--   cd - && SLUICE_EXAMPLE_TLS_DIR=/tmp/redis-tls build/sluice -c examples/config/redis_tls.lua &
--   redis-cli -p 7060 SET k v        # OK: plain RESP to sluice, TLS to redis
--   redis-cli -p 7060 FLUSHALL       # (error) ERR command 'FLUSHALL' is not allowed
--
-- SLUICE_EXAMPLE_LISTEN and SLUICE_EXAMPLE_UPSTREAM change the addresses;
-- SLUICE_EXAMPLE_TLS_DIR is the folder of ca.crt, sluice.crt and
-- sluice.key (default: the folder tls/ beside this file).
local dir = os.getenv("SLUICE_EXAMPLE_TLS_DIR") or "tls"

return {
  listeners = {
    { name = "redis", listen = os.getenv("SLUICE_EXAMPLE_LISTEN") or "127.0.0.1:7060",
      upstream = "redis_tls",
      pipeline = { { "examples.redis_guard", deny = { "FLUSHALL", "KEYS" } } } },
  },
  upstreams = {
    redis_tls = {
      servers = { os.getenv("SLUICE_EXAMPLE_UPSTREAM") or "127.0.0.1:6380" },
      tls = { ca = dir .. "/ca.crt", certificate = dir .. "/sluice.crt",
              key = dir .. "/sluice.key" },
    },
  },
}
