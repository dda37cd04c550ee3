#!/usr/bin/env bash
# The bare-metal install, staged into a scratch DESTDIR (nothing on this
# machine changes): the files land in the conventional places, the systemd
# unit names the installed binary and has its sandboxing, a second install
# keeps an edited config, `systemd-analyze verify` accepts the unit, and the
# installed server starts with the installed config and exits 0 on SIGTERM.
#
#   tests/e2e/test_install.sh [BUILD_DIR]     (make test-install; default build)
#
# Ends with "install: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
BUILD_DIR=${1:-build}
WORK=$(mktemp -d /tmp/lottery-install.XXXXXX)
SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill -KILL "$SERVER_PID" 2>/dev/null; rm -rf "$WORK"' EXIT
PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); echo "  ok    $*"; }
fail() { FAILED=$((FAILED + 1)); echo "  FAIL  $*"; }
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

[ -x "$BUILD_DIR/bin/lottery-server" ] || { echo "install: build first (make build): no $BUILD_DIR/bin/lottery-server"; exit 1; }

# ------------------------------------------------------------ prefix /usr/local
ROOT="$WORK/root"
if DESTDIR="$ROOT" cmake --install "$BUILD_DIR" --prefix /usr/local >"$WORK/install.log" 2>&1; then
  pass "cmake --install (DESTDIR, prefix /usr/local)"
else
  cat "$WORK/install.log"
  fail "cmake --install"
fi
for b in lottery-server lottery-client lottery-datagen lotteryctl; do
  check "/usr/local/bin/$b" test -x "$ROOT/usr/local/bin/$b"
done
UNIT="$ROOT/etc/systemd/system/lottery-server.service"
check "/etc/lottery/config.ini" test -f "$ROOT/etc/lottery/config.ini"
check "/etc/systemd/system/lottery-server.service" test -f "$UNIT"
check "/etc/sysusers.d/lottery.conf creates user lottery" grep -q '^u lottery ' "$ROOT/etc/sysusers.d/lottery.conf"
check "config.ini puts the store in /var/lib/lottery" grep -qE '^SERVER_DATA_DIR *= */var/lib/lottery$' "$ROOT/etc/lottery/config.ini"
for line in 'ExecStart=/usr/local/bin/lottery-server --config /etc/lottery/config.ini' \
  'User=lottery' 'NoNewPrivileges=yes' 'ProtectSystem=strict' 'ReadWritePaths=/var/lib/lottery' \
  'StateDirectory=lottery' 'KillSignal=SIGTERM' 'WantedBy=multi-user.target'; do
  check "unit: $line" grep -qxF "$line" "$UNIT"
done
check "unit: LimitNOFILE" grep -qE '^LimitNOFILE=[0-9]+$' "$UNIT"

# An administrator's edit survives a second install.
echo "; edited" >>"$ROOT/etc/lottery/config.ini"
DESTDIR="$ROOT" cmake --install "$BUILD_DIR" --prefix /usr/local >"$WORK/install2.log" 2>&1
check "a second install keeps an edited /etc/lottery/config.ini" grep -q '^; edited$' "$ROOT/etc/lottery/config.ini"

# ------------------------------------------------------------ systemd-analyze verify
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify --root needs the targets the unit refers to: give it this machine's.
  for dir in /usr/lib/systemd/system /lib/systemd/system; do
    if [ -f "$dir/multi-user.target" ]; then
      mkdir -p "$ROOT/usr/lib/systemd"
      cp -a "$dir" "$ROOT/usr/lib/systemd/"
      break
    fi
  done
  out=$(systemd-analyze verify --root="$ROOT" /etc/systemd/system/lottery-server.service 2>&1)
  rc=$?
  [ -z "$out" ] || echo "$out" | sed 's/^/        /'
  check "systemd-analyze verify: exit 0, no warning" test "$rc" = 0 -a -z "$out"
else
  echo "SKIPPED: install: systemd-analyze verify (systemd-analyze not installed)"
fi

# ------------------------------------------------------------ prefix /usr
ROOT2="$WORK/root-usr"
DESTDIR="$ROOT2" cmake --install "$BUILD_DIR" --prefix /usr >"$WORK/install3.log" 2>&1
check "prefix /usr: unit in /usr/lib/systemd/system naming /usr/bin/lottery-server" \
  grep -qxF 'ExecStart=/usr/bin/lottery-server --config /etc/lottery/config.ini' \
  "$ROOT2/usr/lib/systemd/system/lottery-server.service"
check "prefix /usr: /usr/lib/sysusers.d/lottery.conf" test -f "$ROOT2/usr/lib/sysusers.d/lottery.conf"

# ------------------------------------------------------------ the installed server runs
# With the installed config; only the data directory is moved to scratch.
"$ROOT/usr/local/bin/lottery-server" --config "$ROOT/etc/lottery/config.ini" --data-dir "$WORK/data" \
  --ip 127.0.0.1 --port 0 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  grep -q 'action: listen | result: success' "$WORK/server.log" && break
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.05
done
check "the installed server starts with the installed config" grep -q 'action: listen | result: success' "$WORK/server.log"
kill -TERM "$SERVER_PID" 2>/dev/null
wait "$SERVER_PID"
rc=$?
SERVER_PID=""
check "and exits 0 on SIGTERM (got $rc)" test "$rc" = 0
[ "$FAILED" = 0 ] || cat "$WORK/server.log"

echo "install: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
