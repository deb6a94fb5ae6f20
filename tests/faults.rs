//! Storage faults: a database that is full, read-only or locked by another
//! process. A write then gets a 503 envelope (`STORAGE_UNAVAILABLE`), nothing
//! partial is committed, no event is published, reads keep working, and writes
//! succeed again once the condition clears. Startup on a corrupt or foreign file
//! fails with a clear message and a non-zero exit, without touching the file.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use helpers::*;
use rusqlite::Connection;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const QUIET: Duration = Duration::from_millis(400);

/// A batch that needs many new database pages (so a full database rejects it).
fn big_batch(prefix: &str, n: usize) -> Value {
    let orders: Vec<Value> = (0..n)
        .map(|i| {
            let mut o = order(&format!("{prefix}-{i}"), "dev");
            o["notes"] = json!("n".repeat(480));
            o
        })
        .collect();
    json!(orders)
}

fn assert_503(r: &Resp) {
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["success"], false, "{}", r.body);
    assert_eq!(r.body["code"], "STORAGE_UNAVAILABLE", "{}", r.body);
    assert!(
        r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        r.body
    );
}

/// Everything a failed write must leave untouched.
async fn snapshot(app: &TestApp, uid: &str, t: &str) -> (Value, Vec<(i64, String, Value)>) {
    let list = app.get("/api/pending-orders", t).await;
    assert_eq!(list.status, 200, "reads keep working: {}", list.body);
    (list.body, app.events_of(uid).await)
}

/// Sets `PRAGMA max_page_count` on the writer connection (through a write job,
/// which runs on that very connection). `None` = the current size: full.
async fn set_max_pages(app: &TestApp, pages: Option<i64>) -> i64 {
    app.app
        .store
        .write(move |tx| {
            let c = tx.conn();
            let n = match pages {
                Some(n) => n,
                None => c.query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))?,
            };
            Ok(
                c.query_row(&format!("PRAGMA max_page_count = {n}"), [], |r| {
                    r.get::<_, i64>(0)
                })?,
            )
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn database_full_gives_503_writes_nothing_publishes_nothing_then_recovers() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    assert_eq!(
        app.post_orders(&t, json!([order("keep", "dev")]))
            .await
            .status,
        200
    );
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let before = snapshot(&app, &uid, &t).await;

    set_max_pages(&app, None).await;
    let r = app.post_orders(&t, big_batch("big", 200)).await;
    assert_503(&r);
    // An update of an existing order in the same failing batch is not applied either.
    let mut batch = big_batch("big2", 200);
    batch
        .as_array_mut()
        .unwrap()
        .push(order_with_qty("keep", "dev", 9));
    assert_503(&app.post_orders(&t, batch).await);
    ws.assert_silent(QUIET).await;
    assert_eq!(snapshot(&app, &uid, &t).await, before, "nothing partial");
    assert_eq!(app.get("/healthz", &t).await.status, 200);
    assert_eq!(app.get("/api/pending-orders/keep", &t).await.status, 200);

    // Cleared: the same write now succeeds and is published once, in order.
    set_max_pages(&app, Some(1_073_741_823)).await;
    let r = app.post_orders(&t, big_batch("big", 200)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ev = ws.next_json().await;
    assert_eq!(ev["seq"], 2, "{ev}");
    assert_eq!(ev["payload"]["count"], 200);
    assert_eq!(app.events_of(&uid).await.len(), 2);
}

#[tokio::test]
async fn a_full_database_fails_whole_requests_never_half_of_one() {
    // Small writes concurrent with huge ones on a full database: every request
    // gets either 200 (and is then fully there) or 503 (and is fully absent).
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    assert_eq!(
        app.post_orders(&t, json!([order("seed", "dev")]))
            .await
            .status,
        200
    );
    set_max_pages(&app, None).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let body = if i % 3 == 0 {
            big_batch(&format!("huge{i}"), 150)
        } else {
            json!([order(&format!("small{i}"), "dev")])
        };
        let client = app.client.clone();
        let url = app.url("/api/pending-orders");
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(t)
                .json(&json!({ "orders": body.clone() }))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let b: Value = r.json().await.unwrap();
            (body, status, b)
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for task in tasks {
        let (body, status, reply) = task.await.unwrap();
        let ids: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap())
            .collect();
        let q = format!("/api/pending-orders?ids={}", ids.join(","));
        let found = app.get(&q, &t).await.body["orders"]
            .as_array()
            .unwrap()
            .len();
        match status {
            200 => {
                ok += 1;
                assert_eq!(found, ids.len(), "acknowledged but missing: {reply}");
            }
            503 => {
                assert_eq!(reply["code"], "STORAGE_UNAVAILABLE");
                assert_eq!(found, 0, "a rejected batch was partly written");
                rejected += 1;
            }
            other => panic!("unexpected {other}: {reply}"),
        }
    }
    eprintln!("{ok} acknowledged, {rejected} rejected");
    assert!(rejected > 0, "the full database rejected nothing");
    // Every event in the log belongs to an acknowledged request, gapless.
    let events = app.events_of(&uid).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=(1 + ok)).collect::<Vec<_>>());
    set_max_pages(&app, Some(1_073_741_823)).await;
}

#[tokio::test]
async fn locked_beyond_busy_timeout_gives_503_and_reads_go_on_then_recovers() {
    let mut args = test_args();
    args.busy_timeout = Duration::from_millis(200);
    let app = spawn_with(args).await;
    let (uid, t) = app.user_with_token("alice").await;
    assert_eq!(
        app.post_orders(&t, json!([order("a", "dev")])).await.status,
        200
    );
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let before = snapshot(&app, &uid, &t).await;

    // Another process (here: connection) holds the write lock.
    let other = Connection::open(app.db_path()).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_503(&app.post_orders(&t, json!([order("b", "dev")])).await);
    assert_503(&app.lock("a", &t, true).await);
    assert_503(&app.delete("/api/pending-orders/a", &t).await);
    let ready = app.get("/readyz", &t).await;
    assert_eq!(ready.status, 503, "not ready while the file is locked");
    assert_eq!(app.get("/healthz", &t).await.status, 200);
    ws.assert_silent(QUIET).await;
    assert_eq!(snapshot(&app, &uid, &t).await, before);
    other.execute_batch("ROLLBACK").unwrap();

    let r = app.post_orders(&t, json!([order("b", "dev")])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ws.next_json().await["seq"], 2);
    assert_eq!(app.get("/readyz", &t).await.status, 200);
}

/// Marks files immutable (`chattr +i`): even root cannot write them, so SQLite's
/// writes fail as on a read-only mount. Undone on drop.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(paths: &[std::path::PathBuf]) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .args(paths)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("chattr").arg("-i").args(paths).status();
            return None;
        }
        Some(Immutable(paths.to_vec()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

fn with_suffix(p: &Path, s: &str) -> std::path::PathBuf {
    let mut o = p.as_os_str().to_owned();
    o.push(s);
    o.into()
}

#[tokio::test]
async fn read_only_files_give_503_and_nothing_partial_then_recover() {
    let app = spawn_app().await;
    let (uid, t) = app.user_with_token("alice").await;
    assert_eq!(
        app.post_orders(&t, json!([order("a", "dev")])).await.status,
        200
    );
    let (mut ws, _) = app.connect_ok(&format!("token={t}")).await;
    let before = snapshot(&app, &uid, &t).await;
    let db = app.db_path();
    // Not the -shm file: it is memory-mapped, and an immutable mapping faults.
    let Some(guard) = Immutable::set(&[db.clone(), with_suffix(&db, "-wal")]) else {
        eprintln!("SKIPPED: chattr +i is not supported on this filesystem");
        return;
    };
    assert_503(&app.post_orders(&t, big_batch("ro", 20)).await);
    assert_503(&app.lock("a", &t, true).await);
    ws.assert_silent(QUIET).await;
    assert_eq!(snapshot(&app, &uid, &t).await, before);
    drop(guard);

    let r = app.post_orders(&t, big_batch("ro", 20)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ws.next_json().await["seq"], 2);
    assert_eq!(app.events_of(&uid).await.len(), 2);
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// Runs `ordersync serve` on `db`; returns (exit code, stderr). Fails if it starts serving.
fn serve_expecting_failure(db: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ordersync"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the server started on {}: {}",
                db.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(db: &Path, expect_in_message: &str) {
    let before = sha(db);
    let (code, stderr) = serve_expecting_failure(db);
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}: {stderr}");
    assert!(
        stderr.contains(expect_in_message) && stderr.contains("not modified"),
        "unclear message: {stderr}"
    );
    assert!(stderr.len() < 2000, "a clear message, not a dump: {stderr}");
    assert_eq!(sha(db), before, "{} was modified", db.display());
    for s in ["-wal", "-shm", "-journal"] {
        let side = with_suffix(db, s);
        assert!(
            !side.exists() || std::fs::metadata(&side).unwrap().len() == 0,
            "{} left behind",
            side.display()
        );
    }
}

#[test]
fn startup_on_a_corrupt_file_fails_clearly_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    // Random bytes.
    let garbage = dir.path().join("garbage.db");
    let bytes: Vec<u8> = (0..16384u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).unwrap();
    assert_refused(&garbage, "not a usable SQLite database");
    // A text file.
    let text = dir.path().join("notes.db");
    std::fs::write(&text, "these are my notes, not a database\n".repeat(200)).unwrap();
    assert_refused(&text, "not a usable SQLite database");
    // A real ordersync database whose header was overwritten.
    let real = dir.path().join("real.db");
    let (ok, _, err) = cli(
        &real,
        &["user", "add", "x", "--password-stdin"],
        "pw-12345678\n",
    );
    assert!(ok, "{err}");
    let mut b = std::fs::read(&real).unwrap();
    b[..16].copy_from_slice(b"NOT SQLITE AT AL");
    std::fs::write(&real, &b).unwrap();
    assert_refused(&real, "not a usable SQLite database");
}

#[test]
fn startup_on_a_foreign_sqlite_database_fails_clearly_without_touching_it() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.db");
    {
        let c = Connection::open(&foreign).unwrap();
        c.execute_batch(
            "CREATE TABLE invoices(id INTEGER PRIMARY KEY, total REAL);
             INSERT INTO invoices(total) VALUES (10.5), (20.25);",
        )
        .unwrap();
    }
    assert_refused(&foreign, "not an ordersync one");
    // An ordersync database from a newer version.
    let newer = dir.path().join("newer.db");
    {
        let c = Connection::open(&newer).unwrap();
        c.execute_batch("CREATE TABLE x(a); PRAGMA user_version = 99;")
            .unwrap();
    }
    assert_refused(&newer, "newer than this ordersync");
}

/// Starts the real binary on `db`; returns the child and its address.
fn serve_child(db: &Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ordersync"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--db")
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("ordersync listening on http://") {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server started");
    (child, addr)
}

fn sigterm(mut child: std::process::Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success(), "graceful stop");
}

#[tokio::test]
async fn a_database_read_only_at_startup_serves_reads_and_refuses_writes_with_503() {
    // A separate process: SQLite may hand a new connection a file descriptor that
    // an earlier connection of the same process opened read-write, so only a fresh
    // process really opens the file read-only.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ro.db");
    let (ok, _, err) = cli(
        &db,
        &["user", "add", "alice", "--password-stdin"],
        "pw-12345678\n",
    );
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&db, &["token", "create", "alice"], "");
    assert!(ok);
    let t = out.lines().last().unwrap().trim().to_string();
    let client = reqwest::Client::new();
    let (child, addr) = serve_child(&db);
    let r = client
        .post(format!("http://{addr}/api/pending-orders"))
        .bearer_auth(&t)
        .json(&json!({"orders": [order("a", "dev")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sigterm(child);
    let before = sha(&db);
    // The file (not its directory) is immutable: SQLite opens it read-only and
    // every write fails with SQLITE_READONLY.
    let Some(guard) = Immutable::set(std::slice::from_ref(&db)) else {
        eprintln!("SKIPPED: chattr +i is not supported on this filesystem");
        return;
    };
    let (child, addr) = serve_child(&db);
    let get = |path: &str| {
        client
            .get(format!("http://{addr}{path}"))
            .bearer_auth(&t)
            .send()
    };
    let list: Value = get("/api/pending-orders")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["orders"].as_array().unwrap().len(), 1, "reads work");
    let r = client
        .post(format!("http://{addr}/api/pending-orders"))
        .bearer_auth(&t)
        .json(&json!({"orders": [order("b", "dev")]}))
        .send()
        .await
        .unwrap();
    let r = Resp {
        status: r.status(),
        headers: r.headers().clone(),
        body: r.json().await.unwrap(),
    };
    assert_503(&r);
    assert!(
        r.body["error"].as_str().unwrap().contains("read-only"),
        "{}",
        r.body
    );
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    sigterm(child);
    drop(guard);
    assert_eq!(sha(&db), before, "the read-only file was not modified");
    // Writable again: a restart serves writes.
    let (child, addr) = serve_child(&db);
    let r = client
        .post(format!("http://{addr}/api/pending-orders"))
        .bearer_auth(&t)
        .json(&json!({"orders": [order("b", "dev")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sigterm(child);
}
