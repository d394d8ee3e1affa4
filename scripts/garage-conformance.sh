#!/usr/bin/env bash
# Runs the pack-storage conformance suite (store::storage::tests::s3_conformance_external,
# an #[ignore]d test) against a real single-node Garage on loopback: a second S3
# implementation besides the s3s-fs the ordinary tests start.
#
# Installs Garage with cargo when it is missing (about 6 minutes of two cores), starts it in
# a temp dir on free loopback ports, assigns the one-node layout, creates a bucket and a key
# allowed on it, then runs the test with NIX_P2P_CACHE_TEST_S3_* pointing at it. Everything
# it started or wrote goes away on exit.
#
#   scripts/garage-conformance.sh             # GARAGE_VERSION=x.y.z to pick another Garage
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
BUCKET=nix-p2p-cache-conformance
REGION=garage

cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if command -v garage >/dev/null 2>&1; then
  garage_bin="$(command -v garage)"
elif [ -x "$cargo_bin/garage" ]; then
  garage_bin="$cargo_bin/garage"
else
  echo "installing: garage $GARAGE_VERSION (cargo install, about 6 minutes)" >&2
  nice -n 10 cargo install "garage@$GARAGE_VERSION" --locked --no-default-features \
    --features bundled-libs,sqlite
  garage_bin="$cargo_bin/garage"
fi
echo "using $("$garage_bin" --version 2>/dev/null || echo "$garage_bin")" >&2

work="$(mktemp -d -t garage-conformance.XXXXXX)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A loopback port nothing listens on (checked by connecting; a race with another process
# is possible but unlikely, and shows as Garage failing to start).
free_port() {
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "no free loopback port found" >&2
  return 1
}
random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

rpc_port="$(free_port)"
s3_port="$(free_port)"
while [ "$s3_port" = "$rpc_port" ]; do s3_port="$(free_port)"; done

config="$work/garage.toml"
cat >"$config" <<EOF
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$s3_port"
EOF
chmod 600 "$config"

g() { "$garage_bin" -c "$config" "$@"; }

# Retries "$@" (quietly) until it succeeds or $1 seconds pass.
retry() {
  local secs="$1"
  shift
  local deadline=$((SECONDS + secs))
  until "$@" >"$work/last.out" 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "gave up after ${secs}s: $*" >&2
      cat "$work/last.out" >&2
      echo "--- garage log (tail) ---" >&2
      tail -n 40 "$work/garage.log" >&2 || true
      return 1
    fi
    if [ -n "$server_pid" ] && ! kill -0 "$server_pid" 2>/dev/null; then
      echo "garage server exited; its log:" >&2
      tail -n 60 "$work/garage.log" >&2 || true
      return 1
    fi
    sleep 1
  done
}

g server >"$work/garage.log" 2>&1 &
server_pid=$!

retry 120 g status
node_id="$(g node id -q 2>/dev/null | head -n 1 | cut -d@ -f1)"
if [ -z "$node_id" ]; then
  echo "could not read the node id" >&2
  exit 1
fi
g layout assign -z dc1 -c 1G "$node_id" >/dev/null
g layout apply --version 1 >/dev/null

# The bucket can be created once the new layout is in force.
retry 60 g bucket create "$BUCKET"
key_info="$(g key create nix-p2p-cache-conformance)"
key_id="$(awk '/Key ID:/ {print $NF; exit}' <<<"$key_info")"
secret="$(awk '/Secret key:/ {print $NF; exit}' <<<"$key_info")"
unset key_info
if [ -z "$key_id" ] || [ -z "$secret" ]; then
  echo "could not read the new key from 'garage key create'" >&2
  exit 1
fi
g bucket allow --read --write --owner "$BUCKET" --key "$key_id" >/dev/null

# The S3 API answers (any HTTP status will do: it is listening).
retry 60 bash -c "exec 3<>/dev/tcp/127.0.0.1/$s3_port"

echo "garage on http://127.0.0.1:$s3_port (bucket $BUCKET, key $key_id); running the suite" >&2
NIX_P2P_CACHE_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port" \
NIX_P2P_CACHE_TEST_S3_BUCKET="$BUCKET" \
NIX_P2P_CACHE_TEST_S3_REGION="$REGION" \
NIX_P2P_CACHE_TEST_S3_ACCESS_KEY_ID="$key_id" \
NIX_P2P_CACHE_TEST_S3_SECRET_ACCESS_KEY="$secret" \
  nice -n 10 cargo test -p nix-p2p-cache --lib store::storage::tests::s3_conformance_external \
  -- --ignored --exact
