//! Abusive clients: sockets that never read, oversized frames, floods of client
//! frames, half-open TCP connections and storms of bad tokens. Each test checks
//! that the abuser is dealt with and that a well-behaved client is still served
//! correctly (every event, in order). Timeouts are hang guards, never verdicts.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use helpers::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const GUARD: Duration = Duration::from_secs(30);

/// Reads a socket continuously (so it answers pings) and forwards its JSON frames.
fn reader(ws: Ws) -> mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut ws = ws.ws;
    tokio::spawn(async move {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Text(t) = msg {
                if tx.send(serde_json::from_str(&t).unwrap()).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Receives events `from..=to` in order, no holes, no duplicates.
async fn expect_seqs(rx: &mut mpsc::UnboundedReceiver<Value>, from: i64, to: i64) {
    for want in from..=to {
        let ev = tokio::time::timeout(GUARD, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("event {want} never arrived"))
            .expect("good socket stays open");
        assert_eq!(ev["seq"], want, "{ev}");
    }
}

async fn wait_sessions(app: &TestApp, n: usize) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while app.app.sessions.open() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions open: {} (want {n})",
            app.app.sessions.open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_reads_is_dropped_and_never_delays_others() {
    let mut args = test_args();
    // Long enough that the stuck socket's buffers fill before it misses two pings
    // (then the bounded write buffer and the send timeout close it), short enough
    // to keep the test quick. Either way it must be closed.
    args.ws_ping_interval = Duration::from_millis(1000);
    args.max_body = 16 * 1024 * 1024;
    let app = spawn_with(args).await;
    let (_, t) = app.user_with_token("alice").await;
    let good = app.connect(&format!("token={t}&deviceId=good")).await;
    let mut good = reader(good);
    assert_eq!(good.recv().await.unwrap()["type"], "CONNECTED");
    // Never polled: it reads nothing and answers no ping.
    let stuck = app.connect(&format!("token={t}&deviceId=stuck")).await;
    wait_sessions(&app, 2).await;

    // Far more event traffic than the kernel's socket buffers plus the server's
    // bounded write buffer (1 MiB) hold: about 12 MB of frames for the stuck socket.
    let big_id = |i: usize, j: usize| format!("{i:04}-{j:03}-{}", "x".repeat(110));
    let rounds = 100;
    for i in 0..rounds {
        let orders: Vec<Value> = (0..500).map(|j| order(&big_id(i, j), "w")).collect();
        let r = app.post_orders(&t, json!(orders)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    expect_seqs(&mut good, 1, rounds as i64).await;
    // The stuck socket is closed by the server (missed pings / send timeout),
    // which frees its buffers: the server holds only the good session.
    wait_sessions(&app, 1).await;
    drop(stuck);
    // The good one keeps receiving.
    app.post_orders(&t, json!([order("after", "w")])).await;
    expect_seqs(&mut good, rounds as i64 + 1, rounds as i64 + 1).await;
}

#[tokio::test]
async fn an_oversized_frame_closes_the_socket_with_1009() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let big = "p".repeat(app.app.cfg.ws_max_frame + 1);
    let _ = ws.ws.send(Message::text(big)).await;
    assert_eq!(ws.close_code(GUARD).await, Some(1009));
    // Others are unaffected.
    let (mut other, _) = app.connect_ok(&format!("token={t}")).await;
    other.send_text("ping").await;
    assert!(matches!(other.next_within(GUARD).await, Next::Text(t) if t == "pong"));
}

#[tokio::test]
async fn a_flood_of_client_frames_closes_the_socket_with_1008() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let (mut other, _) = app.connect_ok(&format!("token={t}")).await;
    for _ in 0..500 {
        if ws.ws.feed(Message::text("ping")).await.is_err() {
            break;
        }
    }
    let _ = ws.ws.flush().await;
    assert_eq!(ws.close_code(GUARD).await, Some(1008));
    // The flooder's neighbour still gets its events.
    app.post_orders(&t, json!([order("a", "d")])).await;
    let ev = other.next_json().await;
    assert_eq!(ev["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_tcp_connections_do_not_stop_service() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let mut held = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        let partial: String = match i % 5 {
            0 => String::new(), // connects, sends nothing
            1 => "GET /api/pending-orders HTTP/1.1\r\nHost: x\r\nAuthor".into(),
            2 => format!(
                "POST /api/pending-orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"orders\": ["
            ),
            3 => "GET /ws/realtime?token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n".into(),
            _ => "GE".into(),
        };
        s.write_all(partial.as_bytes()).await.unwrap();
        held.push(s);
    }
    // Good clients are served while all of those hang around.
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    for i in 0..5 {
        let r = app
            .post_orders(&t, json!([order(&format!("o{i}"), "d")]))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(ws.next_json().await["seq"], i + 1);
    }
    let list = app.get("/api/pending-orders", &t).await;
    assert_eq!(list.body["orders"].as_array().unwrap().len(), 5);
    // The half-sent upload wrote nothing; closing them all is harmless.
    drop(held);
    let list = app.get("/api/pending-orders", &t).await;
    assert_eq!(list.body["seq"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_token_attempts_do_not_stop_good_clients() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let good = app.connect(&format!("token={t}")).await;
    let mut good = reader(good);
    assert_eq!(good.recv().await.unwrap()["type"], "CONNECTED");

    const ATTEMPTS: usize = 1500;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(48));
    let mut tasks = Vec::new();
    for i in 0..ATTEMPTS {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let client = app.client.clone();
        let url = app.url("/api/pending-orders");
        let ws_url = app.ws_url(&format!("token=os_{i:064x}"));
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            if i % 2 == 0 {
                let r = client
                    .get(url)
                    .bearer_auth(format!("os_{i:064x}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 401);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["code"], "UNAUTHORIZED");
            } else {
                let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
                let mut code = None;
                while let Some(Ok(m)) = ws.next().await {
                    if let Message::Close(f) = m {
                        code = f.map(|f| u16::from(f.code));
                        break;
                    }
                }
                assert_eq!(code, Some(1008));
            }
        }));
    }
    // Meanwhile, the good client writes and its socket gets every event.
    for i in 0..20 {
        let r = app
            .post_orders(&t, json!([order(&format!("g{i}"), "d")]))
            .await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for task in tasks {
        tokio::time::timeout(GUARD, task)
            .await
            .expect("bad attempt hang")
            .unwrap();
    }
    expect_seqs(&mut good, 1, 20).await;
    let r = app.get("/api/auth/me", &t).await;
    assert_eq!(r.status, 200);
}
