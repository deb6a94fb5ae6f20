//! Events and the hub that delivers them live.
//!
//! An [`Event`] is a row of the `events` table. The single writer publishes each
//! committed event to the [`Hub`], in seq order, after the commit. The hub keeps
//! one `tokio::sync::broadcast` channel per user that has sockets open, so an event
//! wakes only its own user's sockets. Broadcast channels are bounded: a socket
//! that falls behind gets `RecvError::Lagged` and re-reads the log (see `ws.rs`);
//! nothing is ever dropped from the log itself.
//!
//! The hub also carries [`Control`] messages (token revoked, user disabled,
//! shutdown) to every socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{TimeZone, Utc};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

pub const PENDING_CREATED: &str = "PENDING_CREATED";
pub const PENDING_UPDATED: &str = "PENDING_UPDATED";
pub const PENDING_DELETED: &str = "PENDING_DELETED";

/// A committed event of one user's stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub user_id: String,
    pub seq: i64,
    pub kind: String,
    /// JSON text of the payload.
    pub payload: String,
    pub device_id: Option<String>,
    /// Epoch milliseconds.
    pub created_at: i64,
}

impl Event {
    /// The WebSocket text frame for this event: `{type, payload, timestamp, seq}`.
    pub fn frame(&self) -> String {
        // The payload is JSON we wrote ourselves; the type is one of our constants,
        // quoted by serde_json anyway.
        format!(
            r#"{{"type":{},"payload":{},"timestamp":"{}","seq":{}}}"#,
            serde_json::Value::from(self.kind.as_str()),
            self.payload,
            iso_millis(self.created_at),
            self.seq
        )
    }
}

/// A frame without seq (`CONNECTED`, `RESYNC_REQUIRED`).
pub fn control_frame(kind: &str, payload: Value) -> String {
    serde_json::json!({
        "type": kind,
        "payload": payload,
        "timestamp": iso_millis(now_ms()),
    })
    .to_string()
}

/// ISO 8601 UTC with milliseconds, e.g. `2026-11-25T21:40:31.123Z` (compat).
pub fn iso_millis(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Messages to open sockets that are not events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The token with this SHA-256 hex hash was revoked: close its sockets with 4001.
    TokenRevoked(String),
    /// The user was disabled: close all of its sockets with 4001.
    UserDisabled(String),
    /// The server is stopping: close with 1001.
    Shutdown,
}

/// A live event as sent through the broadcast channel: the event and its rendered
/// frame, shared by every socket of the user (rendered once, not once per socket).
#[derive(Debug)]
pub struct Live {
    pub seq: i64,
    /// Cheap to clone (reference-counted bytes).
    pub frame: Utf8Bytes,
}

/// Registry of per-user broadcast channels.
pub struct Hub {
    /// user id → sender. Locked only for map operations, never across `.await`
    /// (it is a std mutex, also used from the writer thread).
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<Live>>>>,
    capacity: usize,
    control: broadcast::Sender<Control>,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        let (control, _) = broadcast::channel(256);
        Hub {
            channels: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            control,
        }
    }

    /// Subscribes to a user's live events. Subscribe *before* reading the log's head,
    /// so nothing committed after that read can be missed.
    pub fn subscribe(&self, user_id: &str) -> broadcast::Receiver<Arc<Live>> {
        let mut map = self.channels.lock().expect("hub lock poisoned");
        match map.get(user_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.capacity);
                map.insert(user_id.to_string(), tx);
                rx
            }
        }
    }

    /// Drops the user's channel when its last receiver is gone (call after dropping one).
    pub fn release(&self, user_id: &str) {
        let mut map = self.channels.lock().expect("hub lock poisoned");
        if map.get(user_id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(user_id);
        }
    }

    /// Publishes committed events, in the order given (seq order per user).
    /// Called by the writer thread after each commit.
    pub fn publish(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let map = self.channels.lock().expect("hub lock poisoned");
        for ev in events {
            if let Some(tx) = map.get(&ev.user_id) {
                let live = Arc::new(Live {
                    seq: ev.seq,
                    frame: ev.frame().into(),
                });
                // An error only means no receiver right now; the log has the event.
                let _ = tx.send(live);
            }
        }
    }

    pub fn control(&self, msg: Control) {
        let _ = self.control.send(msg);
    }

    pub fn subscribe_control(&self) -> broadcast::Receiver<Control> {
        self.control.subscribe()
    }

    /// Number of users with at least one open channel (for tests and metrics).
    pub fn users_listening(&self) -> usize {
        self.channels.lock().expect("hub lock poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: &str, seq: i64) -> Event {
        Event {
            user_id: user.into(),
            seq,
            kind: PENDING_DELETED.into(),
            payload: r#"{"orderId":"a","deviceId":"d"}"#.into(),
            device_id: Some("d".into()),
            created_at: 1_700_000_000_123,
        }
    }

    #[test]
    fn frame_has_type_payload_timestamp_seq() {
        let f: Value = serde_json::from_str(&ev("1", 7).frame()).unwrap();
        assert_eq!(f["type"], "PENDING_DELETED");
        assert_eq!(f["payload"]["orderId"], "a");
        assert_eq!(f["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(f["seq"], 7);
    }

    #[tokio::test]
    async fn events_reach_only_their_users_subscribers() {
        let hub = Hub::new(8);
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        hub.publish(&[ev("a", 1), ev("a", 2)]);
        assert_eq!(a.recv().await.unwrap().seq, 1);
        assert_eq!(a.recv().await.unwrap().seq, 2);
        assert!(b.try_recv().is_err());
    }

    #[test]
    fn channel_is_released_with_its_last_receiver() {
        let hub = Hub::new(8);
        let a1 = hub.subscribe("a");
        let a2 = hub.subscribe("a");
        drop(a1);
        hub.release("a");
        assert_eq!(hub.users_listening(), 1);
        drop(a2);
        hub.release("a");
        assert_eq!(hub.users_listening(), 0);
    }

    #[test]
    fn lagging_receiver_is_told_how_much_it_missed() {
        let hub = Hub::new(2);
        let mut a = hub.subscribe("a");
        hub.publish(&[ev("a", 1), ev("a", 2), ev("a", 3)]);
        assert!(matches!(
            a.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
    }
}
