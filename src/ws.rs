//! `GET /ws/realtime`: the WebSocket session.
//!
//! We finish the upgrade ourselves (instead of warp's `ws()`) to configure
//! tungstenite fully: a 1 KiB read buffer instead of the eager 128 KiB default,
//! a bounded write buffer, and small frame limits. That is what keeps an idle
//! socket cheap and a socket that never reads bounded.
//!
//! One task per socket. The session subscribes to its user's live channel
//! *before* reading the log's head, replays the log from `since`, then forwards
//! live events. It tracks the last seq it delivered and only ever sends
//! `last + 1`: duplicates (seen in both the log and the channel) are skipped, and
//! a lag or a gap is repaired by re-reading the log. Hence, per connection:
//! strictly increasing seqs, no holes, no duplicates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::auth::Principal;
use crate::error::AppError;
use crate::hub::{control_frame, Control};
use crate::store::events;
use crate::App;

/// Events read from the log per page when replaying or catching up.
const PAGE: usize = 1000;
/// Client frames allowed per second before the socket is closed (1008).
const MAX_CLIENT_FRAMES_PER_SEC: u32 = 50;

pub const CLOSE_AUTH_FAILED: u16 = 1008;
pub const CLOSE_REVOKED: u16 = 4001;
pub const CLOSE_GOING_AWAY: u16 = 1001;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// `GET /ws/realtime?token=&since=&lastEventTs=&deviceId=`
pub fn route(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("ws" / "realtime")
        .and(warp::get())
        .and(warp::any().map(move || app.clone()))
        .and(warp::header::headers_cloned())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(upgrade)
}

async fn upgrade(
    app: Arc<App>,
    headers: HeaderMap,
    query: HashMap<String, String>,
    on_upgrade: Option<OnUpgrade>,
) -> Result<Response, Rejection> {
    let started = std::time::Instant::now();
    let header_has = |name: header::HeaderName, want: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(want)))
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    let is_ws = header_has(header::UPGRADE, "websocket")
        && header_has(header::CONNECTION, "upgrade")
        && header_has(header::SEC_WEBSOCKET_VERSION, "13");
    let (Some(key), Some(on_upgrade), true) = (key, on_upgrade, is_ws) else {
        let e = AppError::bad_request(
            "WEBSOCKET_REQUIRED",
            "this endpoint is a WebSocket: connect with a WebSocket client (Upgrade: websocket, version 13)",
        );
        return Ok(e.into_response());
    };
    if let Err(e) = crate::cors::check_ws_origin(&app.cfg.cors_origin, &headers) {
        return Ok(e.into_response());
    }
    let token = query
        .get("token")
        .map(String::as_str)
        .or_else(|| crate::http::bearer(&headers))
        .map(str::to_string);
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(app.cfg.ws_max_frame))
        .max_frame_size(Some(app.cfg.ws_max_frame));
    let guard = app.enter_session();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                run(app, ws, query, token).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
        drop(guard);
    });
    let mut resp = Response::new(Default::default());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .expect("base64 is a header value"),
    );
    // The log line carries no query string: the token may be in it. The user is
    // authenticated after the upgrade; the `socket open` line names it.
    tracing::info!(target: "ordersync::request", method = %Method::GET, route = "GET /ws/realtime",
        status = 101, latency_ms = started.elapsed().as_secs_f64() * 1000.0, user = "-", "request");
    Ok(resp)
}

/// Why a session ended.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer went away or the socket failed: nothing more to send.
    Gone,
}

impl From<WsError> for End {
    fn from(e: WsError) -> Self {
        match e {
            WsError::Capacity(_) => End::Close(1009, "message too big"),
            _ => End::Gone,
        }
    }
}

struct Session {
    app: Arc<App>,
    ws: Socket,
    principal: Principal,
    /// Last seq delivered on this socket.
    last: i64,
    send_timeout: Duration,
}

async fn run(app: Arc<App>, ws: Socket, query: HashMap<String, String>, token: Option<String>) {
    let principal = match token {
        Some(t) => app.auth.authenticate(&app.store, &t).await.ok(),
        None => None,
    };
    let mut ws = ws;
    let Some(principal) = principal else {
        tracing::info!(reason = "authentication failed", "socket refused");
        close(&mut ws, CLOSE_AUTH_FAILED, "authentication failed").await;
        return;
    };
    let user = principal.user_id.clone();
    let device = query
        .get("deviceId")
        .filter(|d| !d.is_empty() && d.chars().count() <= crate::orders::MAX_ID_CHARS)
        .cloned()
        .or_else(|| principal.device_id.clone());
    let mut session = Session {
        send_timeout: app.cfg.ws_ping_interval * 2,
        app: app.clone(),
        ws,
        principal,
        last: 0,
    };
    tracing::info!(user = %user, device = device.as_deref().unwrap_or("-"), "socket open");
    let end = match session.serve(&query, device).await {
        Ok(()) => End::Gone,
        Err(end) => end,
    };
    let reason = match &end {
        End::Close(code, reason) => {
            close(&mut session.ws, *code, reason).await;
            format!("{code} {reason}")
        }
        End::Gone => "peer gone".to_string(),
    };
    tracing::info!(user = %user, reason = %reason, delivered_through = session.last, "socket closed");
    drop(session);
    app.store.hub().release(&user);
}

/// Sends a close frame, then waits briefly for the peer's close so the frame is
/// not lost to a reset connection.
async fn close(ws: &mut Socket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    if timeout(Duration::from_secs(1), ws.close(Some(frame)))
        .await
        .is_ok()
    {
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

impl Session {
    async fn serve(
        &mut self,
        query: &HashMap<String, String>,
        device: Option<String>,
    ) -> Result<(), End> {
        if self.app.is_shutting_down() {
            return Err(End::Close(CLOSE_GOING_AWAY, "server shutting down"));
        }
        let hub = self.app.store.hub().clone();
        let mut control = hub.subscribe_control();
        // Subscribe before reading the head: every event committed after the read
        // is then in the channel (possibly also in the log; duplicates are skipped).
        let mut live = hub.subscribe(&self.principal.user_id);
        let user = self.principal.user_id.clone();
        let (head, floor) = self
            .app
            .store
            .read(move |c| events::stream_bounds(c, &user))
            .await
            .map_err(|_| End::Close(1011, "database unavailable; reconnect"))?;

        let mut resync: Option<&'static str> = None;
        let mut resumed = false;
        self.last = head;
        let since = query.get("since").filter(|s| !s.is_empty());
        let last_ts = query.get("lastEventTs").filter(|s| !s.is_empty());
        if let Some(since) = since {
            match since.parse::<i64>() {
                Ok(n) if n < 0 => resync = Some("invalid since"),
                Ok(n) if n < floor => resync = Some("since is older than the retained event log"),
                Ok(n) if n > head => resync = Some("since is ahead of the server's event log"),
                Ok(n) => {
                    self.last = n;
                    resumed = true;
                }
                Err(_) => resync = Some("invalid since"),
            }
        } else if let Some(ts) = last_ts {
            match parse_time(ts) {
                Some(ms) => {
                    let user = self.principal.user_id.clone();
                    let at = self
                        .app
                        .store
                        .read(move |c| events::seq_at_time(c, &user, ms))
                        .await
                        .map_err(|_| End::Close(1011, "database unavailable; reconnect"))?;
                    match at {
                        Some(s) => {
                            self.last = s.min(head);
                            resumed = true;
                        }
                        None => resync = Some("lastEventTs is older than the retained event log"),
                    }
                }
                None => resync = Some("invalid lastEventTs"),
            }
        }
        let connected = control_frame(
            "CONNECTED",
            json!({
                "userId": self.principal.user_id,
                "deviceId": device,
                "headSeq": head,
                "resumed": resumed,
            }),
        );
        self.send(Message::text(connected)).await?;
        if let Some(reason) = resync {
            metrics::counter!("ordersync_ws_resyncs_total").increment(1);
            let frame = control_frame(
                "RESYNC_REQUIRED",
                json!({"headSeq": head, "reason": reason}),
            );
            self.send(Message::text(frame)).await?;
        }
        self.catch_up().await?;

        let period = self.app.cfg.ws_ping_interval;
        let mut pings = tokio::time::interval_at(Instant::now() + period, period);
        let mut unanswered = 0u32;
        let mut window_start = Instant::now();
        let mut frames_in_window = 0u32;
        loop {
            tokio::select! {
                biased;
                ctl = control.recv() => match ctl {
                    Ok(Control::Shutdown) => return Err(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
                    Ok(Control::TokenRevoked(h)) if self.principal.token_hash.as_ref() == Some(&h) => {
                        return Err(End::Close(CLOSE_REVOKED, "token revoked"));
                    }
                    Ok(Control::UserDisabled(u)) if u == self.principal.user_id => {
                        return Err(End::Close(CLOSE_REVOKED, "account disabled"));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => self.recheck_token().await?,
                    Err(RecvError::Closed) => return Err(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
                },
                ev = live.recv() => match ev {
                    Ok(ev) if ev.seq <= self.last => {}
                    Ok(ev) if ev.seq == self.last + 1 => {
                        self.send(Message::Text(ev.frame.clone())).await?;
                        self.last = ev.seq;
                        metrics::counter!("ordersync_events_delivered_total").increment(1);
                    }
                    // A gap (should not happen) or a lag: the log has everything.
                    Ok(_) | Err(RecvError::Lagged(_)) => {
                        metrics::counter!("ordersync_ws_lag_catchups_total").increment(1);
                        self.catch_up().await?;
                    }
                    Err(RecvError::Closed) => return Err(End::Close(CLOSE_GOING_AWAY, "server shutting down")),
                },
                msg = self.ws.next() => {
                    let now = Instant::now();
                    if now.duration_since(window_start) >= Duration::from_secs(1) {
                        window_start = now;
                        frames_in_window = 0;
                    }
                    frames_in_window += 1;
                    if frames_in_window > MAX_CLIENT_FRAMES_PER_SEC {
                        return Err(End::Close(1008, "too many messages"));
                    }
                    match msg {
                        None => return Ok(()),
                        Some(Err(e)) => return Err(e.into()),
                        Some(Ok(Message::Text(t))) => {
                            unanswered = 0;
                            if t.trim() == "ping" {
                                self.send(Message::text("pong")).await?;
                            }
                        }
                        Some(Ok(Message::Pong(_))) => unanswered = 0,
                        // tungstenite queues the pong; flush sends it now.
                        Some(Ok(Message::Ping(_))) => self.flush().await?,
                        Some(Ok(Message::Close(_))) => return Err(End::Close(1000, "bye")),
                        Some(Ok(_)) => {}
                    }
                },
                _ = pings.tick() => {
                    if unanswered >= 2 {
                        tracing::info!(user = %self.principal.user_id, "socket missed two pings");
                        return Err(End::Gone);
                    }
                    unanswered += 1;
                    self.send(Message::Ping(Default::default())).await?;
                }
            }
        }
    }

    /// Sends every logged event after `self.last`, page by page, until caught up.
    async fn catch_up(&mut self) -> Result<(), End> {
        loop {
            let user = self.principal.user_id.clone();
            let after = self.last;
            let page = self
                .app
                .store
                .read(move |c| events::read_after(c, &user, after, PAGE))
                .await
                .map_err(|_| End::Close(1011, "database unavailable; reconnect"))?;
            let n = page.len();
            for ev in page {
                if ev.seq != self.last + 1 {
                    // Pruned while we were reading: the client must refetch.
                    let user = self.principal.user_id.clone();
                    let head = self
                        .app
                        .store
                        .read(move |c| events::head_seq(c, &user))
                        .await
                        .map_err(|_| End::Close(1011, "database unavailable; reconnect"))?;
                    metrics::counter!("ordersync_ws_resyncs_total").increment(1);
                    let frame = control_frame(
                        "RESYNC_REQUIRED",
                        json!({"headSeq": head, "reason": "events were pruned while replaying"}),
                    );
                    self.send(Message::text(frame)).await?;
                    self.last = head;
                    break;
                }
                self.feed(Message::text(ev.frame())).await?;
                self.last = ev.seq;
            }
            self.flush().await?;
            metrics::counter!("ordersync_events_delivered_total").increment(n as u64);
            if n < PAGE {
                return Ok(());
            }
        }
    }

    /// After missing control messages, make sure our token is still good.
    async fn recheck_token(&mut self) -> Result<(), End> {
        if let Some(hash) = &self.principal.token_hash {
            let hash = hash.clone();
            let rec = self
                .app
                .store
                .read(move |c| crate::store::accounts::lookup_token(c, &hash))
                .await
                .map_err(|_| End::Close(1011, "database unavailable; reconnect"))?;
            if rec.is_none_or(|r| r.revoked_at.is_some() || r.user_disabled) {
                return Err(End::Close(CLOSE_REVOKED, "token revoked"));
            }
        }
        Ok(())
    }

    async fn send(&mut self, msg: Message) -> Result<(), End> {
        match timeout(self.send_timeout, self.ws.send(msg)).await {
            Ok(r) => r.map_err(End::from),
            Err(_) => Err(End::Gone),
        }
    }

    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        match timeout(self.send_timeout, self.ws.feed(msg)).await {
            Ok(r) => r.map_err(End::from),
            Err(_) => Err(End::Gone),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        match timeout(self.send_timeout, self.ws.flush()).await {
            Ok(r) => r.map_err(End::from),
            Err(_) => Err(End::Gone),
        }
    }
}

/// `lastEventTs`: ISO 8601 / RFC 3339, or epoch milliseconds.
fn parse_time(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_ts_accepts_iso_and_millis() {
        assert_eq!(
            parse_time("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(parse_time("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_time("yesterday"), None);
    }
}
