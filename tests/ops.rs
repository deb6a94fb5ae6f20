//! Operations (issue 7): backup under load, `check`, metrics, logs, health and
//! readiness during shutdown. The server runs in-process (tests/api/helpers.rs)
//! or, where its stderr matters, as the real binary in a subprocess.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helpers::{order, spawn_app, spawn_with, test_args, Next};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Runs the real binary; returns (exit ok, stdout, stderr).
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ordersync"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ---------------------------------------------------------------- backup, check

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_under_write_load_passes_check_and_holds_every_acknowledged_write() {
    let app = Arc::new(spawn_app().await);
    let (user, token) = app.user_with_token("alice").await;

    // Some data first, so the copy is more than a few pages.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for b in 0..20 {
        let batch: Vec<Value> = (0..10)
            .map(|i| order(&format!("pre-{b}-{i}"), "seed"))
            .collect();
        let r = app.post_orders(&token, json!(batch)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        acked
            .lock()
            .unwrap()
            .extend((0..10).map(|i| format!("pre-{b}-{i}")));
    }

    // Writers keep going for the whole backup.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (app, token, acked, stop) =
                (app.clone(), token.clone(), acked.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let ids: Vec<String> = (0..3).map(|i| format!("w{w}-{n}-{i}")).collect();
                    let batch: Vec<Value> = ids.iter().map(|id| order(id, "load")).collect();
                    let r = app.post_orders(&token, json!(batch)).await;
                    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
                    acked.lock().unwrap().extend(ids);
                    n += 1;
                }
                n
            })
        })
        .collect();
    // Let every writer get at least one write in before the backup starts.
    while acked.lock().unwrap().len() < 200 + 3 * 3 {
        tokio::task::yield_now().await;
    }

    let dest = app.dir.path().join("backup.db");
    let before: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let (db, dest_s) = (app.db_path(), dest.clone());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        run_cli(&["backup", path_str(&dest_s), "--db", path_str(&db)])
    })
    .await
    .unwrap();
    assert!(ok, "backup failed: {stdout}\n{stderr}");
    // Informational only (timing decides it): writes acknowledged while the backup ran.
    eprintln!(
        "writes acknowledged during the backup: {}",
        acked.lock().unwrap().len() - before.len()
    );
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    assert!(stdout.contains("passed `ordersync check`"), "{stdout}");
    assert!(!Path::new(&format!("{}.partial", dest.display())).exists());

    let (ok, stdout, stderr) = run_cli(&["check", "--db", path_str(&dest)]);
    assert!(ok, "check of the backup failed: {stdout}\n{stderr}");
    assert!(stdout.contains("event log:"), "{stdout}");

    // Every write acknowledged before the backup started is in it, and the copy is
    // one snapshot: each order it holds was announced by an event it holds.
    let copy = rusqlite::Connection::open(&dest).unwrap();
    let in_copy: HashSet<String> = copy
        .prepare("SELECT id FROM pending_orders WHERE user_id = ?1")
        .unwrap()
        .query_map([&user], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let missing: Vec<_> = before.difference(&in_copy).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged writes missing from the backup, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut announced = HashSet::new();
    let mut stmt = copy
        .prepare("SELECT payload FROM events WHERE user_id = ?1 AND type = 'PENDING_CREATED'")
        .unwrap();
    for p in stmt.query_map([&user], |r| r.get::<_, String>(0)).unwrap() {
        let p: Value = serde_json::from_str(&p.unwrap()).unwrap();
        for id in p["orderIds"].as_array().unwrap() {
            announced.insert(id.as_str().unwrap().to_string());
        }
    }
    assert_eq!(in_copy, announced, "orders and events of the copy disagree");

    // The live database is still fine and the server still takes writes.
    let r = app.post_orders(&token, json!([order("after", "x")])).await;
    assert_eq!(r.status, StatusCode::OK);
    let (ok, stdout, _) = run_cli(&["check", "--db", path_str(&app.db_path())]);
    assert!(ok, "{stdout}");

    // An existing destination is refused without --force, replaced with it.
    let (ok, _, stderr) = run_cli(&["backup", path_str(&dest), "--db", path_str(&app.db_path())]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    let (ok, _, stderr) = run_cli(&[
        "backup",
        path_str(&dest),
        "--force",
        "--db",
        path_str(&app.db_path()),
    ]);
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_good_database_and_names_the_user_with_a_hole_in_the_event_log() {
    let app = spawn_app().await;
    let (alice, ta) = app.user_with_token("alice").await;
    let (bob, tb) = app.user_with_token("bob").await;
    for i in 0..3 {
        for t in [&ta, &tb] {
            let r = app
                .post_orders(t, json!([order(&format!("o{i}"), "d")]))
                .await;
            assert_eq!(r.status, StatusCode::OK);
        }
    }
    let dir = app.stop().await; // checkpoints: the file alone is the database
    let db = dir.path().join("test.db");

    let (ok, stdout, stderr) = run_cli(&["check", "--db", path_str(&db)]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    assert!(stdout.contains("integrity: ok"), "{stdout}");
    assert!(stdout.contains("schema version"), "{stdout}");
    assert!(stdout.contains("6 events"), "{stdout}");

    // A copy with one of bob's events deleted.
    let copy = dir.path().join("holed.db");
    std::fs::copy(&db, &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let n = conn
        .execute("DELETE FROM events WHERE user_id = ?1 AND seq = 2", [&bob])
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);

    let (ok, stdout, stderr) = run_cli(&["check", "--db", path_str(&copy)]);
    assert!(!ok, "check passed a log with a hole: {stdout}");
    let fail: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fail.len(), 1, "{stdout}");
    assert!(
        fail[0].contains(&format!("user {bob} (bob)")),
        "the failure does not name bob: {stdout}"
    );
    assert!(!fail[0].contains(&format!("user {alice} ")), "{stdout}");
    assert!(stderr.contains("check found problems"), "{stderr}");
}

// ---------------------------------------------------------------- metrics

/// Sum of the samples of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

async fn scrape(client: &reqwest::Client, url: &str) -> String {
    let r = client.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_present_and_move_with_requests_events_and_sockets() {
    let app = spawn_app().await;
    let url = app.url("/metrics");
    let (_, token) = app.user_with_token("alice").await;
    // Counters are process-wide (other tests share the recorder): compare deltas.
    let post = [("route", "POST /api/pending-orders"), ("status", "200")];
    let upgrades = [("route", "GET /ws/realtime"), ("status", "101")];
    let before = scrape(&app.client, &url).await;
    let v0 = |name: &str, labels: &[(&str, &str)]| sample(&before, name, labels).unwrap_or(0.0);
    let requests0 = v0("ordersync_http_requests_total", &post);
    let upgrades0 = v0("ordersync_http_requests_total", &upgrades);
    let appended0 = v0("ordersync_events_appended_total", &[]);
    let delivered0 = v0("ordersync_events_delivered_total", &[]);
    let latency0 = v0(
        "ordersync_http_request_duration_seconds_count",
        &[("route", "POST /api/pending-orders")],
    );

    let (mut ws, _) = app.connect_ok(&format!("token={token}&since=0")).await;
    for i in 0..3 {
        let r = app
            .post_orders(&token, json!([order(&format!("m{i}"), "d")]))
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(ws.next_json().await["type"], "PENDING_CREATED");
    }
    // Counters are bumped around the acks and sends they count, on other threads
    // and tasks: wait (bounded) until the scrape has caught up.
    let moved = |t: &str| {
        sample(t, "ordersync_events_appended_total", &[]).unwrap_or(0.0) >= appended0 + 3.0
            && sample(t, "ordersync_events_delivered_total", &[]).unwrap_or(0.0) >= delivered0 + 3.0
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = scrape(&app.client, &url).await;
    while !moved(&after) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(&app.client, &url).await;
    }
    let v1 = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels).unwrap_or_else(|| panic!("{name} missing:\n{after}"))
    };
    assert!(v1("ordersync_http_requests_total", &post) >= requests0 + 3.0);
    assert!(v1("ordersync_http_requests_total", &upgrades) >= upgrades0 + 1.0);
    assert!(v1("ordersync_events_appended_total", &[]) >= appended0 + 3.0);
    assert!(v1("ordersync_events_delivered_total", &[]) >= delivered0 + 3.0);
    assert!(v1("ordersync_ws_open_sockets", &[]) >= 1.0, "{after}");
    assert!(v1("ordersync_writer_queue_depth", &[]) >= 0.0);
    assert!(v1("ordersync_database_bytes", &[]) > 0.0);
    assert!(
        v1(
            "ordersync_http_request_duration_seconds_count",
            &[("route", "POST /api/pending-orders")]
        ) >= latency0 + 3.0
    );
    // A real histogram: buckets up to +Inf, cumulative.
    let le = |b: &str| {
        v1(
            "ordersync_http_request_duration_seconds_bucket",
            &[("route", "POST /api/pending-orders"), ("le", b)],
        )
    };
    assert!(le("0.005") <= le("0.1") && le("0.1") <= le("+Inf"));
    assert!(le("+Inf") >= latency0 + 3.0);
    for name in [
        "ordersync_write_transaction_seconds_bucket",
        "ordersync_write_group_size_count",
    ] {
        assert!(sample(&after, name, &[]).is_some(), "{name} missing");
    }
    // Group sizes have their own buckets (counts, not seconds).
    assert!(sample(&after, "ordersync_write_group_size_bucket", &[("le", "1")]).is_some());
    // HELP/TYPE lines come from the exporter, not by hand.
    assert!(after.contains("# TYPE ordersync_http_requests_total counter"));
    assert!(after.contains("# HELP ordersync_events_appended_total "));
    drop(ws);
}

#[tokio::test]
async fn metrics_false_answers_404() {
    let app = spawn_with(ordersync::config::ServeArgs {
        metrics: false,
        ..test_args()
    })
    .await;
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    app.stop().await;
}

// ---------------------------------------------------------------- health, shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_during_shutdown_while_healthz_stays_200_until_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut app = spawn_with(ordersync::config::ServeArgs {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_args()
    })
    .await;
    let (_, token) = app.user_with_token("alice").await;
    let ops = app.app.ops.as_ref().expect("ops listener").addr;
    let ops_url = |p: &str| format!("http://{ops}{p}");
    let main_addr = app.addr;
    let main_url = |p: &str| format!("http://{main_addr}{p}");
    let client = app.client.clone();
    let status = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.map(|r| r.status()) }
    };
    assert_eq!(status(main_url("/readyz")).await.unwrap(), StatusCode::OK);
    assert_eq!(status(ops_url("/readyz")).await.unwrap(), StatusCode::OK);
    assert_eq!(status(ops_url("/healthz")).await.unwrap(), StatusCode::OK);
    // With --metrics-listen, /metrics moves off the main listener.
    assert_eq!(status(ops_url("/metrics")).await.unwrap(), StatusCode::OK);
    assert_eq!(
        status(main_url("/metrics")).await.unwrap(),
        StatusCode::NOT_FOUND
    );

    // A request in flight: headers sent, body held back. "100 Continue" proves the
    // handler is reading the body, so shutdown must wait for it.
    let body = json!({"orders": [order("in-flight", "d")]}).to_string();
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/pending-orders HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        app.addr,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(conn.read(&mut b).await.unwrap(), 1, "connection closed");
        got.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    app.stop_signal().send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(ops_url("/readyz")).await.unwrap();
        if s == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(s, StatusCode::OK);
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status(ops_url("/healthz")).await.unwrap(), StatusCode::OK);
    assert_eq!(
        status(ops_url("/readyz")).await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The in-flight request completes, then the server stops and so does the ops listener.
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut resp = String::new();
    conn.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"created\""), "{resp}");
    app.join().await;
    assert!(
        status(ops_url("/healthz")).await.is_err(),
        "ops listener still up"
    );
}

// ---------------------------------------------------------------- logs

/// The real binary serving on an ephemeral port with JSON logs into a file.
struct Served {
    child: std::process::Child,
    addr: String,
}

fn serve_binary(db: &Path, log: &Path) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ordersync"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--log-level", "info", "--db", path_str(db)])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("ordersync listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_string();
    Served { child, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_request_and_never_contain_tokens_or_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("logs.db");
    let log = dir.path().join("stderr.log");
    let password = "correct-horse-battery-staple";
    let wrong = "wrong-password-xyzzy";
    let (ok, _, e) = helpers::cli(
        &db,
        &["user", "add", "alice", "--password-stdin"],
        &format!("{password}\n"),
    );
    assert!(ok, "{e}");
    let (ok, out, e) = helpers::cli(&db, &["token", "create", "alice"], "");
    assert!(ok, "{e}");
    let cli_token = out.lines().last().unwrap().trim().to_string();

    let mut served = serve_binary(&db, &log);
    let base = format!("http://{}", served.addr);
    let client = reqwest::Client::new();

    let r = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "alice", "password": wrong}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r: Value = client
        .post(format!("{base}/api/auth/login"))
        .json(&json!({"username": "alice", "password": password, "deviceId": "tab"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let login_token = r["token"].as_str().expect("login token").to_string();
    let user_id = r["user"]["id"].as_str().unwrap().to_string();
    for t in [&cli_token, &login_token] {
        let r = client
            .get(format!("{base}/api/auth/me"))
            .bearer_auth(t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = client
        .post(format!("{base}/api/pending-orders"))
        .bearer_auth(&login_token)
        .json(&json!({"orders": [order("log-1", "tab")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Token in the query string (browsers) and in the header.
    let (ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws/realtime?token={cli_token}&since=0",
        served.addr
    ))
    .await
    .unwrap();
    let mut ws = helpers::Ws { ws };
    assert_eq!(ws.next_json().await["type"], "CONNECTED");
    assert_eq!(ws.next_json().await["type"], "PENDING_CREATED");
    ws.ws.close(None).await.unwrap();
    while !matches!(
        ws.next_within(Duration::from_secs(5)).await,
        Next::Closed(..)
    ) {}
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws/realtime", served.addr),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {login_token}").parse().unwrap(),
    );
    let (ws2, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut ws2 = helpers::Ws { ws: ws2 };
    assert_eq!(ws2.next_json().await["type"], "CONNECTED");
    // A page of a foreign origin is refused (403), and that is logged too.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/ws/realtime?token={cli_token}", served.addr),
    )
    .unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    // A bad token in the query string is not logged either.
    let bad = "os_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let (bad_ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/realtime?token={bad}", served.addr))
            .await
            .unwrap();
    let mut bad_ws = helpers::Ws { ws: bad_ws };
    assert_eq!(bad_ws.close_code(Duration::from_secs(5)).await, Some(1008));

    // SIGTERM: graceful stop, exit 0; ws2 is closed with 1001 and logged.
    unsafe { libc::kill(served.child.id() as i32, libc::SIGTERM) };
    assert_eq!(ws2.close_code(Duration::from_secs(5)).await, Some(1001));
    let status = served.child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();

    for secret in [&cli_token, &login_token, password, wrong, bad] {
        assert!(!text.contains(secret), "a secret is in the logs:\n{text}");
    }
    // Nor a recognisable part of one.
    assert!(!text.contains(&cli_token[3..19]), "{text}");

    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "ordersync::request")
        .collect();
    assert!(requests.len() >= 10, "{text}");
    for r in &requests {
        for field in [
            "method",
            "route",
            "status",
            "latency_ms",
            "user",
            "timestamp",
            "level",
        ] {
            assert!(!r[field].is_null(), "request line without {field}: {r}");
        }
        assert!(r["status"].is_u64() && r["latency_ms"].is_number(), "{r}");
    }
    let find = |route: &str, status: u64| {
        requests
            .iter()
            .filter(|r| r["route"] == route && r["status"] == status)
            .collect::<Vec<_>>()
    };
    assert_eq!(find("POST /api/auth/login", 401).len(), 1, "{text}");
    assert_eq!(
        find("POST /api/auth/login", 200)[0]["user"],
        user_id.as_str()
    );
    let me = find("GET /api/auth/me", 200);
    assert_eq!(me.len(), 2);
    assert!(me.iter().all(|r| r["user"] == user_id.as_str()));
    assert_eq!(find("POST /api/pending-orders", 200)[0]["method"], "POST");
    assert_eq!(find("GET /ws/realtime", 101).len(), 3, "{text}");
    assert_eq!(find("GET /", 200).len(), 1, "{text}");
    assert_eq!(find("GET /ws/realtime", 403).len(), 1, "{text}");

    // Socket lines: open with the user, close with a reason.
    let opened = lines
        .iter()
        .filter(|l| l["message"] == "socket open")
        .count();
    assert_eq!(opened, 2, "{text}");
    let closed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"] == "socket closed")
        .collect();
    assert_eq!(closed.len(), 2, "{text}");
    assert!(closed.iter().all(|l| l["user"] == user_id.as_str()));
    assert!(
        closed
            .iter()
            .any(|l| l["reason"].as_str().is_some_and(|r| r.starts_with("1001"))),
        "{text}"
    );
    assert!(lines
        .iter()
        .any(|l| l["message"] == "socket refused" && l["reason"] == "authentication failed"));
}

// ---------------------------------------------------------------- behind a proxy

#[test]
fn client_ip_trusts_x_forwarded_for_only_from_trusted_proxies() {
    use ordersync::http::client_ip;
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("x-forwarded-for", "6.6.6.6, 10.0.0.7".parse().unwrap());
    let proxy: std::net::SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    // Not trusted: the header is the client's word, ignored.
    assert_eq!(client_ip(Some(proxy), &h, &[]), ip("127.0.0.1"));
    // Trusted: the proxy appended the address it saw (the rightmost entry).
    let trusted = [ip("127.0.0.1").unwrap()];
    assert_eq!(client_ip(Some(proxy), &h, &trusted), ip("10.0.0.7"));
    // A chain of trusted proxies is skipped; a client-written entry is not trusted.
    let chain = [ip("127.0.0.1").unwrap(), ip("10.0.0.7").unwrap()];
    assert_eq!(client_ip(Some(proxy), &h, &chain), ip("6.6.6.6"));
    assert_eq!(
        client_ip(Some(proxy), &Default::default(), &trusted),
        ip("127.0.0.1")
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_failed_logins_are_limited_per_real_client() {
    let app = spawn_with(ordersync::config::ServeArgs {
        login_max_failures: 1, // 4 per address
        trusted_proxy: vec!["127.0.0.1".parse().unwrap()],
        ..test_args()
    })
    .await;
    app.create_user("alice", "password123").await;
    let login = |from: &str, user: &str, pw: &str| {
        app.client
            .post(app.url("/api/auth/login"))
            .header("x-forwarded-for", from)
            .json(&json!({"username": user, "password": pw}))
    };
    for i in 0..4 {
        let r = login("10.0.0.1", &format!("nobody{i}"), "x").send().await;
        assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let r = login("10.0.0.1", "nobody9", "x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy is not locked out.
    let r = login("10.0.0.2", "alice", "password123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_installs_a_backup_and_makes_every_device_resync() {
    let app = spawn_app().await;
    let (_, t) = app.user_with_token("alice").await;
    app.post_orders(&t, json!([order("kept", "d")])).await;
    let backup = app.dir.path().join("backup.db");
    let (ok, _, err) = run_cli(&[
        "backup",
        path_str(&backup),
        "--db",
        path_str(&app.db_path()),
    ]);
    assert!(ok, "{err}");
    // Written after the backup: lost by the restore; a device saw up to seq 3.
    app.post_orders(&t, json!([order("lost-1", "d")])).await;
    let seen = app
        .post_orders(&t, json!([order("lost-2", "d")]))
        .await
        .body["seq"]
        .as_i64()
        .unwrap();
    assert_eq!(seen, 3);
    let db = app.db_path();
    let dir = app.stop().await;

    let (ok, out, err) = run_cli(&["restore", path_str(&backup), "--db", path_str(&db)]);
    assert!(ok, "{err}");
    assert!(out.contains("restored"), "{out}");
    let (ok, out, _) = run_cli(&["check", "--db", path_str(&db)]);
    assert!(ok, "restored database passes check: {out}");

    let app = helpers::spawn_at(dir, test_args()).await;
    let ids: Vec<_> = app.get("/api/pending-orders", &t).await.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["kept"]);
    // New writes after the restore must not reuse seqs the device already saw.
    let after = app.post_orders(&t, json!([order("new", "d")])).await.body["seq"]
        .as_i64()
        .unwrap();
    assert!(after > seen);
    for since in [seen, 0] {
        let (mut ws, _) = app.connect_ok(&format!("token={t}&since={since}")).await;
        match ws.next_within(Duration::from_secs(5)).await {
            Next::Text(f) => {
                let f: Value = serde_json::from_str(&f).unwrap();
                assert_eq!(f["type"], "RESYNC_REQUIRED", "since={since}: {f}");
                assert_eq!(f["payload"]["headSeq"], after);
            }
            other => panic!("since={since}: {other:?}"),
        }
    }
    // A device that refetched (seq = head) resumes normally.
    let (mut ws, hello) = app.connect_ok(&format!("token={t}&since={after}")).await;
    assert_eq!(hello["payload"]["resumed"], true);
    app.lock("new", &t, true).await;
    assert_eq!(ws.next_json().await["seq"], after + 1);
    app.stop().await;
}

// ---------------------------------------------------------------- migration

/// A database in the version-1 layout (tests/fixtures/schema-v1.sql: orders and
/// events as WITHOUT ROWID tables), filled with what a server wrote, is backed up
/// and migrated on start, and serves the same orders and the same event log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_backed_up_and_migrated_keeping_orders_and_events() {
    // Real data, written through the API of a current server.
    let source = spawn_app().await;
    let (user, t) = source.user_with_token("alice").await;
    let orders: Vec<Value> = (0..30).map(|i| order(&format!("o-{i}"), "d1")).collect();
    assert_eq!(source.post_orders(&t, json!(orders)).await.status, 200);
    assert_eq!(
        source
            .post_orders(&t, json!([helpers::order_with_qty("o-1", "d1", 9)]))
            .await
            .status,
        200
    );
    assert_eq!(
        source.delete("/api/pending-orders/o-2", &t).await.status,
        200
    );
    let listed = source.get("/api/pending-orders", &t).await.body;
    let events = source.events_of(&user).await;
    assert_eq!(events.len(), 3);
    let source_dir = source.stop().await;

    // The same rows in the version-1 layout.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let db = dir.path().join("test.db");
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(include_str!("fixtures/schema-v1.sql"))
            .unwrap();
        c.execute(
            "ATTACH ?1 AS src",
            [source_dir.path().join("test.db").to_str().unwrap()],
        )
        .unwrap();
        for table in ["users", "tokens", "pending_orders", "events", "streams"] {
            c.execute_batch(&format!(
                "INSERT INTO main.{table} SELECT * FROM src.{table}"
            ))
            .unwrap();
        }
        c.execute_batch("DETACH src; PRAGMA user_version = 1;")
            .unwrap();
        let layout: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(layout.contains("WITHOUT ROWID"), "fixture is the v1 layout");
    }

    let app = helpers::spawn_at(dir.clone(), test_args()).await;
    assert_eq!(app.get("/api/pending-orders", &t).await.body, listed);
    assert_eq!(app.events_of(&user).await, events);
    // The log replays and goes on without a gap.
    let (mut ws, _) = app.connect_ok(&format!("token={t}&since=0")).await;
    for seq in 1..=3 {
        assert_eq!(ws.next_json().await["seq"], seq);
    }
    app.post_orders(&t, json!([order("new", "d1")])).await;
    assert_eq!(ws.next_json().await["seq"], 4);
    drop(ws);
    app.stop().await;

    let c = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
    for table in ["pending_orders", "events"] {
        let sql: String = c
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            !sql.contains("WITHOUT ROWID"),
            "{table} is a rowid table: {sql}"
        );
    }
    drop(c);
    let backup = dir.path().join("test.pre-v2.bak");
    let b = rusqlite::Connection::open(&backup).expect("the pre-migration copy exists");
    let version: i64 = b
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
    let (ok, out, err) = run_cli(&["check", "--db", path_str(&db)]);
    assert!(ok, "check passes after migration: {out}{err}");
}
