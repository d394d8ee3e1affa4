#!/usr/bin/env bash
# Packs on S3-compatible storage (docs/storage.md, "Packs on S3: costs"), measured in one run
# against a real S3 server (s3s-fs, file-backed, checks SigV4) on a free loopback port:
# - S3 requests per GiB ingested: `import` into a data dir with --storage s3://bench/seed, its
#   own storage counters (`import --json`) and the bucket's objects, beside the same import
#   into a local data dir (both timed);
# - NAR serve throughput: every NAR of the corpus fetched once by nix-p2p-cache-bench-fetch
#   from a daemon on the S3 data dir with an empty pack cache (cold), again (warm), and from a
#   daemon on the local data dir; GETs per NAR from /api/status;
# - the monthly object-storage bill of the packs vs the same NARs one object per NAR (the
#   corpus's .nar.xz files, as cache.nixos.org stores them) at the list prices of
#   sim/data/prices.toml (AWS S3 Standard, Cloudflare R2, Backblaze B2), and the upload
#   requests of each.
#
#   scripts/bench-s3.sh [--corpus DIR] [--runs N] [--concurrency N] [--out FILE]
#
# --corpus DIR     a corpus made by corpus/build.sh (imports DIR/cache-none, compares with
#                  DIR/cache-xz) or a binary cache dir (nar/ and *.narinfo). Only read. Default:
#                  target/test-corpus-small, built (small, 2 generations) when missing.
# --runs N         serve passes (cold, warm, local) per measurement (default 3; medians).
# --concurrency N  NARs fetched at once, one keep-alive connection each (default 4).
# --out FILE       where the table is also written (default target/bench-s3.txt).
#
# The S3 daemon starts each run with its pack cache (<data-dir>/pack-cache) deleted and a
# cache bound large enough for the whole corpus, so the warm pass reads no pack from S3.
# s3s-fs, both daemons and the client run on this machine; the S3 "network" is loopback.
# BENCH_KEEP=1 keeps the temporary directory (data dirs, bucket, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

corpus=""
runs=3
conc=4
out=$root/target/bench-s3.txt
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) corpus=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --concurrency) conc=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$runs" -ge 1 ] && [ "$conc" -ge 1 ] || { echo "--runs and --concurrency must be ≥ 1" >&2; exit 2; }
# Nothing from the caller's environment picks another store or storage for the commands below.
unset NIX_P2P_CACHE_DATA_DIR NIX_P2P_CACHE_STORAGE NIX_P2P_CACHE_S3_ENDPOINT NIX_P2P_CACHE_CONFIG

scripts/install-deps.sh
for c in curl jq python3; do
  command -v "$c" >/dev/null || { echo "$c is needed" >&2; exit 1; }
done
s3s_fs=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")
[ -x "$s3s_fs" ] || { echo "s3s-fs not found (scripts/install-deps.sh installs it)" >&2; exit 1; }

if [ -z "$corpus" ]; then
  corpus=$root/target/test-corpus-small
  [ -d "$corpus/cache-none" ] || corpus/build.sh --scale small --generations 2 --out "$corpus"
fi
corpus=$(cd "$corpus" && pwd)
if [ -d "$corpus/cache-none/nar" ]; then
  src=$corpus/cache-none
elif [ -d "$corpus/nar" ]; then
  src=$corpus
else
  echo "$corpus: neither a corpus (cache-none/) nor a binary cache (nar/)" >&2
  exit 1
fi
# One object per NAR: the xz cache when there is one, else the imported cache as it is.
if [ -d "$corpus/cache-xz/nar" ]; then pernar=$corpus/cache-xz; else pernar=$src; fi

echo "== building release binaries" >&2
cargo build --release -p nix-p2p-cache --bin nix-p2p-cache --bin nix-p2p-cache-bench-fetch >&2
bin=${CARGO_TARGET_DIR:-$root/target}/release
[ -x "$bin/nix-p2p-cache-bench-fetch" ] || { echo "no binaries in $bin" >&2; exit 1; }

tmp=$(mktemp -d /tmp/bench-s3.XXXXXX)
s3pid=""
pids=()
cleanup() {
  local rc=$? p
  for p in "${pids[@]}" $s3pid; do
    { kill "$p" && wait "$p"; } 2>/dev/null || true
  done
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- the S3 server -------------------------------------------------------------------------
bucket=bench
prefix=seed
mkdir -p "$tmp/s3/$bucket"
key=bench$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
secret=$(od -An -N20 -tx1 /dev/urandom | tr -d ' \n')
# The credentials reach the S3 commands' environment only (env execs: $! is the process).
s3env=(env "AWS_ACCESS_KEY_ID=$key" "AWS_SECRET_ACCESS_KEY=$secret" "AWS_REGION=us-east-1")
s3port=$(free_port)
endpoint=http://127.0.0.1:$s3port
"$s3s_fs" --host 127.0.0.1 --port "$s3port" --access-key "$key" --secret-key "$secret" \
  "$tmp/s3" >"$tmp/s3s-fs.log" 2>&1 &
s3pid=$!
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/" || true)
  [ "$code" != 000 ] && break
  kill -0 "$s3pid" 2>/dev/null || { cat "$tmp/s3s-fs.log" >&2; exit 1; }
  sleep 0.1
done
[ "$code" != 000 ] || { echo "s3s-fs did not start" >&2; exit 1; }
s3s_version=$("$s3s_fs" --version 2>/dev/null | head -n1 || true)
echo "== s3s-fs $endpoint (pid $s3pid), bucket $bucket in $tmp/s3" >&2
storage_args=(--storage "s3://$bucket/$prefix" --s3-endpoint "$endpoint")

# --- ingest --------------------------------------------------------------------------------
echo "== reading $src once (page cache), then importing it twice" >&2
cat "$src"/nar/* >/dev/null
now() { date +%s.%N; }
t0=$(now)
"$bin/nix-p2p-cache" import --json --data-dir "$tmp/local" --from "file://$src" \
  >"$tmp/import-local.json" 2>"$tmp/import-local.err" || { cat "$tmp/import-local.err" >&2; exit 1; }
t1=$(now)
"${s3env[@]}" "$bin/nix-p2p-cache" import --json --data-dir "$tmp/s3data" "${storage_args[@]}" \
  --from "file://$src" >"$tmp/import-s3.json" 2>"$tmp/import-s3.err" \
  || { cat "$tmp/import-s3.err" >&2; exit 1; }
t2=$(now)
"$bin/nix-p2p-cache" stats --json --data-dir "$tmp/local" >"$tmp/stats-local.json"
"${s3env[@]}" "$bin/nix-p2p-cache" stats --json --data-dir "$tmp/s3data" "${storage_args[@]}" \
  >"$tmp/stats-s3.json"
# The bucket as s3s-fs keeps it: one file per object.
find "$tmp/s3/$bucket" -type f -printf '%s %P\n' | sort -k2 >"$tmp/bucket.txt"
du -sb "$tmp/local" | cut -f1 >"$tmp/du-local"
du -sb "$tmp/s3data" | cut -f1 >"$tmp/du-s3data"
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "{\"local_secs\": %.3f, \"s3_secs\": %.3f}\n", b - a, c - b }' \
  >"$tmp/import-times.json"

# One object per NAR: each narinfo and the file its URL names (each NAR file once).
for f in "$pernar"/*.narinfo; do
  u=$(awk '/^URL:/{print $2}' "$f")
  c=$(awk '/^Compression:/{print $2}' "$f")
  printf '%s %s %s %s\n' "$(stat -c %s "$f")" "$(stat -c %s "$pernar/$u")" "$u" "${c:-bzip2}"
done >"$tmp/pernar.txt"

# --- the daemons ---------------------------------------------------------------------------
started_pid=""
started_url=""
# start_daemon LOG CMD…: runs CMD (a daemon on 127.0.0.1:0) and waits for its address.
start_daemon() {
  local log=$1
  shift
  "$@" >"$log.out" 2>"$log.err" &
  started_pid=$!
  pids+=("$started_pid")
  started_url=""
  for _ in $(seq 300); do
    started_url=$(sed -n 's/^listening \(http:\/\/[0-9.:]*\).*/\1/p' "$log.out" | head -n1)
    [ -n "$started_url" ] && return 0
    kill -0 "$started_pid" 2>/dev/null || { cat "$log.err" >&2; return 1; }
    sleep 0.1
  done
  echo "the daemon ($*) did not start" >&2
  return 1
}
stop_daemon() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
storage_status() { curl -sf "$1/api/status" | jq -c '.store.storage // {}'; }
fetch() {
  local url=$1
  shift
  "$bin/nix-p2p-cache-bench-fetch" --url "$url" --nars "$tmp/nars.txt" --concurrency "$conc" "$@"
}

daemon_args=(daemon --listen 127.0.0.1:0 --no-mdns)
start_daemon "$tmp/daemon-local" "$bin/nix-p2p-cache" "${daemon_args[@]}" --data-dir "$tmp/local"
lpid=$started_pid
lurl=$started_url
echo "== local daemon $lurl (pid $lpid)" >&2

# The NAR list, as the daemon names the NARs (each NAR once).
: >"$tmp/nars-all.txt"
for f in "$src"/*.narinfo; do
  curl -sf "$lurl/$(basename "$f")" | awk '/^URL:/{u=$2} /^NarSize:/{s=$2} END{print u, s}' \
    >>"$tmp/nars-all.txt"
done
sort -u "$tmp/nars-all.txt" >"$tmp/nars.txt"

# A pack cache that holds every pack: the warm pass then reads nothing from S3.
pack_bytes=$(jq '.pack_bytes' "$tmp/stats-s3.json")
cache_size=$(((pack_bytes * 2 > (1 << 30)) ? pack_bytes * 2 : (1 << 30)))

: >"$tmp/cold.jsonl"
: >"$tmp/warm.jsonl"
: >"$tmp/local.jsonl"
# measure URL FILE [ARGS]: one fetch pass, with the S3 requests it caused.
measure() {
  local url=$1 file=$2 a b
  shift 2
  a=$(storage_status "$url")
  r=$(fetch "$url" "$@")
  b=$(storage_status "$url")
  jq -cn --argjson r "$r" --argjson a "$a" --argjson b "$b" \
    '$r + {s3_gets: (($b.gets // 0) - ($a.gets // 0)), s3_bytes_in: (($b.bytes_in // 0) - ($a.bytes_in // 0)),
           s3_errors: (($b.errors // 0) - ($a.errors // 0))}' >>"$file"
}
for run in $(seq "$runs"); do
  rm -rf "$tmp/s3data/pack-cache"
  start_daemon "$tmp/daemon-s3" "${s3env[@]}" "$bin/nix-p2p-cache" "${daemon_args[@]}" \
    --data-dir "$tmp/s3data" "${storage_args[@]}" --s3-cache-size "$cache_size"
  spid=$started_pid
  surl=$started_url
  echo "== run $run/$runs: S3 daemon $surl (pid $spid), pack cache emptied" >&2
  measure "$surl" "$tmp/cold.jsonl"
  measure "$surl" "$tmp/warm.jsonl"
  if [ "$run" = "$runs" ]; then
    echo "== checking every NAR from the S3 daemon against its NarHash" >&2
    fetch "$surl" --verify >/dev/null
  fi
  stop_daemon "$spid"
  measure "$lurl" "$tmp/local.jsonl"
  tail -n1 "$tmp/cold.jsonl" "$tmp/warm.jsonl" "$tmp/local.jsonl" >&2
done
echo "== checking every NAR from the local daemon against its NarHash" >&2
fetch "$lurl" --verify >/dev/null

# --- the table -----------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
{
  echo "# nix-p2p-cache: packs on S3 vs local disk"
  echo
  echo "corpus: $src (one object per NAR: $pernar); ${s3s_version:-s3s-fs} on $endpoint;" \
    "$(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD);" \
    "$(date -u +%Y-%m-%dT%H:%MZ)"
  BENCH_TMP=$tmp BENCH_RUNS=$runs BENCH_CONC=$conc BENCH_CACHE_SIZE=$cache_size \
    BENCH_PRICES=$root/sim/data/prices.toml python3 - <<'EOF'
import json, math, os, statistics, tomllib

tmp = os.environ["BENCH_TMP"]
runs, conc = int(os.environ["BENCH_RUNS"]), int(os.environ["BENCH_CONC"])
cache_size = int(os.environ["BENCH_CACHE_SIZE"])
j = lambda n: json.load(open(f"{tmp}/{n}"))
jl = lambda n: [json.loads(l) for l in open(f"{tmp}/{n}") if l.strip()]
imp_l, imp_s, times = j("import-local.json"), j("import-s3.json"), j("import-times.json")
st_l, st_s = j("stats-local.json"), j("stats-s3.json")
req = imp_s["storage"]
GiB, MiB = float(1 << 30), float(1 << 20)

# The bucket: pack objects (PREFIX/packs/pack-N.pack) and anything else s3s-fs keeps.
objs = [l.split(" ", 1) for l in open(f"{tmp}/bucket.txt").read().splitlines()]
packs = [(int(s), p) for s, p in objs if p.endswith(".pack") and "/packs/pack-" in "/" + p]
other = [(int(s), p) for s, p in objs if (int(s), p) not in packs]
obj_bytes = sum(s for s, _ in packs)
# store::storage::s3 uploads a pack with one PUT, and only one of 96 MiB or more (a single
# huge NAR ran it over) in 32 MiB parts (initiate + parts + complete, each a billed write).
THRESHOLD, PART = 96 << 20, 32 << 20
mp = [s for s, _ in packs if s >= THRESHOLD]
parts_expected = sum(math.ceil(s / PART) for s in mp)
billed_writes = req["puts"] + len(mp) + req["multipart_parts"]  # put_pack calls count the initiate

nar_bytes = st_s["nar_bytes"]
pack_bytes = st_s["pack_bytes"]
print(f"\n{st_s['narinfos']} narinfos, {st_s['nars']} NARs, {nar_bytes / 1e6:.1f} MB of NARs "
      f"({nar_bytes / GiB:.3f} GiB) stored as {st_s['packs']} pack(s), {pack_bytes / 1e6:.1f} MB")

print("\n## Ingest: `import --from file://…` into a local data dir and into one on S3")
print("| | local | S3 (s3s-fs) |")
print("|---|---|---|")
tl, ts = times["local_secs"], times["s3_secs"]
print(f"| import time | {tl:.2f} s | {ts:.2f} s ({ts / tl:.2f}×) |")
print(f"| NAR MB/s | {nar_bytes / 1e6 / tl:.0f} | {nar_bytes / 1e6 / ts:.0f} |")
print(f"| packs; pack bytes | {st_l['packs']}; {st_l['pack_bytes']} | {st_s['packs']}; {pack_bytes} |")
print(f"| objects in the bucket (listing) | — | {len(packs)} packs, {obj_bytes} B"
      + (f"; {len(other)} other files" if other else "") + " |")
du_l, du_s = (int(open(f"{tmp}/{n}").read()) for n in ("du-local", "du-s3data"))
print(f"| data dir on local disk after import | {du_l / 1e6:.1f} MB | {du_s / 1e6:.1f} MB |")

print("\n## S3 requests of the import (its own counters, `import --json`)")
print("| | count | per GiB of packed bytes | per GiB of NAR bytes | target |")
print("|---|---|---|---|---|")
pg, ng = pack_bytes / GiB, nar_bytes / GiB
# The target, 1 PUT per 64 MiB packed (16 per GiB), counted per started 64 MiB: the last pack
# of an import is sealed part-full.
want = math.ceil(pack_bytes / (64 * MiB))
ok = "✓" if req["puts"] <= want else "✗"
print(f"| pack uploads (`puts`: one per pack) | {req['puts']} {ok} | {req['puts'] / pg:.1f} | "
      f"{req['puts'] / ng:.1f} | ≤ 1 per started 64 MiB packed: {want} (16 per GiB) |")
print(f"| multipart uploads (packs ≥ 96 MiB) | {len(mp)} | | | |")
pm = "" if parts_expected == req["multipart_parts"] else f" (objects say {parts_expected})"
print(f"| multipart parts (32 MiB) | {req['multipart_parts']}{pm} | {req['multipart_parts'] / pg:.1f} | "
      f"{req['multipart_parts'] / ng:.1f} | |")
print(f"| billed write requests (PUT, or initiate + parts + complete) | {billed_writes} | "
      f"{billed_writes / pg:.1f} | {billed_writes / ng:.1f} | |")
print(f"| reads (GET/HEAD: length checks) / LISTs / DELETEs / errors | "
      f"{req['gets']} / {req['lists']} / {req['deletes']} / {req['errors']} | | | |")
print(f"| bytes uploaded (`bytes_out`) | {req['bytes_out']} "
      f"({'=' if req['bytes_out'] == pack_bytes else '≠'} pack bytes) | | | |")
print(f"| mean bytes per pack upload | {req['bytes_out'] / max(req['puts'], 1) / MiB:.1f} MiB | | | |")

cold, warm, local = jl("cold.jsonl"), jl("warm.jsonl"), jl("local.jsonl")
med = lambda xs, k: statistics.median(x[k] for x in xs)
nars = cold[0]["nars"]
print(f"\n## NAR serve throughput: {nars} NARs, {cold[0]['bytes'] / 1e6:.1f} MB, each once, "
      f"{conc} connections; median of {runs} runs")
print(f"(S3 pack cache emptied before each cold pass, bound {cache_size / MiB:.0f} MiB)")
print("| pass | MB/s | vs local | NAR p50 / p99 ms | S3 GETs | GETs per NAR | MB read from S3 |")
print("|---|---|---|---|---|---|---|")
lm = med(local, "mb_per_s")
for name, xs in (("S3 seed, cold cache", cold), ("S3 seed, warm cache", warm), ("local seed", local)):
    m = med(xs, "mb_per_s")
    g = med(xs, "s3_gets")
    s3 = name.startswith("S3")
    print(f"| {name} | {m:.0f} | {m / lm:.2f} | {med(xs, 'nar_p50_ms'):.1f} / {med(xs, 'nar_p99_ms'):.1f} | "
          + (f"{g:.0f} | {g / nars:.2f} | {med(xs, 's3_bytes_in') / 1e6:.1f} |" if s3 else "— | — | — |"))
errs = sum(x["s3_errors"] for x in cold + warm)
if errs:
    print(f"\nS3 errors during the serve passes: {errs}")

# --- the bill ---
pn = [l.split() for l in open(f"{tmp}/pernar.txt").read().splitlines()]
files = {}
for ni, fs, u, c in pn:
    files[u] = (int(fs), c)
narinfo_bytes = sum(int(ni) for ni, _, _, _ in pn)
pn_objects = len(files) + len(pn)
pn_bytes = sum(s for s, _ in files.values()) + narinfo_bytes
comp = ",".join(sorted({c for _, c in files.values()}))
P = tomllib.load(open(os.environ["BENCH_PRICES"], "rb"))
provs = [("AWS S3 Standard", "aws_s3_standard"), ("Cloudflare R2", "cloudflare_r2"),
         ("Backblaze B2", "backblaze_b2")]
print(f"\n## Object storage: packs vs one object per NAR ({comp}, as cache.nixos.org)")
print("| | packs (this store) | one object per NAR | packs / per NAR |")
print("|---|---|---|---|")
print(f"| objects | {len(packs)} | {pn_objects} ({len(files)} NAR files + {len(pn)} narinfos) | "
      f"{len(packs) / pn_objects:.3f} |")
print(f"| bytes stored | {obj_bytes} | {pn_bytes} | {obj_bytes / pn_bytes:.2f} |")
print(f"| write requests to upload | {billed_writes} | {pn_objects} (one PUT per file) | "
      f"{billed_writes / pn_objects:.3f} |")
print(f"| GETs per NAR read cold | {med(cold, 's3_gets') / nars:.2f} (ranged) | 2 (narinfo + NAR) | |")
scale = float(1 << 40) / nar_bytes
print(f"\nList prices from sim/data/prices.toml (as_of {P['as_of']}; sources there and in "
      "docs/storage.md); first storage tier; GB = 10^9 bytes; free allowances not applied. "
      f"\"per TiB of NARs\": this corpus's ratios scaled linearly to 2^40 NAR bytes (×{scale:.0f}).")
print("| provider | $/GB-month | write $/1k | packs $/month | per NAR $/month | ratio | "
      "packs upload $ | per NAR upload $ | per TiB of NARs: packs $/month + upload $ | per NAR $/month + upload $ |")
print("|---|---|---|---|---|---|---|---|---|---|")
for label, k in provs:
    p = P[k]
    gbm, put = p["storage_tiers"][0]["per_gb_month"], p["put_per_1k"]
    a_m, b_m = obj_bytes / 1e9 * gbm, pn_bytes / 1e9 * gbm
    a_u, b_u = billed_writes / 1e3 * put, pn_objects / 1e3 * put
    print(f"| {label} | {gbm} | {put} | {a_m:.6f} | {b_m:.6f} | {a_m / b_m:.2f} | {a_u:.6f} | {b_u:.6f} | "
          f"{a_m * scale:.2f} + {a_u * scale:.3f} | {b_m * scale:.2f} + {b_u * scale:.3f} |")
EOF
  echo
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out"
echo "== written to $out" >&2
