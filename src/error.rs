//! One error type for the request path. Each variant knows its HTTP status and
//! machine code, and renders as the compat envelope
//! `{"success": false, "error", "code", "details"?, "current"?}`.

use std::time::Duration;

use serde_json::{json, Value};
use warp::http::{header, StatusCode};
use warp::reply::Response;

use crate::orders::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: the request is malformed or a field is invalid.
    #[error("{message}")]
    BadRequest {
        code: &'static str,
        message: String,
        details: Vec<FieldError>,
    },
    /// 401: missing, malformed, expired or revoked credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a forbidden origin.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown order (for this user) or route.
    #[error("{0}")]
    NotFound(String),
    /// 409: optimistic concurrency failed; `current` is the server's order (or null).
    #[error("{message}")]
    Conflict { message: String, current: Value },
    /// 413: the body is larger than `--max-body`.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: too many failed logins.
    #[error("too many failed logins; try again in {} s", .0.as_secs().max(1))]
    TooManyRequests(Duration),
    /// 503: the database cannot take the write now (full, read-only, locked, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug. The message is logged; the client sees a generic one.
    #[error("{0}")]
    Internal(String),
}

impl AppError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        AppError::BadRequest {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn validation(details: Vec<FieldError>) -> Self {
        let message = match details.first() {
            Some(first) if details.len() == 1 => {
                format!(
                    "invalid request: {} {}",
                    display_path(&first.path),
                    first.message
                )
            }
            Some(first) => format!(
                "invalid request: {} {} (and {} more problems)",
                display_path(&first.path),
                first.message,
                details.len() - 1
            ),
            None => "invalid request".to_string(),
        };
        AppError::BadRequest {
            code: "VALIDATION_ERROR",
            message,
            details,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::BadRequest { code, .. } => code,
            AppError::Unauthorized(_) => "UNAUTHORIZED",
            AppError::Forbidden(_) => "FORBIDDEN",
            AppError::NotFound(_) => "NOT_FOUND",
            AppError::Conflict { .. } => "VERSION_CONFLICT",
            AppError::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            AppError::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            AppError::TooManyRequests(_) => "RATE_LIMITED",
            AppError::Unavailable(_) => "STORAGE_UNAVAILABLE",
            AppError::Internal(_) => "INTERNAL_ERROR",
        }
    }

    pub fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            AppError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                "internal error; the server log has details".to_string()
            }
            other => other.to_string(),
        };
        let mut body = json!({"success": false, "error": message, "code": self.code()});
        match &self {
            AppError::BadRequest { details, .. } if !details.is_empty() => {
                body["details"] = json!(details);
            }
            AppError::Conflict { current, .. } => body["current"] = current.clone(),
            _ => {}
        }
        let mut resp = json_response(status, &body);
        if let AppError::TooManyRequests(wait) = &self {
            let secs = wait.as_secs().max(1).to_string();
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                secs.parse().expect("digits are a header value"),
            );
        }
        if let AppError::PayloadTooLarge(_) = &self {
            // The rest of the body is not read, so the connection cannot carry
            // another request: say so, or a keep-alive client reuses it and its
            // next request fails (found by tests/props.rs).
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "body".to_string()
    } else {
        format!("`{path}`")
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).expect("serializing a response cannot fail");
    let mut resp = Response::new(bytes.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

impl From<rusqlite::Error> for AppError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        match e.sqlite_error_code() {
            Some(DiskFull) => AppError::Unavailable(
                "the database is full; free disk space (or raise the size limit) and retry".into(),
            ),
            Some(ReadOnly) => AppError::Unavailable(
                "the database is read-only; check the file's permissions and retry".into(),
            ),
            Some(DatabaseBusy) | Some(DatabaseLocked) => AppError::Unavailable(
                "the database is locked by another process; retry shortly".into(),
            ),
            Some(SystemIoFailure) | Some(CannotOpen) | Some(OutOfMemory) => AppError::Unavailable(
                format!("the database cannot be written now ({e}); retry shortly"),
            ),
            _ => AppError::Internal(format!("sqlite: {e}")),
        }
    }
}

impl From<r2d2::Error> for AppError {
    fn from(e: r2d2::Error) -> Self {
        AppError::Unavailable(format!(
            "no database connection available ({e}); retry shortly"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_message_names_the_first_field() {
        let e = AppError::validation(vec![
            FieldError::new("orders[0].id", "is required"),
            FieldError::new("orders[1].id", "is required"),
        ]);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "invalid request: `orders[0].id` is required (and 1 more problems)"
        );
    }

    #[test]
    fn disk_full_is_503() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        assert_eq!(AppError::from(e).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn rate_limit_sets_retry_after() {
        let r = AppError::TooManyRequests(Duration::from_secs(42)).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "42");
    }
}
