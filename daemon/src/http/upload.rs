//! Uploads: `nix copy --to http://…` PUTs each NAR (compressed as the store URL says), then
//! its narinfo. A NAR waits in the staging dir until its narinfo arrives; the narinfo PUT then
//! ingests it through the same path as `import` and answers only after the index commit.
//! Every upload needs the upload token as the HTTP basic password.

use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{add, blocking, finish, parse_narinfo_file, HttpError, HttpState};
use crate::core::signing;
use crate::core::store_path::StorePathHash;
use crate::import::{check_narinfo, decompressor, ImportError};
use crate::store::Retention;

/// Largest narinfo accepted.
const MAX_NARINFO: usize = 1024 * 1024;
/// Marks a NAR upload still being received (`<name>.part-<pid>-<n>`).
const PART: &str = ".part-";
/// A staged NAR whose narinfo has not come this long after is removed at the next start.
const STAGED_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Clears the staging dir at start: part files (uploads cut by a crash or a restart) and
/// staged NARs older than [`STAGED_MAX_AGE`] (their narinfo never came). Returns how many
/// files went.
pub fn sweep_staging(dir: &FsPath) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let old = e
            .metadata()?
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= STAGED_MAX_AGE);
        if name.contains(PART) || old {
            std::fs::remove_file(e.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

pub(super) fn check_auth(state: &HttpState, headers: &HeaderMap) -> Result<(), HttpError> {
    let Some(token) = state.upload_token.as_deref() else {
        return Err(HttpError::Forbidden(
            "uploads are disabled (start the daemon with --upload-token-file)".into(),
        ));
    };
    let password = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| {
            let s = String::from_utf8(raw).ok()?;
            s.split_once(':').map(|(_, p)| p.to_string())
        })
        .ok_or(HttpError::Unauthorized)?;
    if constant_time_eq(password.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(HttpError::Unauthorized)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A NAR file name as Nix uploads it: `<nix-base32>.nar[.xz|.zst|.bz2|…]`.
fn staged_name(file: &str) -> Result<&str, HttpError> {
    let ok = !file.is_empty()
        && file.len() <= 128
        && file.contains(".nar")
        && !file.starts_with('.')
        && file
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_');
    if ok {
        Ok(file)
    } else {
        Err(HttpError::BadRequest(format!(
            "{file:?} is not a NAR file name"
        )))
    }
}

/// `PUT` of files we accept and do not keep (`nix-cache-info`, `.ls` listings, build logs,
/// realisations): authenticated, then dropped.
pub async fn put_ignored(State(state): State<Arc<HttpState>>, headers: HeaderMap) -> Response {
    let r = check_auth(&state, &headers).map(|()| StatusCode::OK.into_response());
    finish(&state, "put-other", r)
}

/// `PUT /nar/<file>`: stream the body to the staging dir, bounded by `max_upload`.
pub async fn put_nar(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(file): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        check_auth(&state, &headers)?;
        let name = staged_name(&file)?;
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > state.max_upload {
                return Err(HttpError::TooLarge(format!(
                    "{len} bytes > {}",
                    state.max_upload
                )));
            }
        }
        tokio::fs::create_dir_all(&state.staging)
            .await
            .map_err(|e| HttpError::write_failed("staging dir", &e))?;
        let dest = state.staging.join(name);
        // Each upload writes its own part file, renamed over the staged name once complete:
        // two uploads of one NAR never write into the same file, and a narinfo PUT that has
        // the staged file open keeps reading a complete one.
        static PARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let part = state
            .staging
            .join(format!("{name}{PART}{}-{n}", std::process::id()));
        let res = receive(&state, body, &part).await;
        if let Err(e) = res {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(e);
        }
        tokio::fs::rename(&part, &dest)
            .await
            .map_err(|e| HttpError::write_failed("staging", &e))?;
        Ok(StatusCode::OK.into_response())
    }
    .await;
    finish(&state, "put-nar", r)
}

async fn receive(state: &HttpState, body: Body, part: &FsPath) -> Result<(), HttpError> {
    let mut f = tokio::fs::File::create(part)
        .await
        .map_err(|e| HttpError::write_failed("staging", &e))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| HttpError::BadRequest(format!("upload body interrupted: {e}")))?;
        total += chunk.len() as u64;
        if total > state.max_upload {
            return Err(HttpError::TooLarge(format!(
                "more than {} bytes",
                state.max_upload
            )));
        }
        f.write_all(&chunk)
            .await
            .map_err(|e| HttpError::write_failed("staging", &e))?;
    }
    f.flush()
        .await
        .map_err(|e| HttpError::write_failed("staging", &e))?;
    add(&state.metrics.upload_bytes, total);
    Ok(())
}

/// `PUT /<hash>.narinfo`: check it, ingest its staged NAR, commit, then answer.
pub async fn put_narinfo(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    Path(file): Path<String>,
    body: Body,
) -> Response {
    let r = async {
        check_auth(&state, &headers)?;
        if file.ends_with(".ls") {
            return Ok(StatusCode::OK.into_response());
        }
        let hash = parse_narinfo_file(&file)?;
        let bytes = axum::body::to_bytes(body, MAX_NARINFO)
            .await
            .map_err(|e| HttpError::BadRequest(format!("narinfo body: {e}")))?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| HttpError::BadRequest("narinfo is not UTF-8".into()))?;
        let state2 = state.clone();
        let h = hash.clone();
        let result = blocking(move || ingest_upload(&state2, &h, &text)).await;
        state.narinfo_cache.forget(hash.as_str());
        result?;
        add(&state.metrics.uploads, 1);
        Ok(StatusCode::OK.into_response())
    }
    .await;
    finish(&state, "put-narinfo", r)
}

fn ingest_upload(state: &HttpState, hash: &StorePathHash, text: &str) -> Result<(), HttpError> {
    let (info, trust) = check_narinfo(text, Some(hash), &state.trusted).map_err(|e| match e {
        ImportError::Store(e) => HttpError::from(*e),
        other => HttpError::BadRequest(other.to_string()),
    })?;
    let staged: PathBuf = FsPath::new(&info.url)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| HttpError::BadRequest(format!("bad URL {:?}", info.url)))
        .and_then(staged_name)
        .map(|n| state.staging.join(n))?;
    let compression = info.compression_or_default().to_string();
    let path_name = info.store_path.to_absolute();
    let outcome = state
        .store
        .ingest_with(&info, text, &trust, "upload", Retention::Pinned, || {
            let f = std::fs::File::open(&staged).map_err(|e| {
                io::Error::new(e.kind(), format!("NAR {} was not uploaded", info.url))
            })?;
            decompressor(io::BufReader::with_capacity(1 << 20, f), &compression)
        });
    // Whatever happened, the staged NAR has served its purpose (a refused one is garbage).
    let _ = std::fs::remove_file(&staged);
    match outcome {
        Ok(_) => {
            state.resolver.stored(crate::resolve::NarStored {
                nar_hash: info.nar_hash,
                trusted: matches!(trust, signing::Trust::Trusted { .. }),
            });
            Ok(())
        }
        Err(crate::store::StoreError::NarRead { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            Err(HttpError::BadRequest(format!("{path_name}: {source}")))
        }
        Err(e @ crate::store::StoreError::NarRead { .. }) => {
            // A corrupt compressed stream is the uploader's fault.
            Err(HttpError::BadRequest(e.to_string()))
        }
        Err(e) => Err(e.into()),
    }
}
