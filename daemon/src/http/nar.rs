//! `GET`/`HEAD /nar/<NarHash>.nar`: the NAR reassembled from chunks and streamed, or, when
//! the store lacks it, the resolver's flight of it streamed as it arrives (see
//! [`crate::resolve`]).
//!
//! A stored NAR's body is read a chunk at a time on blocking threads, one chunk ahead of the
//! client, and no thread is held between chunks (bounded memory whatever the NAR size, and a
//! slow client pins nothing). A read error (damaged chunk, NarHash mismatch) is sent down the
//! body stream, which makes hyper abort the connection: with a `Content-Length` set, the
//! client sees a short body and fails, never a complete wrong one.

use std::io::Read;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::{add, blocking, finish, HttpError, HttpState};
use crate::core::NarHash;
use crate::metrics::transfers::{Direction, TransferGuard};
use crate::metrics::Metrics;
use crate::resolve::Flight;

const BUF: usize = 256 * 1024;

/// What a `/nar/<file>` request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarFile {
    /// `<NarHash>.nar`: the uncompressed NAR, the only URL our narinfos give.
    Plain(NarHash),
    /// `<digest>.nar.<ext>`: a compressed file name some uploaded or imported narinfo used.
    /// Served (recompressed on the fly) only if the store knows the name; Nix asks for it when
    /// it cached that original narinfo, and HEADs it before an upload.
    Compressed { name: String, ext: String },
}

/// Parses a `/nar/` file name.
pub fn parse_nar_file(file: &str) -> Result<NarFile, HttpError> {
    let bad = || HttpError::BadRequest(format!("{file:?} is not a NAR file name"));
    let (digest, ext) = file.split_once(".nar").ok_or_else(bad)?;
    let hash = NarHash::parse_digest(digest).map_err(|_| bad())?;
    match ext.strip_prefix('.') {
        None if ext.is_empty() => Ok(NarFile::Plain(hash)),
        Some(e) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_alphanumeric()) => {
            Ok(NarFile::Compressed {
                name: file.to_string(),
                ext: e.to_string(),
            })
        }
        _ => Err(bad()),
    }
}

/// Wraps a NAR stream in the compressor a file extension names.
fn compressor(ext: &str, r: crate::store::NarReader) -> Option<Box<dyn Read + Send>> {
    Some(match ext {
        "xz" => Box::new(xz2::read::XzEncoder::new(r, 1)),
        "zst" | "zstd" => Box::new(zstd::stream::read::Encoder::new(r, 1).ok()?),
        "bz2" => Box::new(bzip2::read::BzEncoder::new(r, bzip2::Compression::fast())),
        _ => return None,
    })
}

/// A parsed `Range` header: `start..end` (end exclusive), or `None` for the whole body.
pub fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, HttpError> {
    let unsat = HttpError::RangeNotSatisfiable { size };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None); // unknown unit: ignore, serve everything
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: serve the whole body (allowed by RFC 9110)
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or(HttpError::BadRequest("malformed Range".into()))?;
    let num = |s: &str| -> Result<u64, HttpError> {
        s.trim()
            .parse()
            .map_err(|_| HttpError::BadRequest("malformed Range".into()))
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(HttpError::BadRequest("malformed Range".into())),
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(unsat);
            }
            (size.saturating_sub(n), size)
        }
        (false, true) => (num(a)?, size),
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            if e < s {
                return Err(HttpError::BadRequest("malformed Range".into()));
            }
            (s, e.saturating_add(1).min(size))
        }
    };
    if start >= size {
        return Err(unsat);
    }
    Ok(Some((start, end)))
}

pub async fn get_nar(
    State(state): State<Arc<HttpState>>,
    method: Method,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Response {
    let r = serve(&state, method, &headers, &file).await;
    finish(&state, "nar", r)
}

async fn serve(
    state: &Arc<HttpState>,
    method: Method,
    headers: &HeaderMap,
    file: &str,
) -> Result<Response, HttpError> {
    let (nar_hash, ext) = match parse_nar_file(file)? {
        NarFile::Plain(h) => (h, None),
        NarFile::Compressed { name, ext } => {
            let store = state.store.clone();
            match blocking(move || Ok(store.nar_hash_by_file(&name)?)).await? {
                Some(h) => (h, Some(ext)),
                None => {
                    Metrics::inc(&state.metrics.nar_misses, 1);
                    return Err(HttpError::NotFound);
                }
            }
        }
    };
    let read = || {
        let store = state.store.clone();
        blocking(move || Ok(store.nar_reader(&nar_hash)?))
    };
    let mut reader = match read().await {
        Ok(r) => r,
        Err(HttpError::NotFound) if ext.is_none() && state.resolver.has_sources() => {
            if let Some(resp) = from_elsewhere(state, &method, headers, nar_hash).await? {
                return Ok(resp);
            }
            // The resolver had nothing: a flight may have stored the NAR meanwhile.
            match read().await {
                Ok(r) => r,
                Err(HttpError::NotFound) => {
                    Metrics::inc(&state.metrics.nar_misses, 1);
                    return Err(HttpError::NotFound);
                }
                Err(e) => return Err(e),
            }
        }
        Err(HttpError::NotFound) => {
            Metrics::inc(&state.metrics.nar_misses, 1);
            return Err(HttpError::NotFound);
        }
        Err(e) => return Err(e),
    };
    Metrics::inc(&state.metrics.nar_hits, 1);
    Metrics::inc(&state.metrics.nar_store_hits, 1);
    if let Some(ext) = ext {
        // Recompressed: length unknown up front, no ranges.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/x-nix-nar".parse().expect("static"),
        );
        if method == Method::HEAD {
            return Ok((StatusCode::OK, h, Body::empty()).into_response());
        }
        let r = compressor(&ext, reader).ok_or(HttpError::NotFound)?;
        return Ok((
            StatusCode::OK,
            h,
            stream_body(state, nar_hash, Source::Reader(r), None),
        )
            .into_response());
    }
    let (status, resp_headers, range) = body_headers(headers, reader.nar_size())?;
    let total = match range {
        Some((start, end)) => {
            reader.set_range(start, end);
            end - start
        }
        None => reader.nar_size(),
    };
    if method == Method::HEAD {
        return Ok((status, resp_headers, Body::empty()).into_response());
    }

    // The first block is read (and checked) before the status goes out: a store that cannot
    // read the NAR at all (its pack storage down, a damaged first chunk) is an error status,
    // not a 200 cut short.
    let (reader, first) = tokio::task::spawn_blocking(move || {
        let first = reader.next_block();
        (reader, first)
    })
    .await
    .map_err(|e| HttpError::Internal(format!("NAR read task failed: {e}")))?;
    let first = first.map_err(|e| {
        tracing::warn!(nar = %nar_hash, error = %e, "NAR unreadable");
        Metrics::inc(&state.metrics.nar_aborted, 1);
        HttpError::Unavailable(format!("NAR {nar_hash} cannot be read now: {e}"))
    })?;
    let body = stream_body(
        state,
        nar_hash,
        Source::Nar(Box::new(reader), first),
        Some(total),
    );
    Ok((status, resp_headers, body).into_response())
}

/// A NAR the store lacks, from the resolver: `HEAD` answers from the pending narinfo without
/// fetching; `GET` joins (or starts) the NAR's flight and streams it as it arrives — after
/// its first bytes, so a source that fails at once is a 502, not a cut 200; a range waits
/// for the whole NAR to be verified. `None`: no source can bring it.
async fn from_elsewhere(
    state: &Arc<HttpState>,
    method: &Method,
    headers: &HeaderMap,
    nar_hash: NarHash,
) -> Result<Option<Response>, HttpError> {
    let resolver = &state.resolver;
    if resolver.fetchable_size(&nar_hash).is_none() && !resolver.recover(&nar_hash).await {
        return Ok(None);
    }
    if *method == Method::HEAD {
        let Some(size) = resolver.fetchable_size(&nar_hash) else {
            return Ok(None);
        };
        let (status, h, _) = body_headers(headers, size)?;
        return Ok(Some((status, h, Body::empty()).into_response()));
    }
    let Some(flight) = resolver.nar(&nar_hash)? else {
        return Ok(None);
    };
    let (status, h, range) = body_headers(headers, flight.nar_size())?;
    if let Err(e) = flight.ready(range.is_some()).await {
        return Err(HttpError::BadGateway(e.to_string()));
    }
    Metrics::inc(&state.metrics.nar_hits, 1);
    let (start, end) = range.unwrap_or((0, flight.nar_size()));
    Ok(Some(
        (status, h, flight_body(state, nar_hash, &flight, start, end)).into_response(),
    ))
}

/// A NAR response's status, headers and byte range (`None`: all of it).
type BodyHead = (StatusCode, HeaderMap, Option<(u64, u64)>);

/// The status and headers of a NAR body of `size` bytes, honouring a `Range` request: 206
/// with `Content-Range` and the range (`start..end`), or 200 with the whole length.
fn body_headers(headers: &HeaderMap, size: u64) -> Result<BodyHead, HttpError> {
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) => parse_range(v, size)?,
        None => None,
    };
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        "application/x-nix-nar".parse().expect("static"),
    );
    h.insert(header::ACCEPT_RANGES, "bytes".parse().expect("static"));
    let (status, len) = match range {
        Some((start, end)) => {
            let v = format!("bytes {start}-{}/{size}", end - 1);
            h.insert(
                header::CONTENT_RANGE,
                v.parse()
                    .map_err(|_| HttpError::Internal("content-range".into()))?,
            );
            (StatusCode::PARTIAL_CONTENT, end - start)
        }
        None => (StatusCode::OK, size),
    };
    h.insert(header::CONTENT_LENGTH, len.into());
    Ok((status, h, range))
}

/// A body of `total` bytes (if known) going out: listed in the running transfers until the
/// returned guard is dropped, its bytes counted in the returned counter.
fn serving(
    state: &HttpState,
    nar_hash: NarHash,
    total: Option<u64>,
) -> (TransferGuard, Arc<AtomicU64>) {
    let done = Arc::new(AtomicU64::new(0));
    let guard = state.metrics.transfers.begin(
        Direction::Serve,
        format!("nar/{}.nar", nar_hash.to_base32()),
        "http",
        total,
        done.clone(),
    );
    (guard, done)
}

/// A flight's bytes as a response body; an aborted flight aborts the body.
fn flight_body(
    state: &HttpState,
    nar_hash: NarHash,
    flight: &Arc<Flight>,
    start: u64,
    end: u64,
) -> Body {
    let metrics = state.metrics.clone();
    let (shown, done) = serving(state, nar_hash, Some(end - start));
    let stream = flight.stream(start, end).map(move |item| {
        let _ = &shown; // listed while the body lives
        match &item {
            Ok(b) => {
                add(&metrics.nar_bytes_served, b.len() as u64);
                add(&done, b.len() as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, "aborting NAR stream");
                add(&metrics.nar_aborted, 1);
            }
        }
        item
    });
    Body::from_stream(stream)
}

/// Where a response body's bytes come from.
enum Source {
    /// A stored NAR, handed out a whole chunk at a time (no copies), after its first block
    /// (read before the response status).
    Nar(Box<crate::store::NarReader>, Option<Vec<u8>>),
    /// Anything else (a recompressed NAR), read into full buffers.
    Reader(Box<dyn Read + Send>),
}

impl Source {
    fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match self {
            Source::Nar(r, first) => match first.take() {
                Some(b) => Ok(Some(b)),
                None => r.next_block(),
            },
            Source::Reader(r) => {
                let mut buf = vec![0u8; BUF];
                let mut n = 0;
                while n < BUF {
                    match r.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(n);
                Ok((n > 0).then_some(buf))
            }
        }
    }
}

/// Streams `source` into a response body; a read error aborts the body. Each block is read
/// on a blocking thread that is free again once the block is read (one block read ahead),
/// so a client that reads slowly holds memory for a block or two and no thread: hundreds of
/// slow readers cannot starve the runtime's blocking pool (which the store calls of every
/// other request need). The NAR counts as used for eviction (`Store::touch`).
fn stream_body(state: &HttpState, nar_hash: NarHash, source: Source, total: Option<u64>) -> Body {
    type Read = tokio::task::JoinHandle<(Source, std::io::Result<Option<Vec<u8>>>)>;
    fn read_next(mut source: Source) -> Read {
        tokio::task::spawn_blocking(move || {
            let r = source.next();
            (source, r)
        })
    }
    let metrics = state.metrics.clone();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.touch(&nar_hash) {
            tracing::warn!(nar = %nar_hash, error = %e, "recording the NAR's last access failed");
        }
    });
    let (shown, done) = serving(state, nar_hash, total);
    let stream = futures_util::stream::unfold(Some(read_next(source)), move |next| {
        let _ = &shown; // listed while the body lives
        let (metrics, done) = (metrics.clone(), done.clone());
        async move {
            let (source, item) = match next?.await {
                Ok(v) => v,
                Err(e) => {
                    let e = std::io::Error::other(format!("NAR read task failed: {e}"));
                    return Some((Err(e), None));
                }
            };
            match item {
                Ok(None) => None,
                Ok(Some(block)) => {
                    add(&metrics.nar_bytes_served, block.len() as u64);
                    add(&done, block.len() as u64);
                    Some((Ok(Bytes::from(block)), Some(read_next(source))))
                }
                Err(e) => {
                    tracing::error!(nar = %nar_hash, error = %e, "aborting NAR stream");
                    add(&metrics.nar_aborted, 1);
                    Some((Err(e), None))
                }
            }
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 10)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 100)));
        assert_eq!(parse_range("bytes=-1000", 100).unwrap(), Some((0, 100)));
        assert_eq!(parse_range("bytes=50-1000", 100).unwrap(), Some((50, 100)));
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert!(matches!(
            parse_range("bytes=100-", 100),
            Err(HttpError::RangeNotSatisfiable { size: 100 })
        ));
        assert!(matches!(
            parse_range("bytes=5-1", 100),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            parse_range("bytes=x-1", 100),
            Err(HttpError::BadRequest(_))
        ));
    }

    #[test]
    fn nar_files() {
        let h = "1ddv0iqq47j0awyw7a8dmm8bz71c6ifrliq53kmmsfzjxf3rwvb8";
        assert!(matches!(
            parse_nar_file(&format!("{h}.nar")),
            Ok(NarFile::Plain(_))
        ));
        assert_eq!(
            parse_nar_file(&format!("{h}.nar.xz")).unwrap(),
            NarFile::Compressed {
                name: format!("{h}.nar.xz"),
                ext: "xz".into()
            }
        );
        assert!(matches!(
            parse_nar_file(&format!("{h}.nar.")),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            parse_nar_file(&format!("{h}.nar.x/y")),
            Err(HttpError::BadRequest(_))
        ));
        assert!(parse_nar_file("..%2f..%2fetc%2fpasswd.nar").is_err());
    }
}
