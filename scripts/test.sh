#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs the real Nix client and tools
# when missing, builds the binaries, then runs unit, property and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
