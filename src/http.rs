//! HTTP: warp filters (one per endpoint), their handlers, and the one rejection
//! handler that turns every failure into the JSON envelope.
//!
//! Routing filters only match method and path and extract raw parts (headers,
//! query, body stream); they never fail on bad input. All checking happens in the
//! handlers, which turn errors into envelopes themselves, so a bad token or body
//! can never be mistaken by warp for "try the next route".

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use warp::http::{header, HeaderMap, Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter, Rejection};

use crate::auth::{self, Principal};
use crate::error::{json_response, AppError};
use crate::hub::{now_ms, Control};
use crate::orders::{self, Limits, Order};
use crate::store::{accounts, orders as order_sql};
use crate::App;

/// Most ids accepted in `GET /api/pending-orders?ids=`.
pub const MAX_IDS_PER_GET: usize = 1000;

/// Per-request context: the route's name and who made the request, for the log
/// line and the metrics written when the response is ready.
pub struct Ctx {
    route: &'static str,
    method: Method,
    started: Instant,
    user: Option<String>,
}

impl Ctx {
    fn new(method: Method, route: &'static str) -> Self {
        Ctx {
            route,
            method,
            started: Instant::now(),
            user: None,
        }
    }

    /// Authenticates the request's bearer token and remembers the user for the log.
    async fn authenticate(
        &mut self,
        app: &App,
        headers: &HeaderMap,
    ) -> Result<Principal, AppError> {
        let token = bearer(headers).ok_or_else(|| {
            auth::unauthorized("missing bearer token: send `Authorization: Bearer <token>`")
        })?;
        let p = app.auth.authenticate(&app.store, token).await?;
        self.user = Some(p.user_id.clone());
        Ok(p)
    }

    fn finish(self, result: Result<Response, AppError>) -> Result<Response, Infallible> {
        let resp = result.unwrap_or_else(AppError::into_response);
        log_request(
            &self.method,
            self.route,
            resp.status(),
            self.started,
            self.user.as_deref(),
        );
        Ok(resp)
    }
}

fn log_request(
    method: &Method,
    route: &str,
    status: StatusCode,
    started: Instant,
    user: Option<&str>,
) {
    let elapsed = count_request(route, status, started);
    tracing::info!(
        target: "ordersync::request",
        method = %method,
        route,
        status = status.as_u16(),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        user = user.unwrap_or("-"),
        "request"
    );
}

/// The request metrics (without the log line); returns the latency.
fn count_request(route: &str, status: StatusCode, started: Instant) -> std::time::Duration {
    let elapsed = started.elapsed();
    let status_text = status.as_u16().to_string();
    metrics::counter!("ordersync_http_requests_total", "route" => route.to_string(), "status" => status_text)
        .increment(1);
    metrics::histogram!("ordersync_http_request_duration_seconds", "route" => route.to_string())
        .record(elapsed.as_secs_f64());
    elapsed
}

/// The bearer token of a request (`Authorization: Bearer …`), if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The client's address: the peer's, or, when the peer is a `--trusted-proxy`,
/// the nearest X-Forwarded-For entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[std::net::IpAddr],
) -> Option<std::net::IpAddr> {
    let mut ip = peer?.ip();
    if !trusted.contains(&ip) {
        return Some(ip);
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in forwarded.iter().rev() {
        match hop.trim().parse() {
            Ok(hop_ip) => {
                ip = hop_ip;
                if !trusted.contains(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(ip)
}

fn ok(body: &impl Serialize) -> Result<Response, AppError> {
    Ok(json_response(StatusCode::OK, body))
}

/// All routes, with the rejection handler.
pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let headers = warp::header::headers_cloned();
    let body = warp::body::stream();
    let query = warp::query::<HashMap<String, String>>();
    let order_id = warp::path::param::<String>();

    let health = warp::path!("healthz")
        .and(warp::get())
        .and(with_app.clone())
        .and_then(healthz);
    let ready = warp::path!("readyz")
        .and(warp::get())
        .and(with_app.clone())
        .and_then(readyz);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_app.clone())
        .and_then(metrics_text);
    // Embedded assets: a bounded set of paths, so the path is the route label.
    let statics = warp::get()
        .and(warp::any().map(Instant::now))
        .and(warp::path::full())
        .and(headers)
        .and_then(
            |started: Instant, path: warp::path::FullPath, headers| async move {
                let route = format!("GET {}", path.as_str());
                let resp = crate::web::serve(path, headers).await?;
                log_request(&Method::GET, &route, resp.status(), started, None);
                Ok::<_, Rejection>(resp)
            },
        );

    let login = warp::path!("api" / "auth" / "login")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::addr::remote())
        .and(headers)
        .and(body)
        .and_then(login);
    let logout = warp::path!("api" / "auth" / "logout")
        .and(warp::post())
        .and(with_app.clone())
        .and(headers)
        .and_then(logout);
    let me = warp::path!("api" / "auth" / "me")
        .and(warp::get())
        .and(with_app.clone())
        .and(headers)
        .and_then(me);

    let list = warp::path!("api" / "pending-orders")
        .and(warp::get())
        .and(with_app.clone())
        .and(headers)
        .and(query)
        .and_then(list_orders);
    let get_one = warp::path!("api" / "pending-orders" / String)
        .and(warp::get())
        .and(with_app.clone())
        .and(headers)
        .and_then(get_order);
    let upsert = warp::path!("api" / "pending-orders")
        .and(warp::post())
        .and(with_app.clone())
        .and(headers)
        .and(body)
        .and_then(upsert_orders);
    let delete = warp::path("api")
        .and(warp::path("pending-orders"))
        .and(order_id)
        .and(warp::path::end())
        .and(warp::delete())
        .and(with_app.clone())
        .and(headers)
        .and(query)
        .and_then(delete_order);
    let lock = warp::path!("api" / "pending-orders" / String / "lock")
        .and(warp::patch())
        .and(with_app.clone())
        .and(headers)
        .and(body)
        .and_then(lock_order);

    // WebSocket handshakes: counted like every request; refusals (400, 403) are
    // logged here, an accepted upgrade (101) by ws.rs.
    let ws = warp::any()
        .map(Instant::now)
        .and(crate::ws::route(app.clone()))
        .map(|started: Instant, resp: Response| {
            const ROUTE: &str = "GET /ws/realtime";
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                count_request(ROUTE, resp.status(), started);
            } else {
                log_request(&Method::GET, ROUTE, resp.status(), started, None);
            }
            resp
        });

    let api = login
        .or(logout)
        .unify()
        .or(me)
        .unify()
        .or(list)
        .unify()
        .or(get_one)
        .unify()
        .or(upsert)
        .unify()
        .or(delete)
        .unify()
        .or(lock)
        .unify();
    let all = cors_preflight(app.clone())
        .or(health)
        .unify()
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(ws)
        .unify()
        .or(api)
        .unify()
        .or(statics)
        .unify()
        .recover(handle_rejection)
        .unify();
    with_cors(all, Arc::new(app.cfg.cors_origin.clone()))
}

/// Answers CORS preflights for allowed origins (other requests fall through).
fn cors_preflight(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    // Not `warp::options()`: its rejection would turn every 404 into a 405.
    let only_options = warp::method()
        .and_then(|m: Method| async move {
            if m == Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    only_options
        .and(warp::header::headers_cloned())
        .and_then(move |headers: HeaderMap| {
            let app = app.clone();
            async move {
                let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
                match crate::cors::is_preflight(&Method::OPTIONS, &headers)
                    .then(|| crate::cors::preflight(&app.cfg.cors_origin, origin))
                    .flatten()
                {
                    Some(resp) => Ok(resp),
                    None => Err(warp::reject::not_found()),
                }
            }
        })
}

/// Adds `Access-Control-Allow-Origin` for allowed origins.
fn with_cors(
    inner: impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
    origins: Arc<Vec<String>>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    warp::header::optional::<String>("origin")
        .or(warp::any().map(|| None))
        .unify()
        .and(inner)
        .map(move |origin: Option<String>, mut resp: Response| {
            if !origins.is_empty() {
                crate::cors::add_headers(&origins, origin.as_deref(), &mut resp);
            }
            resp
        })
}

/// Reads a JSON body: 415 unless `Content-Type: application/json`, 413 past
/// `limit` bytes (checked on Content-Length and while streaming), 400 if not JSON.
pub async fn read_json<S, B>(headers: &HeaderMap, body: S, limit: usize) -> Result<Value, AppError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" {
        return Err(AppError::UnsupportedMediaType(format!(
            "send the body as JSON with `Content-Type: application/json` (got `{}`)",
            if ct.is_empty() { "nothing" } else { ct }
        )));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::PayloadTooLarge(limit));
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit as u64) as usize);
    let mut body = body;
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            AppError::bad_request("BAD_BODY", format!("could not read the body: {e}"))
        })?;
        while chunk.has_remaining() {
            let part = chunk.chunk();
            if buf.len() + part.len() > limit {
                return Err(AppError::PayloadTooLarge(limit));
            }
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    crate::json::parse_strict(&buf).map_err(|msg| {
        AppError::bad_request(
            "MALFORMED_JSON",
            format!("the body is not valid JSON: {msg}"),
        )
    })
}

pub(crate) async fn healthz(app: Arc<App>) -> Result<Response, Infallible> {
    let ctx = Ctx::new(Method::GET, "GET /healthz");
    let r = app
        .store
        .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await
        .and_then(|_| ok(&json!({"success": true, "status": "ok"})));
    ctx.finish(r)
}

pub(crate) async fn readyz(app: Arc<App>) -> Result<Response, Infallible> {
    let ctx = Ctx::new(Method::GET, "GET /readyz");
    let r = async {
        if app.shutting_down.load(Ordering::SeqCst) {
            return Err(AppError::Unavailable("shutting down".into()));
        }
        // An empty write transaction: proves the writer is alive and can lock the file.
        // A file opened read-only (e.g. no write permission at startup) can still be
        // locked, so ask SQLite whether the connection can write at all.
        app.store
            .write(|tx| match tx.conn().is_readonly(rusqlite::MAIN_DB) {
                Ok(false) => Ok(()),
                _ => Err(AppError::Unavailable(
                    "the database is read-only; check the file's permissions and restart".into(),
                )),
            })
            .await?;
        ok(&json!({"success": true, "status": "ready"}))
    }
    .await;
    ctx.finish(r)
}

async fn metrics_text(app: Arc<App>) -> Result<Response, Infallible> {
    let ctx = Ctx::new(Method::GET, "GET /metrics");
    let r = if app.cfg.metrics_listen.is_some() {
        Err(AppError::NotFound(
            "metrics are served on the --metrics-listen address".into(),
        ))
    } else {
        crate::telemetry::render(&app)
    };
    ctx.finish(r)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoginBody {
    username: String,
    password: String,
    device_id: Option<String>,
    label: Option<String>,
}

async fn login(
    app: Arc<App>,
    addr: Option<SocketAddr>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::POST, "POST /api/auth/login");
    let r = async {
        let value = read_json(&headers, body, app.cfg.max_body).await?;
        let b: LoginBody = serde_json::from_value(value).map_err(|e| {
            AppError::bad_request("VALIDATION_ERROR", format!("invalid login body: {e}"))
        })?;
        if b.username.is_empty() || b.password.is_empty() {
            return Err(AppError::bad_request(
                "VALIDATION_ERROR",
                "username and password are required",
            ));
        }
        for (name, v) in [("deviceId", &b.device_id), ("label", &b.label)] {
            if v.as_ref().is_some_and(|s| s.chars().count() > 128) {
                return Err(AppError::validation(vec![orders::FieldError::new(
                    name,
                    "must be at most 128 characters",
                )]));
            }
        }
        let ip = client_ip(addr, &headers, &app.cfg.trusted_proxy);
        app.limiter.check(&b.username, ip)?;
        let name = b.username.clone();
        let user = app
            .store
            .read(move |c| accounts::find_user(c, &name))
            .await?;
        let password = b.password.clone();
        let hash = user
            .as_ref()
            .filter(|u| !u.disabled)
            .map(|u| u.password_hash.clone());
        let valid = tokio::task::spawn_blocking(move || match hash {
            Some(h) => auth::verify_password(&password, &h),
            None => {
                auth::verify_password(&password, auth::dummy_hash());
                false
            }
        })
        .await
        .map_err(|e| AppError::Internal(format!("password check failed: {e}")))?;
        let Some(user) = user.filter(|_| valid) else {
            app.limiter.record_failure(&b.username, ip);
            return Err(AppError::Unauthorized(
                "invalid username or password".into(),
            ));
        };
        app.limiter.record_success(&b.username);
        ctx.user = Some(user.id.clone());
        let token = auth::new_token();
        let hash = auth::token_hash(&token);
        let expires_at = now_ms() + app.cfg.token_ttl.as_millis() as i64;
        let user_id = user.id.clone();
        app.store
            .write(move |tx| {
                let t = accounts::NewToken {
                    hash: &hash,
                    user_id: &user_id,
                    label: b.label.as_deref(),
                    device_id: b.device_id.as_deref(),
                    expires_at: Some(expires_at),
                };
                accounts::insert_token(tx.conn(), &t, tx.now())
            })
            .await?;
        ok(&json!({
            "success": true,
            "token": token,
            "user": {"id": user.id, "username": user.username},
            "expiresAt": expires_at,
        }))
    }
    .await;
    ctx.finish(r)
}

async fn logout(app: Arc<App>, headers: HeaderMap) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::POST, "POST /api/auth/logout");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        // A JWT cannot be revoked here: its issuer controls it; logout is a no-op for it.
        if let Some(hash) = p.token_hash {
            let h = hash.clone();
            app.store
                .write(move |tx| accounts::revoke_hash(tx.conn(), &h, tx.now()))
                .await?;
            app.store.hub().control(Control::TokenRevoked(hash));
        }
        ok(&json!({"success": true}))
    }
    .await;
    ctx.finish(r)
}

async fn me(app: Arc<App>, headers: HeaderMap) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::GET, "GET /api/auth/me");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        ok(&json!({"success": true, "user": {"id": p.user_id, "username": p.username}}))
    }
    .await;
    ctx.finish(r)
}

#[derive(Serialize)]
struct ListReply {
    success: bool,
    orders: Vec<Order>,
    seq: i64,
}

async fn list_orders(
    app: Arc<App>,
    headers: HeaderMap,
    query: HashMap<String, String>,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::GET, "GET /api/pending-orders");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        let ids: Option<Vec<String>> = query.get("ids").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        });
        if ids.as_ref().is_some_and(|ids| ids.len() > MAX_IDS_PER_GET) {
            return Err(AppError::bad_request(
                "TOO_MANY_IDS",
                format!("at most {MAX_IDS_PER_GET} ids per request"),
            ));
        }
        if let Some(unknown) = query.keys().find(|k| k.as_str() != "ids") {
            return Err(AppError::bad_request(
                "UNKNOWN_PARAMETER",
                format!("unknown query parameter `{unknown}` (only `ids` is accepted)"),
            ));
        }
        let user = p.user_id.clone();
        let (orders, seq) = app
            .store
            .read(move |c| order_sql::list(c, &user, ids.as_deref()))
            .await?;
        ok(&ListReply {
            success: true,
            orders,
            seq,
        })
    }
    .await;
    ctx.finish(r)
}

/// The order id of a URL path segment (percent-decoded). An id that cannot be
/// valid cannot exist: 404.
fn path_id(raw: &str) -> Result<String, AppError> {
    let id = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| order_sql::not_found(raw))?
        .into_owned();
    orders::check_id(&id).map_err(|_| order_sql::not_found(&id))?;
    Ok(id)
}

async fn get_order(
    raw_id: String,
    app: Arc<App>,
    headers: HeaderMap,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::GET, "GET /api/pending-orders/{id}");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        let id = path_id(&raw_id)?;
        let user = p.user_id.clone();
        let lookup = id.clone();
        let order = app
            .store
            .read(move |c| order_sql::get(c, &user, &lookup))
            .await?
            .ok_or_else(|| order_sql::not_found(&id))?;
        #[derive(Serialize)]
        struct One {
            success: bool,
            order: Order,
        }
        ok(&One {
            success: true,
            order,
        })
    }
    .await;
    ctx.finish(r)
}

async fn upsert_orders(
    app: Arc<App>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::POST, "POST /api/pending-orders");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        let value = read_json(&headers, body, app.cfg.max_body).await?;
        let limits = Limits {
            max_batch: app.cfg.max_batch,
            max_items: app.cfg.max_items,
        };
        let batch = orders::parse_batch(&value, limits).map_err(AppError::validation)?;
        let user = p.user_id.clone();
        let (results, seq) = app
            .store
            .write(move |tx| order_sql::upsert(tx, &user, &batch))
            .await?;
        // Serialized straight to bytes (json! would build a Value tree first).
        #[derive(Serialize)]
        struct Reply<'a> {
            success: bool,
            results: &'a [order_sql::UpsertResult],
            seq: i64,
        }
        ok(&Reply {
            success: true,
            results: &results,
            seq,
        })
    }
    .await;
    ctx.finish(r)
}

async fn delete_order(
    raw_id: String,
    app: Arc<App>,
    headers: HeaderMap,
    query: HashMap<String, String>,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::DELETE, "DELETE /api/pending-orders/{id}");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        let id = path_id(&raw_id)?;
        if let Some(unknown) = query
            .keys()
            .find(|k| !matches!(k.as_str(), "deviceId" | "baseVersion"))
        {
            return Err(AppError::bad_request(
                "UNKNOWN_PARAMETER",
                format!("unknown query parameter `{unknown}` (accepted: deviceId, baseVersion)"),
            ));
        }
        let base_version = match query.get("baseVersion") {
            None => None,
            Some(v) => Some(v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                AppError::validation(vec![orders::FieldError::new(
                    "baseVersion",
                    "must be a whole number, 0 or more",
                )])
            })?),
        };
        let device = device_param(query.get("deviceId"), &p)?;
        let user = p.user_id.clone();
        let seq = app
            .store
            .write(move |tx| order_sql::delete(tx, &user, &id, base_version, device.as_deref()))
            .await?;
        ok(&json!({"success": true, "seq": seq}))
    }
    .await;
    ctx.finish(r)
}

/// The device a request comes from: the explicit value, else the token's device.
fn device_param(explicit: Option<&String>, p: &Principal) -> Result<Option<String>, AppError> {
    match explicit {
        Some(d) if d.is_empty() || d.chars().count() > orders::MAX_ID_CHARS => {
            Err(AppError::validation(vec![orders::FieldError::new(
                "deviceId",
                format!("must be 1 to {} characters", orders::MAX_ID_CHARS),
            )]))
        }
        Some(d) => Ok(Some(d.clone())),
        None => Ok(p.device_id.clone()),
    }
}

async fn lock_order(
    raw_id: String,
    app: Arc<App>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
) -> Result<Response, Infallible> {
    let mut ctx = Ctx::new(Method::PATCH, "PATCH /api/pending-orders/{id}/lock");
    let r = async {
        let p = ctx.authenticate(&app, &headers).await?;
        let id = path_id(&raw_id)?;
        let value = read_json(&headers, body, app.cfg.max_body).await?;
        let mut errors = Vec::new();
        let obj = value.as_object().cloned().unwrap_or_default();
        if !value.is_object() {
            errors.push(orders::FieldError::new(
                "",
                "body must be an object like {\"locked\": true}",
            ));
        }
        for k in obj.keys() {
            if k != "locked" && k != "deviceId" {
                errors.push(orders::FieldError::new(k.as_str(), "unknown field"));
            }
        }
        let locked = match obj.get("locked") {
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                errors.push(orders::FieldError::new("locked", "must be true or false"));
                None
            }
            None if value.is_object() => {
                errors.push(orders::FieldError::new("locked", "is required"));
                None
            }
            None => None,
        };
        let device = match obj.get("deviceId") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                errors.push(orders::FieldError::new("deviceId", "must be a string"));
                None
            }
        };
        if !errors.is_empty() {
            return Err(AppError::validation(errors));
        }
        let locked = locked.expect("checked above");
        let device = device_param(device.as_ref(), &p)?;
        let user = p.user_id.clone();
        let res = app
            .store
            .write(move |tx| order_sql::set_locked(tx, &user, &id, locked, device.as_deref()))
            .await?;
        ok(&json!({
            "success": true,
            "id": res.id,
            "isLocked": res.is_locked,
            "version": res.version,
            "updatedAt": res.updated_at,
            "seq": res.seq,
        }))
    }
    .await;
    ctx.finish(r)
}

/// Turns warp's own rejections (no route, wrong method, bad query …) into envelopes.
async fn handle_rejection(err: Rejection) -> Result<Response, Infallible> {
    let started = Instant::now();
    let (status, code, message) = if err.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "ROUTE_NOT_FOUND",
            "no such route; see the API summary in the README".to_string(),
        )
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "this method is not allowed on this route".to_string(),
        )
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
            "the query string could not be decoded".to_string(),
        )
    } else if let Some(e) = err.find::<warp::reject::InvalidHeader>() {
        (StatusCode::BAD_REQUEST, "INVALID_HEADER", e.to_string())
    } else if let Some(e) = err.find::<warp::reject::MissingHeader>() {
        (StatusCode::BAD_REQUEST, "MISSING_HEADER", e.to_string())
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "the request body is too large".to_string(),
        )
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "unsupported content type".to_string(),
        )
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        (
            StatusCode::BAD_REQUEST,
            "BAD_REQUEST",
            "the request could not be handled".to_string(),
        )
    };
    log_request(&Method::GET, "-", status, started, None);
    Ok(json_response(
        status,
        &json!({"success": false, "error": message, "code": code}),
    ))
}
