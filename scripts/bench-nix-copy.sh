#!/usr/bin/env bash
# End to end, what a user feels (design §8, "miss path"): the real `nix copy --from` a fresh
# fetcher daemon that gets the closure P2P from a seed daemon on this machine, against
# `nix copy --from` nginx serving the same signed narinfos and uncompressed NARs. Each run uses
# a fresh fetcher (empty data dir), a fresh Nix store and a fresh Nix cache dir for both.
#
#   scripts/bench-nix-copy.sh [--corpus DIR | --cache DIR] [--runs N]
#
# --corpus DIR  a corpus made by corpus/build.sh (DIR/cache-none). Default:
#               target/test-corpus-small, built (small, 2 generations) when missing.
# --cache DIR   a file:// binary cache instead (no upgrade measurement).
# --runs N      runs (default 3); the table shows each and the median ratio.
#
# With a corpus of two or more generations it then measures an upgrade: a fresh fetcher that
# holds generation N-1 (copied through it) copies generation N; the bytes it received from
# peers for that (p2p_bytes_down_total, wire bytes) against the xz size of generation N's NARs
# (their FileSize in the corpus' cache-xz).
#
# The signed cache, the seed's data dir and nginx's root come from nix-p2p-cache-bench-p2p's
# setup (`--work-dir`), so both sides serve byte for byte the same narinfos and NARs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

corpus=""
cache=""
runs=3
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
  cache=$corpus/cache-none
fi
cache=$(cd "$cache" && pwd)

echo "== building release binaries" >&2
cargo build --release -p nix-p2p-cache --bins >&2
bin=$root/target/release

work=$(mktemp -d /tmp/bench-nix-copy.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  chmod -R u+w "$work" 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== setup (signed cache, seed data dir, nginx root)" >&2
"$bin/nix-p2p-cache-bench-p2p" --cache "$cache" --bin "$bin/nix-p2p-cache" --nginx "$nginx_bin" \
  --peers 1 --no-capped --runs 1 --work-dir "$work/setup" >/dev/null 2>"$work/setup.log" || {
  cat "$work/setup.log" >&2; exit 1; }
pk=$(nix --extra-experimental-features nix-command key convert-secret-to-public \
  < "$work/setup/bench.key")
mapfile -t paths < <(grep -h '^StorePath:' "$work/setup/www"/*.narinfo | cut -d' ' -f2)
bytes=$(grep -h '^NarSize:' "$work/setup/www"/*.narinfo | awk '{s+=$2} END {print s}')

# nginx on the setup's root (its config names a port that was free then: take a new one).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s/listen 127.0.0.1:[0-9]*;/listen 127.0.0.1:$port;/" -e "s#$work/setup/nginx#$work/nginx#g" \
  "$work/setup/nginx/nginx.conf" > "$work/nginx.conf"
mkdir -p "$work/nginx/tmp"
"$nginx_bin" -c "$work/nginx.conf" -e "$work/nginx/error.log" &
pids+=($!)
nginx_url=http://127.0.0.1:$port

# Starts a daemon; once it listens, `addrs` holds its HTTP URL (and with --p2p-listen its P2P
# address) and `last_pid` its pid.
start_daemon() {
  local name=$1; shift
  "$bin/nix-p2p-cache" daemon --listen 127.0.0.1:0 --data-dir "$work/$name" \
    --trusted-public-key "$pk" --no-mdns "$@" >"$work/$name.out" 2>"$work/$name.err" &
  last_pid=$!
  pids+=("$last_pid")
  local lines=1
  case " $* " in *" --p2p-listen "*) lines=2 ;; esac
  for _ in $(seq 200); do
    [ "$(wc -l < "$work/$name.out")" -ge "$lines" ] && break
    sleep 0.05
  done
  mapfile -t addrs < <(sed -n 's/^listening //p' "$work/$name.out")
  [ "${#addrs[@]}" -ge "$lines" ] || { cat "$work/$name.err" >&2; exit 1; }
}

cp -r "$work/setup/data-template" "$work/seed"
start_daemon seed --role seed --p2p-listen /ip4/127.0.0.1/tcp/0 --share all
seed=("${addrs[@]}")
sleep 1 # the seed announces its NARs

copy() { # copy URL NAME [PATH…]: seconds nix copy takes (default: every path) into a fresh store
  local t0 t1 url=$1 name=$2
  shift 2
  [ $# -gt 0 ] || set -- "${paths[@]}"
  t0=$(date +%s.%N)
  XDG_CACHE_HOME=$work/xdg-$name nix --extra-experimental-features nix-command copy \
    --from "$url" --to "$work/store-$name" --option substituters '' \
    --option trusted-public-keys "$pk" --option require-sigs true "$@" \
    2>"$work/copy-$name.err" || { cat "$work/copy-$name.err" >&2; return 1; }
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo
echo "## nix copy of ${#paths[@]} paths ($((bytes / 1000000)) MB of NARs): through a fresh daemon vs from nginx"
echo
echo "P2P: the daemon fetches from a seed daemon; pull-through: the daemon (no P2P) has nginx as"
echo "its --upstream. Each run: nginx, P2P, pull-through, each into a fresh store."
echo
echo "| run | nginx s | via P2P s | P2P / nginx | pull-through s | pull-through / nginx |"
echo "|---|---|---|---|---|---|"
ratios=()
pulls=()
for i in $(seq "$runs"); do
  start_daemon "fetcher-$i" --p2p-listen /ip4/127.0.0.1/tcp/0 --bootstrap "${seed[1]}"
  a=${addrs[0]}
  fetcher_pid=$last_pid
  sleep 0.5 # connected to the seed
  start_daemon "pull-$i" --upstream "$nginx_url"
  u=${addrs[0]}
  pull_pid=$last_pid
  n=$(copy "$nginx_url" "nginx-$i")
  p=$(copy "$a" "p2p-$i")
  q=$(copy "$u" "pull-$i")
  kill "$fetcher_pid" "$pull_pid" 2>/dev/null || true
  r=$(echo "$p / $n" | bc -l)
  s=$(echo "$q / $n" | bc -l)
  ratios+=("$r")
  pulls+=("$s")
  printf '| %d | %.2f | %.2f | %.2f | %.2f | %.2f |\n' "$i" "$n" "$p" "$r" "$q" "$s"
done
printf '\nmedian P2P / nginx = %.2f (target ≤ 1.1); median pull-through / nginx = %.2f (target ≤ 1.05)\n' \
  "$(median "${ratios[@]}")" "$(median "${pulls[@]}")"

# An upgrade: generation N after N-1, through one fetcher.
if [ -n "$corpus" ] && [ -f "$corpus/gen-2.paths" ]; then
  last=$(ls "$corpus"/gen-*.paths | sed 's/.*gen-\([0-9]*\).paths/\1/' | sort -n | tail -1)
  prev=$((last - 1))
  mapfile -t old < "$corpus/gen-$prev.paths"
  mapfile -t new < "$corpus/gen-$last.paths"
  start_daemon fetcher-upgrade --p2p-listen /ip4/127.0.0.1/tcp/0 --bootstrap "${seed[1]}"
  a=${addrs[0]}
  sleep 0.5
  metric() { curl -fsS "$a/metrics" | awk -v m="nix_p2p_cache_$1" '$1 == m {print $2}'; }
  copy "$a" upgrade-old "${old[@]}" >/dev/null
  before=$(metric p2p_bytes_down_total)
  t=$(copy "$a" upgrade-new "${new[@]}")
  after=$(metric p2p_bytes_down_total)
  xz=0
  for p in "${new[@]}"; do
    h=$(basename "$p" | cut -c1-32)
    old_has=0
    for o in "${old[@]}"; do [ "$o" = "$p" ] && old_has=1 && break; done
    [ "$old_has" = 1 ] && continue # already held: nothing to fetch, nothing to compare
    s=$(sed -n 's/^FileSize: //p' "$corpus/cache-xz/$h.narinfo")
    xz=$((xz + s))
  done
  got=$((after - before))
  echo
  echo "## upgrade: generation $last after generation $prev (${#new[@]} paths, $t s)"
  echo
  printf 'received from peers: %d bytes; xz size of the new NARs: %d bytes; ratio %.3f (target ≤ 0.05)\n' \
    "$got" "$xz" "$(echo "$got / $xz" | bc -l)"
fi
