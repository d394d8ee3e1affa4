//! Where sealed pack files live: a narrow, synchronous storage trait ([`PackStorage`]) with a
//! local-directory backend ([`LocalDir`]) and an S3 backend ([`S3Storage`]), plus the parsing
//! of where to store (`s3://BUCKET[/PREFIX]`, an endpoint, credentials from the environment).
//!
//! Owns: the bytes of sealed packs once they are handed over, and the counters of what was
//! asked of the storage. Knows nothing about records, chunks or the index: a pack is an opaque
//! byte string named by its id.
//!
//! Invariants:
//! - every method is synchronous and callable from any thread that is not running async code:
//!   plain threads, CLI code with no runtime, and `spawn_blocking` threads of any runtime (the
//!   S3 backend runs its client on a runtime of its own and waits for it with a blocking
//!   receive, so it never starts or enters a runtime on the caller's thread);
//! - a read returns exactly the bytes asked for or an error (a short read is an error);
//! - a put is idempotent and atomic as seen by readers: a pack is absent or whole;
//! - credentials come only from the environment or a credentials file, never from the command
//!   line, and never appear in a message, a log line or a `Debug` output.

mod local;
mod s3;
pub mod testing;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) use local::LocalDir;
pub(crate) use s3::{S3Config, S3Options, S3Storage};

/// A store of sealed pack files, addressed by pack id.
pub(crate) trait PackStorage: Send + Sync + fmt::Debug {
    /// `"local"` or `"s3"`: a label for metrics and logs.
    fn kind(&self) -> &'static str;
    /// Where the packs are, for humans (`s3://bucket/prefix at http://127.0.0.1:9000`); never
    /// credentials.
    fn describe(&self) -> String;
    /// Stores the sealed pack file at `path` as pack `pack`. Idempotent: storing the same pack
    /// again leaves the same bytes. Readers see the pack absent or whole, never in part.
    fn put_pack(&self, pack: u32, path: &Path) -> Result<(), StorageError>;
    /// Exactly `len` bytes of pack `pack` from `offset`, or an error ([`StorageError::ShortRead`]
    /// when the pack ends before). A zero-length read returns nothing and does no I/O.
    fn read_range(&self, pack: u32, offset: u64, len: u64) -> Result<Vec<u8>, StorageError>;
    /// The length of pack `pack`, or `None` when it is not stored.
    fn pack_len(&self, pack: u32) -> Result<Option<u64>, StorageError>;
    /// Every stored pack with its length, sorted by id; objects that are not packs are ignored.
    fn list_packs(&self) -> Result<Vec<(u32, u64)>, StorageError>;
    /// Removes pack `pack`; removing an absent pack is not an error.
    fn delete_pack(&self, pack: u32) -> Result<(), StorageError>;
    /// A snapshot of what was asked of this storage since it was opened.
    fn counters(&self) -> StorageCounters;
}

/// What a storage was asked to do, since it was opened.
///
/// Each operation counter counts trait calls that reached the storage (failed ones included;
/// a zero-length read does not count): `puts` per [`PackStorage::put_pack`] (a multipart upload
/// is one put), `gets` per [`PackStorage::read_range`] and [`PackStorage::pack_len`], `lists`
/// per [`PackStorage::list_packs`], `deletes` per [`PackStorage::delete_pack`]. `errors` counts
/// the calls among them that returned an error (`pack_len` of an absent pack is no error).
/// `bytes_in` are pack bytes read (downloaded), `bytes_out` pack bytes stored (uploaded);
/// `multipart_parts` the parts that multipart uploads sent (each one billed as a request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StorageCounters {
    pub puts: u64,
    pub gets: u64,
    pub deletes: u64,
    pub lists: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub errors: u64,
    pub multipart_parts: u64,
}

/// Which operation a counter or an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
}

impl Op {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The live counters behind [`StorageCounters`], shared by the backends.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    deletes: AtomicU64,
    lists: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    errors: AtomicU64,
    multipart_parts: AtomicU64,
}

impl Counters {
    /// Counts one call of `op` and, when it failed, one error; passes the result through.
    pub(crate) fn record<T>(
        &self,
        op: Op,
        result: Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let counter = match op {
            Op::Put => &self.puts,
            Op::Get => &self.gets,
            Op::List => &self.lists,
            Op::Delete => &self.deletes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &result {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(op = %op, error = %e, "pack storage call failed");
        }
        result
    }

    pub(crate) fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_multipart_part(&self) {
        self.multipart_parts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StorageCounters {
        StorageCounters {
            puts: self.puts.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            multipart_parts: self.multipart_parts.load(Ordering::Relaxed),
        }
    }
}

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("pack {pack} not found at {location}")]
    NotFound { pack: u32, location: String },
    #[error(
        "access denied to {location} (credentials from {credentials}): {detail}; check the key \
         pair and that it may read and write the bucket"
    )]
    AccessDenied {
        location: String,
        /// Where the credentials came from (environment variable names or a file and
        /// profile), never the credentials themselves.
        credentials: String,
        detail: String,
    },
    #[error("no S3 credentials: {tried}")]
    NoCredentials { tried: String },
    #[error("storage unavailable: {op} {location} at {endpoint} failed after retries: {detail}")]
    Unavailable {
        op: Op,
        location: String,
        endpoint: String,
        detail: String,
    },
    #[error(
        "short read of pack {pack}: wanted {wanted} bytes at offset {offset}, the pack has \
         {available} there"
    )]
    ShortRead {
        pack: u32,
        offset: u64,
        wanted: u64,
        available: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid storage configuration {spec:?}: {reason}")]
    Config { spec: String, reason: String },
    #[error("S3 {op} {location} at {endpoint} failed: {detail}")]
    S3 {
        op: Op,
        location: String,
        endpoint: String,
        detail: String,
    },
}

impl StorageError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The file name of pack `pack`, in a directory or under an object prefix.
pub(crate) fn pack_file_name(pack: u32) -> String {
    format!("pack-{pack:08}.pack")
}

/// The pack id of a file or object name made by [`pack_file_name`]; `None` for anything else
/// (temporary files, foreign objects, other spellings of a number).
pub(crate) fn parse_pack_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("pack-")?.strip_suffix(".pack")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u32 = digits.parse().ok()?;
    (pack_file_name(id) == name).then_some(id)
}

/// Where packs are stored, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StorageSpec {
    /// The store's own `packs/` directory.
    Local,
    /// An S3 bucket (credentials are looked up when it is opened).
    S3(S3Target),
}

/// An S3 bucket, a key prefix in it, and the endpoint that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Target {
    pub(crate) bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub(crate) prefix: String,
    /// `http(s)://host[:port]`; `None` for AWS's endpoint of the region.
    pub(crate) endpoint: Option<String>,
    pub(crate) region: String,
}

/// The region when `AWS_REGION` is not set.
pub(crate) const DEFAULT_REGION: &str = "us-east-1";

impl StorageSpec {
    /// Parses `local`, or `s3://BUCKET[/PREFIX]` with an optional endpoint URL
    /// (`--s3-endpoint`); the region comes from `AWS_REGION`, else [`DEFAULT_REGION`].
    pub(crate) fn parse(spec: &str, endpoint: Option<&str>) -> Result<StorageSpec, StorageError> {
        Self::parse_with_env(spec, endpoint, &|name| std::env::var(name).ok())
    }

    pub(crate) fn parse_with_env(
        spec: &str,
        endpoint: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<StorageSpec, StorageError> {
        let bad = |reason: &str| StorageError::Config {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if spec == "local" {
            if endpoint.is_some() {
                return Err(bad("an S3 endpoint was given for local storage"));
            }
            return Ok(StorageSpec::Local);
        }
        let Some(rest) = spec.strip_prefix("s3://") else {
            return Err(bad("expected `local` or `s3://BUCKET[/PREFIX]`"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_bucket_name(bucket) {
            return Err(bad(
                "the bucket name must be 3-63 characters of a-z, 0-9, '.' and '-'",
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == "." || p == "..")
            || prefix.contains("//")
            || prefix.chars().any(|c| c.is_control() || c == '\\')
        {
            return Err(bad(
                "the prefix must be /-separated names without empty, `.` or `..` parts",
            ));
        }
        let endpoint = endpoint
            .map(|e| validate_endpoint(e).map_err(|reason| bad(&reason)))
            .transpose()?;
        let region = env("AWS_REGION")
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        Ok(StorageSpec::S3(S3Target {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint,
            region,
        }))
    }
}

fn valid_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.starts_with(['.', '-'])
        && !b.ends_with(['.', '-'])
}

/// Checks an endpoint URL (`http(s)://host[:port]`, no credentials, path or query) and returns
/// it without a trailing `/`.
fn validate_endpoint(e: &str) -> Result<String, String> {
    let e = e.trim_end_matches('/');
    let authority = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or_else(|| format!("endpoint {e:?} must start with http:// or https://"))?;
    if authority.is_empty() {
        return Err("the endpoint has no host".into());
    }
    if authority.contains('@') {
        // Never print it: the part before '@' may be a secret.
        return Err(
            "the endpoint must not carry credentials (user:password@); use \
                    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                .into(),
        );
    }
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "endpoint {e:?} must be scheme://host[:port], without a path"
        ));
    }
    Ok(e.to_string())
}

/// A secret string: `Debug` and `Display` print `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// S3 credentials and where they came from.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct S3Credentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: Secret,
    pub(crate) session_token: Option<Secret>,
    /// For messages: `environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)` or
    /// `/root/.aws/credentials [default]`.
    pub(crate) source: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &"<redacted>")
            .field("secret_access_key", &self.secret_access_key)
            .field("session_token", &self.session_token)
            .field("source", &self.source)
            .finish()
    }
}

impl S3Credentials {
    /// Credentials from the process environment: `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY`
    /// (+ `AWS_SESSION_TOKEN`), else the credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
    /// `~/.aws/credentials`) at profile `AWS_PROFILE`, else `default`.
    pub(crate) fn from_env() -> Result<S3Credentials, StorageError> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// [`S3Credentials::from_env`] with `env` in place of the process environment.
    pub(crate) fn from_lookup(
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<S3Credentials, StorageError> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        let token = get("AWS_SESSION_TOKEN").map(Secret::new);
        match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
            (Some(id), Some(secret)) => {
                let source = if token.is_some() {
                    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)"
                } else {
                    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
                };
                return Ok(S3Credentials {
                    access_key_id: id,
                    secret_access_key: Secret::new(secret),
                    session_token: token,
                    source: source.to_string(),
                });
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(StorageError::NoCredentials {
                    tried: "only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY is set; set \
                            both"
                        .to_string(),
                });
            }
            (None, None) => {}
        }
        let (file, file_source) = match get("AWS_SHARED_CREDENTIALS_FILE") {
            Some(f) => (PathBuf::from(f), "AWS_SHARED_CREDENTIALS_FILE"),
            None => match get("HOME") {
                Some(home) => (Path::new(&home).join(".aws/credentials"), "HOME"),
                None => {
                    return Err(StorageError::NoCredentials {
                        tried: "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set, nor \
                                AWS_SHARED_CREDENTIALS_FILE, nor HOME (for ~/.aws/credentials)"
                            .to_string(),
                    });
                }
            },
        };
        let profile = get("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NoCredentials {
                    tried: format!(
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set and {} (from \
                         {file_source}) does not exist",
                        file.display()
                    ),
                });
            }
            Err(e) => return Err(StorageError::io(&file)(e)),
        };
        let section = ini_section(&text, &profile);
        let source = format!("{} [{profile}]", file.display());
        let value = |key: &str| {
            section
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .filter(|v| !v.is_empty())
        };
        match (value("aws_access_key_id"), value("aws_secret_access_key")) {
            (Some(id), Some(secret)) => Ok(S3Credentials {
                access_key_id: id,
                secret_access_key: Secret::new(secret),
                session_token: value("aws_session_token").map(Secret::new),
                source,
            }),
            _ => Err(StorageError::NoCredentials {
                tried: format!(
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set and {source} has no \
                     aws_access_key_id and aws_secret_access_key"
                ),
            }),
        }
    }
}

/// The `key = value` pairs of section `[name]` of an INI text (keys lower-cased; `#` and `;`
/// start comment lines). Enough for `~/.aws/credentials`.
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

/// Opens the storage `spec` names: [`LocalDir`] on `local_packs_dir`, or [`S3Storage`] with
/// credentials from the environment ([`S3Credentials::from_env`]) and default options.
pub(crate) fn open_storage(
    spec: &StorageSpec,
    local_packs_dir: &Path,
) -> Result<Arc<dyn PackStorage>, StorageError> {
    match spec {
        StorageSpec::Local => Ok(Arc::new(LocalDir::open(local_packs_dir)?)),
        StorageSpec::S3(target) => {
            let config = S3Config {
                target: target.clone(),
                credentials: S3Credentials::from_env()?,
                options: S3Options::default(),
            };
            Ok(Arc::new(S3Storage::open(config)?))
        }
    }
}
