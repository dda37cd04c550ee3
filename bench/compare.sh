#!/usr/bin/env bash
# bench/compare.sh (`make bench`): measures, side by side on this machine, with
# the same bets, batch size and connection count:
#   1. the loopback limit: bench-discard-sink (reads frames, 4-byte ack each);
#   2. Redis: variadic RPUSH of the same bets, persistence off, AOF everysec,
#      AOF always;
#   3. lottery-server in every mode it has (found in its --help: --io,
#      --workers, --durability); a mode it lacks is an "n/a" row.
# Closed-loop runs alternate between systems, several times, and the table
# reports medians; then each system is run open loop at half its median
# maximum for the latency distribution. Then the micro-benchmarks, an
# allocation count and (with perf) a profile of the server.
#
# Everything listens on 127.0.0.1 only, and every process this script starts
# is stopped by it (trap on EXIT/INT/TERM), by pid.
#
# Environment (defaults in brackets):
#   BENCH_QUICK=1        ~3 minutes instead of ~12 [0]
#   BIN_DIR              binaries [build/bin]
#   BENCH_OUT            results: results.md, JSON per run, PNG charts [build/bench-results]
#   BENCH_REPS, BENCH_DURATION, BENCH_WARMUP   runs per mode, seconds [5, 5, 1 | quick 3, 2, 0.5]
#   BENCH_CONNECTIONS [4]  BENCH_BATCH [128]  BENCH_PIPELINE [8]  BENCH_AGENCIES [5]
#   BENCH_PORT           first port of the range used [24000]
#   BENCH_DATA_DIR       where lottery-server and Redis write [a fresh dir under /tmp]
#   BENCH_PROFILE=0      skip the perf profile
#   BENCH_STEPS          which steps to run [closed open alloc micro profile]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
BIN_DIR=${BIN_DIR:-$root/build/bin}
OUT=${BENCH_OUT:-$BIN_DIR/../bench-results}
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
  REPS=${BENCH_REPS:-3}; DURATION=${BENCH_DURATION:-2}; WARMUP=${BENCH_WARMUP:-0.5}; MICRO_MIN_TIME=0.05
else
  REPS=${BENCH_REPS:-5}; DURATION=${BENCH_DURATION:-5}; WARMUP=${BENCH_WARMUP:-1}; MICRO_MIN_TIME=0.3
fi
CONNECTIONS=${BENCH_CONNECTIONS:-4}
BATCH=${BENCH_BATCH:-128}
PIPELINE=${BENCH_PIPELINE:-8}
AGENCIES=${BENCH_AGENCIES:-5}
PORT=${BENCH_PORT:-24000}
PROFILE=${BENCH_PROFILE:-1}
OPEN_PIPELINE=64  # open loop: the window must not be what limits the rate
STEPS=" ${BENCH_STEPS:-closed open alloc micro profile} "
step() { [[ $STEPS == *" $1 "* ]]; }

log() { printf '%s compare: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for b in lottery-server lottery-loadgen bench-discard-sink lottery_bench; do
  [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b is missing: build first (make build)"
done
command -v redis-server >/dev/null || die "redis-server is missing: apt-get install redis-server (make bench does it)"
HAVE_GNUPLOT=0; command -v gnuplot >/dev/null && HAVE_GNUPLOT=1
HAVE_PERF=0; command -v perf >/dev/null && perf --version >/dev/null 2>&1 && HAVE_PERF=1

DATA_ROOT=${BENCH_DATA_DIR:-$(mktemp -d /tmp/lottery-bench.XXXXXX)}
mkdir -p "$OUT/runs" "$DATA_ROOT"
step closed && rm -f "$OUT"/runs/*.json

# ---------------------------------------------------------------- processes

declare -a STARTED=()  # every pid this script started and has not reaped
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}
forget_pid() {
  local kept=() p
  for p in "${STARTED[@]+"${STARTED[@]}"}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  STARTED=("${kept[@]+"${kept[@]}"}")
}
cleanup() {
  for pid in "${STARTED[@]+"${STARTED[@]}"}"; do stop_pid "$pid"; done
  [[ -n ${BENCH_DATA_DIR:-} ]] || rm -rf "$DATA_ROOT"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

wait_port() {  # port pid
  for _ in $(seq 1 200); do
    kill -0 "$2" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.025
  done
  return 1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
port_taken && die "127.0.0.1:$PORT is in use by another process: set BENCH_PORT"

# ---------------------------------------------------------------- modes

# A mode is "system|label|durability class|how to start it".
server_help=$("$BIN_DIR/lottery-server" --help 2>&1 || true)
has_flag() { grep -q -- "$1" <<<"$server_help"; }

declare -a MODES=() NA=()
MODES+=("sink|discard sink|-|sink")
MODES+=("redis|redis no persistence|none|redis none")
MODES+=("redis|redis AOF everysec|group|redis everysec")
MODES+=("redis|redis AOF always|always|redis always")

io_modes=(default)
if has_flag "--io"; then
  io_modes=(epoll)
  # io_uring counts as a mode only when this kernel and build can run it.
  probe_dir=$DATA_ROOT/probe
  "$BIN_DIR/lottery-server" --ip 127.0.0.1 --port "$PORT" --io uring --data-dir "$probe_dir" \
    $(has_flag --workers && echo --workers 1) >/dev/null 2>&1 &
  probe=$!; STARTED+=("$probe")
  if wait_port "$PORT" "$probe"; then io_modes+=(uring); else NA+=("lottery io_uring|not available: lottery-server --io uring did not start here"); fi
  stop_pid "$probe"; rm -rf "$probe_dir"
fi
worker_modes=(1)
if has_flag "--workers"; then worker_modes=(1 2); else NA+=("lottery 2 workers|not implemented yet: no --workers in lottery-server --help"); fi
durability_modes=(none)
if has_flag "--durability"; then
  durability_modes=(none group always)
else
  NA+=("lottery durability group|not implemented yet: no --durability in lottery-server --help")
  NA+=("lottery durability always|not implemented yet: no --durability in lottery-server --help")
fi
for io in "${io_modes[@]}"; do
  for w in "${worker_modes[@]}"; do
    for d in "${durability_modes[@]}"; do
      MODES+=("lottery|lottery $io w$w $d|$d|lottery $io $w $d")
    done
  done
done
# The machine is shared: what else ran during the benchmark goes in the report.
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "modes: ${#MODES[@]} measured, ${#NA[@]} not available; $REPS runs of ${DURATION}s (+${WARMUP}s warm-up) each"

# ---------------------------------------------------------------- one run

SERVER_PID=""
start_system() {  # "how" words; sets SERVER_PID
  local kind=$1; shift
  # lottery-server listens with SO_REUSEPORT: a stray server on our port
  # would silently take part of the load.
  for _ in $(seq 1 100); do port_taken || break; sleep 0.05; done
  port_taken && die "127.0.0.1:$PORT is in use by another process: set BENCH_PORT"
  local dir=$DATA_ROOT/run
  rm -rf "$dir"; mkdir -p "$dir"
  case $kind in
    sink)
      "$BIN_DIR/bench-discard-sink" "$PORT" 2>"$dir/stderr" &
      ;;
    redis)
      local persistence=(--appendonly no)
      [[ $1 == everysec ]] && persistence=(--appendonly yes --appendfsync everysec)
      [[ $1 == always ]] && persistence=(--appendonly yes --appendfsync always)
      redis-server --bind 127.0.0.1 --port "$PORT" --dir "$dir" --save '' "${persistence[@]}" \
        --protected-mode no --daemonize no --logfile "$dir/redis.log" &
      ;;
    lottery)
      local io=$1 workers=$2 durability=$3 args=()
      [[ $io != default ]] && args+=(--io "$io")
      has_flag "--workers" && args+=(--workers "$workers")
      has_flag "--durability" && args+=(--durability "$durability")
      "$BIN_DIR/lottery-server" --ip 127.0.0.1 --port "$PORT" --agencies "$AGENCIES" --data-dir "$dir/data" \
        "${args[@]}" 2>"$dir/server.log" &
      ;;
  esac
  SERVER_PID=$!
  STARTED+=("$SERVER_PID")
  wait_port "$PORT" "$SERVER_PID" || { tail -5 "$dir"/*.log "$dir/stderr" 2>/dev/null >&2 || true; die "$kind $* did not start"; }
  if [[ $kind == lottery ]] && has_flag "--workers"; then
    # The master may listen before its workers exist; the profile attaches to them.
    for _ in $(seq 1 100); do [[ -n $(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null) ]] && break; sleep 0.02; done
  fi
}

target_of() { case $1 in sink) echo discard ;; redis) echo redis ;; *) echo lottery ;; esac; }

run_load() {  # out.json system extra-loadgen-args...
  local out=$1 system=$2; shift 2
  "$BIN_DIR/lottery-loadgen" --address "127.0.0.1:$PORT" --target "$(target_of "$system")" \
    --connections "$CONNECTIONS" --agencies "$AGENCIES" --batch "$BATCH" --warmup "$WARMUP" \
    --server-pid "$SERVER_PID" --json --no-progress "$@" >"$out" || log "loadgen reported errors: $out"
}

slug() { tr ' ' '_' <<<"$1"; }

measure() {  # mode index rep
  local IFS='|'; read -r system label _ how <<<"$1"; unset IFS
  # shellcheck disable=SC2086
  start_system $how
  run_load "$OUT/runs/closed-$(slug "$label")-$2.json" "$system" --pipeline "$PIPELINE" --duration "$DURATION"
  stop_pid "$SERVER_PID"
  log "  $label: $(python3 "$here/compare_report.py" --one "$OUT/runs/closed-$(slug "$label")-$2.json")"
}

# ---------------------------------------------------------------- closed loop, alternated

n=${#MODES[@]}
step closed || REPS=0
for rep in $(seq 1 "$REPS"); do
  log "round $rep/$REPS"
  for i in $(seq 0 $((n - 1))); do
    measure "${MODES[$(((i + rep - 1) % n))]}" "$rep"  # rotate the order every round
  done
done

# ---------------------------------------------------------------- open loop at half load

step open && log "open loop at half of each system's median maximum"
for mode in "${MODES[@]}"; do
  step open || break
  IFS='|' read -r system label _ how <<<"$mode"
  max=$(python3 "$here/compare_report.py" --median-rate "$OUT/runs" "$(slug "$label")")
  rate=$(python3 -c "print(int(float('$max') / 2))")
  [[ $rate -gt 0 ]] || continue
  # shellcheck disable=SC2086
  start_system $how
  run_load "$OUT/runs/open-$(slug "$label").json" "$system" --pipeline "$OPEN_PIPELINE" --rate "$rate" \
    --duration "$DURATION"
  stop_pid "$SERVER_PID"
  log "  $label at $rate bets/s: $(python3 "$here/compare_report.py" --one "$OUT/runs/open-$(slug "$label").json")"
done

# ---------------------------------------------------------------- allocations per bet

# lottery-server (its default mode) under the counting shim: allocations
# after a small and after a larger load; the difference per extra bet is the
# hot path's allocations.
alloc_file=$OUT/runs/allocations.txt
if step alloc && [[ -f $BIN_DIR/libbench-alloc-count.so ]]; then
  log "allocation count"
  : >"$alloc_file"
  dir=$DATA_ROOT/alloc; rm -rf "$dir"; mkdir -p "$dir/counts"
  ALLOC_COUNT_DIR=$dir/counts LD_PRELOAD=$BIN_DIR/libbench-alloc-count.so \
    "$BIN_DIR/lottery-server" --ip 127.0.0.1 --port "$PORT" --agencies "$AGENCIES" --data-dir "$dir/data" \
    $(has_flag --workers && echo --workers 1) 2>"$dir/server.log" &
  SERVER_PID=$!; STARTED+=("$SERVER_PID")
  wait_port "$PORT" "$SERVER_PID" || die "lottery-server did not start under the allocation counter"
  total() { local s=0; for f in "$dir"/counts/alloc-count.*; do s=$((s + $(od -An -tu8 "$f"))); done; echo $s; }
  small=$((BATCH * 2000)); large=$((BATCH * 20000))
  "$BIN_DIR/lottery-loadgen" --address "127.0.0.1:$PORT" --connections "$CONNECTIONS" --agencies "$AGENCIES" \
    --batch "$BATCH" --pipeline "$PIPELINE" --warmup 0 --bets $small --no-progress >/dev/null || true
  after_small=$(total)
  "$BIN_DIR/lottery-loadgen" --address "127.0.0.1:$PORT" --connections "$CONNECTIONS" --agencies "$AGENCIES" \
    --batch "$BATCH" --pipeline "$PIPELINE" --warmup 0 --bets $large --no-progress >/dev/null || true
  after_large=$(total)
  stop_pid "$SERVER_PID"
  echo "bets_small=$small allocations_after_small=$after_small bets_large=$large allocations_after_large=$after_large" \
    "batch=$BATCH" >"$alloc_file"
  log "  $(cat "$alloc_file")"
fi

# ---------------------------------------------------------------- micro-benchmarks

if step micro; then
  log "micro-benchmarks (lottery_bench)"
  LOTTERY_BENCH_DIR=$DATA_ROOT "$BIN_DIR/lottery_bench" --benchmark_min_time=$MICRO_MIN_TIME \
    --benchmark_out="$OUT/runs/micro.json" --benchmark_out_format=json >"$OUT/runs/micro.txt" 2>&1 ||
    log "lottery_bench failed: see $OUT/runs/micro.txt"
fi

# ---------------------------------------------------------------- profile

perf_file=$OUT/runs/perf-top.txt
if step profile && [[ $PROFILE == 1 && $HAVE_PERF == 1 ]]; then
  rm -f "$perf_file"
  log "profile: perf record of lottery-server under closed-loop load"
  IFS='|' read -r system label _ how <<<"$(printf '%s\n' "${MODES[@]}" | grep '^lottery|' | head -1)"
  # shellcheck disable=SC2086
  start_system $how
  pids=$SERVER_PID
  for c in $(cat /proc/"$SERVER_PID"/task/*/children 2>/dev/null); do pids="$pids,$c"; done
  log "  attaching to pids $pids"
  perf record -F 999 -g -p "$pids" -o "$DATA_ROOT/perf.data" -- sleep "$DURATION" >"$OUT/runs/perf-record.log" 2>&1 &
  perf_pid=$!; STARTED+=("$perf_pid")
  run_load "$OUT/runs/profile-load.json" "$system" --pipeline "$PIPELINE" --warmup 0.2 --duration "$DURATION"
  wait "$perf_pid" 2>/dev/null || true
  forget_pid "$perf_pid"
  stop_pid "$SERVER_PID"
  { echo "# perf report --no-children --sort symbol ($label, closed loop)"
    perf report -i "$DATA_ROOT/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
      grep -E '^ +[0-9.]+%' | head -25; } >"$perf_file" || true
fi

# ---------------------------------------------------------------- report

machine="$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB,"
machine="$machine Linux $(uname -r), $(. /etc/os-release && echo "$PRETTY_NAME"), data on $(df -T "$DATA_ROOT" | awk 'NR==2{print $2}')"
load_at_end=$(cut -d' ' -f1-3 /proc/loadavg)
pressure=$(sed -n 's/^some avg10=[^ ]* avg60=[^ ]* avg300=\([^ ]*\).*/\1/p' /proc/pressure/cpu 2>/dev/null || true)
machine="$machine; load average at start $load_at_start, at end $load_at_end${pressure:+, CPU pressure (some, 5 min) $pressure %}"
na_args=()
for x in "${NA[@]+"${NA[@]}"}"; do na_args+=(--na "$x"); done
python3 "$here/compare_report.py" --report "$OUT" --machine "$machine" \
  --config "connections $CONNECTIONS, batch $BATCH bets, pipeline $PIPELINE (open loop $OPEN_PIPELINE), $REPS runs of ${DURATION} s after ${WARMUP} s warm-up per mode" \
  "${na_args[@]+"${na_args[@]}"}" --order "$(printf '%s\n' "${MODES[@]}" | cut -d'|' -f1-3 | paste -sd';')" \
  >"$OUT/results.md"
if [[ $(wc -l <"$OUT/throughput.dat") -lt 2 ]]; then
  log "no closed-loop runs in $OUT/runs: no charts"
elif [[ $HAVE_GNUPLOT == 1 ]]; then
  for plot in throughput latency; do
    (cd "$OUT" && gnuplot "$here/$plot.gp") || log "gnuplot $plot failed"
  done
else
  log "gnuplot is missing: no charts (apt-get install gnuplot-nox)"
fi
cat "$OUT/results.md"
log "results in $OUT (results.md, throughput.png, latency.png, runs/)"
