//! The REST API of DESIGN.md §4 against a real server.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::*;

fn actions(r: &Resp) -> Vec<String> {
    r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["action"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn batch_upsert_created_updated_unchanged_in_one_request() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    let r = app
        .post_orders(&t, json!([order("a", "d1"), order("b", "d1")]))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["success"], true);
    assert_eq!(actions(&r), ["created", "created"]);
    assert_eq!(r.body["results"][0]["version"], 1);
    assert_eq!(r.body["seq"], 1);

    // a: changed → updated; b: identical → unchanged; c: new → created.
    let r = app
        .post_orders(
            &t,
            json!([
                order_with_qty("a", "d1", 9),
                order("b", "d1"),
                order("c", "d1")
            ]),
        )
        .await;
    assert_eq!(actions(&r), ["updated", "unchanged", "created"]);
    assert_eq!(r.body["results"][0]["version"], 2);
    assert_eq!(r.body["results"][1]["version"], 1);
    assert_eq!(r.body["seq"], 3, "one CREATED and one UPDATED event");

    // A pure retry changes nothing: no version bump, no event, seq stays.
    let r = app
        .post_orders(&t, json!([order_with_qty("a", "d1", 9)]))
        .await;
    assert_eq!(actions(&r), ["unchanged"]);
    assert_eq!(r.body["seq"], 3);

    let events = app.events_of(&uid).await;
    let kinds: Vec<_> = events.iter().map(|e| (e.0, e.1.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (1, "PENDING_CREATED"),
            (2, "PENDING_CREATED"),
            (3, "PENDING_UPDATED")
        ]
    );
    assert_eq!(
        events[0].2,
        json!({"orderIds": ["a", "b"], "count": 2, "deviceId": "d1"})
    );
    assert_eq!(events[1].2["orderIds"], json!(["c"]));
    assert_eq!(events[2].2["orderIds"], json!(["a"]));
}

#[tokio::test]
async fn update_keeps_created_at_and_lock_state() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d1")])).await;
    let before = app.get("/api/pending-orders/a", &t).await.body["order"].clone();
    assert_eq!(app.lock("a", &t, true).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let r = app
        .post_orders(&t, json!([order_with_qty("a", "d1", 7)]))
        .await;
    assert_eq!(actions(&r), ["updated"]);
    let after = app.get("/api/pending-orders/a", &t).await.body["order"].clone();
    assert_eq!(after["createdAt"], before["createdAt"]);
    assert_eq!(after["isLocked"], true);
    assert_eq!(after["version"], 3);
    assert!(after["updatedAt"].as_i64() > before["updatedAt"].as_i64());
    assert_eq!(after["items"][0]["quantity"], 7);
}

#[tokio::test]
async fn base_version_detects_conflicts_and_writes_nothing_for_them() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d1")])).await;

    let mut stale = order_with_qty("a", "d2", 5);
    stale["baseVersion"] = json!(0);
    let mut fresh_create = order("new", "d2");
    fresh_create["baseVersion"] = json!(0);
    let mut gone = order("ghost", "d2");
    gone["baseVersion"] = json!(3);
    let r = app
        .post_orders(&t, json!([stale, fresh_create, gone]))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(actions(&r), ["conflict", "created", "conflict"]);
    assert_eq!(r.body["results"][0]["current"]["version"], 1);
    assert_eq!(r.body["results"][0]["current"]["items"][0]["quantity"], 2);
    assert_eq!(r.body["results"][2]["current"], Value::Null);
    // The conflicting order is untouched.
    let a = app.get("/api/pending-orders/a", &t).await.body["order"].clone();
    assert_eq!(a["version"], 1);
    assert_eq!(a["deviceId"], "d1");

    let mut ok = order_with_qty("a", "d2", 5);
    ok["baseVersion"] = json!(1);
    let r = app.post_orders(&t, json!([ok])).await;
    assert_eq!(actions(&r), ["updated"]);
    assert_eq!(r.body["results"][0]["version"], 2);
    // Events: initial create, the created "new", then the update.
    assert_eq!(app.events_of(&uid).await.len(), 3);
}

#[tokio::test]
async fn list_is_newest_first_with_seq_and_ids_filter() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    for id in ["a", "b", "c"] {
        app.post_orders(&t, json!([order(id, "d")])).await;
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let r = app.get("/api/pending-orders", &t).await;
    assert_eq!(r.status, 200);
    let ids: Vec<_> = r.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].clone())
        .collect();
    assert_eq!(ids, [json!("c"), json!("b"), json!("a")]);
    assert_eq!(r.body["seq"], 3);
    let o = &r.body["orders"][0];
    for field in [
        "id",
        "customerId",
        "customerName",
        "deviceId",
        "status",
        "items",
        "discountPercent",
        "targetTotalWithVat",
        "shippingCost",
        "shippingTax",
        "noShipping",
        "notes",
        "originDraftId",
        "subClientCodice",
        "subClientName",
        "subClientData",
        "deliveryAddressId",
        "idempotencyKey",
        "isLocked",
        "version",
        "createdAt",
        "updatedAt",
    ] {
        assert!(o.get(field).is_some(), "order lacks {field}: {o}");
    }
    let r = app.get("/api/pending-orders?ids=a,zzz,c", &t).await;
    let ids: Vec<_> = r.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].clone())
        .collect();
    assert_eq!(ids, [json!("c"), json!("a")]);
}

#[tokio::test]
async fn optional_fields_and_aliases_round_trip_verbatim() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    let mut o = order("full", "d");
    o["items"][0]["lot"] = json!({"code": "L-1", "expiry": "2027-01"});
    let items = o.as_object_mut().unwrap().remove("items").unwrap();
    o["itemsJson"] = json!(items.to_string());
    o["subClientDataJson"] = json!("{\"codice\":\"S1\"}");
    o["discountPercent"] = json!(10.5);
    o["notes"] = json!("ring twice");
    o["noShipping"] = json!(true);
    o["deliveryAddressId"] = json!(42);
    o["status"] = json!("syncing");
    assert_eq!(app.post_orders(&t, json!([o])).await.status, 200);
    let got = app.get("/api/pending-orders/full", &t).await.body["order"].clone();
    assert_eq!(got["items"], items);
    assert_eq!(got["items"][0]["lot"]["code"], "L-1");
    assert_eq!(got["subClientData"], json!({"codice": "S1"}));
    assert_eq!(got["discountPercent"], 10.5);
    assert_eq!(got["notes"], "ring twice");
    assert_eq!(got["noShipping"], true);
    assert_eq!(got["deliveryAddressId"], 42);
    assert_eq!(got["status"], "syncing");
}

#[tokio::test]
async fn delete_404_writes_no_event_and_base_version_conflict_is_409() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    let r = app.delete("/api/pending-orders/nope", &t).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "NOT_FOUND");
    assert!(app.events_of(&uid).await.is_empty());

    app.post_orders(&t, json!([order("a", "d")])).await;
    let r = app.delete("/api/pending-orders/a?baseVersion=7", &t).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["current"]["version"], 1);
    assert_eq!(app.events_of(&uid).await.len(), 1);

    let r = app
        .delete("/api/pending-orders/a?baseVersion=1&deviceId=tab-1", &t)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, json!({"success": true, "seq": 2}));
    let ev = app.events_of(&uid).await;
    assert_eq!(ev[1].1, "PENDING_DELETED");
    assert_eq!(ev[1].2, json!({"orderId": "a", "deviceId": "tab-1"}));
    assert_eq!(app.get("/api/pending-orders/a", &t).await.status, 404);

    // Re-creating after delete starts again at version 1.
    let r = app.post_orders(&t, json!([order("a", "d")])).await;
    assert_eq!(actions(&r), ["created"]);
    assert_eq!(
        app.delete("/api/pending-orders/a?baseVersion=x", &t)
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn lock_toggles_bumps_version_and_validates() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("a", "d")])).await;
    let r = app.lock("a", &t, true).await;
    assert_eq!(r.status, 200);
    let updated_at = r.body["updatedAt"]
        .as_i64()
        .expect("lock reply has updatedAt");
    assert_eq!(
        r.body,
        json!({"success": true, "id": "a", "isLocked": true, "version": 2, "updatedAt": updated_at, "seq": 2})
    );
    assert_eq!(
        app.get("/api/pending-orders/a", &t).await.body["order"]["updatedAt"],
        updated_at
    );
    // Same state again: no change, no event.
    let r = app.lock("a", &t, true).await;
    assert_eq!(r.body["version"], 2);
    assert_eq!(r.body["seq"], 2);
    let r = app.lock("a", &t, false).await;
    assert_eq!(r.body["isLocked"], false);
    assert_eq!(r.body["version"], 3);
    let ev = app.events_of(&uid).await;
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[1].1, "PENDING_UPDATED");
    assert_eq!(ev[1].2["orderIds"], json!(["a"]));

    assert_eq!(app.lock("missing", &t, true).await.status, 404);
    for bad in [
        json!({"locked": "yes"}),
        json!({}),
        json!({"locked": true, "x": 1}),
        json!([true]),
    ] {
        let r = app
            .request(
                Method::PATCH,
                "/api/pending-orders/a/lock",
                Some(&t),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.body["code"], "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn users_are_isolated_even_with_the_same_order_id() {
    let app = spawn_app().await;
    let (alice, ta) = app.user_with_token("alice").await;
    let (bob, tb) = app.user_with_token("bob").await;
    app.post_orders(&ta, json!([order("same", "alice-dev")]))
        .await;
    // Bob cannot see, change, delete or lock Alice's order.
    assert_eq!(app.get("/api/pending-orders/same", &tb).await.status, 404);
    assert!(app.get("/api/pending-orders", &tb).await.body["orders"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(
        app.get("/api/pending-orders?ids=same", &tb).await.body["orders"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        app.delete("/api/pending-orders/same", &tb).await.status,
        404
    );
    assert_eq!(app.lock("same", &tb, true).await.status, 404);
    // Bob's order with the same id is a different order.
    let r = app
        .post_orders(&tb, json!([order_with_qty("same", "bob-dev", 9)]))
        .await;
    assert_eq!(actions(&r), ["created"]);
    let a = app.get("/api/pending-orders/same", &ta).await.body["order"].clone();
    assert_eq!(a["deviceId"], "alice-dev");
    assert_eq!(a["isLocked"], false);
    assert_eq!(a["version"], 1);
    assert_eq!(app.events_of(&alice).await.len(), 1);
    assert_eq!(app.events_of(&bob).await.len(), 1);
}

#[tokio::test]
async fn invalid_batches_are_400_with_paths_and_write_nothing() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    let mut bad_qty = order("b", "d");
    bad_qty["items"][0]["quantity"] = json!(0);
    let r = app.post_orders(&t, json!([order("a", "d"), bad_qty])).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["code"], "VALIDATION_ERROR");
    assert_eq!(r.body["details"][0]["path"], "orders[1].items[0].quantity");
    assert_eq!(r.body["details"][0]["message"], "must be greater than 0");
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("orders[1].items[0].quantity"));

    let mut unknown = order("a", "d");
    unknown["colour"] = json!("red");
    let r = app.post_orders(&t, json!([unknown])).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["details"][0]["path"], "orders[0].colour");

    let r = app
        .post_orders(&t, json!([order("a", "d"), order("a", "d")]))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["details"][0]["message"]
        .as_str()
        .unwrap()
        .contains("duplicate"));

    let r = app.post_orders(&t, json!([])).await;
    assert_eq!(r.status, 400);

    // Malformed JSON, duplicate keys.
    for raw in ["{\"orders\": [", "{\"orders\": [], \"orders\": []}", "nul"] {
        let r = app
            .client
            .post(app.url("/api/pending-orders"))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{raw}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "MALFORMED_JSON");
    }
    assert!(app.events_of(&uid).await.is_empty());
    assert!(app.get("/api/pending-orders", &t).await.body["orders"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn batch_and_item_limits_are_flags() {
    let mut args = test_args();
    args.max_batch = 2;
    args.max_items = 1;
    let app = spawn_with(args).await;
    let (_, t) = app.user_with_token("alice").await;
    let r = app
        .post_orders(
            &t,
            json!([order("a", "d"), order("b", "d"), order("c", "d")]),
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["error"]
        .as_str()
        .unwrap()
        .contains("at most 2 orders"));
    let r = app.post_orders(&t, json!([order("a", "d")])).await;
    assert_eq!(r.status, 400, "two items > max 1");
    assert_eq!(r.body["details"][0]["path"], "orders[0].items");
}

#[tokio::test]
async fn http_error_statuses_use_the_envelope() {
    let mut args = test_args();
    args.max_body = 1024;
    let app = spawn_with(args).await;
    let (_, t) = app.user_with_token("alice").await;

    // 413 over --max-body (declared length and chunked).
    let big = json!({"orders": [{"id": "x", "notes": "n".repeat(2000)}]});
    let r = app
        .request(Method::POST, "/api/pending-orders", Some(&t), Some(big))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.body["code"], "PAYLOAD_TOO_LARGE");
    let chunks =
        futures_util::stream::iter((0..40).map(|_| Ok::<_, std::io::Error>(vec![b' '; 100])));
    let r = app
        .client
        .post(app.url("/api/pending-orders"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // 415 without a JSON content type.
    let r = app
        .client
        .post(app.url("/api/pending-orders"))
        .bearer_auth(&t)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "UNSUPPORTED_MEDIA_TYPE"
    );

    // 404 unknown route, 405 wrong method.
    let r = app.get("/api/nothing-here", &t).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["code"], "ROUTE_NOT_FOUND");
    let r = app
        .request(Method::PUT, "/api/pending-orders", Some(&t), None)
        .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.body["code"], "METHOD_NOT_ALLOWED");

    // 400 unknown query parameter.
    let r = app.get("/api/pending-orders?idz=a", &t).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn healthz_and_readyz_answer() {
    let app = spawn_app().await;
    let r = app.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "ok");
    let r = app.request(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn demo_page_and_client_are_served_with_types_and_etags() {
    let app = spawn_app().await;
    for (path, ct) in [
        ("/", "text/html"),
        ("/ordersync.js", "text/javascript"),
        ("/ordersync.d.ts", "application/typescript"),
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(ct),
            "{path}"
        );
        let etag = r.headers()["etag"].clone();
        let r = app
            .client
            .get(app.url(path))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{path}");
    }
}

/// Groups that fill up to `--max-group` are committed while the syncer is still
/// busy; the writer must still be woken for the next group (this once hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_complete_when_groups_fill_to_max_group() {
    let args = ordersync::config::ServeArgs {
        max_group: 2,
        ..test_args()
    };
    let app = std::sync::Arc::new(spawn_with(args).await);
    let (_, t) = app.user_with_token("alice").await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (app, t) = (app.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let r = app
                    .post_orders(&t, json!([order(&format!("w{w}-{i}"), "d")]))
                    .await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        }));
    }
    // A hang guard only: on a healthy server this takes well under a second.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("a write never completed: the writer was not woken");
    let list = app.get("/api/pending-orders", &t).await;
    assert_eq!(list.body["orders"].as_array().unwrap().len(), 16 * 20);
    assert_eq!(list.body["seq"], 16 * 20);
}
