#!/usr/bin/env bash
# Build generations 1..N of corpus/closure.nix and publish all their closures
# into two file:// binary caches (xz-compressed and uncompressed).
#
#   corpus/build.sh --scale small|large --generations N --out DIR
#
# Writes DIR/gen-<i>.paths (closure of generation i, from nix-store -qR),
# DIR/gen-<i>.out (the top-level out path), GC-root links DIR/result-<i>,
# DIR/cache-xz and DIR/cache-none.  Idempotent: existing results are reused.
# Needs only a working single-user nix (Debian's nix-bin); all settings are
# passed through NIX_CONFIG, no nix.conf is read or written.
set -euo pipefail

scale=small
gens=3
out=
usage() { echo "usage: $0 --scale small|large --generations N --out DIR" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) scale=${2:?}; shift 2;;
    --generations) gens=${2:?}; shift 2;;
    --out) out=${2:?}; shift 2;;
    -h|--help) usage;;
    *) usage;;
  esac
done
[ -n "$out" ] || usage
case "$scale" in small|large) ;; *) usage;; esac
[[ "$gens" =~ ^[1-9][0-9]*$ ]] || usage

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Never touch the network, never need nixbld users or a sandbox.
export NIX_CONFIG="sandbox = false
build-users-group =
substituters =
trusted-substituters =
require-sigs = false
experimental-features = nix-command
fallback = false
connect-timeout = 1
warn-dirty = false
${NIX_CONFIG:-}"
export NIX_PATH=

fmt_bytes() { numfmt --to=iec-i --suffix=B "$1" 2>/dev/null || echo "$1 B"; }

declare -a roots=()
t_all=$(date +%s)
for i in $(seq 1 "$gens"); do
  t0=$(date +%s)
  link="$out/result-$i"
  # re-evaluate cheaply: nix-instantiate + realise only if the out path is missing
  drv=$(nix-instantiate "$here/closure.nix" --arg generation "$i" --argstr scale "$scale" 2> >(grep -v "add-root" >&2))
  outp=$(nix-store -q --outputs "$drv")
  if [ -e "$outp" ] && [ "$(readlink -f "$link" 2>/dev/null || true)" = "$outp" ]; then
    echo "gen $i: up to date ($outp)" >&2
  else
    echo "gen $i: building $outp ..." >&2
    nix-store --realise "$drv" --add-root "$link" --indirect --quiet >/dev/null
  fi
  echo "$outp" > "$out/gen-$i.out"
  nix-store -qR "$outp" | LC_ALL=C sort > "$out/gen-$i.paths.tmp"
  mv "$out/gen-$i.paths.tmp" "$out/gen-$i.paths"
  roots+=("$outp")
  echo "gen $i: $(( $(date +%s) - t0 ))s" >&2
done

for comp in xz none; do
  cache="$out/cache-$comp"
  t0=$(date +%s)
  # nix copy skips paths the cache already has (it checks .narinfo files)
  nix copy --extra-experimental-features nix-command \
    --to "file://$cache?compression=$comp" "${roots[@]}"
  echo "cache-$comp: copy took $(( $(date +%s) - t0 ))s" >&2
done

echo
echo "== corpus: scale=$scale generations=$gens out=$out ($(( $(date +%s) - t_all ))s)"
all_tmp=$(mktemp)
for i in $(seq 1 "$gens"); do
  n=$(wc -l < "$out/gen-$i.paths")
  nar=$(xargs nix path-info --json < "$out/gen-$i.paths" \
        | grep -o '"narSize":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {printf "%.0f\n", s}')
  new=""
  if [ "$i" -gt 1 ]; then
    new=" new-vs-gen-$((i-1))=$(comm -13 "$out/gen-$((i-1)).paths" "$out/gen-$i.paths" | wc -l)"
  fi
  printf 'gen %-2s paths=%-4s narSize=%-12s (%s)%s\n' "$i" "$n" "$nar" "$(fmt_bytes "$nar")" "$new"
  cat "$out/gen-$i.paths" >> "$all_tmp"
done
uniq_n=$(LC_ALL=C sort -u "$all_tmp" | wc -l)
uniq_nar=$(LC_ALL=C sort -u "$all_tmp" | xargs nix path-info --json \
          | grep -o '"narSize":[0-9]*' | cut -d: -f2 | awk '{s+=$1} END {printf "%.0f\n", s}')
rm -f "$all_tmp"
printf 'all  paths=%-4s narSize=%-12s (%s)\n' "$uniq_n" "$uniq_nar" "$(fmt_bytes "$uniq_nar")"
for comp in xz none; do
  b=$(du -sb "$out/cache-$comp" | cut -f1)
  printf 'cache-%-4s du -sb=%-12s (%s)  narinfos=%s\n' "$comp" "$b" "$(fmt_bytes "$b")" \
    "$(find "$out/cache-$comp" -maxdepth 1 -name '*.narinfo' | wc -l)"
done
