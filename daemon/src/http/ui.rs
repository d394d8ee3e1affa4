//! The dashboard (`/ui/`): a read-only page for the operator, shipped inside the binary (plain
//! HTML, CSS and JS under `http/ui/`, no build step, nothing fetched from elsewhere). The page
//! polls the JSON API (`/api/status`, `/api/peers`, `/api/transfers`, `/api/history`,
//! `/api/errors`) and draws what it gets; it changes nothing. `GET /` redirects here.
//!
//! Owns only the static files and their headers; every number comes from `api.rs`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};

use super::{finish, HttpError, HttpState};

/// The files of the page: (name under `/ui/`, content type, bytes).
const FILES: [(&str, &str, &str); 3] = [
    (
        "",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("ui/style.css"),
    ),
];

/// Only this origin's scripts, styles and API; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` and `GET /ui`: to the dashboard.
pub async fn to_dashboard(State(state): State<Arc<HttpState>>) -> Response {
    finish(&state, "ui", Ok(Redirect::to("/ui/").into_response()))
}

/// `GET /ui/`: the page.
pub async fn page(State(state): State<Arc<HttpState>>) -> Response {
    finish(&state, "ui", file(""))
}

/// `GET /ui/<file>`: its script and style sheet.
pub async fn asset(State(state): State<Arc<HttpState>>, Path(name): Path<String>) -> Response {
    finish(&state, "ui", file(&name))
}

fn file(name: &str) -> Result<Response, HttpError> {
    let (_, kind, body) = FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or(HttpError::NotFound)?;
    Ok((
        [
            (header::CONTENT_TYPE, *kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        *body,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_only_its_own_files() {
        let html = FILES[0].2;
        assert!(html.contains("src=\"app.js\"") && html.contains("href=\"style.css\""));
        // Nothing loaded from elsewhere (the page works offline): the only absolute URLs are
        // the SVG namespace (a name) and cache.nixos.org in the nix.conf line shown.
        for (name, _, body) in FILES {
            for (at, _) in body.match_indices("://") {
                let rest = &body[at + 3..];
                assert!(
                    rest.starts_with("www.w3.org/2000/svg'")
                        || rest.starts_with("cache.nixos.org`"),
                    "{name}: an address elsewhere: {}",
                    &rest[..rest.len().min(40)]
                );
            }
            assert!(
                !body.contains("@import") && !body.contains("url("),
                "{name}"
            );
        }
        assert!(file("app.js").is_ok());
        assert!(matches!(file("../mod.rs"), Err(HttpError::NotFound)));
    }
}
