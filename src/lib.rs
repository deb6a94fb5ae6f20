//! ordersync: pending orders in a local SQLite file, pushed live to every device
//! of their user over WebSocket, without gaps.
//!
//! # Layout
//!
//! Data flows one way: `http` → `orders` (parsing) → `store` → `hub` → `ws`.
//!
//! * [`config`] — the command line (clap) and `ORDERSYNC_*` variables; every limit is a flag.
//! * [`orders`] — the domain: `OrderInput` parsed from untrusted JSON, `Order` as returned.
//! * [`store`] — SQLite: the single writer thread with group commit (and the VFS
//!   that writes its commits' WAL frames in one go), the read-only pool, the schema
//!   and its migrations, SQL for orders, events and accounts.
//! * [`hub`] — events and the per-user broadcast channels the writer publishes to.
//! * [`auth`] — passwords, built-in tokens, JWTs, the login rate limiter.
//! * [`http`] — warp filters and handlers of the REST API, the error envelope.
//! * [`ws`] — the WebSocket session: replay from the log, then live, with lag repair.
//! * [`web`] — the embedded demo page and browser client.
//! * [`cli`] — the admin subcommands (`user`, `token`, `backup`, `check`, `demo`).
//! * [`telemetry`] — logs and metrics.
//!
//! [`run`] serves on a listener the caller bound, until the caller's shutdown
//! future resolves: `main` passes SIGINT/SIGTERM, tests bind `127.0.0.1:0`.

pub mod auth;
pub mod cli;
pub mod config;
pub mod cors;
pub mod error;
pub mod http;
pub mod hub;
pub mod json;
pub mod orders;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod ws;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::auth::{Authenticator, LoginLimiter};
use crate::config::ServeArgs;
use crate::hub::{now_ms, Control};
use crate::store::{Store, StoreOptions};

/// Everything a request handler needs. Shared as `Arc<App>`.
pub struct App {
    pub store: Store,
    pub auth: Authenticator,
    pub limiter: LoginLimiter,
    pub cfg: ServeArgs,
    /// Set when shutdown begins: /readyz turns 503, new sockets are closed with 1001.
    pub shutting_down: AtomicBool,
    pub sessions: Sessions,
    pub metrics: Option<PrometheusHandle>,
    /// The separate listener of `--metrics-listen`, bound by [`build`].
    pub ops: Option<telemetry::OpsListener>,
}

impl App {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Counts open WebSocket sessions so shutdown can wait for them (warp does not
/// track upgraded connections).
#[derive(Default)]
pub struct Sessions {
    open: AtomicUsize,
    closed: Notify,
}

impl Sessions {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn enter_raw(&self) {
        self.open.fetch_add(1, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    /// Waits until no session is open, at most `limit`. Returns how many remain.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open();
            }
        }
    }
}

/// Held by a session task; dropping it marks the session closed.
pub struct OwnedSessionGuard(Arc<App>);

impl Drop for OwnedSessionGuard {
    fn drop(&mut self) {
        self.0.sessions.leave();
    }
}

impl App {
    /// Registers a session; keep the guard for the session's lifetime.
    pub fn enter_session(self: &Arc<Self>) -> OwnedSessionGuard {
        self.sessions.enter_raw();
        OwnedSessionGuard(self.clone())
    }
}

/// Opens the store and builds the shared state.
pub fn build(db: &Path, cfg: ServeArgs) -> anyhow::Result<Arc<App>> {
    let opts = StoreOptions {
        sync: cfg.sync,
        busy_timeout: cfg.busy_timeout,
        read_pool: cfg.read_pool,
        max_group: cfg.max_group,
        hub_capacity: cfg.ws_buffer,
    };
    let store = Store::open(db, &opts)?;
    let ops = cfg
        .metrics_listen
        .map(telemetry::OpsListener::bind)
        .transpose()?;
    Ok(Arc::new(App {
        ops,
        store,
        auth: Authenticator::new(cfg.jwt_secret.as_deref()),
        limiter: LoginLimiter::new(cfg.login_max_failures, cfg.login_window),
        metrics: if cfg.metrics {
            telemetry::metrics_handle()
        } else {
            None
        },
        cfg,
        shutting_down: AtomicBool::new(false),
        sessions: Sessions::default(),
    }))
}

/// Serves `app` on `listener` until `shutdown` resolves, then: stop accepting,
/// close sockets with 1001, finish in-flight requests, checkpoint, return.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener has no address")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let poller = tokio::spawn(watch_revocations(app.clone(), stop_rx.clone()));
    let pruner = tokio::spawn(prune_events(app.clone(), stop_rx.clone()));
    let ops = telemetry::serve_ops(app.clone(), stop_rx.clone())?;

    let signal_app = app.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: closing sockets, finishing requests");
        signal_app.shutting_down.store(true, Ordering::SeqCst);
        signal_app.store.hub().control(Control::Shutdown);
    };
    tracing::info!(%addr, db = %app.store.path().display(), "serving");
    warp::serve(http::routes(app.clone()))
        .incoming(listener)
        .graceful(signal)
        .run()
        .await;

    let left = app.sessions.wait_idle(app.cfg.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            sockets = left,
            "sockets still open after the shutdown grace period"
        );
    }
    let _ = stop_tx.send(true);
    let _ = poller.await;
    let _ = pruner.await;
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    app.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Polls for tokens revoked and users disabled by another process (the CLI) and
/// closes their sockets; in-process revocations are announced directly.
async fn watch_revocations(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut since = now_ms();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // Overlap windows by a second so clock skew between processes cannot hide
        // a revocation; announcing one twice is harmless.
        let from = since - 1000;
        let started = now_ms();
        match app
            .store
            .read(move |c| store::accounts::revocations_since(c, from))
            .await
        {
            Ok((tokens, users)) => {
                for t in tokens {
                    app.store.hub().control(Control::TokenRevoked(t));
                }
                for u in users {
                    app.store.hub().control(Control::UserDisabled(u));
                }
                since = started;
            }
            Err(e) => tracing::warn!(error = %e, "revocation poll failed"),
        }
    }
}

/// Prunes events older than `--event-retention`, at start and then periodically.
async fn prune_events(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let retention = app.cfg.event_retention;
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let cutoff = now_ms() - retention.as_millis() as i64;
        match app
            .store
            .write(move |tx| store::events::prune(tx, cutoff))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "pruned events past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning events failed"),
        }
    }
}
