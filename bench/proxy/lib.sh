# shellcheck shell=bash
# Functions of the proxy benchmark, sourced by bench/proxy/run and
# bench/proxy/profile. Not a program on its own.
#
# Every process started here goes through bench_spawn, which records its PID;
# bench_cleanup (installed as the EXIT trap by bench_init) stops each one by
# PID, children first, with SIGTERM and then SIGKILL after 5 s.

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="$root/build-bench"          # sluice in Release (-O2 -g, no sanitizers)
work="$build/proxy"                # netload, generated configs, logs, raw figures
sluice="${SLUICE_BIN:-$build/sluice}"   # SLUICE_BIN: measure that binary instead (A/B runs)
netload="$work/netload"

bench_pids=()                      # every process started, in start order

say() { printf '== %s\n' "$*" >&2; }
die() { printf 'bench/proxy: %s\n' "$*" >&2; exit 1; }

# The PIDs of the children of $1 (nginx's workers), from /proc.
bench_children() {
  cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' || true
}

bench_alive() {   # pid: running and not a zombie
  local state
  state=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# Stops one process and its children by PID: SIGTERM, up to 5 s, SIGKILL.
bench_stop() {
  local pid=$1 kids i p
  [ -n "$pid" ] || return 0
  kids=$(bench_children "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    bench_alive "$pid" || break
    sleep 0.1
  done
  if bench_alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  for p in $kids; do
    if bench_alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
  done
  wait "$pid" 2>/dev/null || true
  bench_forget "$pid"
}

# Drops a PID from the list (once waited for: it may be reused).
bench_forget() {
  local kept=() p
  for p in "${bench_pids[@]}"; do [ "$p" = "$1" ] || kept+=("$p"); done
  bench_pids=("${kept[@]}")
}

bench_cleanup() {
  local i
  for ((i = ${#bench_pids[@]} - 1; i >= 0; i--)); do bench_stop "${bench_pids[$i]}"; done
}

bench_init() {
  mkdir -p "$work"
  # One run at a time: runs share build-bench/proxy and would disturb each other.
  exec 9>"$work/lock"
  flock -n 9 || die "another bench/proxy run holds $work/lock"
  trap bench_cleanup EXIT
  trap 'echo "bench/proxy: interrupted" >&2; exit 130' INT
  trap 'echo "bench/proxy: terminated" >&2; exit 143' TERM
}

# bench_spawn LOG CPUS CMD...: starts CMD in the background pinned on CPUS
# ("" for no pinning), output to LOG; sets SPAWNED to its PID.
bench_spawn() {
  local log=$1 cpus=$2
  shift 2
  if [ -n "$cpus" ]; then
    taskset -c "$cpus" "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  SPAWNED=$!
  bench_pids+=("$SPAWNED")
}

# bench_wait_port PORT PID LOG: until 127.0.0.1:PORT accepts (10 s at most);
# fails with LOG shown when PID exits first.
bench_wait_port() {
  local port=$1 pid=$2 log=$3 i
  for ((i = 0; i < 100; i++)); do
    if ! bench_alive "$pid"; then
      sed 's/^/    /' "$log" >&2
      return 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench/proxy: nothing listens on 127.0.0.1:$port after 10 s" >&2
  return 1
}

bench_free_ports() { "$netload" port "$1"; }

# The knobs of bench/proxy/run (see its header), with the defaults of MODE
# (full or quick); checks the lists.
bench_settings() {   # mode
  local mode=$1
  if [ "$mode" = quick ]; then
    rounds=${ROUNDS:-1} duration=${DURATION:-2} redis_requests=${REDIS_REQUESTS:-100000}
    bulk_bytes=${BULK_BYTES:-268435456} idle_conns=${IDLE_CONNS:-2000}
  else
    rounds=${ROUNDS:-3} duration=${DURATION:-10} redis_requests=${REDIS_REQUESTS:-2000000}
    bulk_bytes=${BULK_BYTES:-4294967296} idle_conns=${IDLE_CONNS:-10000}
  fi
  # https-small and https-churn (TLS from the proxy to the origin) are opt-in.
  read -r -a workloads <<<"${WORKLOADS:-http-small redis-p16 bulk churn idle}"
  all_contenders=(baseline haproxy-1w haproxy-1w-splice haproxy-2w nginx-1w nginx-2w
                  sluice-1w sluice-1w-splice sluice-1w-nohc sluice-1w-lua sluice-1w-guard
                  sluice-2w sluice-2w-splice sluice-2w-nohc sluice-2w-lua sluice-2w-guard)
  read -r -a contenders <<<"${CONTENDERS:-${all_contenders[*]}}"
  load_cpus=${LOAD_CPUS:-0}
  proxy_cpus=${PROXY_CPUS:-1}
  all_cpus=${ALL_CPUS:-0-$(( $(nproc) - 1 ))}

  for w in "${workloads[@]}"; do
    case $w in
      http-small | redis-p16 | bulk | churn | idle | https-small | https-churn) ;;
      *) die "unknown workload $w" ;;
    esac
  done
  for c in "${contenders[@]}"; do
    [[ " ${all_contenders[*]} " == *" $c "* ]] || die "unknown contender $c"
  done
  [ "$rounds" -ge 1 ] || die "ROUNDS must be at least 1"
  if [ "$(nproc)" -lt 2 ]; then
    die "needs 2 CPUs (proxy on one, load generator and origin on the other); this machine has $(nproc)"
  fi
}

# Installs the bench packages, checks every tool is there, builds sluice and
# netload.
bench_prepare() {
  if [ "${SKIP_SETUP:-0}" != 1 ]; then
    say "setup (SLUICE_SETUP_BENCH=1 scripts/setup)"
    SLUICE_SETUP_BENCH=1 "$root/scripts/setup"
  fi
  local missing=() t
  for t in haproxy nginx wrk redis-server redis-benchmark taskset gcc cmake luajit timeout openssl; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  [ -f "$nginx_stream_module" ] || missing+=("$nginx_stream_module (libnginx-mod-stream)")
  [ "${#missing[@]}" -eq 0 ] || die "missing after setup: ${missing[*]}"

  mkdir -p "$work"
  if [ -n "${SLUICE_BIN:-}" ]; then
    [ -x "$SLUICE_BIN" ] || die "SLUICE_BIN=$SLUICE_BIN is not an executable"
    say "measuring $SLUICE_BIN (not building)"
  else
    say "building sluice (Release, -O2 -g, no sanitizers) in ${build#"$root"/}"
  fi
  if [ -z "${SLUICE_BIN:-}" ] && ! { cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release \
           -DCMAKE_C_FLAGS_RELEASE="-O2 -g -DNDEBUG" -DSLUICE_TESTS=OFF \
           -DSLUICE_ASAN=OFF -DSLUICE_UBSAN=OFF -DSLUICE_WERROR=OFF &&
         cmake --build "$build" --target sluice -j 2; } >"$work/cmake.log" 2>&1; then
    cat "$work/cmake.log" >&2
    die "building sluice failed"
  fi
  gcc -O2 -std=gnu11 -Wall -Wextra "$here/netload.c" -o "$netload" || die "building netload failed"
  bench_make_cert
}

# The TLS origin's certificate: self-signed, EC P-256, for 127.0.0.1 (every
# proxy connects with verification off, so only the key type matters: it
# sets the cost of the origin's signature in each full handshake).
origin_cert="$work/origin-cert.pem"
origin_key="$work/origin-key.pem"
bench_make_cert() {
  [ -s "$origin_cert" ] && [ -s "$origin_key" ] && return 0
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$origin_key" -out "$origin_cert" >"$work/openssl.log" 2>&1 ||
    { cat "$work/openssl.log" >&2; die "making the origin's certificate failed"; }
}

nginx_stream_module=/usr/lib/nginx/modules/ngx_stream_module.so

# Open files: every proxied idle connection costs the proxy two descriptors.
# The soft limit goes up to the hard one (raised to 65536 first where that is
# allowed); IDLE_N is the idle connection count that fits.
bench_raise_nofile() {
  ulimit -Hn 65536 2>/dev/null || true
  local hard
  hard=$(ulimit -Hn)
  [ "$hard" = unlimited ] && hard=1048576
  ulimit -Sn "$hard"
  NOFILE=$hard
  local fit=$(( (hard - 256) / 2 ))
  IDLE_N=$idle_conns
  if [ "$IDLE_N" -gt "$fit" ]; then IDLE_N=$(( fit / 2 * 2 )); fi
}

# --- the origins: nginx (HTTP and HTTPS, 100-byte body), redis-server, netload sink ---

body100=$(printf '%0100d' 0)

bench_start_origins() {
  local ports d="$work/origin"
  mkdir -p "$d/tmp"
  mapfile -t ports < <(bench_free_ports 4)
  HTTP_PORT=${ports[0]} REDIS_PORT=${ports[1]} SINK_PORT=${ports[2]} HTTPS_PORT=${ports[3]}
  # The TLS server logs whether each connection's handshake was resumed
  # ("r" or "."), on its first request only: one line per connection.
  TLS_SESSIONS_LOG=$d/tls-sessions.log
  : >"$TLS_SESSIONS_LOG"
  cat >"$d/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $d/nginx.pid;
error_log $d/nginx-error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
  keepalive_requests 1000000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$HTTP_PORT backlog=4096;
    location / { default_type text/plain; return 200 "$body100"; }
  }
  map \$connection_requests \$first_request { 1 1; default 0; }
  log_format session '\$ssl_session_reused';
  server {
    listen 127.0.0.1:$HTTPS_PORT ssl backlog=4096;
    ssl_certificate $origin_cert;
    ssl_certificate_key $origin_key;
    ssl_protocols TLSv1.2 TLSv1.3;
    access_log $TLS_SESSIONS_LOG session if=\$first_request;
    location / { default_type text/plain; return 200 "$body100"; }
  }
}
EOF
  bench_spawn "$d/nginx.out" "$load_cpus" nginx -p "$d/" -e "$d/nginx-error.log" -c "$d/nginx.conf"
  HTTP_PID=$SPAWNED
  bench_wait_port "$HTTP_PORT" "$HTTP_PID" "$d/nginx.out" || die "the nginx origin did not start"

  bench_spawn "$d/redis.out" "$load_cpus" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
    --save '' --appendonly no --protected-mode no --dir "$d" --daemonize no --maxclients 10000
  REDIS_PID=$SPAWNED
  bench_wait_port "$REDIS_PORT" "$REDIS_PID" "$d/redis.out" || die "redis-server did not start"

  bench_spawn "$d/sink.out" "$load_cpus" "$netload" sink "$SINK_PORT"
  SINK_PID=$SPAWNED
  bench_wait_port "$SINK_PORT" "$SINK_PID" "$d/sink.out" || die "the sink did not start"
  bench_wait_port "$HTTPS_PORT" "$HTTP_PID" "$d/nginx.out" || die "the nginx origin's TLS port did not open"
  say "origins: nginx :$HTTP_PORT (TLS :$HTTPS_PORT), redis-server :$REDIS_PORT, sink :$SINK_PORT (CPUs $load_cpus)"
}

bench_origin_port() {   # workload -> the port the proxy forwards to
  case $1 in
    http-small | churn) echo "$HTTP_PORT" ;;
    https-small | https-churn) echo "$HTTPS_PORT" ;;
    redis-p16) echo "$REDIS_PORT" ;;
    bulk | idle) echo "$SINK_PORT" ;;
  esac
}

# --- the contenders --------------------------------------------------------

# bench_sluice_accepts TOP PIPELINE: whether `sluice --check` accepts a
# one-listener config with TOP as extra top-level keys and PIPELINE as the
# stage list; on refusal sets REFUSAL to the first line of its message.
bench_sluice_accepts() {
  local f="$work/detect.lua" out
  printf 'return { %s listeners = { { name = "p", listen = "127.0.0.1:1", upstream = "u",\n  pipeline = { %s } } }, upstreams = { u = { servers = { "127.0.0.1:2" } } } }\n' \
    "$1" "$2" >"$f"
  if out=$(SLUICE_ROOT="$root" "$sluice" --check "$f" 2>&1); then return 0; fi
  out=${out%%$'\n'*}
  REFUSAL=${out#config error: }
  REFUSAL=${REFUSAL%% (expected one of*}
  return 1
}

# What sluice accepts: SLUICE_WORKERS ("yes" when the config schema has
# `workers`), SLUICE_GUARD ("yes" when examples.redis_guard loads), with the
# refusal kept for the notes.
bench_detect_sluice() {
  SLUICE_WORKERS=yes SLUICE_WORKERS_NOTE="" SLUICE_GUARD=yes SLUICE_GUARD_NOTE=""
  if ! bench_sluice_accepts "workers = 2," ""; then
    SLUICE_WORKERS=no SLUICE_WORKERS_NOTE="one worker only: --check refuses workers = 2 ($REFUSAL)"
  fi
  if ! bench_sluice_accepts "" '"examples.redis_guard"'; then
    SLUICE_GUARD=no SLUICE_GUARD_NOTE="examples.redis_guard does not load ($REFUSAL)"
  fi
}

# A contender id is NAME-Nw[-VARIANT]: baseline, haproxy-1w, nginx-2w,
# sluice-1w, sluice-1w-lua, sluice-2w-guard.
bench_contender_workers() {
  case $1 in *-2w*) echo 2 ;; *) echo 1 ;; esac
}

# Whether a contender belongs on a workload: the RESP guard rows run on
# redis-p16 only, the splicing rows (HAProxy with splice-auto, sluice with
# splice = true) on bulk only (where they splice), the half_close = false
# rows on churn only (the only workload whose connections end). The https
# workloads take the rows of http-small and churn: proxies with 1 and 2
# workers and the Lua stage rows.
bench_applies() {   # contender workload
  case $1 in
    *-guard) [ "$2" = redis-p16 ] ;;
    *-splice) [ "$2" = bulk ] ;;
    *-nohc) [ "$2" = churn ] ;;
    *) return 0 ;;
  esac
}

# Why a contender has no figure on a workload ("" when it runs).
bench_unavailable() {   # contender workload
  local c=$1 w=$2
  case $c in
    baseline)
      [ "$w" != idle ] || { echo "no proxy to measure"; return; }
      case $w in https-*)
        echo "clients speak plain HTTP to the proxy; without one there is no TLS hop (the no-proxy rows of http-small and churn show the load side's limit)"
        return ;;
      esac ;;
  esac
  case $c in
    *-guard) [ "$SLUICE_GUARD" = yes ] || { echo "$SLUICE_GUARD_NOTE"; return; } ;;
  esac
  case $c in
    sluice-2w*) [ "$SLUICE_WORKERS" = yes ] || { echo "$SLUICE_WORKERS_NOTE"; return; } ;;
  esac
  echo ""
}

# bench_start_proxy CONTENDER WORKLOAD: starts the contender in front of the
# workload's origin; sets PROXY_PORT and PROXY_PID ("" for the baseline).
bench_start_proxy() {
  local c=$1 w=$2 up n cpus
  up=$(bench_origin_port "$w")
  if [ "$c" = baseline ]; then
    PROXY_PORT=$up PROXY_PID=""
    return 0
  fi
  n=$(bench_contender_workers "$c")
  if [ "$n" = 1 ]; then cpus=$proxy_cpus; else cpus=$all_cpus; fi
  for _ in 1 2 3; do   # a port taken between the check and the bind: next port
    PROXY_PORT=$(bench_free_ports 1)
    local d="$work/run/$c"
    mkdir -p "$d"
    case $c in
      haproxy-*) bench_config_haproxy "$d/haproxy.cfg" "$n" "$up" "$c" "$w"
                 bench_spawn "$d/out.log" "$cpus" haproxy -db -f "$d/haproxy.cfg" ;;
      nginx-*)   bench_config_nginx "$d" "$n" "$up" "$w"
                 bench_spawn "$d/out.log" "$cpus" nginx -p "$d/" -e "$d/error.log" -c "$d/nginx.conf" ;;
      sluice-*)  bench_config_sluice "$d/sluice.lua" "$c" "$n" "$up" "$w"
                 bench_spawn "$d/out.log" "$cpus" env SLUICE_ROOT="$root" "$sluice" -c "$d/sluice.lua" ;;
      *) die "unknown contender $c" ;;
    esac
    PROXY_PID=$SPAWNED
    if bench_wait_port "$PROXY_PORT" "$PROXY_PID" "$d/out.log"; then return 0; fi
    bench_stop "$PROXY_PID"
  done
  return 1
}

bench_stop_proxy() {
  if [ -n "${PROXY_PID:-}" ]; then bench_stop "$PROXY_PID"; fi
  PROXY_PID=""
}

# The https workloads: every proxy speaks TLS to the origin and verifies
# nothing (HAProxy `ssl verify none`, nginx `proxy_ssl on` with its default
# `proxy_ssl_verify off`, sluice `tls = { verify = false }`), sends no SNI,
# offers TLS 1.2 and 1.3 (so 1.3 is spoken) and resumes sessions as it
# does by default.
bench_is_tls() { case $1 in https-*) return 0 ;; *) return 1 ;; esac; }

bench_config_haproxy() {   # file workers upstream-port contender workload
  local splice="" per_conn=2 ssl=""
  bench_is_tls "$5" && ssl=" ssl verify none"
  # HAProxy splices only when told to; sluice splices pass-through by default.
  # Its pipes (up to maxconn / 4 of them) take descriptors too.
  case $4 in *-splice) splice="
  option splice-auto" per_conn=3 ;; esac
  cat >"$1" <<EOF
global
  nbthread $2
  maxconn $(( (NOFILE - 256) / per_conn ))
defaults
  mode tcp$splice
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend bench
  bind 127.0.0.1:$PROXY_PORT
  default_backend origin
backend origin
  server s1 127.0.0.1:$3$ssl
EOF
}

bench_config_nginx() {   # dir workers upstream-port workload
  local reuse="" ssl=""
  [ "$2" -gt 1 ] && reuse=" reuseport"
  # nginx 1.22 offers TLS 1.2 at most unless told (proxy_ssl_protocols).
  bench_is_tls "$4" && ssl="
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;"
  cat >"$1/nginx.conf" <<EOF
load_module $nginx_stream_module;
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $NOFILE; }   # the listening socket takes one too
stream {
  server {
    listen 127.0.0.1:$PROXY_PORT backlog=4096$reuse;
    proxy_pass 127.0.0.1:$3;$ssl
  }
}
EOF
}

bench_config_sluice() {   # file contender workers upstream-port workload
  local stages="" workers="" extra="" tls=""
  bench_is_tls "$5" && tls=", tls = { verify = false }"
  case $2 in
    *-lua) stages='"bench.proxy.field_stage"' ;;
    *-guard) stages='"examples.redis_guard"' ;;
    # Splicing on loopback too (the default, "auto", splices only toward
    # peers off loopback, so the plain rows copy).
    *-splice) extra=" splice = true," ;;
    # The first FIN ends the connection, as nginx's stream proxy does by
    # default (proxy_half_close off).
    *-nohc) extra=" half_close = false," ;;
  esac
  [ "$SLUICE_WORKERS" = yes ] && workers="workers = $3, "
  cat >"$1" <<EOF
return {
  ${workers}log_level = "warn",
  listeners = {
    { name = "bench", listen = "127.0.0.1:$PROXY_PORT", upstream = "origin",
      pipeline = { $stages },$extra },
  },
  upstreams = { origin = { servers = { "127.0.0.1:$4" }$tls } },
}
EOF
}

# --- the workloads ---------------------------------------------------------
#
# bench_load LOG CMD...: runs a load generator pinned with the origins and
# waits for it (interruptible: it runs in the background).
bench_load() {
  local log=$1 rc=0
  shift
  bench_spawn "$log" "$load_cpus" "$@"
  wait "$SPAWNED" || rc=$?
  bench_forget "$SPAWNED"
  return "$rc"
}

# Each workload sets M (the figures of one measurement, "key=value ...") and
# returns non-zero when the load generator failed.
bench_work_wrk() {   # port log extra-wrk-args...
  local port=$1 log=$2
  shift 2
  bench_load "$log" wrk -t 2 -c 64 -d "${duration}s" --latency "$@" "http://127.0.0.1:$port/" || return 1
  M=$(awk '
    function ms(v) {
      if (v ~ /us$/) return v / 1000
      if (v ~ /ms$/) return v + 0
      if (v ~ /s$/) return v * 1000
      if (v ~ /m$/) return v * 60000
      return v + 0
    }
    /^Requests\/sec:/ { rate = $2 }
    $1 == "99%" { p99 = ms($2) }
    / requests in / { n = $1 }
    /Socket errors:/ { gsub(",", ""); errs += $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { errs += $NF }
    END {
      if (rate == "" || n == "") exit 1
      printf "rate=%s work=%s errors=%d", rate, n, errs
      if (p99 != "") printf " p99_ms=%.3f", p99
    }' "$log")
}

bench_work_http_small() { bench_work_wrk "$1" "$2"; }
bench_work_churn() { bench_work_wrk "$1" "$2" -H "Connection: close"; }

# The https workloads: as http-small and churn, and the TLS origin's count
# of the proxy's handshakes in the run, and of those resumed (from its
# log: one line per connection, written as each connection's first
# request is answered).
bench_work_https() {   # port log extra-wrk-args...
  local s0 s1 counts
  s0=$(stat -c %s "$TLS_SESSIONS_LOG")
  bench_work_wrk "$@" || return 1
  s1=$(stat -c %s "$TLS_SESSIONS_LOG")
  counts=$(tail -c +$((s0 + 1)) "$TLS_SESSIONS_LOG" | head -c $((s1 - s0)) |
    awk '$1 == "r" { r++ } { n++ } END { printf "handshakes=%d resumed=%d", n, r }')
  M="$M $counts"
}

bench_work_redis() {   # port log
  bench_load "$2" timeout 600 redis-benchmark -h 127.0.0.1 -p "$1" -P 16 -c 50 -t set,get \
    -n "$redis_requests" --csv || return 1
  M=$(awk -F'"' -v n="$redis_requests" '
    $2 == "SET" { set = $4 } $2 == "GET" { get = $4 }
    /rror/ { errs++ }
    END {
      if (set <= 0 || get <= 0) exit 1
      printf "rate=%.0f set_rate=%s get_rate=%s work=%d errors=%d", 2 * n / (n / set + n / get), set, get, 2 * n, errs
    }' "$2")
}

bench_work_bulk() {   # port log
  bench_load "$2" "$netload" bulk "$1" "$bulk_bytes" || return 1
  M=$(awk '/^bytes=/ { split($3, g, "="); split($1, b, "="); printf "rate=%s work=%s errors=0", g[2], b[2] }' "$2")
  [ -n "$M" ]
}

# Waits until PID holds at least N descriptors (30 s at most).
bench_wait_fds() {
  local pid=$1 n=$2 i
  for ((i = 0; i < 300; i++)); do
    [ "$(bench_fd_count "$pid")" -ge "$n" ] && return 0
    bench_alive "$pid" || return 1
    sleep 0.1
  done
  return 1
}

# Opens a batch of idle connections; sets SPAWNED. Fails unless all connect.
bench_idle_batch() {   # port count log
  local i
  bench_spawn "$3" "$load_cpus" "$netload" idle "$1" "$2" 600
  for ((i = 0; i < 600; i++)); do
    grep -q '^connected=' "$3" 2>/dev/null && return 0
    bench_alive "$SPAWNED" || return 1
    sleep 0.1
  done
  return 1
}

# RSS of the proxy with no connection, half and all of IDLE_N idle connections.
bench_work_idle() {   # port log
  local port=$1 log=$2 half=$((IDLE_N / 2)) base rss0 rss_half rss a b
  base=$(bench_fd_count "$PROXY_PID")
  rss0=$(bench_status_kb "$PROXY_PID" VmRSS)
  bench_idle_batch "$port" "$half" "$log.a" || return 1
  a=$SPAWNED
  bench_wait_fds "$PROXY_PID" $((base + 2 * half)) || return 1
  sleep 1
  rss_half=$(bench_status_kb "$PROXY_PID" VmRSS)
  bench_idle_batch "$port" "$half" "$log.b" || return 1
  b=$SPAWNED
  bench_wait_fds "$PROXY_PID" $((base + 4 * half)) || return 1
  sleep 1
  rss=$(bench_status_kb "$PROXY_PID" VmRSS)
  bench_stop "$b"
  bench_stop "$a"
  M="rss0_kb=$rss0 rss_half_kb=$rss_half rss_kb=$rss n=$((2 * half)) errors=0"
}

bench_workload() {   # workload port log
  case $1 in
    http-small) bench_work_http_small "$2" "$3" ;;
    churn) bench_work_churn "$2" "$3" ;;
    https-small) bench_work_https "$2" "$3" ;;
    https-churn) bench_work_https "$2" "$3" -H "Connection: close" ;;
    redis-p16) bench_work_redis "$2" "$3" ;;
    bulk) bench_work_bulk "$2" "$3" ;;
    idle) bench_work_idle "$2" "$3" ;;
  esac
}

# --- what the proxy used, from /proc ----------------------------------------

bench_proc_set() {   # pid -> the pid and its children
  [ -n "$1" ] || return 0
  echo "$1"
  bench_children "$1"
}

# CPU ticks (utime + stime, every thread) of a process set.
bench_cpu_ticks() {
  local total=0 p line rest
  for p in $(bench_proc_set "$1"); do
    line=$(cat /proc/"$p"/stat 2>/dev/null) || continue
    rest=${line##*) }   # after the command name, which may hold spaces
    # shellcheck disable=SC2086
    set -- $rest
    total=$(( total + ${12} + ${13} ))
  done
  echo "$total"
}

# Busy and total ticks of the CPUs in a list such as "0", "0-1" or "0,2"
# (all work on them, whoever does it), from /proc/stat: "busy total".
bench_cpus_ticks() {
  awk -v list="$1" '
    BEGIN {
      n = split(list, parts, ",")
      for (i = 1; i <= n; i++) {
        if (split(parts[i], r, "-") == 2) { for (c = r[1]; c <= r[2]; c++) want["cpu" c] = 1 }
        else want["cpu" parts[i]] = 1
      }
    }
    $1 in want {
      t = 0
      for (i = 2; i <= NF; i++) t += $i
      total += t; busy += t - $5 - $6   # less idle and iowait
    }
    END { print busy + 0, total + 0 }' /proc/stat
}

# Percent busy between two bench_cpus_ticks readings.
bench_busy_pct() {   # "busy0 total0" "busy1 total1"
  awk -v a="$1" -v b="$2" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    printf "%.0f", (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0 }'
}

bench_status_kb() {   # pid field(VmHWM|VmRSS) -> summed over the set, in kB
  local total=0 p v
  for p in $(bench_proc_set "$1"); do
    v=$(awk -v f="$2:" '$1 == f {print $2}' /proc/"$p"/status 2>/dev/null)
    total=$(( total + ${v:-0} ))
  done
  echo "$total"
}

bench_fd_count() {
  local total=0 p n
  for p in $(bench_proc_set "$1"); do
    n=$(find /proc/"$p"/fd -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    total=$(( total + n ))
  done
  echo "$total"
}
