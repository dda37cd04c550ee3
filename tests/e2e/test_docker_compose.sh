#!/usr/bin/env bash
# End-to-end test of the Docker deployment, through the Makefile targets a
# user runs:
#   make docker-image            the base image (debootstrap if no registry), one compile
#   make docker-compose-up       5 agencies on generated data with known winners
#   (follow the logs)            until every client has exited
#   make docker-compose-down     graceful stop: every container exits 0
# and checks each agency's cant_ganadores, the single sorteo line, the
# server's orderly exit, a client's exit 0 on SIGTERM, and that nothing of
# the deployment is left behind.
#
# Needs a Docker engine. When none answers and we are root, it installs
# docker.io and docker-compose from Debian and starts dockerd itself (and
# stops it at the end). When that is impossible it prints a SKIPPED line with
# the reason and exits 0; it never passes silently.
#
# Runs as `make test-docker` and from .ci/run. Ends with "docker-e2e: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1

AGENCIES=5
WINNERS=(2 0 3 1 4)  # planted per agency with lottery-datagen --winners-list
BETS=3000
PROJECT=lottery-e2e
clients_timeout_s=120
dockerd_start_timeout_s=60

T0=$(date +%s)
WORK=$(mktemp -d /tmp/lottery-e2e.XXXXXX)
COMPOSE_YAML_PATH="$WORK/compose.yaml"
DATA="$WORK/data"
DOCKERD_PID=""
DOCKER_SERVICE_STARTED=0
LOGS_PID=""
COMPOSE=""
SIGTERM_CONTAINER=lottery-e2e-sigterm
PASSED=0
FAILED=0
UP=0

say() { echo "docker-e2e: [$(($(date +%s) - T0))s] $*"; }
pass() { PASSED=$((PASSED + 1)); echo "  ok    $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL  $*"; }
check() {  # check "what" command...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

stop_dockerd() {
  if [ "$DOCKER_SERVICE_STARTED" = 1 ]; then
    say "stopping docker.service, which this test started"
    systemctl stop docker.service docker.socket >/dev/null 2>&1
    DOCKER_SERVICE_STARTED=0
  fi
  [ -n "$DOCKERD_PID" ] || return 0
  say "stopping the dockerd this test started (pid $DOCKERD_PID)"
  kill -TERM "$DOCKERD_PID" 2>/dev/null
  for _ in $(seq 1 60); do
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$DOCKERD_PID" 2>/dev/null; then
    echo "docker-e2e: dockerd did not stop within 30 s; killing it" >&2
    kill -KILL "$DOCKERD_PID" 2>/dev/null
  fi
  wait "$DOCKERD_PID" 2>/dev/null
  DOCKERD_PID=""
}

cleanup() {
  if [ -n "$LOGS_PID" ]; then
    kill "$LOGS_PID" 2>/dev/null
    wait "$LOGS_PID" 2>/dev/null
  fi
  if docker info >/dev/null 2>&1; then
    docker rm -f "$SIGTERM_CONTAINER" >/dev/null 2>&1
    if [ "$UP" = 1 ] && [ -f "$COMPOSE_YAML_PATH" ]; then
      $COMPOSE -p "$PROJECT" -f "$COMPOSE_YAML_PATH" down --volumes --remove-orphans -t 5 >/dev/null 2>&1
    fi
  fi
  stop_dockerd
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "docker-e2e: interrupted"; exit 130' INT TERM

# Cleanup first, so the SKIPPED line or the summary is the last line printed.
skip() {
  trap - EXIT
  cleanup
  echo "SKIPPED: docker-e2e: $*"
  exit 0
}
finish() {
  trap - EXIT
  cleanup
  echo "docker-e2e: $PASSED passed, $FAILED failed"
  [ "$FAILED" = 0 ] && exit 0
  exit 1
}

# ------------------------------------------------------------------ engine
docker_ok() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
compose_ok() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }

ensure_engine() {
  if docker_ok && compose_ok; then
    say "using the running Docker engine ($(docker info -f '{{.ServerVersion}}'))"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    skip "no Docker engine answers ('docker info' fails) and not root, so none can be installed or started"
  fi
  local packages=()
  command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
  compose_ok || packages+=(docker-compose)
  command -v debootstrap >/dev/null 2>&1 || packages+=(debootstrap)
  if [ ${#packages[@]} -gt 0 ]; then
    say "installing ${packages[*]} (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${packages[@]}"; } >"$WORK/apt.log" 2>&1; then
      tail -5 "$WORK/apt.log"
      skip "cannot install ${packages[*]} with apt-get (see above)"
    fi
  fi
  command -v dockerd >/dev/null 2>&1 || skip "dockerd is not installed and docker.io did not provide it"
  compose_ok || skip "neither 'docker compose' nor docker-compose is available"
  docker_ok && { say "Docker engine up ($(docker info -f '{{.ServerVersion}}'))"; return 0; }
  if [ -d /run/systemd/system ]; then
    say "starting docker.service"
    systemctl start docker.service >/dev/null 2>&1 && DOCKER_SERVICE_STARTED=1
  else
    say "starting dockerd (log: $WORK/dockerd.log)"
    dockerd >"$WORK/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
  fi
  for _ in $(seq 1 $((dockerd_start_timeout_s * 2))); do
    docker_ok && break
    if [ -n "$DOCKERD_PID" ] && ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
      wait "$DOCKERD_PID" 2>/dev/null
      DOCKERD_PID=""
      break
    fi
    sleep 0.5
  done
  if ! docker_ok; then
    [ -f "$WORK/dockerd.log" ] && tail -15 "$WORK/dockerd.log"
    stop_dockerd
    skip "dockerd could not be started here (see its log above)"
  fi
  say "Docker engine up ($(docker info -f '{{.ServerVersion}}'))"
}

ensure_engine
COMPOSE=$(docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
say "compose: $COMPOSE ($($COMPOSE version --short 2>/dev/null || $COMPOSE version | head -1))"

# Container names are fixed (server, client1..); someone else's would clash.
for name in server $(seq -f 'client%g' 1 "$AGENCIES"); do
  if docker container inspect "$name" >/dev/null 2>&1; then
    echo "docker-e2e: a container named '$name' exists already (a deployment running? make docker-compose-down)"
    fail "no container named $name before the test"
    finish
  fi
done

MAKE_VARS=(
  "AGENCIES=$AGENCIES"
  "COMPOSE_YAML=$COMPOSE_YAML_PATH"
  "COMPOSE_PROJECT=$PROJECT"
  "AGENCY_DATA_DIR=$DATA"
  "KEYS_DIR=$WORK/keys"
  "DATAGEN_ARGS=--bets $BETS --seed 7 --winners-list $(IFS=,; echo "${WINNERS[*]}")"
  STOP_TIMEOUT=20
)

# ------------------------------------------------------------------ images
say "make docker-image (log: $WORK/build.log)"
if make --no-print-directory docker-image >"$WORK/build.log" 2>&1; then
  pass "images built: $(docker image ls --format '{{.Repository}}:{{.Tag}} ({{.Size}})' | grep -E '^lottery-(server|client):' | tr '\n' ' ')"
else
  tail -40 "$WORK/build.log"
  fail "make docker-image"
  finish
fi
check "the base image debian:bookworm-slim is in the local store" \
  bash -c 'docker image inspect debian:bookworm-slim >/dev/null 2>&1'

# ------------------------------------------------------------------ up
say "make docker-compose-up (5 agencies, $BETS bets each, winners ${WINNERS[*]})"
UP=1
if ! make --no-print-directory docker-compose-up "${MAKE_VARS[@]}" >"$WORK/up.log" 2>&1; then
  tail -30 "$WORK/up.log"
  fail "make docker-compose-up"
  finish
fi
pass "make docker-compose-up"
check "the compose file has no top-level name: or version:" \
  bash -c "! grep -qE '^(name|version):' '$COMPOSE_YAML_PATH'"
# Agency identity (docs/SECURITY.md): the server gets the keys file, each
# client its own agency's key and no other.
check "the server is given the TLS keys file" grep -q 'SERVER_TLS_KEYS: /etc/lottery/tls/server.keys' "$COMPOSE_YAML_PATH"
for i in $(seq 1 "$AGENCIES"); do
  mounted=$(docker inspect --format '{{range .Mounts}}{{.Source}} {{end}}' "client$i" 2>/dev/null | tr ' ' '\n' | grep -E '\.key$|\.keys$' | xargs -r -n1 basename | tr '\n' ' ')
  check "client$i holds only its own key (mounted: ${mounted:-none})" test "$mounted" = "agency-$i.key "
done
for i in $(seq 1 "$AGENCIES"); do
  want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['agencies'][sys.argv[2]]['winners'])" \
    "$DATA/expected.json" "$i" 2>/dev/null)
  [ "$want" = "${WINNERS[$((i - 1))]}" ] || fail "expected.json plants ${WINNERS[$((i - 1))]} winners for agency $i (says '$want')"
done

# Follow the logs, as `make docker-compose-logs` does, for the whole run.
$COMPOSE -p "$PROJECT" -f "$COMPOSE_YAML_PATH" logs -f --no-color >"$WORK/compose.log" 2>&1 &
LOGS_PID=$!

say "waiting for the $AGENCIES clients to exit (at most ${clients_timeout_s}s)"
clients=$(seq -f 'client%g' 1 "$AGENCIES")
if codes=$(timeout "$clients_timeout_s" docker wait $clients); then
  i=0
  for code in $codes; do
    i=$((i + 1))
    check "client$i exited with code 0 (got $code)" test "$code" = 0
  done
else
  fail "the clients did not all exit within ${clients_timeout_s}s"
  docker ps -a --filter "label=com.docker.compose.project=$PROJECT" --format '  {{.Names}}: {{.Status}}'
fi

# ------------------------------------------------------------------ results
for i in $(seq 1 "$AGENCIES"); do
  log=$(docker logs "client$i" 2>&1)
  got=$(sed -n 's/.*action: consulta_ganadores | result: success | cant_ganadores: \([0-9]*\).*/\1/p' <<<"$log" | tail -1)
  check "agency $i: cant_ganadores ${got:-none}, planted ${WINNERS[$((i - 1))]}" test "${got:-x}" = "${WINNERS[$((i - 1))]}"
  check "client$i logged action: exit | result: success" grep -q 'action: exit | result: success' <<<"$log"
  if [ "${got:-x}" != "${WINNERS[$((i - 1))]}" ]; then tail -5 <<<"$log" | sed 's/^/        /'; fi
done
server_log=$(docker logs server 2>&1)
sorteo=$(grep -c 'action: sorteo | result: success' <<<"$server_log")
check "the server logged one sorteo line (got $sorteo)" test "$sorteo" = 1
grep -h 'action: sorteo' <<<"$server_log" | sed 's/^/        /'
grep -h 'action: io_backend' <<<"$server_log" | sed 's/^/        /'
check "the server reports its I/O backend" grep -q 'action: io_backend | result: success' <<<"$server_log"
check "the server runs TLS 1.3 with a key per agency" grep -q 'action: tls | result: success | mode: tls1.3-psk' <<<"$server_log"
check "no connection was unauthenticated" bash -c "! grep -q 'unauthenticated' <<<\"\$1\"" _ "$server_log"

# ------------------------------------------------------------------ down
say "make docker-compose-down"
make --no-print-directory docker-compose-down "${MAKE_VARS[@]}" >"$WORK/down.log" 2>&1
down_rc=$?
sed -n '/exit code\|action: exit\|compose-down: /p' "$WORK/down.log" | sed 's/^/        /'
check "make docker-compose-down exits 0" test "$down_rc" = 0
check "the server exited 0 on SIGTERM" grep -q '^  server: exit code 0$' "$WORK/down.log"
check "the server logged its orderly exit" grep -q 'action: exit | result: success | code: 0' "$WORK/down.log"
UP=0
for _ in $(seq 1 20); do kill -0 "$LOGS_PID" 2>/dev/null || break; sleep 0.5; done
kill "$LOGS_PID" 2>/dev/null
wait "$LOGS_PID" 2>/dev/null
LOGS_PID=""
check "the followed logs show the server's exit" grep -q 'server .*action: exit | result: success' "$WORK/compose.log"
check "the followed logs show all $AGENCIES winners queries" \
  test "$(grep -c 'action: consulta_ganadores | result: success' "$WORK/compose.log")" = "$AGENCIES"
check "no container of the project is left" \
  test -z "$(docker ps -a -q --filter "label=com.docker.compose.project=$PROJECT")"
check "no network of the project is left" \
  test -z "$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
check "the data volume is removed" \
  test -z "$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")"

# ------------------------------------------------------------------ SIGTERM reaches a client
# A client still retrying its connection when `docker stop` comes: the
# exec-form entrypoint makes it PID 1, and it must exit 0 at once.
say "a client stopped by SIGTERM while it retries"
docker run -d --name "$SIGTERM_CONTAINER" --network none \
  -e CLI_ID=1 -e CLI_SERVER_ADDRESS=127.0.0.1:9 -e CLI_LOOP_AMOUNT=1000 -e CLI_DATA_FILE=/data/agency-1.csv \
  --mount "type=bind,source=$DATA/agency-1.csv,target=/data/agency-1.csv,readonly" \
  lottery-client:latest >/dev/null
for _ in $(seq 1 40); do
  docker logs "$SIGTERM_CONTAINER" 2>&1 | grep -q 'action: conectar | result: fail' && break
  sleep 0.25
done
t_stop=$(date +%s%N)
docker stop -t 10 "$SIGTERM_CONTAINER" >/dev/null
stop_ms=$((($(date +%s%N) - t_stop) / 1000000))
code=$(docker inspect -f '{{.State.ExitCode}}' "$SIGTERM_CONTAINER")
check "the client exited $code in ${stop_ms} ms (want 0, well before the 10 s SIGKILL)" \
  test "$code" = 0 -a "$stop_ms" -lt 5000
check "the client logged exit by signal" \
  bash -c "docker logs '$SIGTERM_CONTAINER' 2>&1 | grep -q 'action: exit | result: success | reason: signal'"
docker rm -f "$SIGTERM_CONTAINER" >/dev/null

if [ "$FAILED" -gt 0 ]; then
  # The per-batch lines say little here; show the rest of each service's log.
  for svc in server $(seq -f 'client%g' 1 "$AGENCIES"); do
    echo "---- $svc (last lines of the followed logs, without apuesta_recibida/batch_enviado)"
    grep "^$svc " "$WORK/compose.log" | grep -vE 'action: (apuesta_recibida|batch_enviado) ' | tail -25
  done
fi
say "done in $(($(date +%s) - T0))s"
finish
