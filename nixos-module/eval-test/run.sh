#!/usr/bin/env bash
# Evaluates the NixOS module with the real nixpkgs lib (eval.nix: lib.evalModules, stand-in
# NixOS options, a pkgs stub), prints each case's unit, firewall and nix.settings, then
# "builds" the config check of every case that passes its assertions: runs the stub
# runCommand's script (check-config on the generated TOML with the unit's flags) with the
# locally built binary, and prints the checked file.
#
#   nixos-module/eval-test/run.sh /path/to/nixpkgs.lib [path/to/nix-p2p-cache]
#
# nixpkgs.lib: a checkout of github:nix-community/nixpkgs.lib (its lib/ directory is used).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lib=${1:?usage: run.sh NIXPKGS_LIB_DIR [NIX_P2P_CACHE_BIN]}
bin=${2:-$here/../../target/debug/nix-p2p-cache}
[ -d "$lib/lib" ] && lib=$lib/lib
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --bin nix-p2p-cache)" >&2; exit 1; }
bindir=$(mktemp -d); trap 'rm -rf "$bindir"' EXIT
ln -s "$(realpath "$bin")" "$bindir/nix-p2p-cache"

echo "nixpkgs lib: $(nix-instantiate --eval --expr "(import $lib).version")"
# --read-write-mode: the stubs write their files (builtins.toFile) into the store.
json=$(nix-instantiate --eval --read-write-mode --strict --json "$here/eval.nix" --arg lib "import $lib")

status=0
for case in $(jq -r 'keys[]' <<<"$json"); do
  c=$(jq -c --arg c "$case" '.[$c]' <<<"$json")
  echo "=== $case"
  jq -r '"failed assertions: \(.failedAssertions | length)", (.failedAssertions[] | "  - \(.)"),
         "firewall: tcp \(.firewall.allowedTCPPorts) udp \(.firewall.allowedUDPPorts)",
         "environment.systemPackages: \(.systemPackages)",
         "nix.settings.substituters: \(.nixSettings.substituters)",
         "nix.settings.trusted-public-keys: \(.nixSettings["trusted-public-keys"])"' <<<"$c"
  if [ "$(jq '.unit == null' <<<"$c")" = true ]; then
    echo "unit: none"
    continue
  fi
  jq -r '.unit.serviceConfig | "ExecStart: \(.ExecStart)", "LoadCredential: \(.LoadCredential)",
         "hardening: \([to_entries[] | select(.key | test("^(DynamicUser|StateDirectory|ProtectSystem|PrivateTmp|NoNewPrivileges|RestrictAddressFamilies|Restart)$")) | "\(.key)=\(.value)"] | join(" "))"' <<<"$c"
  if [ "$(jq '.failedAssertions | length' <<<"$c")" != 0 ]; then
    case $case in
      bad-*) echo "refused by the assertions (expected)" ;;
      *) echo "UNEXPECTED: assertions failed"; status=1 ;;
    esac
    continue
  fi
  # The stub runCommand's output is its build script: run it as the builder would.
  script=$(jq -r '.unit.serviceConfig.ExecStart' <<<"$c" | sed -E 's/.* --config ([^ ]+).*/\1/')
  out=$(mktemp)
  if err=$(out=$out PATH="$bindir:$PATH" bash -e "$script" 2>&1 >/dev/null); then
    case $case in
      bad-*) echo "UNEXPECTED: check-config accepted it"; status=1 ;;
      *) echo "check-config: ok; generated config:"; sed 's/^/  /' "$out" ;;
    esac
  else
    case $case in
      bad-*) echo "check-config refused it (expected):"; sed 's/^/  /' <<<"$err" ;;
      *) echo "check-config: FAILED"; sed 's/^/  /' <<<"$err"; status=1 ;;
    esac
  fi
  rm -f "$out"
done
echo "=== $([ $status = 0 ] && echo ok || echo FAILED)"
exit $status
