//! `HttpError`: every failure of a handler, mapped to a status in one place.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not found")]
    NotFound,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("payload too large: {0}")]
    TooLarge(String),
    #[error("range not satisfiable")]
    RangeNotSatisfiable { size: u64 },
    #[error("bad gateway: {0}")]
    BadGateway(String),
    /// The pack storage (S3) did not answer: try again later.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The disk (data dir or upload staging) is full: nothing was stored, nothing lost.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Whether `e` (or an error it wraps) is a full disk or an exhausted quota.
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // ENOSPC, EDQUOT
            if io.kind() == std::io::ErrorKind::StorageFull
                || matches!(io.raw_os_error(), Some(28 | 122))
            {
                return true;
            }
        }
        // redb reports its I/O errors as text.
        if err.to_string().contains("No space left on device") {
            return true;
        }
        cur = err.source();
    }
    false
}

impl HttpError {
    /// A failed write of the upload staging dir or the store: 507 on a full disk, else 500.
    pub fn write_failed(what: &str, e: &(dyn std::error::Error + 'static)) -> HttpError {
        if is_disk_full(e) {
            HttpError::InsufficientStorage(format!(
                "{what}: {e}: no space left; nothing was stored (free space and retry)"
            ))
        } else {
            HttpError::Internal(format!("{what}: {e}"))
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
        if is_disk_full(&e) {
            return HttpError::write_failed("store", &e);
        }
        match e {
            StoreError::NoSuchNar(_) => HttpError::NotFound,
            e @ (StoreError::BadNar { .. }
            | StoreError::NarHashMismatch { .. }
            | StoreError::NarSizeMismatch { .. }) => HttpError::BadRequest(e.to_string()),
            e @ StoreError::Storage(_) => HttpError::Unavailable(e.to_string()),
            other => HttpError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self {
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            HttpError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            HttpError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            HttpError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                return (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response();
            }
        };
        let mut resp = (status, format!("{self}\n")).into_response();
        match self {
            HttpError::Unauthorized => {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"nix-p2p-cache\"".parse().expect("static"),
                );
            }
            HttpError::RangeNotSatisfiable { size } => {
                if let Ok(v) = format!("bytes */{size}").parse() {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        resp
    }
}
