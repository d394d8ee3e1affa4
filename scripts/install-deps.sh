#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine, when missing:
# the real Nix client (Debian's nix-bin, Nix 2.8), patchelf, xz and zstd (corpus building and
# reference measurements), nginx-light (substituter benchmark reference), s3s-fs (the real
# S3 server the pack-storage tests start; later versions need a newer Rust than ours), and
# for the dashboard's browser test (tests/tests/ui.rs) Debian's chromium, node and npm, and
# playwright-core (the version pinned in tests/ui/package-lock.json).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

need=()
command -v nix-store >/dev/null 2>&1 || need+=(nix-bin)
command -v patchelf >/dev/null 2>&1 || need+=(patchelf)
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "${WITH_NGINX:-0}" = 1 ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  need+=(nginx-light)
fi

if ((${#need[@]})); then
  echo "installing: ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null || true
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# s3s-fs: a file-backed S3 server that checks SigV4, for store::storage's tests.
S3S_FS_VERSION=0.14.1
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$cargo_bin/s3s-fs" ]; then
  echo "installing: s3s-fs $S3S_FS_VERSION (cargo install, about 1-2 minutes)" >&2
  cargo install "s3s-fs@$S3S_FS_VERSION" --locked --features binary
fi

# playwright-core drives the chromium installed above (it downloads no browser of its own);
# pinned to 1.61 in tests/ui, the last line that runs on Debian 12's Node 18.
if [ ! -f "$root/tests/ui/node_modules/playwright-core/package.json" ]; then
  echo "installing: playwright-core (npm ci in tests/ui)" >&2
  (cd "$root/tests/ui" && npm ci --no-audit --no-fund --loglevel=error)
fi
