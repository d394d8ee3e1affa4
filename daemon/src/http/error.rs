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
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for HttpError {
    fn from(e: StoreError) -> Self {
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
