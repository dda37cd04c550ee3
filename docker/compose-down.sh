#!/usr/bin/env bash
# `make docker-compose-down`: stops the deployment gracefully, says how each
# container ended, then removes the containers, the network and (unless
# KEEP_DATA=1) the server's data volume.
#
# Environment: COMPOSE (e.g. "docker compose" or docker-compose), COMPOSE_YAML,
# COMPOSE_PROJECT, STOP_TIMEOUT (seconds from SIGTERM to SIGKILL), KEEP_DATA,
# DOCKER. Exits 1 if a container did not exit 0 (a SIGKILL after the grace
# period shows as 137), after removing everything all the same.
set -euo pipefail
DOCKER=${DOCKER:-docker}
COMPOSE=${COMPOSE:-docker-compose}
COMPOSE_YAML=${COMPOSE_YAML:-docker/docker-compose.generated.yaml}
COMPOSE_PROJECT=${COMPOSE_PROJECT:-lottery}
STOP_TIMEOUT=${STOP_TIMEOUT:-20}
KEEP_DATA=${KEEP_DATA:-0}

containers() {
  $DOCKER ps -a --filter "label=com.docker.compose.project=$COMPOSE_PROJECT" --format '{{.Names}}' | sort -V
}

if [ ! -f "$COMPOSE_YAML" ]; then
  if [ -n "$(containers)" ]; then
    echo "compose-down: $COMPOSE_YAML is gone but project $COMPOSE_PROJECT has containers: $(containers | tr '\n' ' ')" >&2
    echo "compose-down: run 'make docker-compose-file' to write it again, then this target" >&2
    exit 1
  fi
  echo "compose-down: no $COMPOSE_YAML and no containers of project $COMPOSE_PROJECT: nothing to stop"
  exit 0
fi

compose() { $COMPOSE -p "$COMPOSE_PROJECT" -f "$COMPOSE_YAML" "$@"; }

echo "compose-down: stopping (SIGTERM, then SIGKILL after ${STOP_TIMEOUT}s)"
compose stop -t "$STOP_TIMEOUT"

status=0
for c in $(containers); do
  read -r state code <<<"$($DOCKER inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c")"
  if [ "$state" = created ]; then
    echo "  $c: never started"
  else
    echo "  $c: exit code $code"
    [ "$code" = 0 ] || status=1
  fi
done
if $DOCKER inspect server >/dev/null 2>&1; then
  echo "compose-down: the server's shutdown:"
  $DOCKER logs server 2>&1 | grep -E 'action: (shutdown|listener_closed|connections_closed|store_closed|exit) ' | sed 's/^/  /' || true
fi

if [ "$KEEP_DATA" = 1 ]; then
  compose down --remove-orphans
else
  # The store goes with the deployment, so the next `up` is a new lottery
  # whose winners match the agency files' expected.json.
  compose down --remove-orphans --volumes
fi
[ "$status" = 0 ] && echo "compose-down: every container exited 0" || echo "compose-down: FAILED: a container did not exit 0" >&2
exit "$status"
