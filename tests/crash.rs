//! Crash test (`make crash-test`): the real binary under concurrent write load from
//! several users is killed with SIGKILL at random moments, again and again, and
//! restarted on the same database. After every restart we check that
//!
//! * every write that got a 2xx reply is there with the acknowledged version
//!   (deleted orders stay deleted), and writes whose reply was lost to the kill are
//!   either fully there or fully absent;
//! * every user's event log is gapless `1..=last_seq` and replays through the
//!   WebSocket (`since=0`) in order, matching the log row for row;
//! * `PRAGMA integrity_check` is `ok`;
//! * a client that was listening when the server died resumes with `since` and,
//!   following the client recipe, ends with exactly the server's state.
//!
//! `CRASH_KILLS` (default 20) sets the number of kills, `CRASH_SEED` the random seed.
//! Only loopback addresses are used. Timing never decides pass/fail; timeouts are
//! hang guards only.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_ordersync");
const USERS: usize = 3;
const WRITERS_PER_USER: usize = 2;
const IDS_PER_WRITER: usize = 12;
/// Hang guard for any single network step.
const GUARD: Duration = Duration::from_secs(30);

/// Small deterministic PRNG (xorshift64*), seeded per run and printed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct User {
    name: String,
    id: String,
    token: String,
}

fn cli(db: &Path, args: &[&str], stdin: &str) -> String {
    let (ok, out, err) = helpers::cli(db, args, stdin);
    assert!(ok, "ordersync {args:?} failed: {err}");
    out
}

struct Server {
    child: Child,
    addr: String,
}

/// Starts `ordersync serve` on a loopback ephemeral port; waits for its banner.
fn start_server(db: &Path, log: &Path) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--sync", "full"])
        .arg("--db")
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("server starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        // Keep draining so the server never writes into a full or closed pipe.
        while let Some(Ok(line)) = lines.next() {
            if !sent {
                if let Some(addr) = line.strip_prefix("ordersync listening on http://") {
                    let _ = tx.send(addr.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(GUARD)
        .expect("server printed its listening address");
    assert!(addr.starts_with("127.0.0.1:"), "loopback only: {addr}");
    Server { child, addr }
}

fn sigkill(server: &mut Server) {
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(server.child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill failed");
    let status = server.child.wait().unwrap();
    assert!(!status.success(), "killed server must not exit cleanly");
}

/// What the test knows about one order (each order is written by exactly one
/// writer task, one request at a time, so the last acknowledgement is the truth).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Known {
    Absent,
    Present { version: i64, locked: bool },
}

#[derive(Debug, Clone, Copy)]
enum InFlight {
    /// An upsert (or lock) whose reply was lost: the order may be as before, or
    /// present with a higher version.
    Write,
    /// A delete whose reply was lost: as before, or absent.
    Delete,
}

#[derive(Debug, Clone)]
struct Slot {
    known: Known,
    uncertain: Option<InFlight>,
}

type Model = BTreeMap<String, Slot>;

#[derive(Default)]
struct Stats {
    acked_writes: u64,
}

struct Writer {
    user: usize,
    writer: usize,
    token: String,
    model: Model,
    rng: Rng,
    stats: Stats,
}

fn order_body(id: &str, device: &str, qty: u32) -> Value {
    Value::Object(ordersync::orders::sample_order(id, device, qty))
}

impl Writer {
    fn id(&self, n: usize) -> String {
        format!("w{}-{n}", self.writer)
    }

    fn pick(&mut self) -> String {
        let n = self.rng.below(IDS_PER_WRITER as u64) as usize;
        self.id(n)
    }

    /// Runs random operations until `stop` or the first transport error (the kill).
    async fn run(mut self, base: String, stop: Arc<AtomicBool>) -> Writer {
        let client = reqwest::Client::builder().timeout(GUARD).build().unwrap();
        let device = format!("dev-u{}-w{}", self.user, self.writer);
        while !stop.load(Ordering::SeqCst) {
            let op = self.rng.below(10);
            if op < 6 {
                // Batch upsert of 1..=4 distinct ids of ours.
                let n = 1 + self.rng.below(4) as usize;
                let mut ids = BTreeSet::new();
                while ids.len() < n {
                    ids.insert(self.pick());
                }
                let ids: Vec<String> = ids.into_iter().collect();
                let orders: Vec<Value> = ids
                    .iter()
                    .map(|id| order_body(id, &device, 1 + self.rng.below(5) as u32))
                    .collect();
                for id in &ids {
                    self.mark(id, InFlight::Write);
                }
                let r = client
                    .post(format!("{base}/api/pending-orders"))
                    .bearer_auth(&self.token)
                    .json(&json!({ "orders": orders }))
                    .send()
                    .await;
                let Some((status, body)) = reply(r).await else {
                    return self;
                };
                if status == 503 {
                    // Not written (e.g. shutting down); leave as uncertain, stop.
                    return self;
                }
                assert_eq!(status, 200, "upsert: {body}");
                for res in body["results"].as_array().unwrap() {
                    let id = res["id"].as_str().unwrap().to_string();
                    let version = res["version"].as_i64().unwrap();
                    let action = res["action"].as_str().unwrap();
                    assert!(
                        matches!(action, "created" | "updated" | "unchanged"),
                        "{res}"
                    );
                    let slot = self.model.get_mut(&id).unwrap();
                    let locked = match slot.known {
                        Known::Present { locked, .. } => locked,
                        Known::Absent => false,
                    };
                    slot.known = Known::Present { version, locked };
                    slot.uncertain = None;
                    self.stats.acked_writes += 1;
                }
            } else if op < 8 {
                let id = self.pick();
                self.mark(&id, InFlight::Delete);
                let r = client
                    .delete(format!("{base}/api/pending-orders/{id}?deviceId={device}"))
                    .bearer_auth(&self.token)
                    .send()
                    .await;
                let Some((status, body)) = reply(r).await else {
                    return self;
                };
                if status == 503 {
                    return self;
                }
                let slot = self.model.get_mut(&id).unwrap();
                match status.as_u16() {
                    200 => {}
                    404 => assert_eq!(slot.known, Known::Absent, "404 on delete of {id}"),
                    _ => panic!("delete {id}: {status} {body}"),
                }
                slot.known = Known::Absent;
                slot.uncertain = None;
                self.stats.acked_writes += 1;
            } else {
                let id = self.pick();
                let want = self.rng.below(2) == 0;
                self.mark(&id, InFlight::Write);
                let r = client
                    .patch(format!("{base}/api/pending-orders/{id}/lock"))
                    .bearer_auth(&self.token)
                    .json(&json!({ "locked": want, "deviceId": device }))
                    .send()
                    .await;
                let Some((status, body)) = reply(r).await else {
                    return self;
                };
                if status == 503 {
                    return self;
                }
                let slot = self.model.get_mut(&id).unwrap();
                match status.as_u16() {
                    200 => {
                        assert_eq!(body["isLocked"], want);
                        slot.known = Known::Present {
                            version: body["version"].as_i64().unwrap(),
                            locked: want,
                        };
                    }
                    404 => assert_eq!(slot.known, Known::Absent, "404 on lock of {id}"),
                    _ => panic!("lock {id}: {status} {body}"),
                }
                slot.uncertain = None;
                self.stats.acked_writes += 1;
            }
        }
        self
    }

    fn mark(&mut self, id: &str, what: InFlight) {
        self.model.get_mut(id).unwrap().uncertain = Some(what);
    }
}

/// `None` when the transport failed (the server was killed mid-request).
async fn reply(
    r: Result<reqwest::Response, reqwest::Error>,
) -> Option<(reqwest::StatusCode, Value)> {
    let r = r.ok()?;
    let status = r.status();
    let text = r.text().await.ok()?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Some((status, body))
}

/// A client following the README's recipe: it remembers the last seq it saw and
/// which orders the events touched; at check time it refetches those ids.
#[derive(Default)]
struct Listener {
    last: i64,
    orders: BTreeMap<String, Value>,
    dirty: BTreeSet<String>,
}

impl Listener {
    fn apply(&mut self, ev: &Value) {
        let seq = ev["seq"].as_i64().expect("event has a seq");
        assert_eq!(seq, self.last + 1, "listener saw a hole or duplicate: {ev}");
        self.last = seq;
        let p = &ev["payload"];
        match ev["type"].as_str().unwrap() {
            "PENDING_CREATED" | "PENDING_UPDATED" => {
                let ids = p["orderIds"].as_array().unwrap();
                assert_eq!(p["count"].as_u64(), Some(ids.len() as u64));
                for id in ids {
                    self.dirty.insert(id.as_str().unwrap().to_string());
                }
            }
            "PENDING_DELETED" => {
                self.dirty
                    .insert(p["orderId"].as_str().unwrap().to_string());
            }
            other => panic!("unexpected event type {other}: {ev}"),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(addr: &str, token: &str, since: i64) -> (Ws, Value) {
    let url = format!("ws://{addr}/ws/realtime?token={token}&since={since}&deviceId=listener");
    let (mut ws, _) = tokio::time::timeout(GUARD, tokio_tungstenite::connect_async(url))
        .await
        .expect("ws connect hang")
        .expect("ws connects");
    let hello = next_text(&mut ws).await.expect("CONNECTED frame");
    assert_eq!(hello["type"], "CONNECTED", "{hello}");
    (ws, hello)
}

/// The next text frame as JSON; `None` when the socket ends.
async fn next_text(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(GUARD, ws.next()).await {
            Err(_) => panic!("socket silent for {GUARD:?}"),
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Listens during a server life until the socket dies with the server.
async fn listen_live(addr: String, token: String, listener: Arc<Mutex<Listener>>) {
    let since = listener.lock().unwrap().last;
    let Ok(Ok((mut ws, _))) = tokio::time::timeout(
        GUARD,
        tokio_tungstenite::connect_async(format!(
            "ws://{addr}/ws/realtime?token={token}&since={since}&deviceId=listener"
        )),
    )
    .await
    else {
        return;
    };
    while let Some(frame) = next_text(&mut ws).await {
        match frame["type"].as_str() {
            Some("CONNECTED") => assert_eq!(frame["payload"]["resumed"], true, "{frame}"),
            Some("RESYNC_REQUIRED") => panic!("unexpected resync: {frame}"),
            _ => listener.lock().unwrap().apply(&frame),
        }
    }
}

fn integrity_and_log(db: &Path, users: &[User]) -> HashMap<String, Vec<(i64, String, String)>> {
    let c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    c.busy_timeout(GUARD).unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "integrity_check");
    let mut logs = HashMap::new();
    c.execute_batch("BEGIN").unwrap();
    for u in users {
        let last: i64 = c
            .query_row(
                "SELECT coalesce((SELECT last_seq FROM streams WHERE user_id = ?1), 0)",
                [&u.id],
                |r| r.get(0),
            )
            .unwrap();
        let mut st = c
            .prepare("SELECT seq, type, payload FROM events WHERE user_id = ?1 ORDER BY seq")
            .unwrap();
        let rows: Vec<(i64, String, String)> = st
            .query_map([&u.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
        assert_eq!(
            seqs,
            (1..=last).collect::<Vec<_>>(),
            "event log of {} is not gapless 1..={last}",
            u.name
        );
        logs.insert(u.id.clone(), rows);
    }
    c.execute_batch("COMMIT").unwrap();
    logs
}

async fn list(client: &reqwest::Client, base: &str, token: &str) -> (BTreeMap<String, Value>, i64) {
    let r = client
        .get(format!("{base}/api/pending-orders"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    let orders = body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["id"].as_str().unwrap().to_string(), o.clone()))
        .collect();
    (orders, body["seq"].as_i64().unwrap())
}

/// Checks the acknowledged model against the server, then adopts the server's
/// state for orders whose last write's outcome was unknown.
fn check_model(user: &str, model: &mut Model, server: &BTreeMap<String, Value>) {
    for (id, slot) in model.iter_mut() {
        let actual = server.get(id).map(|o| Known::Present {
            version: o["version"].as_i64().unwrap(),
            locked: o["isLocked"].as_bool().unwrap(),
        });
        let actual = actual.unwrap_or(Known::Absent);
        let ok = match (slot.uncertain, slot.known, actual) {
            (None, k, a) => k == a,
            (Some(InFlight::Delete), k, a) => a == Known::Absent || a == k,
            (Some(InFlight::Write), Known::Absent, _) => true,
            (Some(InFlight::Write), Known::Present { version, .. }, a) => match a {
                Known::Present { version: v, .. } => v >= version,
                Known::Absent => false,
            },
        };
        assert!(
            ok,
            "{user} order {id}: acknowledged {:?} (in flight: {:?}) but the server has {actual:?}",
            slot.known, slot.uncertain
        );
        slot.known = actual;
        slot.uncertain = None;
    }
    for id in server.keys() {
        assert!(model.contains_key(id), "{user}: unexpected order {id}");
    }
}

/// Replays the whole log through the socket (`since=0`) and compares it with the rows.
async fn check_replay(addr: &str, token: &str, rows: &[(i64, String, String)]) {
    let (mut ws, hello) = ws_connect(addr, token, 0).await;
    let head = hello["payload"]["headSeq"].as_i64().unwrap();
    assert_eq!(head, rows.len() as i64, "headSeq vs log");
    for (seq, kind, payload) in rows {
        let ev = next_text(&mut ws).await.expect("replayed event");
        assert_eq!(ev["seq"].as_i64(), Some(*seq), "replay order: {ev}");
        assert_eq!(ev["type"].as_str(), Some(kind.as_str()));
        let p: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(ev["payload"], p);
    }
    drop(ws);
}

/// The listener resumes with `since`, catches up to the head, refetches what the
/// events touched and must then hold exactly the server's list.
async fn check_listener(
    client: &reqwest::Client,
    addr: &str,
    token: &str,
    listener: &Arc<Mutex<Listener>>,
    head: i64,
) {
    let since = listener.lock().unwrap().last;
    assert!(
        since <= head,
        "the listener saw seq {since} but the log ends at {head}: a delivered event was lost"
    );
    let (mut ws, hello) = ws_connect(addr, token, since).await;
    assert_eq!(hello["payload"]["resumed"], true);
    while listener.lock().unwrap().last < head {
        let ev = next_text(&mut ws).await.expect("resumed event");
        listener.lock().unwrap().apply(&ev);
    }
    drop(ws);
    let base = format!("http://{addr}");
    let dirty: Vec<String> = std::mem::take(&mut listener.lock().unwrap().dirty)
        .into_iter()
        .collect();
    for chunk in dirty.chunks(200) {
        let ids = chunk.join(",");
        let r = client
            // Our ids are [a-z0-9-] only: no escaping needed.
            .get(format!("{base}/api/pending-orders?ids={ids}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let body: Value = r.json().await.unwrap();
        let got: BTreeMap<String, Value> = body["orders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["id"].as_str().unwrap().to_string(), o.clone()))
            .collect();
        let mut l = listener.lock().unwrap();
        for id in chunk {
            match got.get(id) {
                Some(o) => l.orders.insert(id.clone(), o.clone()),
                None => l.orders.remove(id),
            };
        }
    }
    let (server, _) = list(client, &base, token).await;
    let l = listener.lock().unwrap();
    assert_eq!(
        l.orders.keys().collect::<Vec<_>>(),
        server.keys().collect::<Vec<_>>(),
        "listener ids differ from the server's"
    );
    assert_eq!(l.orders, server, "listener state differs from the server's");
}

#[test]
#[ignore = "slow: run with `make crash-test`"]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash test: {kills} kills, CRASH_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let db: PathBuf = dir.path().join("crash.db");
    let log = dir.path().join("server.log");

    // Accounts through the CLI (creates and migrates the database).
    let mut users = Vec::new();
    for i in 0..USERS {
        let name = format!("agent{i}");
        let out = cli(
            &db,
            &["user", "add", &name, "--password-stdin"],
            "crash-pass-1234\n",
        );
        assert!(out.contains("created user"), "{out}");
        let out = cli(&db, &["token", "create", &name], "");
        let token = out.lines().last().unwrap().trim().to_string();
        users.push(User {
            name,
            id: String::new(),
            token,
        });
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut writers: Vec<Writer> = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for w in 0..WRITERS_PER_USER {
            let mut model = Model::new();
            for n in 0..IDS_PER_WRITER {
                model.insert(
                    format!("w{w}-{n}"),
                    Slot {
                        known: Known::Absent,
                        uncertain: None,
                    },
                );
            }
            writers.push(Writer {
                user: u,
                writer: w,
                token: user.token.clone(),
                model,
                rng: Rng(rng.next() | 1),
                stats: Stats::default(),
            });
        }
    }
    let listener = Arc::new(Mutex::new(Listener::default()));
    let client = reqwest::Client::builder().timeout(GUARD).build().unwrap();
    let mut total_events = 0usize;

    let mut server = start_server(&db, &log);
    // User ids (for the event-log check) from /api/auth/me.
    rt.block_on(async {
        for u in users.iter_mut() {
            let me: Value = client
                .get(format!("http://{}/api/auth/me", server.addr))
                .bearer_auth(&u.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            u.id = me["user"]["id"].as_str().unwrap().to_string();
        }
    });

    for round in 0..=kills {
        let addr = server.addr.clone();
        let base = format!("http://{addr}");
        // 1. Verify the state the previous life left behind.
        let logs = integrity_and_log(&db, &users);
        rt.block_on(async {
            for (u, user) in users.iter().enumerate() {
                let (orders, seq) = list(&client, &base, &user.token).await;
                assert_eq!(seq, logs[&user.id].len() as i64, "list seq vs log head");
                for w in writers.iter_mut().filter(|w| w.user == u) {
                    let mine: BTreeMap<String, Value> = orders
                        .iter()
                        .filter(|(id, _)| id.starts_with(&format!("w{}-", w.writer)))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    check_model(&user.name, &mut w.model, &mine);
                }
                let all_ids: BTreeSet<&String> =
                    writers.iter().flat_map(|w| w.model.keys()).collect();
                for id in orders.keys() {
                    assert!(all_ids.contains(id), "unknown order {id}");
                }
                check_replay(&addr, &user.token, &logs[&user.id]).await;
            }
            let u0 = &users[0];
            let head = logs[&u0.id].len() as i64;
            check_listener(&client, &addr, &u0.token, &listener, head).await;
        });
        total_events = logs.values().map(Vec::len).sum();
        if round == kills {
            break;
        }

        // 2. Load: writers of every user and a listening socket, then SIGKILL.
        let stop = Arc::new(AtomicBool::new(false));
        let live = rt.spawn(listen_live(
            addr.clone(),
            users[0].token.clone(),
            listener.clone(),
        ));
        let tasks: Vec<_> = writers
            .drain(..)
            .map(|w| rt.spawn(w.run(base.clone(), stop.clone())))
            .collect();
        let wait_ms = 150 + rng.below(1200);
        std::thread::sleep(Duration::from_millis(wait_ms));
        sigkill(&mut server);
        stop.store(true, Ordering::SeqCst);
        rt.block_on(async {
            for t in tasks {
                let w = tokio::time::timeout(GUARD, t)
                    .await
                    .expect("writer hang")
                    .expect("writer task panicked");
                writers.push(w);
            }
            tokio::time::timeout(GUARD, live)
                .await
                .expect("listener hang")
                .expect("listener task panicked");
        });
        let acked: u64 = writers.iter().map(|w| w.stats.acked_writes).sum();
        let uncertain = writers
            .iter()
            .flat_map(|w| w.model.values())
            .filter(|s| s.uncertain.is_some())
            .count() as u64;
        println!(
            "kill {:>2}/{kills} after {wait_ms:>4} ms: {acked} acknowledged writes so far, \
             {uncertain} orders with a reply lost to the kill, listener at seq {}",
            round + 1,
            listener.lock().unwrap().last
        );
        // 3. Restart on the same database.
        server = start_server(&db, &log);
    }
    let acked: u64 = writers.iter().map(|w| w.stats.acked_writes).sum();
    assert!(acked > 0, "no write was acknowledged: the test did nothing");
    assert!(total_events > 0);
    println!(
        "crash test passed: {kills} SIGKILLs, {acked} acknowledged writes verified, \
         {total_events} events gapless and replayed, in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    sigkill(&mut server);
}
