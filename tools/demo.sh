#!/usr/bin/env bash
# make demo: generate agency data, run the server and one client per agency,
# print what each agency bet and won, stop the server gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-build/bin}
AGENCIES=${AGENCIES:-5}
RUN=demo-run
rm -rf "$RUN"
mkdir -p "$RUN/.data" "$RUN/logs"

echo "== generating data for $AGENCIES agencies"
"$BIN_DIR/lottery-datagen" --agencies "$AGENCIES" --bets 20000 --seed 2026 --out-dir "$RUN/.data"

echo "== TLS keys: one per agency (lotteryctl keys init)"
"$BIN_DIR/lotteryctl" keys init --agencies "$AGENCIES" --dir "$RUN/keys"

echo "== starting the server (TLS 1.3, a pre-shared key per agency; plaintext refused)"
"$BIN_DIR/lottery-server" --ip 127.0.0.1 --port 0 --data-dir "$RUN/data" --agencies "$AGENCIES" \
  --tls-keys "$RUN/keys/server.keys" >"$RUN/logs/server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
PORT=""
for _ in $(seq 1 200); do
  PORT=$(sed -n 's/.*action: listen | result: success | .*port: \([0-9]*\).*/\1/p' "$RUN/logs/server.log" | head -1)
  [ -n "$PORT" ] && break
  sleep 0.05
done
[ -n "$PORT" ] || { cat "$RUN/logs/server.log"; echo "server did not start"; exit 1; }
echo "   listening on 127.0.0.1:$PORT"

echo "== running $AGENCIES agency clients, each with its own key"
PIDS=()
for i in $(seq 1 "$AGENCIES"); do
  CLI_ID=$i CLI_SERVER_ADDRESS=127.0.0.1:$PORT CLI_DATA_FILE="$RUN/.data/agency-$i.csv" \
    CLI_TLS_KEY="$RUN/keys/agency-$i.key" \
    "$BIN_DIR/lottery-client" >"$RUN/logs/client$i.log" 2>&1 &
  PIDS+=($!)
done
STATUS=0
for i in $(seq 1 "$AGENCIES"); do
  wait "${PIDS[$((i - 1))]}" || { echo "client $i failed:"; tail -5 "$RUN/logs/client$i.log"; STATUS=1; }
done

echo "== results"
printf "%-8s %10s %10s %10s\n" agency bets winners expected
for i in $(seq 1 "$AGENCIES"); do
  bets=$(sed -n 's/.*action: fin_apuestas | result: success .*cantidad: \([0-9]*\).*/\1/p' "$RUN/logs/client$i.log" | tail -1)
  won=$(sed -n 's/.*action: consulta_ganadores | result: success | cant_ganadores: \([0-9]*\).*/\1/p' "$RUN/logs/client$i.log" | tail -1)
  want=$(python3 -c "import json;print(json.load(open('$RUN/.data/expected.json'))['agencies']['$i']['winners'])")
  printf "%-8s %10s %10s %10s\n" "$i" "${bets:-?}" "${won:-?}" "$want"
  [ "${won:-x}" = "$want" ] || STATUS=1
done
grep -h "action: sorteo" "$RUN/logs/server.log" || STATUS=1
handshakes_failed=$(grep -c "action: tls_handshake | result: fail" "$RUN/logs/server.log" || true)
echo "   every connection over TLS; failed handshakes: $handshakes_failed"
[ "$handshakes_failed" = 0 ] || STATUS=1

echo "== lotteryctl status (while the server still runs)"
"$BIN_DIR/lotteryctl" --data-dir "$RUN/data" status || STATUS=1

echo "== stopping the server (SIGTERM)"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" && echo "   server exited 0" || { echo "   server exited $?"; STATUS=1; }
trap - EXIT
echo "   logs in $RUN/logs/"
exit $STATUS
