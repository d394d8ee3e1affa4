#!/usr/bin/env bash
# Holds load against a running daemon on loopback and reports errors, narinfo latency, and the
# daemon's RSS and file descriptors over time (issue 14):
#
#   scripts/soak.sh [--seconds N] --url http://127.0.0.1:PORT [--hash H] [nix-p2p-cache-soak flags]
#
# 1000 connections asking for narinfos back to back, and with --hash (a stored path) 32 NAR
# downloads and 200 slow readers of its NAR. The daemon's pid is found from the port. The last
# line: `soak: errors=E narinfo_p99_ms=X rss_growth_mib=Y`.
set -euo pipefail
cd "$(dirname "$0")/.."
url=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=${2:?}; args+=("$1" "$2"); shift 2;;
    *) args+=("$1"); shift;;
  esac
done
[ -n "$url" ] || { echo "usage: $0 [--seconds N] --url http://127.0.0.1:PORT [--hash H]" >&2; exit 2; }
port=${url##*:}; port=${port%%/*}
# The process listening on the port: its socket inode, then whose fd points at it.
pid=
inode=$(awk -v p="$(printf '%04X' "$port")" '$4 == "0A" && $2 ~ ":"p"$" {print $10; exit}' /proc/net/tcp /proc/net/tcp6 2>/dev/null || true)
if [ -n "$inode" ]; then
  for d in /proc/[0-9]*; do
    if ls -l "$d/fd" 2>/dev/null | grep -q "socket:\[$inode\]"; then pid=${d#/proc/}; break; fi
  done
fi
[ -n "$pid" ] && args+=(--pid "$pid") || echo "daemon pid not found: no RSS/fd figures" >&2
cargo build --release --quiet --bin nix-p2p-cache-soak
exec target/release/nix-p2p-cache-soak "${args[@]}"
