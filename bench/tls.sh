#!/usr/bin/env bash
# TLS vs plaintext on the same load (docs/PERFORMANCE.md "TLS"): one worker,
# durability none (so the store's syncs do not hide the CPU cost of
# encryption), CONNECTIONS connections, batches of 128. Runs alternate
# plaintext / TLS, ROUNDS of each, RUN_SECONDS s each, every run with a fresh
# server; then prints each run and the medians as ratios TLS / plaintext.
# On a shared, noisy machine only the ratio of medians means anything.
set -euo pipefail
BIN_DIR=${BIN_DIR:-build/bin}
PORT=${PORT:-23462}
ROUNDS=${ROUNDS:-5}
RUN_SECONDS=${RUN_SECONDS:-4}
CONNECTIONS=${CONNECTIONS:-4}
IO=${IO:-epoll}
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then
  echo "port $PORT is busy: a server there would take part of the load (SO_REUSEPORT); set PORT" >&2
  exit 1
fi
"$BIN_DIR/lotteryctl" keys init --agencies 5 --dir "$DATA/keys" >/dev/null
: >"$DATA/runs"
for round in $(seq 1 "$ROUNDS"); do
  for mode in plain tls; do
    rm -rf "$DATA/data"
    server_tls=()
    loadgen_tls=()
    if [ "$mode" = tls ]; then
      server_tls=(--tls-keys "$DATA/keys/server.keys")
      loadgen_tls=(--tls-keys "$DATA/keys")
    fi
    "$BIN_DIR/lottery-server" --ip 127.0.0.1 --port "$PORT" --data-dir "$DATA/data" --agencies 5 --workers 1 \
      --durability none --io "$IO" "${server_tls[@]}" >"$DATA/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do grep -q "action: listen" "$DATA/server.log" && break; sleep 0.05; done
    "$BIN_DIR/lottery-loadgen" --address "127.0.0.1:$PORT" --connections "$CONNECTIONS" --agencies 5 \
      --duration "$RUN_SECONDS" --warmup 1 --server-pid "$pid" --json --no-progress "${loadgen_tls[@]}" \
      2>/dev/null | python3 -c "
import json, sys
d = json.load(sys.stdin)
cpu = d['server_cpu_s'] / (d['bets'] / 1e6) if d['bets'] else 0
gen = d['client_cpu_s'] / (d['bets'] / 1e6) if d['bets'] else 0
print('$mode', $round, round(d['bets_per_s']), d['latency_us']['p50'], d['latency_us']['p99'], round(cpu, 4), round(gen, 4))" \
      | tee -a "$DATA/runs"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
done
python3 - "$DATA/runs" <<'PY'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
def med(mode, col):
    return statistics.median(float(r[col]) for r in runs if r[0] == mode)
print(f"medians of {sum(1 for r in runs if r[0] == 'plain')} runs each "
      "(columns above: mode round bets/s p50_us p99_us server_cpu_s_per_M_bets generator_cpu_s_per_M_bets)")
for name, col in (("bets/s", 2), ("p50 latency", 3), ("p99 latency", 4), ("server CPU per bet", 5),
                  ("generator CPU/bet", 6)):
    p, t = med("plain", col), med("tls", col)
    print(f"  {name:18s} plaintext {p:>12.4g}  TLS {t:>12.4g}  TLS/plaintext {t / p:.3f}")
PY
