//! `nix-p2p-cache-bench`: measures the core data path on a corpus made by `corpus/build.sh`
//! (binary caches `cache-none` and `cache-xz` holding the same multi-generation closures).
//!
//! In one run, against references on the same bytes:
//! - dedup of the candidate chunking parameters, with and without store-path normalisation;
//! - normalisation v1 (hashes) vs v2 (whole references): dedup, and the new bytes each
//!   generation of the corpus adds;
//! - ingest time of the real store vs `zstd -3` alone over the same uncompressed NARs;
//! - stored bytes vs the `nix copy --to file://…?compression=xz` cache;
//! - reassembly throughput vs reading the uncompressed NAR files.
//!
//! Usage: `nix-p2p-cache-bench --corpus DIR [--skip-params]`

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix_p2p_cache::core::chunker::{self, ChunkingParams};
use nix_p2p_cache::core::narinfo::NarInfo;
use nix_p2p_cache::core::normalise::{Normalisation, Normaliser, RefSet};
use nix_p2p_cache::core::store_path::StorePath;
use nix_p2p_cache::core::ChunkId;
use nix_p2p_cache::import::{self, BinaryCache, Selection};
use nix_p2p_cache::store::{CompactOptions, Store};

struct Args {
    corpus: PathBuf,
    skip_params: bool,
    levels: bool,
    compaction: bool,
}

fn parse_args() -> Result<Args> {
    let mut corpus = None;
    let mut skip_params = false;
    let mut levels = false;
    let mut compaction = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--corpus" => corpus = it.next().map(PathBuf::from),
            "--skip-params" => skip_params = true,
            "--levels" => levels = true,
            "--compaction" => compaction = true,
            other => bail!("unknown argument {other:?}; usage: nix-p2p-cache-bench --corpus DIR [--skip-params] [--levels] [--compaction]"),
        }
    }
    Ok(Args {
        corpus: corpus.context("--corpus DIR is required (made by corpus/build.sh)")?,
        skip_params,
        levels,
        compaction,
    })
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => total += du(&p),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn nar_files(cache: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache.join("nar"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "nar"))
        .collect();
    v.sort();
    Ok(v)
}

/// One NAR of the corpus: its file, its store path and the paths it may name (References
/// and itself), in corpus order.
struct CorpusNar {
    file: PathBuf,
    path: StorePath,
    refs: Vec<StorePath>,
}

fn corpus_nars(cache: &Path) -> Result<Vec<CorpusNar>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(cache)?.flatten() {
        let p = e.path();
        if !matches!(p.extension(), Some(x) if x == "narinfo") {
            continue;
        }
        let info = NarInfo::parse(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("parsing {}", p.display()))?;
        let mut refs = info.references.clone();
        refs.push(info.store_path.clone());
        out.push(CorpusNar {
            file: cache.join(&info.url),
            path: info.store_path,
            refs,
        });
    }
    out.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(out)
}

/// Which generation first holds each store path (`gen-<i>.paths` from corpus/build.sh).
fn generations(corpus: &Path) -> Vec<HashSet<String>> {
    let mut gens = Vec::new();
    for i in 1.. {
        let Ok(text) = std::fs::read_to_string(corpus.join(format!("gen-{i}.paths"))) else {
            break;
        };
        gens.push(text.lines().map(str::to_string).collect());
    }
    gens
}

/// Unique chunk bytes (and their zstd -3 size) that each group of NARs adds, in order, under
/// one normalisation.
fn added_per_group(
    groups: &[Vec<&CorpusNar>],
    normalisation: Option<Normalisation>,
) -> Result<Vec<(u64, u64)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for group in groups {
        let (mut unique, mut compressed) = (0u64, 0u64);
        for n in group {
            let r = BufReader::with_capacity(1 << 20, File::open(&n.file)?);
            let source: Box<dyn Read> = match normalisation {
                None => Box::new(r),
                Some(norm) => Box::new(Normaliser::of(r, norm, || RefSet::from_paths(&n.refs))),
            };
            for c in chunker::chunks(source, ChunkingParams::CURRENT) {
                let c = c?;
                if seen.insert(ChunkId::of(&c.data)) {
                    unique += c.data.len() as u64;
                    compressed += zstd::bulk::compress(&c.data, 3)?.len() as u64;
                }
            }
        }
        out.push((unique, compressed));
    }
    Ok(out)
}

/// Normalisation none / v1 / v2 at the current FastCDC parameters: total dedup and what each
/// generation adds.
fn measure_normalisation(corpus: &Path, cache: &Path, total: u64) -> Result<()> {
    let nars = corpus_nars(cache)?;
    let gens = generations(corpus);
    // Group NARs by the first generation that holds them (the rest, if any, last).
    let mut groups: Vec<Vec<&CorpusNar>> = vec![Vec::new(); gens.len() + 1];
    for n in &nars {
        let abs = n.path.to_absolute();
        let g = gens
            .iter()
            .position(|g| g.contains(&abs))
            .unwrap_or(gens.len());
        groups[g].push(n);
    }
    let modes = [
        ("none", None),
        ("v1 hashes", Some(Normalisation::Hashes)),
        ("v2 references", Some(Normalisation::References)),
    ];
    let mut rows = Vec::new();
    for (name, mode) in modes {
        rows.push((name, added_per_group(&groups, mode)?));
    }
    println!("\n## Normalisation v1 (hashes) vs v2 (whole references), FastCDC 32/128/512 KiB");
    println!("| normalisation | unique MB | dedup × | zstd -3 MB |");
    println!("|---|---|---|---|");
    for (name, per) in &rows {
        let unique: u64 = per.iter().map(|p| p.0).sum();
        let compressed: u64 = per.iter().map(|p| p.1).sum();
        println!(
            "| {name} | {:.1} | {:.2} | {:.1} |",
            unique as f64 / 1e6,
            total as f64 / unique.max(1) as f64,
            compressed as f64 / 1e6
        );
    }
    println!("\nNew unique chunk bytes each generation adds (MB; NAR MB of its new paths):");
    println!("| generation | new paths | NAR MB | none | v1 hashes | v2 references |");
    println!("|---|---|---|---|---|---|");
    for (g, group) in groups.iter().enumerate() {
        if group.is_empty() {
            continue;
        }
        let nar_mb: u64 = group
            .iter()
            .map(|n| n.file.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let label = if g < gens.len() {
            (g + 1).to_string()
        } else {
            "other".into()
        };
        println!(
            "| {label} | {} | {:.1} | {:.2} | {:.2} | {:.2} |",
            group.len(),
            nar_mb as f64 / 1e6,
            rows[0].1[g].0 as f64 / 1e6,
            rows[1].1[g].0 as f64 / 1e6,
            rows[2].1[g].0 as f64 / 1e6
        );
    }
    Ok(())
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Dedup of one parameter set: (unique chunk bytes, zstd-3 bytes of unique chunks, chunks).
fn measure_params(
    nars: &[PathBuf],
    params: ChunkingParams,
    normalise: bool,
) -> Result<(u64, u64, u64)> {
    let mut seen = HashSet::new();
    let (mut unique, mut compressed, mut count) = (0u64, 0u64, 0u64);
    for p in nars {
        let r = BufReader::with_capacity(1 << 20, File::open(p)?);
        let source: Box<dyn Read> = if normalise {
            Box::new(Normaliser::new(r))
        } else {
            Box::new(r)
        };
        for c in chunker::chunks(source, params) {
            let c = c?;
            count += 1;
            if seen.insert(ChunkId::of(&c.data)) {
                unique += c.data.len() as u64;
                compressed += zstd::bulk::compress(&c.data, 3)?.len() as u64;
            }
        }
    }
    Ok((unique, compressed, count))
}

/// zstd level vs size and single-thread speed, over the unique v1 chunks.
fn measure_levels(nars: &[PathBuf], total: u64) -> Result<()> {
    let mut seen = HashSet::new();
    let mut unique: Vec<Vec<u8>> = Vec::new();
    for p in nars {
        let r = Normaliser::new(BufReader::with_capacity(1 << 20, File::open(p)?));
        for c in chunker::chunks(r, ChunkingParams::V1) {
            let c = c?;
            if seen.insert(ChunkId::of(&c.data)) {
                unique.push(c.data);
            }
        }
    }
    let bytes: u64 = unique.iter().map(|c| c.len() as u64).sum();
    println!(
        "\n## zstd level per chunk (v1 unique chunks: {:.1} MB of {:.1} MB)",
        bytes as f64 / 1e6,
        total as f64 / 1e6
    );
    println!("| level | compressed MB | ratio × | MB/s (1 thread) |");
    println!("|---|---|---|---|");
    for level in [1, 3, 6, 9, 12, 15, 19] {
        let mut c = zstd::bulk::Compressor::new(level)?;
        let t = Instant::now();
        let mut out = 0u64;
        for chunk in &unique {
            out += c.compress(chunk)?.len() as u64;
        }
        let d = t.elapsed();
        println!(
            "| {level} | {:.1} | {:.2} | {:.0} |",
            out as f64 / 1e6,
            bytes as f64 / out as f64,
            mbps(bytes, d)
        );
    }
    Ok(())
}

/// Compaction candidates over the unique chunks of the store's own chunking (v2), in order of
/// first appearance: per-chunk zstd at higher levels, with a dictionary trained on the
/// chunks, and runs of adjacent chunks compressed together in bounded blocks.
fn measure_compaction(cache: &Path, xz_bytes: u64) -> Result<()> {
    let mut seen = HashSet::new();
    let mut unique: Vec<Vec<u8>> = Vec::new();
    for n in corpus_nars(cache)? {
        let r = Normaliser::with_references(
            BufReader::with_capacity(1 << 20, File::open(&n.file)?),
            RefSet::from_paths(&n.refs),
        );
        for c in chunker::chunks(r, ChunkingParams::CURRENT) {
            let c = c?;
            if seen.insert(ChunkId::of(&c.data)) {
                unique.push(c.data);
            }
        }
    }
    let bytes: u64 = unique.iter().map(|c| c.len() as u64).sum();
    println!(
        "\n## Compaction candidates (v2 unique chunks: {:.1} MB; xz cache {:.1} MB)",
        bytes as f64 / 1e6,
        xz_bytes as f64 / 1e6
    );
    println!(
        "| scheme | compressed MB | vs xz cache × | compress MB/s (1 thread) | decompress MB/s |"
    );
    println!("|---|---|---|---|---|");
    let row = |name: &str, frames: Vec<Vec<u8>>, t: Duration, d: Duration| {
        let out: u64 = frames.iter().map(|f| f.len() as u64).sum();
        println!(
            "| {name} | {:.1} | {:.3} | {:.1} | {:.0} |",
            out as f64 / 1e6,
            out as f64 / xz_bytes as f64,
            mbps(bytes, t),
            mbps(bytes, d)
        );
    };
    let time_decompress =
        |frames: &[Vec<u8>], dict: Option<&[u8]>, cap: usize| -> Result<Duration> {
            let mut dctx = match dict {
                Some(d) => zstd::bulk::Decompressor::with_dictionary(d)?,
                None => zstd::bulk::Decompressor::new()?,
            };
            let t = Instant::now();
            for f in frames {
                dctx.decompress(f, cap)?;
            }
            Ok(t.elapsed())
        };
    for level in [3, 9, 15, 19] {
        let mut c = zstd::bulk::Compressor::new(level)?;
        let t = Instant::now();
        let frames = unique
            .iter()
            .map(|u| c.compress(u))
            .collect::<io::Result<Vec<_>>>()?;
        let t = t.elapsed();
        let d = time_decompress(&frames, None, ChunkingParams::CURRENT.max as usize)?;
        row(&format!("per chunk, level {level}"), frames, t, d);
    }
    // A dictionary trained on a sample of the chunks (about 100× its size, spread evenly).
    let dict_size = 112 * 1024;
    let step = (bytes / (100 * dict_size as u64)).max(1) as usize;
    let samples: Vec<&[u8]> = unique.iter().step_by(step).map(|c| &c[..]).collect();
    let t = Instant::now();
    let dict = zstd::dict::from_samples(&samples, dict_size)?;
    let train = t.elapsed();
    for level in [3, 19] {
        let mut c = zstd::bulk::Compressor::with_dictionary(level, &dict)?;
        let t = Instant::now();
        let mut frames = unique
            .iter()
            .map(|u| c.compress(u))
            .collect::<io::Result<Vec<_>>>()?;
        let t = t.elapsed();
        let d = time_decompress(&frames, Some(&dict), ChunkingParams::CURRENT.max as usize)?;
        frames.push(dict.clone()); // the dictionary is stored too
        row(
            &format!(
                "per chunk + {} KiB dictionary (trained in {:.1} s), level {level}",
                dict_size / 1024,
                train.as_secs_f64()
            ),
            frames,
            t,
            d,
        );
    }
    // Runs of adjacent chunks in one frame (a read then decompresses up to a whole block).
    for block in [1usize << 20, 4 << 20] {
        let mut blocks: Vec<Vec<u8>> = vec![Vec::new()];
        for u in &unique {
            if blocks.last().is_some_and(|b| b.len() + u.len() > block) {
                blocks.push(Vec::new());
            }
            if let Some(b) = blocks.last_mut() {
                b.extend_from_slice(u);
            }
        }
        let mut c = zstd::bulk::Compressor::new(19)?;
        let t = Instant::now();
        let frames = blocks
            .iter()
            .map(|b| c.compress(b))
            .collect::<io::Result<Vec<_>>>()?;
        let t = t.elapsed();
        let d = time_decompress(&frames, None, block)?;
        row(
            &format!("blocks of ≤ {} MiB, level 19", block >> 20),
            frames,
            t,
            d,
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let none = args.corpus.join("cache-none");
    let xz = args.corpus.join("cache-xz");
    let nars = nar_files(&none).context("reading cache-none/nar")?;
    let total: u64 = nars
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "corpus {}: {} NARs, {:.1} MB uncompressed",
        args.corpus.display(),
        nars.len(),
        total as f64 / 1e6
    );

    if !args.skip_params {
        println!("\n## Chunking parameters (unique bytes after dedup; zstd -3 per chunk)");
        println!("| avg chunk | normalised | chunks | unique MB | dedup × | zstd MB | vs raw × |");
        println!("|---|---|---|---|---|---|---|");
        for params in ChunkingParams::CANDIDATES {
            for normalise in [false, true] {
                let (unique, compressed, count) = measure_params(&nars, params, normalise)?;
                println!(
                    "| {} KiB | {} | {} | {:.1} | {:.2} | {:.1} | {:.2} |",
                    params.avg / 1024,
                    if normalise { "yes" } else { "no" },
                    count,
                    unique as f64 / 1e6,
                    total as f64 / unique as f64,
                    compressed as f64 / 1e6,
                    total as f64 / compressed as f64
                );
            }
        }
    }

    measure_normalisation(&args.corpus, &none, total)?;

    if args.levels {
        measure_levels(&nars, total)?;
    }

    // Reference: zstd -3 alone over the same bytes (one process, all NARs).
    let t = Instant::now();
    let mut child = Command::new("zstd")
        .args(["-3", "-q", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("running zstd (apt-get install zstd)")?;
    {
        let mut stdin = child.stdin.take().context("zstd stdin")?;
        for p in &nars {
            io::copy(&mut File::open(p)?, &mut stdin)?;
        }
    }
    if !child.wait()?.success() {
        bail!("zstd failed");
    }
    let zstd_time = t.elapsed();

    // Ours: ingest the same uncompressed NARs (cache-none) into a fresh store.
    let tmp = tempfile::tempdir()?;
    let store = Store::open(tmp.path())?;
    let cache = BinaryCache::open(&format!("file://{}", none.display()))?;
    let t = Instant::now();
    let report = import::import(&store, &cache, Selection::All, &[], |_, _| {})?;
    let ingest_time = t.elapsed();
    if !report.failed.is_empty() {
        bail!(
            "ingest refused {} paths: {}",
            report.failed.len(),
            report.failed[0]
        );
    }
    let stats = store.stats()?;

    println!("\n## Ingest (uncompressed NARs → store) vs zstd -3 on the same bytes");
    println!("| | time s | MB/s |");
    println!("|---|---|---|");
    println!(
        "| zstd -3 | {:.2} | {:.0} |",
        zstd_time.as_secs_f64(),
        mbps(total, zstd_time)
    );
    println!(
        "| nix-p2p-cache ingest | {:.2} | {:.0} |",
        ingest_time.as_secs_f64(),
        mbps(total, ingest_time)
    );
    println!(
        "ratio ingest / zstd -3 = {:.2} (target ≤ 1.0)",
        ingest_time.as_secs_f64() / zstd_time.as_secs_f64()
    );

    let xz_bytes = du(&xz);
    if args.compaction {
        measure_compaction(&none, xz_bytes)?;
    }
    println!("\n## Stored bytes vs `nix copy --to file://…?compression=xz`");
    println!("| | bytes | MB |");
    println!("|---|---|---|");
    println!(
        "| xz binary cache (NARs + narinfos) | {xz_bytes} | {:.1} |",
        xz_bytes as f64 / 1e6
    );
    println!(
        "| nix-p2p-cache (packs + index) | {} | {:.1} |",
        stats.stored_bytes,
        stats.stored_bytes as f64 / 1e6
    );
    println!(
        "ratio = {:.3} (target ≤ 0.45); dedup {:.2}×, unique chunk bytes {:.1} MB, zstd {:.1} MB",
        stats.stored_bytes as f64 / xz_bytes as f64,
        stats.nar_bytes as f64 / stats.unique_chunk_bytes.max(1) as f64,
        stats.unique_chunk_bytes as f64 / 1e6,
        stats.chunk_compressed_bytes as f64 / 1e6
    );

    // Reassembly vs reading the plain files, before and after compaction.
    let t = Instant::now();
    for p in &nars {
        io::copy(&mut File::open(p)?, &mut io::sink())?;
    }
    let plain_time = t.elapsed();
    let reassemble = |store: &Store| -> Result<(u64, Duration)> {
        let t = Instant::now();
        let mut out = 0u64;
        for (_, rec) in store.narinfos()? {
            out += io::copy(&mut store.nar_reader(&rec.nar_hash)?, &mut io::sink())?;
        }
        Ok((out, t.elapsed()))
    };
    let (out, reasm_time) = reassemble(&store)?;

    let t = Instant::now();
    let report = store.compact(
        CompactOptions {
            level: 19,
            min_age: Duration::ZERO,
            max_packs: None,
        },
        &|| false,
    )?;
    let compact_time = t.elapsed();
    drop(store);
    let mut store = Store::open(tmp.path())?;
    store.compact_index()?;
    let compacted = store.stats()?;
    let (out2, reasm2_time) = reassemble(&store)?;
    let problems = store.verify(|_| {})?;
    if !problems.is_empty() {
        bail!("the compacted store does not verify: {}", problems[0]);
    }
    println!("\n## Cold compaction (`compact --level 19`, one thread)");
    println!("| | bytes | MB | vs xz cache × |");
    println!("|---|---|---|---|");
    println!(
        "| after ingest (packs + index) | {} | {:.1} | {:.3} |",
        stats.stored_bytes,
        stats.stored_bytes as f64 / 1e6,
        stats.stored_bytes as f64 / xz_bytes as f64
    );
    println!(
        "| after compaction (packs + index) | {} | {:.1} | {:.3} |",
        compacted.stored_bytes,
        compacted.stored_bytes as f64 / 1e6,
        compacted.stored_bytes as f64 / xz_bytes as f64
    );
    println!(
        "compaction: {} packs in, {} out, {} records ({} kept), {:.1} s ({:.1} MB/s of chunks)",
        report.packs_in,
        report.packs_out,
        report.records,
        report.records_kept,
        compact_time.as_secs_f64(),
        mbps(stats.unique_chunk_bytes, compact_time)
    );

    println!("\n## Reassembly (verified: chunk ids + NarHash)");
    println!("| | MB | MB/s |");
    println!("|---|---|---|");
    println!(
        "| read plain NAR files (page cache) | {:.1} | {:.0} |",
        total as f64 / 1e6,
        mbps(total, plain_time)
    );
    println!(
        "| nix-p2p-cache reassembly, after ingest | {:.1} | {:.0} |",
        out as f64 / 1e6,
        mbps(out, reasm_time)
    );
    println!(
        "| nix-p2p-cache reassembly, after compaction | {:.1} | {:.0} |",
        out2 as f64 / 1e6,
        mbps(out2, reasm2_time)
    );

    // Informational: import straight from the xz cache (xz decompression dominates).
    let tmp2 = tempfile::tempdir()?;
    let store2 = Store::open(tmp2.path())?;
    let cache = BinaryCache::open(&format!("file://{}", xz.display()))?;
    let t = Instant::now();
    let r = import::import(&store2, &cache, Selection::All, &[], |_, _| {})?;
    println!(
        "\nimport from the xz cache: {} paths in {:.2} s ({:.0} MB/s of NAR)",
        r.imported,
        t.elapsed().as_secs_f64(),
        mbps(r.nar_bytes, t.elapsed())
    );
    Ok(())
}
