//! Property tests: arbitrary and adversarial JSON (wrong types, deep nesting,
//! huge numbers and strings, invalid UTF-8, duplicate keys, NaN-like strings,
//! nulls, empty and oversized batches) against the validation layer and through
//! the HTTP API of a real server.
//!
//! * `parse_strict` and `parse_batch` never panic, and what they accept is sound.
//! * The API never answers 5xx, always answers with the envelope, and a refused
//!   request writes nothing: the list and the event log are unchanged after it.
//!
//! Case counts are modest so `make test` stays fast; raise with PROPTEST_CASES.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use helpers::*;
use ordersync::orders::{parse_batch, Limits};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

const LIMITS: Limits = Limits {
    max_batch: 5,
    max_items: 3,
};
/// The server runs with small limits so oversized batches are cheap to generate.
const MAX_BODY: usize = 64 * 1024;

/// The order fields the server knows, plus one it does not.
fn order_fields() -> Vec<&'static str> {
    let mut fields = ordersync::orders::ORDER_FIELDS.to_vec();
    fields.push("unknownField");
    fields
}
const ITEM_FIELDS: &[&str] = &[
    "articleCode",
    "quantity",
    "price",
    "vat",
    "discount",
    "description",
    "productName",
    "unit",
    "custom",
];

fn cases(n: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(n),
        failure_persistence: None,
        ..Config::default()
    }
}

fn weird_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "NaN",
            "Infinity",
            "-Infinity",
            "1e999",
            "-0",
            "",
            " ",
            "null",
            "true",
            "\u{0}",
            "\u{202e}evil",
            "pending",
            "completed-warehouse",
            "../../etc/passwd",
            "' OR 1=1 --",
            "%00",
        ])
        .prop_map(String::from),
        ".{0,40}",
        (0usize..3000).prop_map(|n| "x".repeat(n)),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-5i64..200).prop_map(|n| json!(n)),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop::sample::select(vec![1e308, -1e308, 5e-324, -0.0, 0.5, 100.0, 100.0001])
            .prop_map(|f| json!(f)),
        weird_string().prop_map(Value::String),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(order_fields()).prop_map(String::from),
        prop::sample::select(ITEM_FIELDS).prop_map(String::from),
        "[a-zA-Z_]{1,10}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn order_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,6}",
        "\\PC{1,6}",
        ".{0,3}",
        (126usize..131).prop_map(|n| "i".repeat(n)),
        Just(" padded ".to_string()),
    ]
}

/// A valid order with some fields removed or replaced by arbitrary values, and
/// some item fields replaced: adversarial inputs that reach deep validation.
fn mutated_order() -> impl Strategy<Value = Value> {
    (
        order_id(),
        1u32..4,
        prop::collection::vec(
            (
                prop::sample::select(order_fields()),
                prop::option::of(json_value()),
            ),
            0..4,
        ),
        prop::collection::vec(
            (
                0usize..3,
                prop::sample::select(ITEM_FIELDS),
                prop::option::of(json_value()),
            ),
            0..3,
        ),
    )
        .prop_map(|(id, qty, fields, items)| {
            let mut o = ordersync::orders::sample_order(&id, "dev", qty);
            for (i, f, v) in items {
                if let Some(Value::Array(list)) = o.get_mut("items") {
                    if i >= list.len() {
                        list.push(json!({}));
                    }
                    let n = list.len() - 1;
                    let item = list[i.min(n)].as_object_mut().unwrap();
                    match v {
                        Some(v) => item.insert(f.to_string(), v),
                        None => item.remove(f),
                    };
                }
            }
            for (f, v) in fields {
                match v {
                    Some(v) => o.insert(f.to_string(), v),
                    None => o.remove(f),
                };
            }
            Value::Object(o)
        })
}

/// A batch body: 0..8 orders (empty and oversized batches included), maybe a
/// body-level deviceId, maybe an unknown top-level field, maybe a duplicate id.
fn batch_body() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(mutated_order(), 0..8),
        prop::option::of(json_value()),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(orders, device, extra, dup)| {
            let mut orders = orders;
            if dup && !orders.is_empty() {
                orders.push(orders[0].clone());
            }
            let mut b = json!({ "orders": orders });
            if let Some(d) = device {
                b["deviceId"] = d;
            }
            if extra {
                b["extra"] = json!(1);
            }
            b
        })
}

/// A request body; its Debug output is truncated so a failure report stays readable.
#[derive(Clone)]
struct Body(Vec<u8>);

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = String::from_utf8_lossy(&self.0[..self.0.len().min(300)]);
        write!(f, "Body({} bytes: {head:?}…)", self.0.len())
    }
}

/// Request bodies, including what no JSON serializer would produce.
fn body_bytes() -> impl Strategy<Value = Body> {
    raw_bytes().prop_map(Body)
}

fn raw_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid_order = r#"{"id":"v","customerId":"c","customerName":"n","deviceId":"d","items":[{"articleCode":"a","quantity":QTY,"price":1,"vat":1}]}"#;
    prop_oneof![
        4 => batch_body().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&json!({"orders": [v]})).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        // Invalid UTF-8 spliced into valid JSON.
        1 => (batch_body(), any::<prop::sample::Index>(), prop::sample::select(vec![
                vec![0xffu8], vec![0xc3], vec![0xed, 0xa0, 0x80], vec![0xf8, 0x88, 0x80, 0x80, 0x80],
                vec![0x00], b"\\ud800".to_vec()]))
            .prop_map(|(v, at, junk)| {
                let mut b = serde_json::to_vec(&v).unwrap();
                let i = at.index(b.len() + 1);
                b.splice(i..i, junk);
                b
            }),
        // Duplicate keys, at the top, in an order, in an item.
        1 => prop::sample::select(vec![
                format!(r#"{{"orders":[{o}],"orders":[{o}]}}"#, o = valid_order.replace("QTY", "1")),
                r#"{"orders":[{"id":"a","id":"b","customerId":"c","customerName":"n","deviceId":"d"}]}"#.to_string(),
                valid_order.replace("QTY", r#"1,"quantity":2"#).replace("{\"id\"", "{\"orders\":[{\"id\"") + "]}",
            ]).prop_map(String::into_bytes),
        // Deep nesting.
        1 => (1usize..400).prop_map(|d| format!(r#"{{"orders":{}{}}}"#, "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => (1usize..200).prop_map(|d| {
                let mut s = String::from(r#"{"orders":[{"id":"deep","customerId":"c","customerName":"n","deviceId":"d","subClientData":"#);
                s += &"{\"a\":".repeat(d);
                s += "1";
                s += &"}".repeat(d);
                s += "}]}";
                s.into_bytes()
            }),
        // Huge and odd numbers where numbers are expected.
        1 => prop::sample::select(vec!["1e400", "-1e400", "123456789012345678901234567890", "1e308",
                "-0", "0.0000001e-400", "NaN", "Infinity", "0x10", "01", "1.", ".5", "+1", "\"5\""])
            .prop_map(move |n| format!(r#"{{"orders":[{}]}}"#, valid_order.replace("QTY", n)).into_bytes()),
        // Larger than --max-body.
        1 => (MAX_BODY - 64..MAX_BODY + 4096).prop_map(|n| {
                format!(r#"{{"orders":[{{"id":"big","customerId":"c","customerName":"n","deviceId":"d","notes":"{}"}}]}}"#, "n".repeat(n))
                    .into_bytes()
            }),
    ]
}

#[test]
fn parse_strict_never_panics_and_agrees_with_serde_json() {
    let mut runner = TestRunner::new(cases(256));
    runner
        .run(&body_bytes(), |bytes| {
            let bytes = bytes.0;
            if let Ok(v) = ordersync::json::parse_strict(&bytes) {
                let plain: Value = serde_json::from_slice(&bytes).expect("strict ⊂ serde_json");
                prop_assert_eq!(v, plain);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn parse_batch_never_panics_and_what_it_accepts_is_valid() {
    let mut runner = TestRunner::new(cases(256));
    let strategy = prop_oneof![3 => batch_body(), 1 => json_value()];
    runner
        .run(&strategy, |body| {
            match parse_batch(&body, LIMITS) {
                Ok(batch) => {
                    let n = batch.orders.len();
                    prop_assert!((1..=LIMITS.max_batch).contains(&n));
                    prop_assert_eq!(n, body["orders"].as_array().unwrap().len());
                    let ids: std::collections::HashSet<_> =
                        batch.orders.iter().map(|o| o.id.clone()).collect();
                    prop_assert_eq!(ids.len(), n, "ids unique");
                    for o in &batch.orders {
                        prop_assert!(ordersync::orders::check_id(&o.id).is_ok());
                        prop_assert!(!o.content.customer_id.is_empty());
                        let items: Value = serde_json::from_str(&o.content.items).unwrap();
                        prop_assert!(items.as_array().unwrap().len() <= LIMITS.max_items);
                    }
                    prop_assert!(!batch.device_id.is_empty());
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for e in &errors {
                        prop_assert!(!e.message.is_empty());
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

fn envelope_ok(status: u16, body: &Value) -> Result<(), TestCaseError> {
    prop_assert!(status < 500, "5xx: {} {}", status, body);
    prop_assert!(body.is_object(), "not a JSON object: {}", body);
    if (200..300).contains(&status) {
        prop_assert_eq!(&body["success"], &json!(true), "{}", body);
    } else {
        prop_assert_eq!(&body["success"], &json!(false), "{}", body);
        prop_assert!(
            body["code"].as_str().is_some_and(|c| !c.is_empty()),
            "{}",
            body
        );
        prop_assert!(
            body["error"].as_str().is_some_and(|c| !c.is_empty()),
            "{}",
            body
        );
        if let Some(d) = body.get("details") {
            for x in d.as_array().unwrap() {
                prop_assert!(
                    x["path"].is_string() && x["message"].is_string(),
                    "{}",
                    body
                );
            }
        }
    }
    Ok(())
}

struct Live {
    rt: tokio::runtime::Runtime,
    app: TestApp,
    uid: String,
    token: String,
}

impl Live {
    fn start() -> Live {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut args = test_args();
        args.max_batch = LIMITS.max_batch;
        args.max_items = LIMITS.max_items;
        args.max_body = MAX_BODY;
        let app = rt.block_on(spawn_with(args));
        let (uid, token) = rt.block_on(app.user_with_token("prop"));
        Live {
            rt,
            app,
            uid,
            token,
        }
    }

    /// The list (with its seq) and the whole event log.
    fn state(&self) -> (Value, Vec<(i64, String, Value)>) {
        self.rt.block_on(async {
            let l = self.app.get("/api/pending-orders", &self.token).await;
            assert_eq!(l.status, 200);
            (l.body, self.app.events_of(&self.uid).await)
        })
    }

    fn send(&self, method: reqwest::Method, path: &str, body: Option<Vec<u8>>) -> (u16, Value) {
        self.rt.block_on(async {
            let mut req = self
                .app
                .client
                .request(method, self.app.url(path))
                .bearer_auth(&self.token);
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let r = req.send().await.expect("the server answers");
            let status = r.status().as_u16();
            let text = r.bytes().await.unwrap();
            let body = serde_json::from_slice(&text)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into()));
            (status, body)
        })
    }
}

#[test]
fn the_api_never_5xx_always_envelopes_and_never_writes_partially() {
    let live = Live::start();
    let before = std::cell::RefCell::new(live.state());
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let mut runner = TestRunner::new(cases(128));
    runner
        .run(&body_bytes(), |bytes| {
            let bytes = bytes.0;
            let sent: Option<usize> = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["orders"].as_array().map(Vec::len));
            let (status, body) =
                live.send(reqwest::Method::POST, "/api/pending-orders", Some(bytes));
            envelope_ok(status, &body)?;
            let after = live.state();
            if status == 200 {
                accepted.set(accepted.get() + 1);
                let results = body["results"].as_array().unwrap();
                prop_assert_eq!(Some(results.len()), sent);
                *before.borrow_mut() = after;
            } else {
                refused.set(refused.get() + 1);
                prop_assert!(matches!(status, 400 | 413), "{} {}", status, body);
                prop_assert!(
                    after == *before.borrow(),
                    "a refused request changed the data: {}",
                    body
                );
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{} batches accepted, {} refused",
        accepted.get(),
        refused.get()
    );
    assert!(refused.get() > 0);
}

#[test]
fn odd_ids_queries_and_lock_bodies_never_5xx_nor_write_when_refused() {
    let live = Live::start();
    // One real order so lock/delete can succeed sometimes.
    let (s, _) = live.send(
        reqwest::Method::POST,
        "/api/pending-orders",
        Some(serde_json::to_vec(&json!({"orders": [order("real", "d")]})).unwrap()),
    );
    assert_eq!(s, 200);
    let before = std::cell::RefCell::new(live.state());
    let strategy = (
        prop_oneof![
            Just("real".to_string()),
            "\\PC{0,12}",
            ".{0,6}",
            "[%./?#a-z]{0,10}"
        ],
        0usize..5,
        prop_oneof![
            json_value(),
            any::<bool>().prop_map(|b| json!({"locked": b}))
        ],
        "[a-zA-Z=&%0-9]{0,20}",
    );
    let mut runner = TestRunner::new(cases(96));
    runner
        .run(&strategy, |(id, op, lock_body, query)| {
            let enc: String =
                percent_encoding::utf8_percent_encode(&id, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            let (status, body) = match op {
                0 => live.send(
                    reqwest::Method::GET,
                    &format!("/api/pending-orders/{enc}"),
                    None,
                ),
                1 => live.send(
                    reqwest::Method::PATCH,
                    &format!("/api/pending-orders/{enc}/lock"),
                    Some(serde_json::to_vec(&lock_body).unwrap()),
                ),
                2 => live.send(
                    reqwest::Method::DELETE,
                    &format!("/api/pending-orders/{enc}?{query}"),
                    None,
                ),
                3 => live.send(
                    reqwest::Method::GET,
                    &format!("/api/pending-orders?{query}"),
                    None,
                ),
                _ => live.send(
                    reqwest::Method::GET,
                    &format!("/api/pending-orders?ids={enc},{enc}x"),
                    None,
                ),
            };
            envelope_ok(status, &body)?;
            let after = live.state();
            if (200..300).contains(&status) {
                *before.borrow_mut() = after;
            } else {
                prop_assert!(
                    after == *before.borrow(),
                    "a refused request changed the data: {}",
                    body
                );
            }
            Ok(())
        })
        .unwrap();
}

/// Regression (found by the property test above): a 413 sent before the body
/// was read left the keep-alive connection open, so the client's next request
/// on it failed. The server now answers 413 with `Connection: close`.
#[tokio::test]
async fn a_413_does_not_break_the_clients_next_request() {
    let mut args = test_args();
    args.max_body = MAX_BODY;
    let app = spawn_with(args).await;
    let (_, t) = app.user_with_token("big").await;
    for _ in 0..5 {
        let big = format!(
            r#"{{"orders":[{{"notes":"{}"}}]}}"#,
            "n".repeat(MAX_BODY * 4)
        );
        let r = app
            .client
            .post(app.url("/api/pending-orders"))
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413);
        assert_eq!(r.headers()["connection"], "close");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");
        // The same client (connection pool) goes on working.
        let r = app.get("/api/pending-orders", &t).await;
        assert_eq!(r.status, 200);
    }
}
