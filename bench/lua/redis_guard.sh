#!/usr/bin/env bash
# Runs bench/lua/redis_guard.lua RUNS times (default 8) on the core library
# scripts/run builds (build/), one line per start.
#   bench/lua/redis_guard.sh [COMMANDS]     (RUNS=8 by default)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
[ -f build/libsluice_core.so ] || scripts/build build >/dev/null
export SLUICE_CORE_LIB="$root/build/libsluice_core.so"
export LUA_PATH="$root/lua/?.lua;$root/lua/?/init.lua;$root/?.lua;$root/spec/?.lua;;"
for ((i = 1; i <= ${RUNS:-8}; i++)); do
  luajit bench/lua/redis_guard.lua "$@" 2>/dev/null
done
