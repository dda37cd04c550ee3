#!/usr/bin/env bash
# Generates the agency files for the compose deployment, unless they are all
# there already, with lottery-datagen from the client image (nothing needs to
# be built on the host).
#
#   docker/generate-data.sh <data-dir> <agencies> [lottery-datagen flags...]
#
# Writes <data-dir>/agency-1.csv ... agency-N.csv and expected.json (the exact
# winners of each agency), owned by the calling user.
# Environment: CLIENT_IMAGE (default lottery-client:latest), DOCKER (default docker).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 <data-dir> <agencies> [lottery-datagen flags...]" >&2; exit 2; }
DATA_DIR=$1
AGENCIES=$2
shift 2
CLIENT_IMAGE=${CLIENT_IMAGE:-lottery-client:latest}
DOCKER=${DOCKER:-docker}

missing=0
for i in $(seq 1 "$AGENCIES"); do [ -f "$DATA_DIR/agency-$i.csv" ] || missing=1; done
[ -f "$DATA_DIR/expected.json" ] || missing=1
if [ "$missing" = 0 ]; then
  echo "generate-data: $DATA_DIR has the files of $AGENCIES agencies (delete it to generate new ones)"
  exit 0
fi

mkdir -p "$DATA_DIR"
DATA_DIR=$(cd "$DATA_DIR" && pwd)
echo "generate-data: writing $AGENCIES agencies into $DATA_DIR"
# --network none: the generator needs nothing but the output directory.
$DOCKER run --rm --network none --user "$(id -u):$(id -g)" \
  --mount "type=bind,source=$DATA_DIR,target=/out" \
  --entrypoint /usr/local/bin/lottery-datagen "$CLIENT_IMAGE" \
  --agencies "$AGENCIES" --out-dir /out "$@"
