//! Logs (tracing) and metrics (the `metrics` facade, rendered by the Prometheus
//! exporter at `GET /metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::App;

/// Installs the log subscriber: level from `RUST_LOG`, else `level`. Logs go to
/// stderr so stdout stays for command output (tokens, tables).
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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
            PrometheusBuilder::new()
                .set_buckets(&latency_buckets)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
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
