#!/usr/bin/env bash
# TLS keys for the compose deployment (docs/SECURITY.md), unless they are
# there already: `lotteryctl keys init` from the server image (nothing needs
# to be built on the host), writing <keys-dir>/server.keys and
# <keys-dir>/agency-N.key.
#
#   docker/generate-keys.sh <keys-dir> <agencies>
#
# The directory is mode 0700, owned by the calling user: nobody else on the
# host can open a key. The files in it are made readable (0644) because each
# is bind-mounted, alone, into a container that runs as another uid
# (lottery, 10001); a bind-mounted file is reached without the host
# directory's permissions, and each client container sees only its own key.
# Rotate one agency: docker/generate-keys.sh --rotate <keys-dir> <agency>,
# then `docker kill -s HUP server` (the server reloads, nothing restarts) and
# restart that agency's client.
# Environment: SERVER_IMAGE (default lottery-server:latest), DOCKER (default docker).
set -euo pipefail
SERVER_IMAGE=${SERVER_IMAGE:-lottery-server:latest}
DOCKER=${DOCKER:-docker}
usage() { echo "usage: $0 <keys-dir> <agencies> | $0 --rotate <keys-dir> <agency>" >&2; exit 2; }
ROTATE=0
if [ "${1:-}" = "--rotate" ]; then ROTATE=1; shift; fi
[ $# -eq 2 ] || usage
KEYS_DIR=$1
N=$2
[[ "$N" =~ ^[1-9][0-9]*$ ]] || usage

lotteryctl() {
  $DOCKER run --rm --network none --user "$(id -u):$(id -g)" \
    --mount "type=bind,source=$KEYS_DIR,target=/keys" \
    --entrypoint /usr/local/bin/lotteryctl "$SERVER_IMAGE" "$@"
}

if [ "$ROTATE" = 0 ]; then
  missing=0
  [ -f "$KEYS_DIR/server.keys" ] || missing=1
  for i in $(seq 1 "$N"); do [ -f "$KEYS_DIR/agency-$i.key" ] || missing=1; done
  if [ "$missing" = 0 ]; then
    echo "generate-keys: $KEYS_DIR has the keys of $N agencies (delete it for new ones)"
    exit 0
  fi
fi
mkdir -p "$KEYS_DIR"
chmod 0700 "$KEYS_DIR"
KEYS_DIR=$(cd "$KEYS_DIR" && pwd)
if [ "$ROTATE" = 1 ]; then
  lotteryctl keys rotate --agency "$N" --dir /keys
else
  echo "generate-keys: writing TLS keys for $N agencies into $KEYS_DIR"
  lotteryctl keys init --agencies "$N" --dir /keys --force
fi
chmod 0644 "$KEYS_DIR"/server.keys "$KEYS_DIR"/agency-*.key
