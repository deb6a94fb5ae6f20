//! Logs (tracing) and metrics (the `metrics` facade, rendered by the Prometheus
//! exporter at `GET /metrics`), and the optional separate listener of
//! `--metrics-listen` for `/metrics`, `/healthz` and `/readyz`.
//!
//! Metrics (all prefixed `ordersync_`), where they are emitted:
//! * `http.rs`: `http_requests_total{route,status}`, `http_request_duration_seconds{route}`;
//! * `store/writer.rs`: `events_appended_total`, `write_transaction_seconds`,
//!   `write_group_size`, `write_failures_total`;
//! * `ws.rs`: `events_delivered_total`, `ws_lag_catchups_total`, `ws_resyncs_total`;
//! * here, sampled on each scrape: `ws_open_sockets`, `writer_queue_depth`, `database_bytes`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;
use warp::http::{header, HeaderValue};
use warp::reply::Response;
use warp::Filter;

use crate::config::LogFormat;
use crate::error::AppError;
use crate::App;

/// Installs the log subscriber: level from `RUST_LOG`, else `level`. Logs go to
/// stderr so stdout stays for command output (tokens, tables).
///
/// Lines are written by a background thread (`tracing_appender::non_blocking`),
/// so a request never waits for a `write(2)` to stderr. Keep the returned guard
/// alive until exit: dropping it flushes the remaining lines.
#[must_use = "dropping the guard stops (and flushes) the log writer"]
pub fn init_logging(level: &str, format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        // warp logs every malformed request from a client as an ERROR
        // ("server connection error"), which lets any bad client flood the log;
        // our own request lines already cover the traffic. RUST_LOG overrides.
        .or_else(|_| EnvFilter::try_new(format!("{level},warp::server=off")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        // Under a flood, block rather than drop lines: the log is part of the contract.
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        // One JSON object per line, fields at the top level, never colour codes.
        LogFormat::Json => builder
            .with_ansi(false)
            .json()
            .flatten_event(true)
            .try_init(),
    };
    guard
}

/// The process-wide metrics recorder (installed once, shared by every server in
/// the process, e.g. in tests).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let group_buckets = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let handle = PrometheusBuilder::new()
                .set_buckets(&latency_buckets)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("ordersync_write_group_size".into()),
                    &group_buckets,
                )
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// HELP lines of every metric (docs/operations.md lists them too).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "ordersync_http_requests_total",
        "HTTP requests answered, by route and status"
    );
    describe_histogram!(
        "ordersync_http_request_duration_seconds",
        Unit::Seconds,
        "Time from request to response, by route"
    );
    describe_counter!(
        "ordersync_events_appended_total",
        "Events committed to the event log"
    );
    describe_histogram!(
        "ordersync_write_transaction_seconds",
        Unit::Seconds,
        "Duration of each group-commit write transaction"
    );
    describe_histogram!(
        "ordersync_write_group_size",
        "Write requests committed together in one transaction"
    );
    describe_counter!(
        "ordersync_write_failures_total",
        "Write requests that failed (nothing committed; answered 503)"
    );
    describe_counter!(
        "ordersync_events_delivered_total",
        "Events sent to WebSocket clients (replay and live)"
    );
    describe_counter!(
        "ordersync_ws_lag_catchups_total",
        "Times a slow socket fell behind the live channel and re-read the log"
    );
    describe_counter!(
        "ordersync_ws_resyncs_total",
        "RESYNC_REQUIRED frames sent (since older than retention, ahead, or invalid)"
    );
    describe_gauge!("ordersync_ws_open_sockets", "Open WebSocket sessions");
    describe_gauge!(
        "ordersync_writer_queue_depth",
        "Write requests waiting for the writer thread"
    );
    describe_gauge!(
        "ordersync_database_bytes",
        Unit::Bytes,
        "Size of the database file plus its WAL"
    );
}

/// Gauges sampled when /metrics is scraped.
pub fn record_gauges(app: &App) {
    metrics::gauge!("ordersync_ws_open_sockets").set(app.sessions.open() as f64);
    metrics::gauge!("ordersync_writer_queue_depth").set(app.store.queue_depth() as f64);
    let db = app.store.path();
    let size: u64 = ["", "-wal"]
        .iter()
        .filter_map(|suffix| {
            let mut p = db.as_os_str().to_owned();
            p.push(suffix);
            std::fs::metadata(p).ok().map(|m| m.len())
        })
        .sum();
    metrics::gauge!("ordersync_database_bytes").set(size as f64);
}

/// The Prometheus text exposition, or 404 with `--metrics false`.
pub fn render(app: &App) -> Result<Response, AppError> {
    match (&app.metrics, app.cfg.metrics) {
        (Some(handle), true) => {
            record_gauges(app);
            let mut resp = Response::new(handle.render().into());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(resp)
        }
        _ => Err(AppError::NotFound(
            "metrics are disabled (--metrics false)".into(),
        )),
    }
}

/// The listener of `--metrics-listen`, bound when the app is built (so a bad
/// address fails the start) and served by [`serve_ops`].
pub struct OpsListener {
    pub addr: SocketAddr,
    listener: Mutex<Option<std::net::TcpListener>>,
}

impl OpsListener {
    pub fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on {addr} for --metrics-listen; pick another address")
        })?;
        listener.set_nonblocking(true)?;
        Ok(OpsListener {
            addr: listener.local_addr()?,
            listener: Mutex::new(Some(listener)),
        })
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on the `--metrics-listen`
/// listener until `stop` turns true. Unlike the main listener, which stops
/// accepting as soon as shutdown begins, this one keeps answering while
/// requests and sockets drain, so a monitor sees `/readyz` 503 and `/healthz`
/// 200 until the server has stopped.
pub fn serve_ops(
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(ops) = &app.ops else {
        return Ok(None);
    };
    let Some(std_listener) = ops.listener.lock().unwrap().take() else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    tracing::info!(addr = %ops.addr, "serving /metrics, /healthz, /readyz");
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_app.clone())
        .map(|app: Arc<App>| render(&app).unwrap_or_else(AppError::into_response));
    let health = warp::path!("healthz")
        .and(warp::get())
        .and(with_app.clone())
        .and_then(crate::http::healthz);
    let ready = warp::path!("readyz")
        .and(warp::get())
        .and(with_app)
        .and_then(crate::http::readyz);
    let not_found = warp::any().map(|| {
        AppError::NotFound("this listener serves /metrics, /healthz and /readyz".into())
            .into_response()
    });
    let routes = metrics
        .or(health)
        .unify()
        .or(ready)
        .unify()
        .or(not_found)
        .unify();
    let server = warp::serve(routes)
        .incoming(listener)
        .graceful(async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        })
        .run();
    Ok(Some(tokio::spawn(server)))
}
