#!/bin/sh
# Prints the Debian packages that provide the shared libraries the given
# binaries load, one per line: what the runtime image must install.
# Runs in the image's build stage (dpkg and ldd from the base image).
set -eu
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }

owner() {
  # dpkg records a library under the path its package ships it at; with
  # merged /usr, ldd may report the other spelling (/lib vs /usr/lib).
  for candidate in "$1" "/usr$1" "${1#/usr}"; do
    pkg=$(dpkg-query -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1) || true
    if [ -n "$pkg" ]; then echo "$pkg"; return 0; fi
  done
  echo "runtime-packages: no package owns $1" >&2
  return 1
}

libs=$(ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u)
if ldd "$@" | grep -q 'not found'; then
  ldd "$@" >&2
  echo "runtime-packages: a library is missing in the build stage" >&2
  exit 1
fi
for lib in $libs; do owner "$lib"; done | sort -u
