#!/usr/bin/env bash
# epoll vs io_uring on the same load: 1 and 16 connections, 2 workers,
# durability none; alternated, ROUNDS rounds of RUN_SECONDS s. Prints one line per
# run: backend connections round bets/s p50_us p99_us. (docs/PERFORMANCE.md)
set -euo pipefail
BIN_DIR=${BIN_DIR:-build/bin}
PORT=${PORT:-23461}
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${RUN_SECONDS:-3}  # not SECONDS: bash sets that one
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then
  echo "port $PORT is busy: a server there would take part of the load (SO_REUSEPORT); set PORT" >&2
  exit 1
fi
for round in $(seq 1 "$ROUNDS"); do
  for conns in 1 16; do
    for io in epoll uring; do
      rm -rf "$DATA/data"
      "$BIN_DIR/lottery-server" --ip 127.0.0.1 --port "$PORT" --data-dir "$DATA/data" --agencies 16 --workers 2 \
        --durability none --io "$io" >"$DATA/server.log" 2>&1 &
      pid=$!
      for _ in $(seq 1 100); do grep -q "action: listen" "$DATA/server.log" && break; sleep 0.05; done
      "$BIN_DIR/lottery-loadgen" --address "127.0.0.1:$PORT" --connections "$conns" --agencies 16 \
        --duration "$SECONDS_PER_RUN" --warmup 0.5 --json --no-progress 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); l=d['latency_us']; print('$io', $conns, $round, round(d['bets_per_s']), l['p50'], l['p99'])"
      kill "$pid"
      wait "$pid" 2>/dev/null || true
    done
  done
done
