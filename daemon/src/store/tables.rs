//! The index tables (redb). Versioned names: a format change is a new table name.

use redb::TableDefinition;

/// Chunk BLAKE3 digest → (pack, record offset, compressed len, raw len, refcount).
pub const CHUNKS: TableDefinition<[u8; 32], (u32, u64, u32, u32, u32)> =
    TableDefinition::new("chunks-v1");
/// NarHash digest (the NAR key) → prost `NarManifest`.
pub const MANIFESTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("manifests-v1");
/// NarHash digest → number of narinfos that point at the manifest.
pub const MANIFEST_REFS: TableDefinition<[u8; 32], u32> = TableDefinition::new("manifest-refs-v1");
/// Store-path hash (32 nix-base32 chars) → prost `StoredNarInfo`.
pub const NARINFOS: TableDefinition<&str, &[u8]> = TableDefinition::new("narinfos-v1");
/// NAR file name a narinfo was received with (`<FileHash>.nar.xz`, …) → NarHash digest, so
/// a client that cached the original narinfo can still fetch its NAR (recompressed).
pub const NAR_FILES: TableDefinition<&str, [u8; 32]> = TableDefinition::new("nar-files-v1");
/// Pack id → committed length (bytes past it are an uncommitted tail).
pub const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs-v1");
/// Counters kept in step with the tables above.
pub const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters-v1");

pub const C_NARS: &str = "nars";
pub const C_NAR_BYTES: &str = "nar_bytes";
pub const C_CHUNKS: &str = "chunks";
pub const C_UNIQUE_CHUNK_BYTES: &str = "unique_chunk_bytes";
pub const C_CHUNK_COMPRESSED_BYTES: &str = "chunk_compressed_bytes";
pub const C_NARINFOS: &str = "narinfos";

// The DHT's tables live in their own database, `dht.redb` (`store::dht::DhtStore`), not in
// `index.redb`: kad writes them on the swarm task, which must never wait on the index's writer.
// An index from before that may still hold them; `store::dht::migrate_from_index` moves them.

/// DHT keys this node provides (record key bytes) → unix time it first provided them.
/// Unbounded: one row per key we announce (`store::dht`).
pub const DHT_PROVIDED: TableDefinition<&[u8], u64> = TableDefinition::new("dht-provided-v1");
/// Provider records of other peers: (record key bytes, provider peer id bytes) →
/// (expiry in unix seconds, addresses as `u16 BE length ‖ multiaddr bytes`…). Bounded
/// (`store::dht::DhtLimits`).
pub const DHT_PROVIDERS: TableDefinition<DhtProviderKey, DhtProviderValue> =
    TableDefinition::new("dht-providers-v1");
/// (record key bytes, provider peer id bytes).
pub type DhtProviderKey = (&'static [u8], &'static [u8]);
/// (expiry in unix seconds, encoded addresses).
pub type DhtProviderValue = (u64, &'static [u8]);
/// DHT value records: record key bytes → (expiry in unix seconds, publisher peer id bytes or
/// empty, value). Bounded (`store::dht::DhtLimits`).
pub const DHT_RECORDS: TableDefinition<&[u8], DhtRecordValue> =
    TableDefinition::new("dht-records-v1");
/// (expiry in unix seconds, publisher peer id bytes or empty, value).
pub type DhtRecordValue = (u64, &'static [u8], &'static [u8]);
// Eviction and pack GC (issue 4, `evict.rs`).

/// Store-path hash → unix seconds it was pinned. A pinned path's NAR is never evicted.
pub const PINS: TableDefinition<&str, u64> = TableDefinition::new("pins-v1");
/// NarHash digest → unix seconds of its last ingest or serve (coalesced, see `Store::touch`).
pub const NAR_ACCESS: TableDefinition<[u8; 32], u64> = TableDefinition::new("nar-access-v1");
/// Pack id → bytes of records in it that no chunk row points at any more (dead, awaiting GC).
pub const PACK_DEAD: TableDefinition<u32, u64> = TableDefinition::new("pack-dead-v1");

/// Pack id → zstd level its records were rewritten at by compaction (`store::compact`). A
/// pack absent here holds records at the level they were ingested with.
pub const COMPACTED_PACKS: TableDefinition<u32, u8> = TableDefinition::new("packs-compacted-v1");

/// Store-path hash → (unix seconds hidden, unix seconds after which it is collected): paths a
/// GC policy selected, not served, announced nor shared until `undelete` (`store::retire`).
pub const HIDDEN: TableDefinition<&str, (u64, u64)> = TableDefinition::new("hidden-v1");
/// Store-path hash → (unix seconds collected, its prost `StoredNarInfo`): tombstones of
/// collected paths.
pub const TOMBSTONES: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("tombstones-v1");

/// NarHash digest → (unix seconds, store-path hash) of narinfos found at sources and served
/// while their NAR was not stored: Nix keeps a positive narinfo for a month, so after a restart
/// the NAR it then asks for is found again through its path (`Store::remember_served`).
/// Bounded: the oldest rows go first.
pub const SERVED_REMOTE: TableDefinition<[u8; 32], (u64, &str)> =
    TableDefinition::new("served-remote-v1");

/// Sum of `PACK_DEAD`.
pub const C_DEAD_BYTES: &str = "dead_bytes";

/// Store-path hash → where its newest metadata record is (`store::meta`): (pack, record
/// offset, compressed len, raw len, seq, record digest). Older records of the path are dead.
pub const NAR_META: TableDefinition<&str, crate::store::meta::MetaRow> =
    TableDefinition::new("nar-meta-v1");

/// Number of the last metadata record committed (`store::meta`).
pub const C_META_SEQ: &str = "meta_seq";

/// Settings the data directory was set up with: `storage` → where its sealed packs are
/// (`local` or `s3://BUCKET[/PREFIX]`).
pub const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings-v1");
pub const S_STORAGE: &str = "storage";
/// `trusted-keys` → the keys (sorted `name:base64`, space-separated) every narinfo's trust
/// class was last checked against (`Store::retrust`).
pub const S_TRUSTED_KEYS: &str = "trusted-keys";
