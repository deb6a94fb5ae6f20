//! The demo page, the browser client and the OpenAPI document, embedded in the
//! binary (no files to deploy). Served with a content type, an ETag and `Cache-Control: no-cache`,
//! so browsers revalidate cheaply and always run the binary's own version.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::path::FullPath;
use warp::reply::Response;
use warp::Rejection;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../web/index.html"),
    },
    Asset {
        path: "/ordersync.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/ordersync.js"),
    },
    Asset {
        path: "/api/openapi.json",
        content_type: "application/json; charset=utf-8",
        body: include_str!("../docs/openapi.json"),
    },
    Asset {
        path: "/ordersync.d.ts",
        content_type: "application/typescript; charset=utf-8",
        body: include_str!("../web/ordersync.d.ts"),
    },
];

fn etags() -> &'static Vec<String> {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                format!(
                    "\"{}\"",
                    &hex::encode(Sha256::digest(a.body.as_bytes()))[..16]
                )
            })
            .collect()
    })
}

/// GET of an embedded asset; anything else falls through (404 from the router).
pub async fn serve(path: FullPath, headers: HeaderMap) -> Result<Response, Rejection> {
    let path = match path.as_str() {
        "/index.html" => "/",
        p => p,
    };
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return Err(warp::reject::not_found());
    };
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        let mut r = Response::new(Default::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(asset.body.into())
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(etag).expect("hex is a header value"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}
