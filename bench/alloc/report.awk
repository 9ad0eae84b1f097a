# Reads bench/alloc/run's raw lines (key=value fields):
#   kind=cg   workload allocator ir pairs        one callgrind run
#   kind=wall workload allocator ns_per_op ...   one wall-clock run
# Prints the table and the summary; writes the JSON records to -v json=PATH.
# Plain POSIX awk (mawk): no asort, so medians sort by hand.

function median(list,    v, n, i, j, t) {
  n = split(list, v, " ")
  if (n == 0) return -1
  for (i = 2; i <= n; i++) {
    t = v[i] + 0
    for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]
    v[j + 1] = t
  }
  return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
}

function minmax(list,    v, n, i, lo, hi) {
  n = split(list, v, " ")
  lo = hi = v[1] + 0
  for (i = 2; i <= n; i++) {
    if (v[i] + 0 < lo) lo = v[i] + 0
    if (v[i] + 0 > hi) hi = v[i] + 0
  }
  return sprintf("%.1f-%.1f", lo, hi)
}

function add(key, val) { acc[key] = (key in acc) ? acc[key] " " val : val }

{
  delete f
  for (i = 1; i <= NF; i++) {
    eq = index($i, "=")
    if (eq > 0) f[substr($i, 1, eq - 1)] = substr($i, eq + 1)
  }
  k = f["workload"] SUBSEP f["allocator"]
  if (f["kind"] == "cg") {
    ir[k] = f["ir"]
    cgpairs[k] = f["pairs"]
  } else if (f["kind"] == "wall") {
    add("ns" SUBSEP k, f["ns_per_op"])
    add("peak" SUBSEP k, f["peak_rss_kb"])
    add("start" SUBSEP k, f["rss_start_kb"])
    add("free" SUBSEP k, f["rss_after_free_kb"])
    add("trim" SUBSEP k, f["rss_after_trim_kb"])
  }
}

END {
  nw = split("W1 W2 W3 W4", W, " ")
  na = split("sluice sluice-64k glibc jemalloc mimalloc loop", A, " ")
  nc = split("glibc jemalloc mimalloc", C, " ")
  desc["W1"] = "io-cycle: alloc, touch, free; 512 B..64 KiB powers of two"
  desc["W2"] = "queue: FIFO of 1024 live; 64 B..64 KiB uniform"
  desc["W3"] = "small: 10,000 live of 16..512 B, freed shuffled"
  desc["W4"] = "cross-thread: one thread allocates, another frees"
  chunk_kb = 4096
  if (rev != "") printf "sluice %s; callgrind %s pairs per run; wall: median of %s interleaved rounds\n\n", rev, cg_run_pairs, rounds

  printf "%-3s %-10s %10s %9s %11s %10s %10s %10s %10s\n", "", "allocator", "instr/pair",
         "ns/pair", "ns min-max", "peak KiB", "start KiB", "freed KiB", "trimmed KiB"
  for (i = 1; i <= nw; i++) {
    w = W[i]
    printf "%s  %s\n", w, desc[w]
    base = ((w SUBSEP "loop") in ir) ? ir[w SUBSEP "loop"] : 0
    for (j = 1; j <= na; j++) {
      a = A[j]
      k = w SUBSEP a
      if (!(k in ir) || !(("ns" SUBSEP k) in acc)) continue
      # The loop row is the harness alone (its raw count); the others are net of it.
      ins[k] = (a == "loop") ? ir[k] / cgpairs[k] : (ir[k] - base) / cgpairs[k]
      ns[k] = median(acc["ns" SUBSEP k])
      peak[k] = median(acc["peak" SUBSEP k])
      start[k] = median(acc["start" SUBSEP k])
      freed[k] = median(acc["free" SUBSEP k])
      trim[k] = median(acc["trim" SUBSEP k])
      printf "%-3s %-10s %10.1f %9.2f %11s %10d %10d %10d %10d\n", "", (a == "loop" ? "(loop)" : a),
             ins[k], ns[k], minmax(acc["ns" SUBSEP k]), peak[k], start[k], freed[k], trim[k]
    }
  }

  print ""
  all_fewer = 1; all_100 = 1; all_rss = 1
  for (i = 1; i <= nw; i++) {
    w = W[i]
    s = w SUBSEP "sluice"
    if (!(s in ins)) { unmeasured = unmeasured " " w; continue }
    bi = ""; bn = ""
    fewer = 1
    for (j = 1; j <= nc; j++) {
      k = w SUBSEP C[j]
      if (!(k in ins)) continue
      if (bi == "" || ins[k] < ins[w SUBSEP bi]) bi = C[j]
      if (bn == "" || ns[k] < ns[w SUBSEP bn]) bn = C[j]
      if (ins[s] >= ins[k]) fewer = 0
    }
    if (!fewer) { all_fewer = 0; miss_fewer = miss_fewer " " w }
    line = sprintf("%s: sluice %.1f instr/pair = %.2fx best contender (%s %.1f); %.2f ns/pair = %.2fx best (%s %.2f)",
                   w, ins[s], ins[s] / ins[w SUBSEP bi], bi, ins[w SUBSEP bi],
                   ns[s], ns[s] / ns[w SUBSEP bn], bn, ns[w SUBSEP bn])
    line = line sprintf("; fewer instructions than every contender: %s", fewer ? "yes" : "NO")
    if (w == "W1" || w == "W2") {
      ok = ins[s] <= 100
      if (!ok) { all_100 = 0; miss_100 = miss_100 " " w }
      line = line sprintf("; <= 100 instr/pair: %s", ok ? "yes" : "NO")
    }
    d = trim[s] - start[s]
    ok = d <= chunk_kb
    if (!ok) { all_rss = 0; miss_rss = miss_rss " " w }
    line = line sprintf("; RSS after trim %+d KiB vs start (<= 4 MiB: %s)", d, ok ? "yes" : "NO")
    print line
  }
  print ""
  # A workload without sluice's figures leaves every target unjudged.
  none = unmeasured != "" ? "not measured (no figures for" unmeasured ")" : ""
  printf "target: fewer instructions than every contender on every workload: %s\n",
         none != "" ? none : all_fewer ? "met" : "NOT met (" substr(miss_fewer, 2) ")"
  printf "target: at most 100 instructions per pair on W1 and W2: %s\n",
         none != "" ? none : all_100 ? "met" : "NOT met (" substr(miss_100, 2) ")"
  printf "target: RSS after free and trim within one chunk (4 MiB) of the start: %s\n",
         none != "" ? none : all_rss ? "met" : "NOT met (" substr(miss_rss, 2) ")"
  print ""
  print "tuned (allocator.max_cached = 65536; the targets above are judged on the defaults):"
  for (i = 1; i <= nw; i++) {
    w = W[i]
    t = w SUBSEP "sluice-64k"
    if (!(t in ins)) continue
    bi = ""
    for (j = 1; j <= nc; j++) {
      k = w SUBSEP C[j]
      if ((k in ins) && (bi == "" || ins[k] < ins[w SUBSEP bi])) bi = C[j]
    }
    printf "%s: sluice-64k %.1f instr/pair = %.2fx best contender (%s %.1f); %.2f ns/pair\n",
           w, ins[t], ins[t] / ins[w SUBSEP bi], bi, ins[w SUBSEP bi], ns[t]
  }
  print "(instr/pair: callgrind Ir of the measured loop minus the (loop) harness, per pair;"
  print " ns/pair: median of the interleaved runs, harness included; RSS: medians, KiB)"

  if (json != "") {
    printf "[\n" > json
    first = 1
    for (i = 1; i <= nw; i++) {
      for (j = 1; j <= na; j++) {
        if (A[j] == "loop") continue
        k = W[i] SUBSEP A[j]
        if (!(k in ins)) continue
        printf "%s  {\"workload\": \"%s\", \"allocator\": \"%s\", \"instructions_per_op\": %.1f, " \
               "\"ns_per_op\": %.2f, \"peak_rss_kb\": %d, \"rss_after_trim_kb\": %d, " \
               "\"rss_start_kb\": %d, \"rss_after_free_kb\": %d}", first ? "" : ",\n",
               W[i], A[j], ins[k], ns[k], peak[k], trim[k], start[k], freed[k] > json
        first = 0
      }
    }
    printf "\n]\n" > json
    close(json)
  }
}
