//! The WebSocket event stream of DESIGN.md §5 against a real server.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn connected_frame_then_aggregated_events_with_consecutive_seqs() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&deviceId=phone")).await;
    assert_eq!(
        hello["payload"],
        json!({"userId": uid, "deviceId": "phone", "headSeq": 0, "resumed": false})
    );
    assert!(hello.get("seq").is_none());
    let ts = hello["timestamp"].as_str().unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == 24,
        "ISO 8601 with millis: {ts}"
    );

    app.post_orders(&t, json!([order("a", "d1"), order("b", "d1")]))
        .await;
    app.post_orders(
        &t,
        json!([
            order_with_qty("a", "d1", 5),
            order("b", "d1"),
            order("c", "d1")
        ]),
    )
    .await;
    let e1 = ws.next_json().await;
    assert_eq!(e1["type"], "PENDING_CREATED");
    assert_eq!(e1["seq"], 1);
    assert_eq!(
        e1["payload"],
        json!({"orderIds": ["a", "b"], "count": 2, "deviceId": "d1"})
    );
    assert!(e1["timestamp"].as_str().unwrap().ends_with('Z'));
    let e2 = ws.next_json().await;
    assert_eq!(
        (e2["type"].as_str(), e2["seq"].as_i64()),
        (Some("PENDING_CREATED"), Some(2))
    );
    assert_eq!(e2["payload"]["orderIds"], json!(["c"]));
    let e3 = ws.next_json().await;
    assert_eq!(
        (e3["type"].as_str(), e3["seq"].as_i64()),
        (Some("PENDING_UPDATED"), Some(3))
    );
    assert_eq!(
        e3["payload"],
        json!({"orderIds": ["a"], "count": 1, "deviceId": "d1"})
    );
    // An unchanged retry sends nothing.
    app.post_orders(&t, json!([order("c", "d1")])).await;
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn delete_and_lock_events_and_404_delete_sends_nothing() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d1")])).await;
    let (mut ws, hello) = app.connect_ok(&format!("token={t}")).await;
    assert_eq!(hello["payload"]["headSeq"], 1);

    assert_eq!(app.lock("a", &t, true).await.status, 200);
    let e = ws.next_json().await;
    assert_eq!(e["type"], "PENDING_UPDATED");
    assert_eq!(e["seq"], 2);
    assert_eq!(e["payload"]["orderIds"], json!(["a"]));

    assert_eq!(app.delete("/api/pending-orders/nope", &t).await.status, 404);
    ws.assert_silent(QUIET).await;

    app.delete("/api/pending-orders/a?deviceId=tab", &t).await;
    let e = ws.next_json().await;
    assert_eq!(e["type"], "PENDING_DELETED");
    assert_eq!(e["seq"], 3);
    assert_eq!(e["payload"], json!({"orderId": "a", "deviceId": "tab"}));
}

#[tokio::test]
async fn every_socket_of_the_user_receives_and_other_users_receive_nothing() {
    let app = spawn_app().await;
    let (_, ta) = app.user_with_token("alice").await;
    let (_, tb) = app.user_with_token("bob").await;
    let (mut a1, _) = app.connect_ok(&format!("token={ta}&deviceId=one")).await;
    let (mut a2, _) = app.connect_ok(&format!("token={ta}&deviceId=two")).await;
    let (mut b, _) = app.connect_ok(&format!("token={tb}")).await;
    app.post_orders(&ta, json!([order("x", "one")])).await;
    for ws in [&mut a1, &mut a2] {
        let e = ws.next_json().await;
        assert_eq!(e["seq"], 1);
        assert_eq!(
            e["payload"]["deviceId"], "one",
            "origin device lets clients skip echoes"
        );
    }
    b.assert_silent(QUIET).await;
    // Bob's own order with the same id reaches only Bob.
    app.post_orders(&tb, json!([order("x", "bobdev")])).await;
    assert_eq!(b.next_json().await["seq"], 1);
    a1.assert_silent(QUIET).await;
}

#[tokio::test]
async fn resume_with_since_after_a_disconnect() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    assert_eq!(ws.next_json().await["seq"], 1);
    drop(ws);
    // Changes while disconnected.
    app.post_orders(&t, json!([order("b", "d")])).await;
    app.lock("a", &t, true).await;
    app.delete("/api/pending-orders/b", &t).await;
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&since=1")).await;
    assert_eq!(hello["payload"]["resumed"], true);
    assert_eq!(hello["payload"]["headSeq"], 4);
    let seqs: Vec<_> = [
        ws.next_json().await,
        ws.next_json().await,
        ws.next_json().await,
    ]
    .iter()
    .map(|e| {
        (
            e["seq"].as_i64().unwrap(),
            e["type"].as_str().unwrap().to_string(),
        )
    })
    .collect();
    assert_eq!(
        seqs,
        [
            (2, "PENDING_CREATED".into()),
            (3, "PENDING_UPDATED".into()),
            (4, "PENDING_DELETED".into())
        ]
    );
    ws.assert_silent(QUIET).await;
    // Then live.
    app.post_orders(&t, json!([order("c", "d")])).await;
    assert_eq!(ws.next_json().await["seq"], 5);
}

#[tokio::test]
async fn resume_by_last_event_timestamp() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}&since=0")).await;
    let first = ws.next_json().await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(5)).await;
    app.post_orders(&t, json!([order("b", "d")])).await;
    let ts = first["timestamp"].as_str().unwrap();
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&lastEventTs={ts}")).await;
    assert_eq!(hello["payload"]["resumed"], true);
    let e = ws.next_json().await;
    assert_eq!(e["seq"], 2);
    ws.assert_silent(QUIET).await;
}

#[tokio::test]
async fn since_outside_the_log_requires_resync() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    for (i, since) in ["99", "-1", "abc"].into_iter().enumerate() {
        let head = 1 + i as i64;
        let (mut ws, hello) = app.connect_ok(&format!("token={t}&since={since}")).await;
        assert_eq!(hello["payload"]["resumed"], false);
        let r = ws.next_json().await;
        assert_eq!(r["type"], "RESYNC_REQUIRED", "since={since}");
        assert_eq!(r["payload"]["headSeq"], head);
        // Then live from the head.
        app.lock("a", &t, i % 2 == 0).await;
        assert_eq!(ws.next_json().await["seq"], head + 1);
    }
}

#[tokio::test]
async fn pruned_events_give_resync_required_never_a_hole() {
    let mut args = test_args();
    args.event_retention = Duration::from_secs(1);
    let app = spawn_with(args).await;
    let (uid, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    app.post_orders(&t, json!([order("b", "d")])).await;
    // Wait until the background pruner removed them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app.events_of(&uid).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events were not pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut ws, _) = app.connect_ok(&format!("token={t}&since=0")).await;
    let r = ws.next_json().await;
    assert_eq!(r["type"], "RESYNC_REQUIRED");
    assert_eq!(r["payload"]["headSeq"], 2);
    // since == floor is still a valid resume point.
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&since=2")).await;
    assert_eq!(hello["payload"]["resumed"], true);
    app.post_orders(&t, json!([order("c", "d")])).await;
    assert_eq!(ws.next_json().await["seq"], 3);
}

#[tokio::test]
async fn text_ping_gets_pong_and_bad_tokens_close_with_1008() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    ws.send_text("ping").await;
    match ws.next_within(Duration::from_secs(5)).await {
        Next::Text(p) => assert_eq!(p, "pong"),
        other => panic!("{other:?}"),
    }
    for q in ["token=os_nope", "", "token="] {
        let mut ws = app.connect(q).await;
        assert_eq!(
            ws.close_code(Duration::from_secs(5)).await,
            Some(1008),
            "{q}"
        );
    }
    // Bearer header works for non-browser clients.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = app.ws_url("").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    let (stream, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws = Ws { ws: stream };
    assert_eq!(ws.next_json().await["type"], "CONNECTED");
}

#[tokio::test]
async fn plain_http_get_of_the_socket_route_is_a_400_envelope() {
    let app = spawn_app().await;
    let r = app.request(Method::GET, "/ws/realtime", None, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["code"], "WEBSOCKET_REQUIRED");
}

#[tokio::test]
async fn logout_revocation_closes_that_tokens_sockets_with_4001() {
    let app = spawn_app().await;
    let (uid, t1) = app.user_with_token("alice").await;
    let t2 = app.token_for(&uid, None).await;
    let (mut ws1, _) = app.connect_ok(&format!("token={t1}")).await;
    let (mut ws2, _) = app.connect_ok(&format!("token={t2}")).await;
    app.request(Method::POST, "/api/auth/logout", Some(&t1), None)
        .await;
    assert_eq!(ws1.close_code(Duration::from_secs(1)).await, Some(4001));
    // The other token's socket stays open and live.
    app.post_orders(&t2, json!([order("a", "d")])).await;
    assert_eq!(ws2.next_json().await["seq"], 1);
}

#[tokio::test]
async fn cli_revocation_and_user_disable_close_sockets_within_a_second() {
    let app = spawn_app().await;
    let db = app.db_path();
    let (ok, _, _) = cli(
        &db,
        &["user", "add", "carol", "--password-stdin"],
        "carol-pass-1\n",
    );
    assert!(ok);
    let create = || {
        cli(&db, &["token", "create", "carol"], "")
            .1
            .lines()
            .last()
            .unwrap()
            .to_string()
    };
    let (t1, t2) = (create(), create());
    let (mut ws1, _) = app.connect_ok(&format!("token={t1}")).await;
    let (mut ws2, _) = app.connect_ok(&format!("token={t2}")).await;
    let id = ordersync::auth::token_hash(&t1)[..16].to_string();
    assert!(cli(&db, &["token", "revoke", &id], "").0);
    assert_eq!(ws1.close_code(Duration::from_secs(1)).await, Some(4001));
    assert!(cli(&db, &["user", "disable", "carol"], "").0);
    assert_eq!(ws2.close_code(Duration::from_secs(1)).await, Some(4001));
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let mut app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let stop = app.stop_signal();
    stop.send(()).unwrap();
    assert_eq!(ws.close_code(Duration::from_secs(5)).await, Some(1001));
    drop(ws);
    app.join().await;
}

#[tokio::test]
async fn clients_resume_after_a_server_restart_and_miss_nothing() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    let last = ws.next_json().await["seq"].as_i64().unwrap();
    let dir = app.stop().await;
    assert_eq!(ws.close_code(Duration::from_secs(5)).await, Some(1001));

    // Writes land on the restarted server before the client reconnects.
    let app = spawn_at(dir, test_args()).await;
    app.post_orders(&t, json!([order("b", "d")])).await;
    app.delete("/api/pending-orders/a", &t).await;
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&since={last}")).await;
    assert_eq!(hello["payload"]["headSeq"], 3);
    assert_eq!(ws.next_json().await["seq"], 2);
    assert_eq!(ws.next_json().await["seq"], 3);
    ws.assert_silent(QUIET).await;
}

/// Reads frames until `want` event seqs arrived; checks 1..=want in order, once each.
async fn expect_gapless(ws: &mut Ws, want: i64) {
    let mut next = 1;
    while next <= want {
        let f = match ws.next_within(Duration::from_secs(20)).await {
            Next::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
            other => panic!("stream ended at seq {next} of {want}: {other:?}"),
        };
        let seq = f["seq"]
            .as_i64()
            .unwrap_or_else(|| panic!("unexpected frame {f}"));
        assert_eq!(seq, next, "seq out of order or duplicated");
        next += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_give_every_socket_a_gapless_ordered_stream() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let mut sockets = Vec::new();
    for i in 0..4 {
        sockets.push(app.connect_ok(&format!("token={t}&deviceId=s{i}")).await.0);
    }
    let app = std::sync::Arc::new(app);
    let writers = 8;
    let per_writer = 40;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let app = app.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..per_writer {
                let r = match i % 4 {
                    0 | 1 => {
                        app.post_orders(&t, json!([order_with_qty(&format!("w{w}-{i}"), "d", 1)]))
                            .await
                    }
                    2 => {
                        app.post_orders(&t, json!([order_with_qty(&format!("w{w}-0"), "d", i)]))
                            .await
                    }
                    _ => app.lock(&format!("w{w}-1"), &t, i % 8 == 3).await,
                };
                assert_eq!(r.status, 200, "{}", r.body);
                seqs.push(r.body["seq"].as_i64().unwrap());
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    let head = *acked.iter().max().unwrap();
    assert_eq!(
        head,
        (writers * per_writer) as i64,
        "every request appended exactly one event"
    );
    for ws in &mut sockets {
        expect_gapless(ws, head).await;
        ws.assert_silent(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_stops_reading_still_gets_every_event_in_order() {
    let mut args = test_args();
    args.ws_buffer = 16; // make the live channel overflow quickly
    let app = spawn_with(args).await;
    let (_, t) = app.user_with_token("alice").await;
    let (mut slow, _) = app.connect_ok(&format!("token={t}")).await;
    let (mut fast, _) = app.connect_ok(&format!("token={t}")).await;
    let total = 2000;
    // A healthy socket keeps reading meanwhile.
    let reader = tokio::spawn(async move {
        expect_gapless(&mut fast, total).await;
        fast
    });
    for i in 0..total {
        let r = app
            .post_orders(&t, json!([order(&format!("o{i}"), "d")]))
            .await;
        assert_eq!(r.status, 200);
    }
    reader.await.unwrap();
    // The slow socket has read nothing so far; now it reads everything.
    expect_gapless(&mut slow, total).await;
    slow.assert_silent(QUIET).await;
}
