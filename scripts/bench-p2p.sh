#!/usr/bin/env bash
# P2P fetch benchmark (design §8): a closure fetched through a fresh fetcher daemon from 1, 2
# and 4 seed daemons, and from 4 seeds with capped uploads, against nginx serving the same
# uncompressed closure, measured in one run by nix-p2p-cache-bench-p2p (see its //! comment).
#
#   scripts/bench-p2p.sh [--corpus DIR | --cache DIR] [--paths-file F] [--runs N]
#                        [--concurrency N] [--upload-rate-limit R] [--json] [-- BENCH_ARGS…]
#
# --corpus DIR  a corpus made by corpus/build.sh; uses DIR/cache-none if present, else
#               DIR/cache-xz. Default: target/test-corpus-small (built when missing).
# --cache DIR   a file:// binary cache instead (any compression).
# --paths-file  store paths to fetch (e.g. DIR/gen-4.paths); default every path of the cache.
# --runs N      timed runs per configuration, each with a fresh fetcher (default 3; medians).
# --concurrency N  paths fetched at once (default 8).
# --upload-rate-limit R  each seed's cap in the capped configuration (default 10M = 10 MB/s).
# --json        JSON on stdout (the table goes to stderr).
#
# Everything runs on this machine: the client, nginx (one process, sendfile on) and up to five
# daemons (seeds and the fetcher), nothing pinned to a core.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

corpus=""
cache=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --paths-file|--runs|--concurrency|--upload-rate-limit) args+=("$1" "$2"); shift 2 ;;
    --json) args+=("$1"); shift ;;
    --) shift; args+=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

WITH_NGINX=1 scripts/install-deps.sh
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "$cache" ]; then
  if [ -z "$corpus" ]; then
    corpus=$root/target/test-corpus-small
    [ -d "$corpus/cache-none" ] || corpus/build.sh --scale small --generations 2 --out "$corpus" >&2
  fi
  if [ -d "$corpus/cache-none" ]; then cache=$corpus/cache-none; else cache=$corpus/cache-xz; fi
fi
cache=$(cd "$cache" && pwd)
ls "$cache"/*.narinfo >/dev/null 2>&1 || { echo "$cache is not a binary cache" >&2; exit 1; }

echo "== building release binaries" >&2
cargo build --release -p nix-p2p-cache --bins >&2
bin=$root/target/release

{
  echo "# nix-p2p-cache P2P fetch vs nginx"
  echo
  echo "cache: $cache; $(nproc) cores; $("$nginx_bin" -v 2>&1 | sed 's/.*: //'), one process," \
    "sendfile on; load average before: $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD)"
  echo
} >&2
"$bin/nix-p2p-cache-bench-p2p" --cache "$cache" --bin "$bin/nix-p2p-cache" --nginx "$nginx_bin" \
  ${args[@]+"${args[@]}"}
echo >&2
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
