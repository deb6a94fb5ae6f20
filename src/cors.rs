//! Browser front-ends served from another origin: CORS for the REST API and the
//! `Origin` check of the WebSocket. With no `--cors-origin`, only same-origin
//! browsers (and non-browser clients, which send no Origin) are served.

use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;

use crate::error::AppError;

fn allowed(origins: &[String], origin: &str) -> bool {
    origins
        .iter()
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Same origin: the Origin's `host[:port]` equals the Host header.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.split_once("://").map(|(_, rest)| rest);
    matches!((host, origin_host), (Some(h), Some(o)) if h.eq_ignore_ascii_case(o))
}

/// A WebSocket from a browser page of a foreign origin is refused (403).
pub fn check_ws_origin(origins: &[String], headers: &HeaderMap) -> Result<(), AppError> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return Ok(());
    };
    if same_origin(origin, headers) || allowed(origins, origin) {
        Ok(())
    } else {
        Err(AppError::Forbidden(format!(
            "origin `{origin}` is not allowed; start the server with --cors-origin {origin}"
        )))
    }
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn preflight(origins: &[String], origin: Option<&str>) -> Option<Response> {
    let origin = origin.filter(|o| allowed(origins, o))?;
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    add_headers(origins, Some(origin), &mut resp);
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Some(resp)
}

/// Adds `Access-Control-Allow-Origin` for allowed origins.
pub fn add_headers(origins: &[String], origin: Option<&str>, resp: &mut Response) {
    let Some(origin) = origin.filter(|o| allowed(origins, o)) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_str(origin) {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
}

pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: &str, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, origin.parse().unwrap());
        h.insert(header::HOST, host.parse().unwrap());
        h
    }

    #[test]
    fn ws_origin_rules() {
        assert!(check_ws_origin(&[], &HeaderMap::new()).is_ok());
        assert!(check_ws_origin(&[], &headers("http://127.0.0.1:8080", "127.0.0.1:8080")).is_ok());
        assert!(check_ws_origin(&[], &headers("http://evil.example", "127.0.0.1:8080")).is_err());
        let allow = vec!["http://app.local:3000".to_string()];
        assert!(
            check_ws_origin(&allow, &headers("http://app.local:3000", "127.0.0.1:8080")).is_ok()
        );
        assert!(check_ws_origin(&["*".into()], &headers("http://x", "y")).is_ok());
    }

    #[test]
    fn preflight_only_for_allowed_origins() {
        let allow = vec!["http://app.local:3000".to_string()];
        assert!(preflight(&allow, Some("http://other")).is_none());
        let r = preflight(&allow, Some("http://app.local:3000")).unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "http://app.local:3000"
        );
    }
}
