#!/usr/bin/env bash
# After `cmake --install` (run by `make install`): create the lottery user and
# make systemd see the new unit. Nothing to do for a staged install (DESTDIR
# set: a package's own scripts do this) or without root.
set -euo pipefail
if [ -n "${DESTDIR:-}" ]; then
  echo "post-install: staged into $DESTDIR; create the user (systemd-sysusers) and run 'systemctl daemon-reload' on the target"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "post-install: not root; run 'sudo systemd-sysusers && sudo systemctl daemon-reload'"
  exit 0
fi
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers
elif ! id lottery >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/lottery --no-create-home --shell /usr/sbin/nologin lottery
fi
echo "post-install: user $(id lottery)"
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "post-install: start it with 'systemctl enable --now lottery-server'; logs: 'journalctl -u lottery-server -f'"
else
  echo "post-install: systemd is not running here; the unit is installed for when it is"
fi
