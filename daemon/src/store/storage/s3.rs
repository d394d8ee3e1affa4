//! [`S3Storage`]: packs as objects `PREFIX/packs/pack-{id:08}.pack` in an S3 bucket, through
//! the `object_store` crate (path-style requests, so any S3-compatible server on any endpoint
//! works, `http://` included).
//!
//! Owns: a small tokio runtime of its own. `object_store` is async and the store is not: each
//! call is spawned onto that runtime and waited for with a bounded blocking receive, so callers
//! on plain threads, in CLI code with no runtime, or on `spawn_blocking` threads of another
//! runtime never start or enter a runtime themselves (and never panic for it).
//!
//! Invariants:
//! - every request is bounded: a connect timeout, a request timeout (longer for uploads,
//!   which go through a client of their own), a few retries within a retry window, and a
//!   guard on the wait itself, so a down or stalled endpoint gives
//!   [`StorageError::Unavailable`] in tens of seconds (a few minutes for a stalled upload)
//!   rather than a hang;
//! - a pack at or above the multipart threshold is uploaded in parts streamed from disk, one
//!   part in memory at a time; a failed multipart upload is aborted;
//! - credentials live only in the client; messages name where they came from, never them.

use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use super::{
    pack_file_name, parse_pack_file_name, Counters, Op, PackStorage, S3Credentials, S3Target,
    StorageCounters, StorageError,
};

/// Tunables of the S3 backend; the defaults suit 64 MiB packs on a real network.
#[derive(Debug, Clone)]
pub(crate) struct S3Options {
    /// Packs of this many bytes or more are uploaded in parts.
    pub(crate) multipart_threshold: u64,
    /// Bytes per part of a multipart upload (S3 wants at least 5 MiB but for the last part).
    pub(crate) part_size: usize,
    /// Time to establish a connection.
    pub(crate) connect_timeout: Duration,
    /// Time for one read, listing or delete request, body included: what a slow server may
    /// take before the call fails (after retries).
    pub(crate) request_timeout: Duration,
    /// Time for one upload request (a pack below the multipart threshold, or one part), body
    /// included: longer, so that a slow uplink still gets a part through.
    pub(crate) upload_timeout: Duration,
    /// Retries of a failed request (connection errors, timeouts, 5xx, 429).
    pub(crate) max_retries: usize,
    /// No retry starts later than this after the first attempt.
    pub(crate) retry_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            // A pack (64 MiB, a little more when its last NAR ran over) goes up in one PUT: one
            // billed write request per pack. Larger ones (a single huge NAR) go up in 32 MiB
            // parts, one part in memory at a time.
            multipart_threshold: 96 * 1024 * 1024,
            part_size: 32 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            // 96 MiB (the largest single-request upload) in 20 minutes is ~82 KiB/s.
            upload_timeout: Duration::from_secs(1200),
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
        }
    }
}

impl S3Options {
    /// How long a caller waits for one spawned call (retries included) whose requests time
    /// out after `request_timeout`: a guard above `object_store`'s own bounds (no retry starts
    /// after `retry_timeout`, and each attempt ends within `request_timeout`).
    fn wait_guard(&self, request_timeout: Duration) -> Duration {
        self.retry_timeout + 2 * request_timeout + self.connect_timeout + Duration::from_secs(10)
    }
}

/// Everything needed to open an [`S3Storage`].
#[derive(Debug, Clone)]
pub(crate) struct S3Config {
    pub(crate) target: S3Target,
    pub(crate) credentials: S3Credentials,
    pub(crate) options: S3Options,
}

/// Packs in an S3 bucket.
pub(crate) struct S3Storage {
    /// Reads, listings, deletes: requests bounded by `request_timeout`.
    store: Arc<AmazonS3>,
    /// Uploads: requests bounded by `upload_timeout`.
    upload_store: Arc<AmazonS3>,
    /// `Some` until drop, which shuts it down without blocking (drop may run on any thread).
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    target: S3Target,
    /// The endpoint as shown in messages.
    endpoint: String,
    credentials_source: String,
    options: S3Options,
    counters: Counters,
}

impl std::fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("target", &self.target)
            .field("credentials", &self.credentials_source)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Storage {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Worker threads of the backend's runtime: requests mostly wait on the network.
const RUNTIME_WORKERS: usize = 2;

impl S3Storage {
    /// Builds the client and its runtime; makes no request.
    pub(crate) fn open(config: S3Config) -> Result<S3Storage, StorageError> {
        let S3Config {
            target,
            credentials,
            options,
        } = config;
        let endpoint = match &target.endpoint {
            Some(e) => e.clone(),
            None => format!("https://s3.{}.amazonaws.com", target.region),
        };
        let config_err = |reason: String| StorageError::Config {
            spec: format!("s3://{}/{}", target.bucket, target.prefix),
            reason,
        };
        if options.part_size == 0 || options.multipart_threshold == 0 {
            return Err(config_err(
                "part size and multipart threshold must be > 0".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_WORKERS)
            .thread_name("s3-storage")
            .enable_all()
            .build()
            .map_err(|e| config_err(format!("cannot start the S3 client's runtime: {e}")))?;
        let handle = runtime.handle().clone();

        let mut client = ClientOptions::new().with_connect_timeout(options.connect_timeout);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&target.bucket)
            .with_region(&target.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(credentials.secret_access_key.expose())
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: options.max_retries,
                retry_timeout: options.retry_timeout,
            });
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token.expose());
        }
        if let Some(e) = &target.endpoint {
            builder = builder.with_endpoint(e);
            if e.starts_with("http://") {
                client = client.with_allow_http(true);
            }
        }
        let (store, upload_store) = {
            // Building the HTTP client may want a runtime context: lend it ours.
            let _enter = runtime.enter();
            let build = |timeout: Duration| {
                builder
                    .clone()
                    .with_client_options(client.clone().with_timeout(timeout))
                    .build()
                    .map_err(|e| config_err(format!("cannot build the S3 client: {e}")))
            };
            (
                build(options.request_timeout)?,
                build(options.upload_timeout)?,
            )
        };
        Ok(S3Storage {
            store: Arc::new(store),
            upload_store: Arc::new(upload_store),
            runtime: Some(runtime),
            handle,
            endpoint,
            credentials_source: credentials.source,
            target,
            options,
            counters: Counters::default(),
        })
    }

    /// The object key of pack `pack`.
    fn key(&self, pack: u32) -> ObjectPath {
        self.packs_prefix().child(pack_file_name(pack))
    }

    /// `PREFIX/packs`.
    fn packs_prefix(&self) -> ObjectPath {
        ObjectPath::from_iter(
            self.target
                .prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .chain(std::iter::once("packs")),
        )
    }

    /// `s3://bucket/key`, for messages.
    fn url(&self, key: &ObjectPath) -> String {
        format!("s3://{}/{}", self.target.bucket, key)
    }

    /// Runs `fut` on the backend's runtime and waits for it on this thread (which must not be
    /// running async code). `None` when no answer came within `guard`.
    fn block<T: Send + 'static>(
        &self,
        guard: Duration,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = sync_channel(1);
        let task = self.handle.spawn(async move {
            // The receiver may have given up: nothing to do then.
            let _ = tx.send(fut.await);
        });
        match rx.recv_timeout(guard) {
            Ok(v) => Some(v),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                task.abort();
                None
            }
        }
    }

    /// [`S3Storage::block`] for one `object_store` call, its error translated. Uploads
    /// (`op` is [`Op::Put`], on `upload_store`) may wait longer.
    fn call<T: Send + 'static>(
        &self,
        op: Op,
        pack: Option<u32>,
        key: &ObjectPath,
        fut: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> Result<T, StorageError> {
        let guard = self.options.wait_guard(match op {
            Op::Put => self.options.upload_timeout,
            Op::Get | Op::List | Op::Delete => self.options.request_timeout,
        });
        match self.block(guard, fut) {
            Some(r) => r.map_err(|e| self.translate(op, pack, key, e)),
            None => Err(StorageError::Unavailable {
                op,
                location: self.url(key),
                endpoint: self.endpoint.clone(),
                detail: format!("no answer within {guard:?}"),
            }),
        }
    }

    fn translate(
        &self,
        op: Op,
        pack: Option<u32>,
        key: &ObjectPath,
        e: object_store::Error,
    ) -> StorageError {
        let location = self.url(key);
        let status = http_status(&e);
        let not_found = matches!(e, object_store::Error::NotFound { .. }) || status == Some(404);
        let denied = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || matches!(status, Some(401 | 403));
        match pack {
            Some(pack) if not_found => StorageError::NotFound { pack, location },
            _ if denied => StorageError::AccessDenied {
                location: format!("{location} at {}", self.endpoint),
                credentials: self.credentials_source.clone(),
                detail: e.to_string(),
            },
            _ if is_transport_error(&e) || matches!(status, Some(500..=599 | 429)) => {
                StorageError::Unavailable {
                    op,
                    location,
                    endpoint: self.endpoint.clone(),
                    detail: e.to_string(),
                }
            }
            _ => StorageError::S3 {
                op,
                location,
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            },
        }
    }

    fn put(&self, pack: u32, path: &Path) -> Result<(), StorageError> {
        let key = self.key(pack);
        let io = StorageError::io(path);
        let mut file = File::open(path).map_err(StorageError::io(path))?;
        let len = file.metadata().map_err(StorageError::io(path))?.len();
        if len < self.options.multipart_threshold {
            let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.read_to_end(&mut data).map_err(io)?;
            let n = data.len() as u64;
            let store = Arc::clone(&self.upload_store);
            let k = key.clone();
            self.call(Op::Put, Some(pack), &key, async move {
                store.put(&k, PutPayload::from(data)).await
            })?;
            self.counters.add_bytes_out(n);
            tracing::debug!(pack, bytes = n, "uploaded pack");
            return Ok(());
        }

        let store = Arc::clone(&self.upload_store);
        let k = key.clone();
        let mut upload = self.call(Op::Put, Some(pack), &key, async move {
            store.put_multipart(&k).await
        })?;
        let mut sent = 0u64;
        let mut parts = 0usize;
        let result = loop {
            let mut part = Vec::with_capacity(self.options.part_size);
            if let Err(e) = (&mut file)
                .take(self.options.part_size as u64)
                .read_to_end(&mut part)
            {
                break Err(StorageError::io(path)(e));
            }
            if part.is_empty() {
                break Ok(());
            }
            let n = part.len() as u64;
            let fut = upload.put_part(PutPayload::from(part));
            if let Err(e) = self.call(Op::Put, Some(pack), &key, fut) {
                break Err(e);
            }
            sent += n;
            parts += 1;
            self.counters.add_multipart_part();
        };
        match result {
            Ok(()) => {
                self.call(
                    Op::Put,
                    Some(pack),
                    &key,
                    async move { upload.complete().await },
                )?;
                self.counters.add_bytes_out(sent);
                tracing::debug!(pack, bytes = sent, parts, "uploaded pack in parts");
                Ok(())
            }
            Err(e) => {
                // Best effort: an upload left open costs storage until a lifecycle rule ends it.
                if let Err(abort) =
                    self.call(
                        Op::Put,
                        Some(pack),
                        &key,
                        async move { upload.abort().await },
                    )
                {
                    tracing::warn!(pack, error = %abort, "could not abort a failed multipart upload");
                }
                Err(e)
            }
        }
    }

    fn read(&self, pack: u32, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        let key = self.key(pack);
        let Some(end) = offset.checked_add(len) else {
            return Err(StorageError::ShortRead {
                pack,
                offset,
                wanted: len,
                available: 0,
            });
        };
        let store = Arc::clone(&self.store);
        let k = key.clone();
        let got = self.call(Op::Get, Some(pack), &key, async move {
            store.get_range(&k, offset..end).await
        });
        let bytes = match got {
            Ok(b) => b,
            Err(e @ StorageError::S3 { .. }) => {
                // A range past the end is refused (416) or answered short, depending on the
                // server; name it a short read when the object is indeed too short.
                let available = self.len(pack)?.unwrap_or(0).saturating_sub(offset);
                if available < len {
                    return Err(StorageError::ShortRead {
                        pack,
                        offset,
                        wanted: len,
                        available,
                    });
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if bytes.len() as u64 != len {
            return Err(StorageError::ShortRead {
                pack,
                offset,
                wanted: len,
                available: bytes.len() as u64,
            });
        }
        self.counters.add_bytes_in(len);
        Ok(Vec::from(bytes))
    }

    fn len(&self, pack: u32) -> Result<Option<u64>, StorageError> {
        let key = self.key(pack);
        let store = Arc::clone(&self.store);
        let k = key.clone();
        match self.call(
            Op::Get,
            Some(pack),
            &key,
            async move { store.head(&k).await },
        ) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> Result<Vec<(u32, u64)>, StorageError> {
        let prefix = self.packs_prefix();
        let store = Arc::clone(&self.store);
        let p = prefix.clone();
        let metas = self.call(Op::List, None, &prefix, async move {
            store.list(Some(&p)).try_collect::<Vec<_>>().await
        })?;
        let mut packs: Vec<(u32, u64)> = metas
            .iter()
            .filter_map(|m| {
                let mut rest = m.location.prefix_match(&prefix)?;
                let name = rest.next()?;
                if rest.next().is_some() {
                    return None;
                }
                Some((parse_pack_file_name(name.as_ref())?, m.size))
            })
            .collect();
        packs.sort_unstable();
        Ok(packs)
    }

    fn delete(&self, pack: u32) -> Result<(), StorageError> {
        let key = self.key(pack);
        let store = Arc::clone(&self.store);
        let k = key.clone();
        match self.call(Op::Delete, Some(pack), &key, async move {
            store.delete(&k).await
        }) {
            Ok(()) | Err(StorageError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
impl S3Storage {
    /// Stores `data` at `key` (relative to the bucket), bypassing the pack naming: how tests
    /// plant foreign objects.
    pub(crate) fn put_raw(&self, key: &str, data: &[u8]) -> Result<(), StorageError> {
        let key = ObjectPath::from(key);
        let store = Arc::clone(&self.upload_store);
        let k = key.clone();
        let payload = PutPayload::from(data.to_vec());
        self.call(
            Op::Put,
            None,
            &key,
            async move { store.put(&k, payload).await },
        )
        .map(|_| ())
    }

    /// The object key prefix packs are stored under (`PREFIX/packs`).
    pub(crate) fn packs_key_prefix(&self) -> String {
        self.packs_prefix().to_string()
    }
}

/// Whether the request never got an answer: a connect error, a timeout, a dropped connection
/// (after `object_store`'s retries).
fn is_transport_error(e: &object_store::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            if matches!(
                h.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            ) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// The HTTP status of a failed request. `object_store` maps only some statuses to its error
/// variants (and none for listings) and does not expose the status as a type; its message
/// reads "... status code: 403 Forbidden ...".
fn http_status(e: &object_store::Error) -> Option<u16> {
    const MARK: &str = "status code: ";
    let text = e.to_string();
    let at = text.find(MARK)? + MARK.len();
    let code = text.get(at..at + 3)?;
    code.parse().ok().filter(|c| (100..=599).contains(c))
}

impl PackStorage for S3Storage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        let mut s = format!("s3://{}", self.target.bucket);
        if !self.target.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.target.prefix);
        }
        match &self.target.endpoint {
            Some(e) => format!("{s} at {e}"),
            None => format!("{s} at AWS ({})", self.target.region),
        }
    }

    fn put_pack(&self, pack: u32, path: &Path) -> Result<(), StorageError> {
        let _span = tracing::debug_span!("put_pack", storage = "s3", pack).entered();
        self.counters.record(Op::Put, self.put(pack, path))
    }

    fn read_range(&self, pack: u32, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let _span = tracing::trace_span!("read_range", storage = "s3", pack, offset, len).entered();
        self.counters.record(Op::Get, self.read(pack, offset, len))
    }

    fn pack_len(&self, pack: u32) -> Result<Option<u64>, StorageError> {
        self.counters.record(Op::Get, self.len(pack))
    }

    fn list_packs(&self) -> Result<Vec<(u32, u64)>, StorageError> {
        let _span = tracing::debug_span!("list_packs", storage = "s3").entered();
        self.counters.record(Op::List, self.list())
    }

    fn delete_pack(&self, pack: u32) -> Result<(), StorageError> {
        let _span = tracing::debug_span!("delete_pack", storage = "s3", pack).entered();
        self.counters.record(Op::Delete, self.delete(pack))
    }

    fn counters(&self) -> StorageCounters {
        self.counters.snapshot()
    }
}
