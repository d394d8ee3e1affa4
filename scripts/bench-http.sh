#!/usr/bin/env bash
# Substituter benchmark (design §8): nix-p2p-cache's localhost HTTP server against nginx serving
# the same uncompressed NARs and narinfos, measured in one run by nix-p2p-cache-bench-http.
#
#   scripts/bench-http.sh [--corpus DIR] [--runs N] [--no-big]
#
# --corpus DIR  a corpus made by corpus/build.sh (uses DIR/cache-none; only read). Default:
#               target/test-corpus-small, built (small, 2 generations) when missing.
# --runs N      timed runs per measurement (default 3; figures are medians).
# --no-big      skip the 1 GiB NAR (daemon RSS while streaming).
#
# The 1 GiB NAR (768 MiB pseudo-random + 256 MiB of text, one store path) is made once into
# $BIG_CACHE (default /tmp/nix-p2p-cache-bench-big, a file:// cache, compression=none) and
# reused. nginx: one worker process, daemon off, access_log off, sendfile on, tcp_nopush on,
# keepalive_requests 1000000, 127.0.0.1:<free port>. Both servers run on this machine beside
# the client; nothing is pinned to a core.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

corpus=""
runs=3
big=1
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --no-big) big=0; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

WITH_NGINX=1 scripts/install-deps.sh
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

if [ -z "$corpus" ]; then
  corpus=$root/target/test-corpus-small
  [ -d "$corpus/cache-none" ] || corpus/build.sh --scale small --generations 2 --out "$corpus"
fi
corpus=$(cd "$corpus" && pwd)
[ -d "$corpus/cache-none/nar" ] || { echo "$corpus/cache-none is not a binary cache" >&2; exit 1; }

echo "== building release binaries" >&2
cargo build --release -p nix-p2p-cache --bins >&2
bin=$root/target/release

# --- the 1 GiB NAR, made once ---------------------------------------------------------------
BIG_CACHE=${BIG_CACHE:-/tmp/nix-p2p-cache-bench-big}
if [ "$big" = 1 ] && [ ! -f "$BIG_CACHE/.complete" ]; then
  echo "== making a 1 GiB NAR into $BIG_CACHE (once)" >&2
  rm -rf "$BIG_CACHE"
  src=$(mktemp -d /tmp/bench-big-src.XXXXXX)
  mkdir "$src/bench-big-nar"
  head -c $((768 << 20)) /dev/urandom >"$src/bench-big-nar/random.bin"
  { seq -f 'line %.0f of the nix-p2p-cache substituter benchmark NAR, mostly text' 1 20000000 || true; } \
    | head -c $((256 << 20)) >"$src/bench-big-nar/text.txt"
  path=$(nix-store --add-fixed --recursive sha256 "$src/bench-big-nar")
  rm -rf "$src"
  NIX_CONFIG="experimental-features = nix-command" \
    nix copy --to "file://$BIG_CACHE?compression=none" "$path"
  nix-store --delete "$path" >/dev/null 2>&1 || true
  touch "$BIG_CACHE/.complete"
fi

# --- data dir, daemon ----------------------------------------------------------------------
tmp=$(mktemp -d /tmp/bench-http.XXXXXX)
chmod 755 "$tmp" # nginx's worker runs as an unprivileged user
dpid=""
npid=""
cleanup() {
  [ -n "$dpid" ] && kill "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null
  [ -n "$npid" ] && kill "$npid" 2>/dev/null && wait "$npid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== importing $corpus/cache-none" >&2
"$bin/nix-p2p-cache" import --data-dir "$tmp/data" --from "file://$corpus/cache-none" >&2
if [ "$big" = 1 ]; then
  echo "== importing the 1 GiB NAR" >&2
  "$bin/nix-p2p-cache" import --data-dir "$tmp/data" --from "file://$BIG_CACHE" >&2
fi

"$bin/nix-p2p-cache" daemon --data-dir "$tmp/data" --listen 127.0.0.1:0 \
  >"$tmp/daemon.out" 2>"$tmp/daemon.err" &
dpid=$!
daemon_url=""
for _ in $(seq 300); do
  daemon_url=$(sed -n 's/^listening \(http:\/\/[0-9.:]*\).*/\1/p' "$tmp/daemon.out" | head -n1)
  [ -n "$daemon_url" ] && break
  kill -0 "$dpid" 2>/dev/null || { cat "$tmp/daemon.err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$daemon_url" ] || { echo "the daemon did not start" >&2; exit 1; }
echo "== daemon $daemon_url (pid $dpid)" >&2

# --- nginx root: the same NARs, and the narinfos exactly as the daemon serves them ----------
www=$tmp/www
mkdir -p "$www/nar"
cp "$corpus"/cache-none/nar/*.nar "$www/nar/"
curl -sf "$daemon_url/nix-cache-info" -o "$www/nix-cache-info"
: >"$tmp/narinfos.txt"
: >"$tmp/nars.txt"
for f in "$corpus"/cache-none/*.narinfo; do
  name=$(basename "$f")
  curl -sf "$daemon_url/$name" -o "$www/$name"
  echo "$name" >>"$tmp/narinfos.txt"
  awk '/^URL:/{u=$2} /^NarSize:/{s=$2} END{print u, s}' "$www/$name" >>"$tmp/nars.txt"
done
while read -r u _; do
  [ -f "$www/$u" ] || { echo "nginx root lacks $u" >&2; exit 1; }
done <"$tmp/nars.txt"
big_args=()
if [ "$big" = 1 ]; then
  bi=$(ls "$BIG_CACHE"/*.narinfo | head -n1)
  name=$(basename "$bi")
  curl -sf "$daemon_url/$name" -o "$www/$name"
  big_url=$(awk '/^URL:/{print $2}' "$www/$name")
  src_url=$(awk '/^URL:/{print $2}' "$bi")
  ln "$BIG_CACHE/$src_url" "$www/$big_url" 2>/dev/null || cp "$BIG_CACHE/$src_url" "$www/$big_url"
  big_args=(--big-nar "$big_url")
fi

# --- nginx ---------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$tmp/nginx/logs" "$tmp/nginx/tmp"
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path $tmp/nginx/tmp/body;
  proxy_temp_path $tmp/nginx/tmp/proxy;
  fastcgi_temp_path $tmp/nginx/tmp/fastcgi;
  uwsgi_temp_path $tmp/nginx/tmp/uwsgi;
  scgi_temp_path $tmp/nginx/tmp/scgi;
  types { text/x-nix-narinfo narinfo; application/x-nix-nar nar; }
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$port;
    root $www;
  }
}
EOF
"$nginx_bin" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e "$tmp/nginx/logs/error.log" &
npid=$!
nginx_url=http://127.0.0.1:$port
for _ in $(seq 100); do
  curl -sf "$nginx_url/nix-cache-info" >/dev/null 2>&1 && break
  kill -0 "$npid" 2>/dev/null || { cat "$tmp/nginx/logs/error.log" >&2; exit 1; }
  sleep 0.1
done
wpid=$(pgrep -P "$npid" | head -n1 || true)
echo "== nginx $nginx_url (master pid $npid, 1 worker: pid ${wpid:-?})" >&2
pid_args=(--daemon-pid "$dpid")
[ -n "$wpid" ] && pid_args+=(--nginx-pid "$wpid")

# --- the measurement -----------------------------------------------------------------------
echo "# nix-p2p-cache substituter vs nginx"
echo
echo "corpus: $corpus/cache-none; $(nproc) cores; $("$nginx_bin" -v 2>&1 | sed 's/.*: //'), 1 worker," \
  "sendfile on; load average before: $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD)"
"$bin/nix-p2p-cache-bench-http" --daemon "$daemon_url" --nginx "$nginx_url" \
  --narinfos "$tmp/narinfos.txt" --nars "$tmp/nars.txt" --runs "$runs" "${pid_args[@]}" "${big_args[@]}"
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
