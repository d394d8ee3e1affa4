//! `Store`: the data directory — append-only pack files plus a redb index (design §3).
//!
//! Owns: `packs/` (chunk records, see [`pack`]), `index.redb` (see [`tables`]) and `dht.redb`
//! (the DHT's records, a database of its own so the swarm never waits on the index's writer:
//! see [`dht`]). This is the only module that touches a database. Everything here is
//! synchronous; async callers run it on `spawn_blocking` (the DHT store's callers excepted:
//! kad calls it on the swarm task, see [`dht`]).
//!
//! Invariants:
//! - ingests run in parallel: each reads, validates, normalises, chunks, hashes and compresses
//!   into its own [`Staging`] without any store-wide lock; only its commit takes the pack
//!   writer lock (copy the staged records the index lacks, fsync, one write transaction), and
//!   nothing waits on a network under it; an ingest reads at most NarSize + 1 bytes;
//! - pack bytes are fsynced before the transaction that points at them commits;
//! - a refused NAR leaves nothing behind: its staged records go with their unlinked file, a
//!   failed commit truncates the pack tail it wrote, nothing is committed;
//! - a chunk's refcount is the number of manifest entries naming it; a manifest's refcount the
//!   number of narinfos naming its NarHash;
//! - every byte read back is checked against its chunk id; every NAR stream against NarHash;
//! - a committed pack's bytes are its header, live records (a chunk row or a path's newest
//!   metadata record points at them) and dead ones (counted in `pack-dead-v1`), nothing else;
//!   eviction and pack GC: [`evict`].
//!
//! By responsibility: opening and index lookups here; `ingest`, `read` (`NarReader`),
//! `verify` (and stats), `evict` (pins, LRU, pack GC), `compact`, `retire` (soft-deleting
//! GC), `meta` and `repair` (metadata records, open's agreement check, `verify --repair`),
//! `packs`, `range_cache` and `upload` (where readers find packs; remote storage), `storage`
//! (the pack-storage trait and its local and S3 backends).

mod compact;
pub mod dht;
mod evict;
mod ingest;
pub(crate) mod meta;
pub mod pack;
mod packs;
mod range_cache;
mod read;
mod repair;
mod retire;
mod staging;
pub mod storage;
pub mod tables;
mod upload;
mod verify;

pub use compact::{CompactOptions, CompactReport};
pub use evict::{EvictReport, GcPolicy, GcReport, RemovedPath, Retention};
pub use ingest::RetrustReport;
pub use read::NarReader;
pub use repair::{repair, RepairReport};
pub use retire::{CollectReport, PathFacts, PathState};
pub use staging::Staging;
pub use upload::UploadReport;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix_p2p_cache_proto::v1 as pb;
use prost::Message;
use redb::{Database, ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};

use crate::core::chunker::{self, ChunkingParams};
use crate::core::manifest::{ChunkEntry, Manifest, ManifestError};
use crate::core::nar::{NarError, NarValidator};
use crate::core::narinfo::NarInfo;
use crate::core::normalise::{Normaliser, RefSet};
use crate::core::signing::Trust;
use crate::core::{ChunkId, NarHash};
use meta::{MetaLoc, NarMeta};
use pack::{Location, PackError, PackWriter};
use packs::{PackFiles, PackHandle};
use tables::*;

/// Default zstd level for chunk records.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("index: {0}")]
    Db(Box<redb::Error>),
    #[error(transparent)]
    Pack(Box<PackError>),
    #[error("{store_path}: reading the NAR failed: {source}")]
    NarRead {
        store_path: String,
        #[source]
        source: io::Error,
    },
    #[error("{store_path}: malformed NAR: {source}")]
    BadNar {
        store_path: String,
        #[source]
        source: Box<NarError>,
    },
    #[error("{store_path}: NAR hashes to {actual}, but its narinfo says NarHash {expected}")]
    NarHashMismatch {
        store_path: String,
        expected: NarHash,
        actual: NarHash,
    },
    #[error("{store_path}: NAR is {actual} bytes, but its narinfo says NarSize {expected}")]
    NarSizeMismatch {
        store_path: String,
        expected: u64,
        actual: u64,
    },
    #[error("NAR {0} is not in the store")]
    NoSuchNar(NarHash),
    #[error("manifest of {nar_hash} is damaged: {source}")]
    BadManifest {
        nar_hash: NarHash,
        #[source]
        source: Box<ManifestError>,
    },
    #[error("manifest of {nar_hash} names chunk {chunk}, which the index does not have")]
    MissingChunk { nar_hash: NarHash, chunk: ChunkId },
    #[error("stored narinfo for {0} is damaged")]
    BadRecord(String),
    #[error(
        "{0}: the index (or the DHT database) is locked by another process (is the daemon \
         running on this data directory? stop it first)"
    )]
    Locked(PathBuf),
    #[error("{0} is not in the store")]
    NotStored(String),
    #[error(transparent)]
    Storage(Box<storage::StorageError>),
    #[error(
        "{dir} keeps its sealed packs in {recorded}, but it was opened with {given}: give \
         --storage {recorded} (and its --s3-endpoint)",
        dir = dir.display()
    )]
    StorageMismatch {
        dir: PathBuf,
        recorded: String,
        given: String,
    },
    #[error(
        "{dir}: the index does not match the packs ({reason}); nothing was changed. Rebuild the \
         index from the packs with `nix-p2p-cache verify --repair --data-dir {dir}`",
        dir = dir.display()
    )]
    IndexMismatch { dir: PathBuf, reason: String },
    #[error(
        "{path} is damaged ({reason}); nothing was changed and the packs are untouched. Move \
         it aside, then {remedy}"
    )]
    DamagedDatabase {
        path: PathBuf,
        reason: String,
        remedy: &'static str,
    },
}

/// Creates every table of the index, so readers never meet a missing one.
fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(CHUNKS)?;
    txn.open_table(MANIFESTS)?;
    txn.open_table(MANIFEST_REFS)?;
    txn.open_table(NARINFOS)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(NAR_FILES)?;
    txn.open_table(PINS)?;
    txn.open_table(NAR_ACCESS)?;
    txn.open_table(PACK_DEAD)?;
    txn.open_table(COMPACTED_PACKS)?;
    txn.open_table(HIDDEN)?;
    txn.open_table(TOMBSTONES)?;
    txn.open_table(SERVED_REMOTE)?;
    txn.open_table(NAR_META)?;
    txn.open_table(SETTINGS)?;
    txn.open_table(PACKS)?;
    Ok(())
}

/// Opens (creating if needed) a redb database. A file redb cannot make sense of — redb
/// asserts on some truncated files — is [`StoreError::DamagedDatabase`], never a panic, and
/// the file is left as it is (`remedy` says what to do instead); one another process holds is
/// [`StoreError::Locked`].
pub(crate) fn open_database(
    path: &Path,
    dir: &Path,
    remedy: &'static str,
) -> Result<Database, StoreError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {})); // redb's assertion is reported as an error below
    let r = std::panic::catch_unwind(|| Database::create(path));
    std::panic::set_hook(hook);
    match r {
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unreadable".into());
            Err(StoreError::DamagedDatabase {
                path: path.to_path_buf(),
                reason,
                remedy,
            })
        }
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(StoreError::Locked(dir.to_path_buf()))
        }
        Ok(Err(e @ redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)))) => {
            Err(StoreError::DamagedDatabase {
                path: path.to_path_buf(),
                reason: e.to_string(),
                remedy,
            })
        }
        Ok(r) => Ok(r?),
    }
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
impl From<storage::StorageError> for StoreError {
    fn from(e: storage::StorageError) -> Self {
        StoreError::Storage(Box::new(e))
    }
}

impl From<PackError> for StoreError {
    fn from(e: PackError) -> Self {
        StoreError::Pack(Box::new(e))
    }
}

db_errors!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Trust class of a stored narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustClass {
    /// Signed by a trusted key (named): may be announced and served to peers.
    Trusted(String),
    /// No trusted signature: local use only.
    Untrusted,
}

impl From<&Trust> for TrustClass {
    fn from(t: &Trust) -> Self {
        match t {
            Trust::Trusted { key } => TrustClass::Trusted(key.clone()),
            Trust::Untrusted => TrustClass::Untrusted,
        }
    }
}

/// A narinfo as stored.
#[derive(Debug, Clone)]
pub struct StoredNarInfo {
    /// The original text, byte for byte.
    pub text: String,
    pub trust: TrustClass,
    pub source: String,
    pub nar_hash: NarHash,
    pub added_unix: u64,
}

impl StoredNarInfo {
    /// The record of `info` (as `text`) received now from `source`.
    fn new(info: &NarInfo, text: &str, trust: &Trust, source: &str) -> Self {
        Self {
            text: text.to_string(),
            trust: trust.into(),
            source: source.to_string(),
            nar_hash: info.nar_hash,
            added_unix: now_unix(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let (trust, key) = match &self.trust {
            TrustClass::Trusted(k) => (1, k.clone()),
            TrustClass::Untrusted => (2, String::new()),
        };
        pb::StoredNarInfo {
            text: self.text.clone(),
            trust,
            trusted_key: key,
            source: self.source.clone(),
            nar_hash: self.nar_hash.0.to_vec(),
            added_unix: self.added_unix,
        }
        .encode_to_vec()
    }

    fn decode(hash: &str, b: &[u8]) -> Result<Self, StoreError> {
        let bad = || StoreError::BadRecord(hash.to_string());
        let r = pb::StoredNarInfo::decode(b).map_err(|_| bad())?;
        let trust = match r.trust {
            1 => TrustClass::Trusted(r.trusted_key),
            2 => TrustClass::Untrusted,
            _ => return Err(bad()),
        };
        Ok(Self {
            text: r.text,
            trust,
            source: r.source,
            nar_hash: NarHash::from_slice(&r.nar_hash).ok_or_else(bad)?,
            added_unix: r.added_unix,
        })
    }
}

/// What an ingest did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// The narinfo was already stored with the same NarHash: nothing changed.
    pub already_present: bool,
    /// The NAR itself was new (false: another store path had the same NAR).
    pub new_nar: bool,
    pub nar_size: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    pub new_chunk_bytes: u64,
    pub new_compressed_bytes: u64,
}

/// Sizes and counts (`nix-p2p-cache stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub narinfos: u64,
    pub nars: u64,
    pub nar_bytes: u64,
    pub chunks: u64,
    pub unique_chunk_bytes: u64,
    /// zstd-compressed bytes of live chunk records.
    pub chunk_compressed_bytes: u64,
    /// Bytes of all manifests (chunk lists and store-path slot tables) in the index.
    pub manifest_bytes: u64,
    /// Bytes of the live metadata records in the packs (what makes the index rebuildable).
    pub metadata_bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub index_bytes: u64,
    /// Everything on disk: packs + index.
    pub stored_bytes: u64,
    /// Store paths pinned (their NARs are never evicted).
    pub pinned_paths: u64,
    /// NARs named by at least one pinned store path.
    pub pinned_nars: u64,
    /// Bytes of pack records no chunk row points at any more (evicted or replaced NARs):
    /// still on disk, reclaimed by pack GC. Counted in `pack_bytes`.
    pub dead_bytes: u64,
    /// What `--max-cache-size` bounds: the same as `stored_bytes` (live and dead pack records,
    /// pack headers, the index file).
    pub cache_bytes: u64,
    /// `cache_bytes` without `dead_bytes`: what is left after a full pack GC.
    pub live_bytes: u64,
    /// Store paths a GC policy hid (collected after their grace period unless undeleted).
    pub hidden_paths: u64,
    /// Tombstones: collected paths whose narinfo is kept.
    pub collected_paths: u64,
    /// Remote pack storage, if the sealed packs are there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageStats>,
}

/// Remote pack storage: where, and what was asked of it since the store was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StorageStats {
    /// `s3`.
    pub backend: &'static str,
    /// Bucket, prefix and endpoint (never credentials).
    pub location: String,
    /// Sealed packs in the storage.
    pub remote_packs: u64,
    /// Bytes of remote pack ranges in the local cache.
    pub cache_bytes: u64,
    #[serde(flatten)]
    pub requests: storage::StorageCounters,
}

/// Rows of `served-remote-v1` kept (about 100 bytes each).
pub const SERVED_REMOTE_MAX: u64 = 200_000;
/// How long a served narinfo is remembered: Nix's positive narinfo cache lasts 30 days.
pub const SERVED_REMOTE_TTL: u64 = 31 * 86_400;

/// The data directory.
pub struct Store {
    dir: PathBuf,
    db: Database,
    /// The DHT's records (`dht.redb`), shared with kad's record store; opened (created) on
    /// first use, so commands that never run the P2P layer leave no DHT database behind.
    dht: std::sync::OnceLock<Arc<dht::DhtStore>>,
    dht_init: Mutex<()>,
    writer: Mutex<PackWriter>,
    packs: Arc<PackFiles>,
    params: ChunkingParams,
    /// zstd level of chunk records written by this store.
    zstd_level: i32,
    /// Last-access times not written yet (see [`Store::touch`]).
    touches: Mutex<evict::Touches>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn loc_of(v: (u32, u64, u32, u32, u32)) -> (Location, u32) {
    (
        Location {
            pack: v.0,
            offset: v.1,
            comp_len: v.2,
            raw_len: v.3,
        },
        v.4,
    )
}

fn add_counter(t: &mut redb::Table<&str, u64>, name: &str, delta: i64) -> Result<(), StoreError> {
    let cur = t.get(name)?.map(|v| v.value()).unwrap_or(0);
    t.insert(name, cur.saturating_add_signed(delta))?;
    Ok(())
}

/// Where a store keeps its sealed packs, as the command line and config give it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StorageOptions {
    /// `s3://BUCKET[/PREFIX]` (credentials from the `AWS_*` variables or a credentials file);
    /// `None` or `local`: the data dir's `packs/`.
    pub storage: Option<String>,
    /// The S3 endpoint (`http://` allowed), path-style addressing.
    pub s3_endpoint: Option<String>,
    /// Bytes of remote pack ranges kept in `<data-dir>/pack-cache/` (default 1 GiB).
    pub cache_size: Option<u64>,
}

/// Default size of the local cache of remote pack ranges.
pub const DEFAULT_PACK_CACHE_SIZE: u64 = 1 << 30;

impl StorageOptions {
    /// Whether the storage and endpoint parse (without connecting).
    pub fn check(&self) -> Result<(), StoreError> {
        self.spec().map(|_| ())
    }

    fn spec(&self) -> Result<storage::StorageSpec, StoreError> {
        Ok(storage::StorageSpec::parse(
            self.storage.as_deref().unwrap_or("local"),
            self.s3_endpoint.as_deref(),
        )?)
    }
}

/// How the settings table names a storage (never the endpoint or credentials).
fn storage_name(spec: &storage::StorageSpec) -> String {
    match spec {
        storage::StorageSpec::Local => "local".into(),
        storage::StorageSpec::S3(t) if t.prefix.is_empty() => format!("s3://{}", t.bucket),
        storage::StorageSpec::S3(t) => format!("s3://{}/{}", t.bucket, t.prefix),
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_ZSTD_LEVEL)
    }

    pub fn open_with(dir: &Path, zstd_level: i32) -> Result<Self, StoreError> {
        Self::open_with_storage(dir, zstd_level, &StorageOptions::default())
    }

    /// Opens the store in `dir` with its sealed packs where `opts` says; a data dir keeps
    /// the storage it was first opened with (a local one may move to S3: its sealed packs
    /// are uploaded), and another is refused.
    pub fn open_with_storage(
        dir: &Path,
        zstd_level: i32,
        opts: &StorageOptions,
    ) -> Result<Self, StoreError> {
        let spec = opts.spec()?;
        let remote = match &spec {
            storage::StorageSpec::Local => None,
            storage::StorageSpec::S3(_) => Some(storage::open_storage(&spec, &dir.join("packs"))?),
        };
        Self::open_inner(dir, zstd_level, &spec, remote, opts.cache_size)
    }

    /// [`Store::open_with_storage`] with the remote storage (for `spec`) already open.
    fn open_inner(
        dir: &Path,
        zstd_level: i32,
        spec: &storage::StorageSpec,
        remote: Option<Arc<dyn storage::PackStorage>>,
        cache_size: Option<u64>,
    ) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let pack_dir = dir.join("packs");
        let index = dir.join("index.redb");
        let new_index = !index.exists();
        let db = open_database(
            &index,
            dir,
            "rebuild it from the packs with `nix-p2p-cache verify --repair`",
        )?;
        if new_index {
            // Private uploads are in here: only the daemon's user reads the index.
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&index, fs::Permissions::from_mode(0o600))
                .map_err(io_err(&index))?;
        }
        let given = storage_name(spec);
        let txn = db.begin_write()?;
        let (known, meta_seq) = {
            create_tables(&txn)?;
            let mut settings = txn.open_table(SETTINGS)?;
            let recorded = settings.get(S_STORAGE)?.map(|v| v.value().to_string());
            match recorded {
                Some(r) if r != given && r != "local" => {
                    return Err(StoreError::StorageMismatch {
                        dir: dir.to_path_buf(),
                        recorded: r,
                        given,
                    })
                }
                Some(r) if r == given => {}
                _ => {
                    settings.insert(S_STORAGE, given.as_str())?;
                }
            }
            drop(settings);
            let known = txn
                .open_table(PACKS)?
                .iter()?
                .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<std::collections::BTreeMap<u32, u64>, _>>()?;
            let seq = txn
                .open_table(COUNTERS)?
                .get(C_META_SEQ)?
                .map(|v| v.value())
                .unwrap_or(0);
            (known, seq)
        };
        txn.commit()?;
        let remote = match remote {
            None => None,
            Some(storage) => {
                let lens: HashMap<u32, u64> = match storage.list_packs() {
                    Ok(l) => l.into_iter().collect(),
                    // Down: what the index knows and the disk lacks is in the storage; the
                    // daemon serves what it can (narinfos, local packs) until it answers.
                    Err(e @ storage::StorageError::Unavailable { .. }) => {
                        tracing::warn!(
                            error = %e,
                            "pack storage unreachable: opening with the packs the index knows"
                        );
                        known
                            .iter()
                            .filter(|(p, _)| !pack::pack_path(&pack_dir, **p).exists())
                            .map(|(p, l)| (*p, *l))
                            .collect()
                    }
                    Err(e) => return Err(e.into()),
                };
                let cache_dir = dir.join("pack-cache");
                let cache = range_cache::RangeCache::open(
                    &cache_dir,
                    cache_size.unwrap_or(DEFAULT_PACK_CACHE_SIZE),
                )
                .map_err(io_err(&cache_dir))?;
                Some(Arc::new(packs::RemotePacks {
                    storage,
                    cache,
                    lens: Mutex::new(lens),
                    doomed: Mutex::default(),
                }))
            }
        };
        // Nothing is cut below unless the packs are proven to hold nothing the index lacks.
        let remote_lens = remote
            .as_ref()
            .map(|r| r.lens.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default();
        let adopted = repair::check_agreement(dir, &pack_dir, &known, meta_seq, &remote_lens, &db)?;
        let known = match adopted {
            None => known,
            Some(a) => {
                let record = StoredNarInfo::decode(&a.meta.hash, &a.meta.narinfo)?;
                let retention = if a.meta.pinned {
                    Retention::Pinned
                } else {
                    Retention::Cache
                };
                Self::commit_ingest(
                    &db,
                    &a.meta.hash,
                    a.meta.nar_file.as_deref(),
                    &record,
                    a.manifest.as_ref(),
                    &a.chunks,
                    &a.lengths,
                    &a.loc,
                    retention,
                    &mut IngestOutcome::default(),
                )?;
                tracing::warn!(
                    path = a.meta.hash,
                    "committed a NAR whose commit a crash interrupted after its records were written"
                );
                let txn = db.begin_read()?;
                let packs = txn.open_table(PACKS)?;
                packs
                    .iter()?
                    .map(|r| r.map(|(k, v)| (k.value(), v.value())))
                    .collect::<Result<std::collections::BTreeMap<u32, u64>, _>>()?
            }
        };
        let known_ids: HashSet<u32> = known.keys().copied().collect();
        evict::sweep_orphan_packs(&pack_dir, &known_ids)?;
        if let Some(r) = &remote {
            // Remote packs the index no longer knows (below its last): a pack GC's, whose
            // delayed delete a stop cut short.
            let last = known.keys().next_back().copied().unwrap_or(0);
            for &p in remote_lens.keys() {
                if !known.contains_key(&p) && p < last {
                    tracing::info!(pack = p, "deleting a remote pack the index does not know");
                    r.storage.delete_pack(p)?;
                    r.lens.lock().unwrap_or_else(|e| e.into_inner()).remove(&p);
                }
            }
        }
        let (pack, committed) = match known.last_key_value() {
            // The last pack was sealed and uploaded: appends start a new one.
            Some((&p, _))
                if !pack::pack_path(&pack_dir, p).exists() && remote_lens.contains_key(&p) =>
            {
                (p + 1, None)
            }
            Some((&p, &len)) => (p, Some(len)),
            None => (1, None),
        };
        let packs = Arc::new(PackFiles::new(pack_dir.clone(), remote));
        let writer = PackWriter::open(&pack_dir, pack, committed)?;
        let store = Self {
            dir: dir.to_path_buf(),
            db,
            dht: std::sync::OnceLock::new(),
            dht_init: Mutex::new(()),
            writer: Mutex::new(writer),
            packs,
            params: ChunkingParams::CURRENT,
            zstd_level,
            touches: Mutex::default(),
        };
        store.describe_undescribed_paths()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The DHT's records: their own database, whose writes never wait on this store's
    /// (ingest, eviction) and which kad's record store holds without holding the `Store`.
    /// Opened on first use; DHT tables an older index still holds move there then.
    pub fn dht(&self) -> Result<&Arc<dht::DhtStore>, StoreError> {
        if let Some(d) = self.dht.get() {
            return Ok(d);
        }
        let _init = self.dht_init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = self.dht.get() {
            return Ok(d);
        }
        let d = Arc::new(dht::DhtStore::open(&self.dir)?);
        dht::migrate_from_index(&self.db, &d)?;
        Ok(self.dht.get_or_init(|| d))
    }

    /// Begins a write transaction on the index and hands it over: every other index write
    /// (ingest, pin, eviction…) waits until it is dropped. For tests that need a busy index.
    #[cfg(test)]
    pub(crate) fn hold_index_write(&self) -> redb::WriteTransaction {
        self.db.begin_write().expect("index write transaction")
    }

    /// The stored narinfo of a store-path hash, unless it is hidden (a GC policy selected it:
    /// not served, announced nor shared until `undelete`).
    pub fn narinfo(&self, hash: &str) -> Result<Option<StoredNarInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        if txn.open_table(HIDDEN)?.get(hash)?.is_some() {
            return Ok(None);
        }
        let t = txn.open_table(NARINFOS)?;
        let Some(v) = t.get(hash)? else {
            return Ok(None);
        };
        Ok(Some(StoredNarInfo::decode(hash, v.value())?))
    }

    /// All stored narinfos, by store-path hash.
    pub fn narinfos(&self) -> Result<Vec<(String, StoredNarInfo)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NARINFOS)?;
        let mut out = Vec::new();
        for r in t.iter()? {
            let (k, v) = r?;
            let hash = k.value().to_string();
            let rec = StoredNarInfo::decode(&hash, v.value())?;
            out.push((hash, rec));
        }
        Ok(out)
    }

    /// The NarHash of a NAR file name some narinfo was received with (see `NAR_FILES`).
    pub fn nar_hash_by_file(&self, name: &str) -> Result<Option<NarHash>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NAR_FILES)?;
        Ok(t.get(name)?.map(|v| NarHash(v.value())))
    }

    pub fn has_nar(&self, nar_hash: &NarHash) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MANIFESTS)?;
        Ok(t.get(nar_hash.0)?.is_some())
    }

    /// The manifest of a NAR, checked.
    pub fn manifest(&self, nar_hash: &NarHash) -> Result<Option<Manifest>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MANIFESTS)?;
        let Some(v) = t.get(nar_hash.0)? else {
            return Ok(None);
        };
        let m = Manifest::decode(v.value()).map_err(|source| StoreError::BadManifest {
            nar_hash: *nar_hash,
            source: Box::new(source),
        })?;
        Ok(Some(m))
    }

    /// The stored manifest bytes (prost `NarManifest`) of a NAR, checked by decoding them and
    /// matching their NarHash: what a peer is sent.
    pub fn manifest_bytes(&self, nar_hash: &NarHash) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MANIFESTS)?;
        let Some(v) = t.get(nar_hash.0)? else {
            return Ok(None);
        };
        let bytes = v.value().to_vec();
        let bad = |source| StoreError::BadManifest {
            nar_hash: *nar_hash,
            source: Box::new(source),
        };
        let m = Manifest::decode(&bytes).map_err(bad)?;
        if m.nar_hash != *nar_hash {
            return Err(bad(ManifestError::BadNarHash));
        }
        Ok(Some(bytes))
    }

    /// Which of `ids` are stored (index only; the bytes are checked when read). One read
    /// transaction for them all.
    pub fn stored_chunks(&self, ids: &[ChunkId]) -> Result<HashSet<ChunkId>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        let mut out = HashSet::new();
        for id in ids {
            if t.get(id.0)?.is_some() {
                out.insert(*id);
            }
        }
        Ok(out)
    }

    /// Whether a chunk is stored (index only; the bytes are checked when read).
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHUNKS)?;
        Ok(t.get(id.0)?.is_some())
    }

    /// Store-path hashes of the narinfos with a trusted signature (what peers may be told
    /// about). One scan of the narinfo table.
    pub fn shareable_paths(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        self.for_each_trusted(|hash, _| out.push(hash.to_string()))?;
        Ok(out)
    }

    /// Calls `f` with the store-path hash and record of every narinfo with a trusted
    /// signature that is not hidden: what peers may be told about. One scan of the narinfo
    /// table.
    fn for_each_trusted(&self, mut f: impl FnMut(&str, StoredNarInfo)) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(NARINFOS)?;
        let hidden = txn.open_table(HIDDEN)?;
        for r in t.iter()? {
            let (k, v) = r?;
            if hidden.get(k.value())?.is_some() {
                continue;
            }
            let rec = StoredNarInfo::decode(k.value(), v.value())?;
            if matches!(rec.trust, TrustClass::Trusted(_)) {
                f(k.value(), rec);
            }
        }
        Ok(())
    }

    /// Remembers narinfos served from sources (NarHash, store-path hash), so that the NAR Nix
    /// asks for later — even after a restart — can be found again. One transaction; the table
    /// keeps at most [`SERVED_REMOTE_MAX`] rows (oldest out) and rows for at most
    /// [`SERVED_REMOTE_TTL`] seconds.
    pub fn remember_served(&self, served: &[(NarHash, String)]) -> Result<(), StoreError> {
        if served.is_empty() {
            return Ok(());
        }
        let now = now_unix();
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(SERVED_REMOTE)?;
            for (nar, path) in served {
                t.insert(nar.0, (now, path.as_str()))?;
            }
            if t.len()? > SERVED_REMOTE_MAX + SERVED_REMOTE_MAX / 10 {
                let mut rows: Vec<(u64, [u8; 32])> = t
                    .iter()?
                    .map(|r| r.map(|(k, v)| (v.value().0, k.value())))
                    .collect::<Result<_, _>>()?;
                rows.sort_unstable();
                let excess = rows.len() - SERVED_REMOTE_MAX as usize;
                for (_, k) in &rows[..excess] {
                    t.remove(k)?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Forgets served narinfos by NarHash (no source could bring their NAR).
    pub fn forget_served(&self, nar_hashes: &[NarHash]) -> Result<(), StoreError> {
        if nar_hashes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(SERVED_REMOTE)?;
            for nar in nar_hashes {
                t.remove(nar.0)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// The store-path hash of a narinfo served from a source with this NarHash, within
    /// [`SERVED_REMOTE_TTL`].
    pub fn served_path(&self, nar_hash: &NarHash) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SERVED_REMOTE)?;
        Ok(t.get(nar_hash.0)?.and_then(|v| {
            let (at, path) = v.value();
            (now_unix().saturating_sub(at) <= SERVED_REMOTE_TTL).then(|| path.to_string())
        }))
    }

    /// How many narinfos the store holds (one counter read: a cheap change check).
    pub fn narinfo_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let c = txn.open_table(COUNTERS)?;
        Ok(c.get(C_NARINFOS)?.map(|v| v.value()).unwrap_or(0))
    }

    /// NarHashes named by at least one narinfo with a trusted signature: the NARs that may be
    /// announced and served to peers (design §5). One scan of the narinfo table.
    pub fn shareable_nars(&self) -> Result<HashSet<NarHash>, StoreError> {
        let mut out = HashSet::new();
        self.for_each_trusted(|_, rec| {
            out.insert(rec.nar_hash);
        })?;
        Ok(out)
    }

    /// Compacts the index file (reclaims free pages after a large import). Needs exclusive use.
    pub fn compact_index(&mut self) -> Result<bool, StoreError> {
        self.db
            .compact()
            .map_err(|e| StoreError::Db(Box::new(e.into())))
    }
}

/// The NAR file name a narinfo's `URL` gives (`<FileHash>.nar.xz`, …), kept in `NAR_FILES`.
fn nar_file_name(url: &str) -> Option<&str> {
    Path::new(url)
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.contains(".nar"))
}

/// Creates the data dir (and missing parents) readable by its owner only: it holds private
/// uploads. An existing dir keeps its mode (the operator's, or systemd's `StateDirectory`).
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    if dir.exists() {
        return Err(io_err(dir)(io::Error::new(
            io::ErrorKind::NotADirectory,
            "the data directory is not a directory",
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Runs `f` with this thread's decompression context (making one costs more than decompressing
/// a small chunk, and chunk reads come one at a time).
fn with_thread_dctx<T>(
    dir: &Path,
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = match &mut *slot {
            Some(d) => d,
            None => slot.insert(new_dctx(dir)?),
        };
        f(dctx)
    })
}

fn new_dctx(dir: &Path) -> Result<zstd::bulk::Decompressor<'static>, StoreError> {
    zstd::bulk::Decompressor::new().map_err(io_err(dir))
}

fn add_ref(refs: &mut redb::Table<[u8; 32], u32>, nar_hash: &NarHash) -> Result<(), StoreError> {
    let cur = refs.get(nar_hash.0)?.map(|v| v.value()).unwrap_or(0);
    refs.insert(nar_hash.0, cur + 1)?;
    Ok(())
}

/// What releasing a manifest's last reference freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Released {
    nar_size: u64,
    chunks: u64,
    /// Pack record bytes (headers + frames) that became dead.
    dead_bytes: u64,
}

/// Drops one narinfo reference to a manifest; the last one removes the manifest and releases
/// its chunks (chunk rows at refcount 0 go; their records become dead bytes of their pack,
/// awaiting pack GC). `None`: other narinfos still name the NAR.
fn release_manifest(
    manifests: &mut redb::Table<[u8; 32], &[u8]>,
    refs: &mut redb::Table<[u8; 32], u32>,
    chunks_t: &mut redb::Table<[u8; 32], (u32, u64, u32, u32, u32)>,
    counters: &mut redb::Table<&str, u64>,
    dead: &mut redb::Table<u32, u64>,
    nar_hash: &NarHash,
) -> Result<Option<Released>, StoreError> {
    let cur = refs.get(nar_hash.0)?.map(|v| v.value()).unwrap_or(0);
    if cur > 1 {
        refs.insert(nar_hash.0, cur - 1)?;
        return Ok(None);
    }
    refs.remove(nar_hash.0)?;
    let Some(bytes) = manifests.remove(nar_hash.0)?.map(|v| v.value().to_vec()) else {
        return Ok(None);
    };
    let m = Manifest::decode(&bytes).map_err(|source| StoreError::BadManifest {
        nar_hash: *nar_hash,
        source: Box::new(source),
    })?;
    add_counter(counters, C_NARS, -1)?;
    add_counter(counters, C_NAR_BYTES, -(m.nar_size as i64))?;
    let mut released = Released {
        nar_size: m.nar_size,
        ..Default::default()
    };
    for c in &m.chunks {
        let Some(mut v) = chunks_t.get(c.id.0)?.map(|v| v.value()) else {
            continue;
        };
        if v.4 > 1 {
            v.4 -= 1;
            chunks_t.insert(c.id.0, v)?;
        } else {
            chunks_t.remove(c.id.0)?;
            add_counter(counters, C_CHUNKS, -1)?;
            add_counter(counters, C_UNIQUE_CHUNK_BYTES, -(v.3 as i64))?;
            add_counter(counters, C_CHUNK_COMPRESSED_BYTES, -(v.2 as i64))?;
            let (loc, _) = loc_of(v);
            evict::add_dead(dead, counters, loc.pack, loc.record_len() as i64)?;
            released.chunks += 1;
            released.dead_bytes += loc.record_len();
        }
    }
    Ok(Some(released))
}

/// Fixtures shared by the store's and the network's tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::io::Cursor;

    use super::*;
    use crate::core::nar::{write_nar, Node};
    use crate::core::signing::{verify_narinfo, SecretKey};

    /// `len` pseudo-random bytes from `seed` (incompressible, so chunks stay distinct).
    pub fn noise(seed: u8, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut out);
        out
    }

    /// The NAR as the store reassembles it (whole, checked).
    pub fn read_nar(store: &Store, nar_hash: &NarHash) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut store.nar_reader(nar_hash).unwrap(), &mut out).unwrap();
        out
    }

    /// A NAR of a few hundred KiB (several chunks) that mentions another store path.
    pub fn sample_nar(seed: u8) -> Vec<u8> {
        let mut entries = BTreeMap::new();
        entries.insert(
            "blob".to_string(),
            Node::Regular {
                executable: false,
                contents: noise(seed, 700 * 1024),
            },
        );
        let mut script = b"#!/nix/store/0123456789abcdfghijklmnpqrsvwxyz-bash/bin/sh\n".to_vec();
        script.extend_from_slice(&noise(seed.wrapping_add(1), 4096));
        entries.insert(
            "run".to_string(),
            Node::Regular {
                executable: true,
                contents: script,
            },
        );
        let mut nar = Vec::new();
        write_nar(&mut nar, &Node::Directory(entries)).expect("valid tree");
        nar
    }

    /// Ingests `nar` as `/nix/store/<hash>-sample`, signed by `key` when given; trusted iff
    /// `key`'s public half is in `trusted`. A cache entry (not pinned).
    pub fn ingest(
        store: &Store,
        hash: &str,
        nar: &[u8],
        key: Option<&SecretKey>,
        trusted: &[crate::core::signing::PublicKey],
    ) -> NarInfo {
        ingest_as(store, hash, nar, key, trusted, Retention::Cache)
    }

    /// [`ingest`] with a retention.
    pub fn ingest_as(
        store: &Store,
        hash: &str,
        nar: &[u8],
        key: Option<&SecretKey>,
        trusted: &[crate::core::signing::PublicKey],
        retention: Retention,
    ) -> NarInfo {
        let nar_hash = NarHash::digest(nar);
        let text = format!(
            "StorePath: /nix/store/{hash}-sample\nURL: nar/{}.nar\nCompression: none\n\
             NarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
            nar_hash.to_base32(),
            nar.len()
        );
        let mut info = NarInfo::parse(&text).expect("valid narinfo");
        if let Some(k) = key {
            info.sigs.push(k.sign(&info.fingerprint()));
        }
        let text = info.to_text();
        let trust = verify_narinfo(&info, trusted).expect("verifiable");
        store
            .ingest_with(&info, &text, &trust, "test", retention, || {
                Ok(Cursor::new(nar.to_vec()))
            })
            .expect("ingest");
        info
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::core::signing::SecretKey;

    #[test]
    fn a_damaged_index_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            ingest(&store, &"a".repeat(32), &sample_nar(1), None, &[]);
        }
        let index = dir.path().join("index.redb");
        let len = fs::metadata(&index).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&index)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let before = fs::read(&index).unwrap();
        match Store::open(dir.path()) {
            Err(e @ StoreError::DamagedDatabase { .. }) => {
                assert!(e.to_string().contains("index.redb is damaged"), "{e}");
            }
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a half index opened"),
        }
        assert!(
            fs::read(&index).unwrap() == before,
            "the index is left as it was"
        );
        assert!(dir.path().join("packs/pack-00000001.pack").exists());
    }

    #[test]
    fn the_dht_database_exists_only_once_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        ingest(&store, &"a".repeat(32), &sample_nar(1), None, &[]);
        assert!(
            !dir.path().join("dht.redb").exists(),
            "import, stats, verify: no DHT"
        );
        store.dht().unwrap();
        assert!(dir.path().join("dht.redb").exists());
    }

    #[test]
    fn chunk_frames_manifests_and_shareable_nars() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = SecretKey::generate("test-1", [7; 32]);
        let trusted = [key.public_key()];
        let nar = sample_nar(1);
        let info = ingest(&store, &"a".repeat(32), &nar, Some(&key), &trusted);
        let private = sample_nar(2);
        let pinfo = ingest(&store, &"b".repeat(32), &private, None, &trusted);

        let m = store.manifest(&info.nar_hash).unwrap().unwrap();
        assert!(m.chunks.len() >= 2, "sample should span chunks");
        let mut rebuilt = Vec::new();
        for (off, c) in m.chunk_offsets() {
            assert!(store.has_chunk(&c.id).unwrap());
            let frame = store.chunk_frame(&c.id).unwrap().unwrap();
            let data = zstd::bulk::decompress(&frame, c.size as usize).unwrap();
            assert_eq!(ChunkId::of(&data), c.id);
            rebuilt.extend(m.restore(off, data));
        }
        assert_eq!(rebuilt, nar);

        let bytes = store.manifest_bytes(&info.nar_hash).unwrap().unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(store.manifest_bytes(&NarHash([9; 32])).unwrap(), None);
        assert_eq!(store.chunk_frame(&ChunkId([9; 32])).unwrap(), None);
        assert!(!store.has_chunk(&ChunkId([9; 32])).unwrap());

        let shareable = store.shareable_nars().unwrap();
        assert!(shareable.contains(&info.nar_hash));
        assert!(!shareable.contains(&pinfo.nar_hash));
        assert_eq!(shareable.len(), 1);
    }

    #[test]
    fn a_whole_nar_read_stops_at_a_damaged_chunk_before_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let nar = sample_nar(4);
        let info = ingest(&store, &"d".repeat(32), &nar, None, &[]);
        let m = store.manifest(&info.nar_hash).unwrap().unwrap();
        // The first chunk is noise: zstd keeps it as a raw block, so a flipped byte in the
        // middle of its frame still decodes — to wrong content.
        let first = m.chunks[0].id;
        let loc = {
            let txn = store.db.begin_read().unwrap();
            let t = txn.open_table(CHUNKS).unwrap();
            loc_of(t.get(first.0).unwrap().unwrap().value()).0
        };
        drop(store);
        let pack = pack::pack_path(&dir.path().join("packs"), loc.pack);
        let mut bytes = std::fs::read(&pack).unwrap();
        let at =
            (loc.offset + pack::RECORD_HEADER_LEN as u64 + u64::from(loc.comp_len) / 2) as usize;
        bytes[at] ^= 0x55;
        std::fs::write(&pack, bytes).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = store.nar_reader(&info.nar_hash).unwrap();
        assert!(
            r.next_block().is_err(),
            "the damaged first chunk is refused before any of its bytes go out"
        );
    }

    #[test]
    fn open_pack_handles_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let files = PackFiles::new(dir.path().to_path_buf(), None);
        use packs::OPEN_PACKS;
        for p in 1..=(OPEN_PACKS as u32 * 3) {
            std::fs::write(pack::pack_path(dir.path(), p), pack::FILE_HEADER).unwrap();
        }
        // One handle held by a reader the whole time: never closed under it.
        let held = files.open.lock().unwrap().get(&1).cloned();
        assert!(held.is_none());
        files.get(1).unwrap();
        let held = files.open.lock().unwrap().get(&1).cloned().unwrap();
        for p in 2..=(OPEN_PACKS as u32 * 3) {
            files.get(p).unwrap();
            assert!(files.open.lock().unwrap().len() <= OPEN_PACKS);
        }
        assert_eq!(Arc::strong_count(&held), 2, "the held pack stays cached");
        assert!(files.get(1).is_ok());
    }

    #[test]
    fn a_new_data_dir_and_index_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new").join("data");
        let store = Store::open(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(
            mode(&dir.join("index.redb")) & 0o077,
            0,
            "index readable by others"
        );
        drop(store);
        // An existing dir keeps the mode its operator gave it.
        let other = tmp.path().join("existing");
        std::fs::create_dir(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o750)).unwrap();
        drop(Store::open(&other).unwrap());
        assert_eq!(mode(&other), 0o750);
    }

    #[test]
    fn chunk_frame_refuses_a_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let nar = sample_nar(3);
        let info = ingest(&store, &"c".repeat(32), &nar, None, &[]);
        let m = store.manifest(&info.nar_hash).unwrap().unwrap();
        // Flip a byte in the middle of the pack: some chunk record is hit.
        let pack = pack::pack_path(&dir.path().join("packs"), 1);
        let mut bytes = std::fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&pack, bytes).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let errors = m
            .chunks
            .iter()
            .filter(|c| store.chunk_frame(&c.id).is_err())
            .count();
        assert_eq!(errors, 1);
    }
}
