//! docs/openapi.json against the real server: the document served at
//! `GET /api/openapi.json` is the file, every documented path+method exists
//! (never 404 ROUTE_NOT_FOUND nor 405), and every real route is documented
//! (routes found in the router's source, and methods found by probing).

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::collections::BTreeSet;

use helpers::*;
use reqwest::Method;
use serde_json::{json, Value};

const DOC: &str = include_str!("../docs/openapi.json");
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

/// (path template, method) pairs the document describes.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m).is_some() {
                out.insert((path.clone(), m.to_string()));
            }
        }
    }
    out
}

fn concrete(template: &str) -> String {
    template.replace("{id}", "probe-id")
}

/// A path template for a concrete probe path.
fn template(path: &str) -> String {
    path.replace("probe-id", "{id}")
}

fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|x| refs(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_and_every_ref_resolves() {
    let d = doc();
    assert_eq!(d["openapi"], "3.1.0");
    assert!(d["info"]["title"].is_string() && d["info"]["version"].is_string());
    assert_eq!(
        d["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut all = Vec::new();
    refs(&d, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let ptr = r.strip_prefix('#').expect("local refs only");
        assert!(d.pointer(ptr).is_some(), "dangling $ref {r}");
    }
    let mut ids = BTreeSet::new();
    for (path, item) in d["paths"].as_object().unwrap() {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                let id = op["operationId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{m} {path}"));
                assert!(ids.insert(id.to_string()), "duplicate operationId {id}");
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
    }
}

/// Paths in the router's source: `warp::path!("a" / "b" / String)` and the
/// embedded assets' `path: "/…"`.
fn source_routes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for src in [
        include_str!("../src/http.rs"),
        include_str!("../src/ws.rs"),
        include_str!("../src/web.rs"),
    ] {
        for part in src.split("path!(").skip(1) {
            let inner = &part[..part.find(')').unwrap()];
            let segs: Vec<String> = inner
                .split('/')
                .map(|s| s.trim())
                .map(|s| match s.strip_prefix('"') {
                    Some(lit) => lit.trim_end_matches('"').to_string(),
                    None => "{id}".to_string(),
                })
                .collect();
            out.insert(format!("/{}", segs.join("/")));
        }
        for part in src.split("path: \"").skip(1) {
            out.insert(part[..part.find('"').unwrap()].to_string());
        }
        if src.contains("\"/index.html\" =>") {
            out.insert("/index.html".into());
        }
    }
    out
}

#[test]
fn every_route_in_the_router_source_is_documented() {
    let d = doc();
    let paths: BTreeSet<String> = d["paths"].as_object().unwrap().keys().cloned().collect();
    let routes = source_routes();
    assert!(routes.len() >= 10, "found routes: {routes:?}");
    for r in &routes {
        assert!(paths.contains(r), "route {r} is not in docs/openapi.json");
    }
}

#[tokio::test]
async fn documented_and_real_routes_match_on_a_live_server() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    // Served verbatim.
    let served = app
        .request(Method::GET, "/api/openapi.json", None, None)
        .await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, doc());

    let d = doc();
    let docs = documented(&d);
    let mut candidates: BTreeSet<String> = d["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(|p| concrete(p))
        .collect();
    // Plausible routes that must NOT exist (or, if they do, must be documented).
    for p in [
        "/api",
        "/api/users",
        "/api/tokens",
        "/api/events",
        "/api/pending-orders/probe-id/unlock",
        "/api/pending-orders/probe-id/history",
        "/api/auth",
        "/api/auth/register",
        "/ws",
        "/health",
        "/favicon.ico",
        "/admin",
    ] {
        candidates.insert(p.to_string());
    }
    let mut found = BTreeSet::new();
    for path in &candidates {
        for m in METHODS {
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let body = matches!(m, "post" | "put" | "patch").then(|| json!({}));
            let r = app.request(method, path, Some(&t), body).await;
            let missing = r.status == 405
                || (r.status == 404 && r.body["code"] == "ROUTE_NOT_FOUND")
                || r.status.is_server_error();
            assert!(!r.status.is_server_error(), "{m} {path}: {}", r.status);
            if !missing {
                found.insert((template(path), m.to_string()));
            }
        }
    }
    for op in &docs {
        assert!(found.contains(op), "documented but not served: {op:?}");
    }
    for op in &found {
        assert!(docs.contains(op), "served but not documented: {op:?}");
    }
}
