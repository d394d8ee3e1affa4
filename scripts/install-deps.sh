#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian machine, when missing:
# the real Nix client (Debian's nix-bin, Nix 2.8), patchelf, xz and zstd (corpus building and
# reference measurements) and nginx-light (substituter benchmark reference).
set -euo pipefail

need=()
command -v nix-store >/dev/null 2>&1 || need+=(nix-bin)
command -v patchelf >/dev/null 2>&1 || need+=(patchelf)
command -v xz >/dev/null 2>&1 || need+=(xz-utils)
command -v zstd >/dev/null 2>&1 || need+=(zstd)
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
