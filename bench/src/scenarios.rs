//! The five scenarios of issue 5 and the HTTP / WebSocket plumbing they share.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::report::{Agg, Goal, Metric};
use crate::util::{micros, mint_jwt, percentile_ms, CpuMeter};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Hard cap on requests per client per round, whatever the duration.
const MAX_REQUESTS_PER_CLIENT: u64 = 5_000_000;
/// Hard cap on fanout writes per round.
const MAX_FANOUT_WRITES: usize = 10_000_000;
/// Upper bound on concurrently outstanding fanout writes (open-loop schedule).
const MAX_INFLIGHT_WRITES: usize = 1024;

/// Parameters of all scenarios, defaults already applied.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    #[serde(skip)]
    pub duration: Duration,
    pub duration_secs: f64,
    pub clients: usize,
    pub batch_size: usize,
    pub batch_clients: usize,
    pub users: usize,
    pub devices: usize,
    pub rate: f64,
    pub grace_ms: u64,
    pub sockets: usize,
    pub events: u64,
    pub fill_clients: usize,
    pub fill_timeout_secs: u64,
    pub connect_concurrency: usize,
    /// Attach issue 5's budgets to the results (off in --quick mode).
    pub budgets: bool,
    /// fanout: write one CSV line per delivered frame here (diagnosis).
    #[serde(skip)]
    pub dump_latencies: Option<std::path::PathBuf>,
}

/// Where the server is and how to talk to it.
pub struct Ctx {
    pub base: String,
    pub secret: String,
    pub pid: Option<u32>,
    pub http: reqwest::Client,
    orders_url: reqwest::Url,
}

static NEXT_USER: AtomicU64 = AtomicU64::new(1);

/// Sets the first user id handed out (random per run, so runs against one `--url` server
/// never share users).
pub fn init_users(base: u64) {
    NEXT_USER.store(base, Ordering::Relaxed);
}

fn new_user() -> u64 {
    NEXT_USER.fetch_add(1, Ordering::Relaxed)
}

impl Ctx {
    pub fn new(base: &str, secret: &str, pid: Option<u32>, pool: usize) -> Result<Ctx> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(pool.max(8))
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()?;
        Ok(Ctx {
            base: base.to_string(),
            secret: secret.to_string(),
            pid,
            http,
            orders_url: reqwest::Url::parse(&format!("{base}/api/pending-orders"))?,
        })
    }

    fn bearer(&self, user: u64) -> String {
        format!("Bearer {}", mint_jwt(&self.secret, user))
    }

    fn ws_url(&self, user: u64, device: &str, since: Option<u64>) -> String {
        let ws_base = self.base.replacen("http://", "ws://", 1);
        let token = mint_jwt(&self.secret, user);
        match since {
            Some(s) => {
                format!("{ws_base}/ws/realtime?token={token}&deviceId={device}&since={s}")
            }
            None => format!("{ws_base}/ws/realtime?token={token}&deviceId={device}"),
        }
    }

    /// Checks the server answers an authenticated request: fails fast with a clear message
    /// (wrong secret, server not up) before any scenario starts.
    pub async fn preflight(&self) -> Result<()> {
        let resp = self
            .http
            .get(self.orders_url.clone())
            .header("authorization", self.bearer(new_user()))
            .send()
            .await
            .with_context(|| format!("GET {}", self.orders_url))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!(
                "preflight GET {} answered {status}: {} (is the JWT secret right?)",
                self.orders_url,
                snippet(body.as_bytes())
            );
        }
        Ok(())
    }

    async fn post_orders(&self, auth: &str, body: Vec<u8>) -> Result<UpsertReply> {
        let resp = self
            .http
            .post(self.orders_url.clone())
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        upsert_reply(status, &bytes)
    }

    /// A keep-alive connection of its own for a closed-loop client.
    async fn connect(&self) -> Result<Conn> {
        let authority = self
            .base
            .strip_prefix("http://")
            .context("the target URL must start with http://")?
            .trim_end_matches('/')
            .to_string();
        let stream = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("connecting to {authority}"))?;
        stream.set_nodelay(true)?;
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Conn { send, authority })
    }
}

/// One HTTP/1.1 keep-alive connection, driven with hyper's connection API. The
/// closed-loop scenarios send over these instead of reqwest: with no pool and
/// no redirect/retry layers the load generator needs about half the CPU per
/// request, and it shares the machine's two cores with the server it measures.
struct Conn {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    authority: String,
}

impl Conn {
    async fn post_orders(&mut self, auth: &str, body: Vec<u8>) -> Result<UpsertReply> {
        use http_body_util::BodyExt;
        self.send.ready().await?;
        let req = hyper::Request::post("/api/pending-orders")
            .header("host", &self.authority)
            .header("authorization", auth)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        upsert_reply(status, &bytes)
    }
}

/// Checks and parses the reply to POST /api/pending-orders.
fn upsert_reply(status: reqwest::StatusCode, bytes: &[u8]) -> Result<UpsertReply> {
    if !status.is_success() {
        bail!(
            "POST /api/pending-orders: HTTP {status}: {}",
            snippet(bytes)
        );
    }
    let reply: UpsertReply =
        serde_json::from_slice(bytes).with_context(|| format!("bad reply {}", snippet(bytes)))?;
    if !reply.success {
        bail!(
            "POST /api/pending-orders: success=false: {}",
            snippet(bytes)
        );
    }
    Ok(reply)
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    s.chars().take(300).collect()
}

// ---------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OrderIn<'a> {
    id: &'a str,
    customer_id: &'a str,
    customer_name: &'a str,
    device_id: &'a str,
    items: [ItemIn; 2],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemIn {
    article_code: &'static str,
    quantity: u64,
    price: f64,
    vat: f64,
}

#[derive(Serialize)]
struct Batch<'a> {
    orders: &'a [OrderIn<'a>],
}

fn order<'a>(id: &'a str, device: &'a str, qty: u64) -> OrderIn<'a> {
    OrderIn {
        id,
        customer_id: "C0042",
        customer_name: "Bench Customer S.r.l.",
        device_id: device,
        items: [
            ItemIn {
                article_code: "ART-001",
                quantity: qty,
                price: 12.5,
                vat: 22.0,
            },
            ItemIn {
                article_code: "ART-002",
                quantity: 3,
                price: 7.25,
                vat: 10.0,
            },
        ],
    }
}

fn batch_body(orders: &[OrderIn<'_>]) -> Vec<u8> {
    serde_json::to_vec(&Batch { orders }).expect("serializable")
}

#[derive(Deserialize)]
struct UpsertReply {
    success: bool,
    #[serde(default)]
    results: Vec<UpsertResult>,
    seq: Option<u64>,
}

#[derive(Deserialize)]
struct UpsertResult {
    action: String,
}

impl UpsertReply {
    /// Errors unless there is one result per order, all with `action`.
    fn expect_actions(&self, n: usize, action: &str) -> Result<()> {
        if self.results.len() != n {
            bail!("expected {n} results, got {}", self.results.len());
        }
        if let Some(r) = self.results.iter().find(|r| r.action != action) {
            bail!("expected action {action:?}, got {:?}", r.action);
        }
        Ok(())
    }

    fn seq(&self) -> Result<u64> {
        self.seq.ok_or_else(|| anyhow!("reply has no seq"))
    }
}

/// Just enough of a server frame to route it.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    seq: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// WebSocket helpers
// ---------------------------------------------------------------------------------------

/// Opens `/ws/realtime` and reads the CONNECTED frame. Returns the socket and `headSeq`.
async fn ws_connect(
    ctx: &Ctx,
    user: u64,
    device: &str,
    since: Option<u64>,
    read_buffer: usize,
) -> Result<(Ws, u64)> {
    let url = ctx.ws_url(user, device, since);
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async_with_config(url, Some(config), true),
    )
    .await
    .map_err(|_| anyhow!("WebSocket handshake timed out"))?
    .context("WebSocket connect")?;
    let first = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .map_err(|_| anyhow!("no CONNECTED frame within 20 s"))?;
    match first {
        Some(Ok(Message::Text(t))) => {
            let v: serde_json::Value =
                serde_json::from_str(t.as_str()).context("CONNECTED frame is not JSON")?;
            if v["type"] != "CONNECTED" {
                bail!("first frame is not CONNECTED: {}", snippet(t.as_bytes()));
            }
            let head = v["payload"]["headSeq"]
                .as_u64()
                .ok_or_else(|| anyhow!("CONNECTED without payload.headSeq: {t}"))?;
            Ok((ws, head))
        }
        Some(Ok(Message::Close(f))) => match f {
            Some(f) => bail!(
                "socket closed at connect: {} {:?}",
                f.code,
                f.reason.as_str()
            ),
            None => bail!("socket closed at connect"),
        },
        Some(Ok(m)) => bail!("unexpected first message {m:?}"),
        Some(Err(e)) => Err(e).context("reading CONNECTED"),
        None => bail!("socket ended before CONNECTED"),
    }
}

struct ConnSpec {
    idx: usize,
    user: u64,
    device: String,
}

/// Connects many sockets with bounded concurrency, printing progress.
async fn connect_many(
    ctx: &Ctx,
    what: &str,
    specs: Vec<ConnSpec>,
    concurrency: usize,
    read_buffer: usize,
) -> Result<Vec<(usize, Ws, u64)>> {
    let total = specs.len();
    let done = AtomicUsize::new(0);
    let last_print = std::sync::Mutex::new(Instant::now());
    let results: Vec<Result<(usize, Ws, u64)>> = futures_util::stream::iter(specs)
        .map(|s| {
            let done = &done;
            let last_print = &last_print;
            async move {
                let r = ws_connect(ctx, s.user, &s.device, None, read_buffer)
                    .await
                    .map(|(ws, head)| (s.idx, ws, head))
                    .with_context(|| format!("socket {} (user {}, {})", s.idx, s.user, s.device));
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                let mut lp = last_print.lock().expect("not poisoned");
                if lp.elapsed() >= Duration::from_secs(2) && n < total {
                    *lp = Instant::now();
                    eprintln!("bench: {what}: {n}/{total} sockets connected");
                }
                r
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// upsert-single and upsert-batch
// ---------------------------------------------------------------------------------------

struct ClientOut {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
}

/// C clients, each its own user, POST batches of `batch` new orders back to back until
/// the deadline. Returns (per-client outcomes, measured wall time).
async fn closed_loop_upserts(
    ctx: &Arc<Ctx>,
    clients: usize,
    batch: usize,
    duration: Duration,
    tag: &str,
) -> Result<(Vec<ClientOut>, Duration)> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let start_at = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut handles = Vec::with_capacity(clients);
    for c in 0..clients {
        let ctx = ctx.clone();
        let barrier = barrier.clone();
        let start_at = start_at.clone();
        let tag = tag.to_string();
        handles.push(tokio::spawn(async move {
            let user = new_user();
            let auth = ctx.bearer(user);
            let device = format!("bench-{c}");
            let mut out = ClientOut {
                latencies_us: Vec::with_capacity(1 << 14),
                ok: 0,
                errors: 0,
                first_error: None,
            };
            let mut n: u64 = 0;
            let one = |n: &mut u64| {
                let ids: Vec<String> = (0..batch)
                    .map(|k| format!("{tag}-{c}-{}-{k}", *n))
                    .collect();
                *n += 1;
                let orders: Vec<OrderIn> = ids.iter().map(|id| order(id, &device, 1)).collect();
                batch_body(&orders)
            };
            let mut conn = None;
            // Warm-up: open the connection, touch the user's stream. Not measured.
            for _ in 0..3 {
                let body = one(&mut n);
                if let Err(e) = post_on(&ctx, &mut conn, &auth, body).await {
                    out.errors += 1;
                    out.first_error.get_or_insert(format!("{e:#}"));
                }
            }
            // Everyone warmed up → the main task sets the start time → everyone starts.
            barrier.wait().await;
            barrier.wait().await;
            let deadline = *start_at.get().expect("set between the barriers") + duration;
            let mut sent = 0u64;
            while Instant::now() < deadline && sent < MAX_REQUESTS_PER_CLIENT {
                let body = one(&mut n);
                sent += 1;
                let t0 = Instant::now();
                let r = post_on(&ctx, &mut conn, &auth, body)
                    .await
                    .and_then(|r| r.expect_actions(batch, "created"));
                match r {
                    Ok(()) => {
                        out.latencies_us.push(micros(t0.elapsed()));
                        out.ok += 1;
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(format!("{e:#}"));
                        if out.errors > 1000 {
                            break;
                        }
                    }
                }
            }
            out
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    start_at.set(start).expect("set once");
    barrier.wait().await;
    let mut outs = Vec::with_capacity(clients);
    for h in handles {
        outs.push(h.await?);
    }
    Ok((outs, start.elapsed()))
}

/// POSTs on the client's connection, opening it first if there is none; after
/// a failure the connection is dropped and the next call opens a new one.
async fn post_on(
    ctx: &Ctx,
    conn: &mut Option<Conn>,
    auth: &str,
    body: Vec<u8>,
) -> Result<UpsertReply> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(ctx.connect().await?),
    };
    let r = c.post_orders(auth, body).await;
    if r.is_err() {
        *conn = None;
    }
    r
}

fn merge(outs: Vec<ClientOut>) -> (Vec<u64>, u64, u64, Option<String>) {
    let mut lat = Vec::new();
    let (mut ok, mut errors, mut first) = (0, 0, None);
    for o in outs {
        lat.extend(o.latencies_us);
        ok += o.ok;
        errors += o.errors;
        if first.is_none() {
            first = o.first_error;
        }
    }
    lat.sort_unstable();
    (lat, ok, errors, first)
}

pub async fn upsert_single(
    ctx: &Arc<Ctx>,
    p: &Params,
    notes: &mut Vec<String>,
) -> Result<Vec<Metric>> {
    eprintln!(
        "bench: upsert-single: {} clients × {:.1} s, one order of 2 items per request",
        p.clients, p.duration_secs
    );
    let cpu = CpuMeter::start(ctx.pid);
    let (outs, elapsed) = closed_loop_upserts(ctx, p.clients, 1, p.duration, "s").await?;
    let cpu = cpu.finish();
    let (lat, ok, errors, first) = merge(outs);
    if let Some(e) = first {
        notes.push(format!("first error: {e}"));
    }
    let budgets = p.budgets && p.clients == 32;
    Ok([
        Metric::new(
            "requests_per_sec",
            "requests/s",
            ok as f64 / elapsed.as_secs_f64(),
        )
        .budget(Goal::AtLeast(25_000.0), budgets),
        Metric::new("p50_ms", "latency p50 ms", percentile_ms(&lat, 50.0)),
        Metric::new("p99_ms", "latency p99 ms", percentile_ms(&lat, 99.0))
            .budget(Goal::AtMost(5.0), budgets),
        Metric::new("requests", "requests ok", ok as f64),
        Metric::new("errors", "errors", errors as f64).must_be_zero(),
    ]
    .into_iter()
    .chain(cpu)
    .collect())
}

pub async fn upsert_batch(
    ctx: &Arc<Ctx>,
    p: &Params,
    notes: &mut Vec<String>,
) -> Result<Vec<Metric>> {
    eprintln!(
        "bench: upsert-batch: {} clients × {:.1} s, batches of {} orders",
        p.batch_clients, p.duration_secs, p.batch_size
    );
    let cpu = CpuMeter::start(ctx.pid);
    let (outs, elapsed) =
        closed_loop_upserts(ctx, p.batch_clients, p.batch_size, p.duration, "b").await?;
    let cpu = cpu.finish();
    let (lat, ok, errors, first) = merge(outs);
    if let Some(e) = first {
        notes.push(format!("first error: {e}"));
    }
    let secs = elapsed.as_secs_f64();
    Ok([
        Metric::new(
            "orders_per_sec",
            "orders/s",
            (ok * p.batch_size as u64) as f64 / secs,
        )
        .budget(Goal::AtLeast(150_000.0), p.budgets && p.batch_size == 100),
        Metric::new("batches_per_sec", "batches/s", ok as f64 / secs),
        Metric::new("p50_ms", "batch latency p50 ms", percentile_ms(&lat, 50.0)),
        Metric::new("p99_ms", "batch latency p99 ms", percentile_ms(&lat, 99.0)),
        Metric::new("errors", "errors", errors as f64).must_be_zero(),
    ]
    .into_iter()
    .chain(cpu)
    .collect())
}

// ---------------------------------------------------------------------------------------
// fanout
// ---------------------------------------------------------------------------------------

struct SockOut {
    user_idx: usize,
    arrivals: Vec<(u64, Instant)>,
    /// Frames whose seq was not exactly previous + 1 (holes, repeats, reordering).
    order_errors: u64,
    /// Why the socket ended early, if it did.
    ended: Option<String>,
    resync: u64,
}

/// Reads event frames until told to stop; records each seq's arrival time and checks
/// that seqs go up by exactly one from headSeq.
async fn event_reader(
    mut ws: Ws,
    user_idx: usize,
    head: u64,
    mut stop: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
) -> SockOut {
    let mut out = SockOut {
        user_idx,
        arrivals: Vec::new(),
        order_errors: 0,
        ended: None,
        resync: 0,
    };
    let mut next = head + 1;
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let now = Instant::now();
                    match serde_json::from_str::<Frame>(t.as_str()) {
                        Ok(Frame { seq: Some(seq), .. }) => {
                            if seq != next {
                                out.order_errors += 1;
                            }
                            next = seq + 1;
                            out.arrivals.push((seq, now));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(f) if f.kind == "RESYNC_REQUIRED" => out.resync += 1,
                        Ok(_) => {}
                        Err(_) => {
                            out.ended.get_or_insert(format!("non-JSON frame {}", snippet(t.as_bytes())));
                        }
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    out.ended = Some(match f {
                        Some(f) => format!("closed by server: {} {}", f.code, f.reason.as_str()),
                        None => "closed by server".into(),
                    });
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.ended = Some(format!("socket error: {e}"));
                    break;
                }
                None => {
                    out.ended = Some("socket ended".into());
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    out
}

/// Sends text `ping`, expects text `pong` (compat keep-alive).
async fn check_ping(ws: &mut Ws) -> Result<()> {
    ws.send(Message::Text("ping".into())).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .map_err(|_| anyhow!("no pong within 5 s of a text ping"))?;
        match msg {
            Some(Ok(Message::Text(t))) if t.as_str() == "pong" => return Ok(()),
            Some(Ok(Message::Text(t))) => bail!("expected pong, got {}", snippet(t.as_bytes())),
            Some(Ok(Message::Close(_))) | None => bail!("socket closed instead of pong"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

pub async fn fanout(ctx: &Arc<Ctx>, p: &Params, notes: &mut Vec<String>) -> Result<Vec<Metric>> {
    let users: Vec<u64> = (0..p.users).map(|_| new_user()).collect();
    let auths: Arc<Vec<String>> = Arc::new(users.iter().map(|u| ctx.bearer(*u)).collect());
    let sockets = p.users * p.devices;
    eprintln!(
        "bench: fanout: connecting {} users × {} devices = {sockets} sockets",
        p.users, p.devices
    );
    let specs = (0..sockets)
        .map(|i| ConnSpec {
            idx: i / p.devices,
            user: users[i / p.devices],
            device: format!("dev-{}", i % p.devices),
        })
        .collect();
    let t_connect = Instant::now();
    let mut conns = connect_many(ctx, "fanout", specs, p.connect_concurrency, 8 * 1024).await?;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    if let Some((_, ws, _)) = conns.first_mut() {
        check_ping(ws).await.context("text ping/pong")?;
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(idx, ws, head)| {
            tokio::spawn(event_reader(
                ws,
                idx,
                head,
                stop_rx.clone(),
                received.clone(),
            ))
        })
        .collect();

    let total = ((p.rate * p.duration_secs).round() as usize).clamp(1, MAX_FANOUT_WRITES);
    eprintln!(
        "bench: fanout: {total} writes at {} writes/s over {} users",
        p.rate, p.users
    );
    let sem = Arc::new(Semaphore::new(MAX_INFLIGHT_WRITES));
    let cpu = CpuMeter::start(ctx.pid);
    let start = Instant::now() + Duration::from_millis(50);
    let mut writes = Vec::with_capacity(total);
    let mut late = 0u64;
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / p.rate);
        tokio::time::sleep_until(at.into()).await;
        let permit = match sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                late += 1;
                sem.clone().acquire_owned().await?
            }
        };
        let ctx = ctx.clone();
        let auths = auths.clone();
        let u = i % p.users;
        writes.push(tokio::spawn(async move {
            let id = format!("w{i}");
            let body = batch_body(&[order(&id, "bench-writer", 1)]);
            let t0 = Instant::now();
            let r = ctx
                .post_orders(&auths[u], body)
                .await
                .and_then(|r| r.expect_actions(1, "created").and_then(|_| r.seq()));
            let t1 = Instant::now();
            drop(permit);
            (u, t0, t1, r)
        }));
    }
    // Per user: (seq, request sent, reply received).
    let mut by_user: Vec<Vec<(u64, Instant, Instant)>> = vec![Vec::new(); p.users];
    let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
    for w in writes {
        let (u, t0, t1, r) = w.await?;
        match r {
            Ok(seq) => {
                by_user[u].push((seq, t0, t1));
                ok += 1;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let write_secs = start.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let expected = ok * p.devices as u64;
    let grace_end = Instant::now() + Duration::from_millis(p.grace_ms);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < grace_end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = stop_tx.send(true);
    let mut outs = Vec::with_capacity(readers.len());
    for r in readers {
        outs.push(r.await?);
    }

    // Match frames to writes by (user, seq).
    let mut lat = Vec::with_capacity(expected as usize);
    let (mut lost, mut extra, mut order_errors, mut ended, mut resync) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut first_end = None;
    let mut dump = String::new();
    if p.dump_latencies.is_some() {
        dump.push_str("sent_ms,user,socket,seq,reply_ms,delivery_ms\n");
    }
    for (sock, o) in outs.iter().enumerate() {
        order_errors += o.order_errors;
        resync += o.resync;
        if let Some(e) = &o.ended {
            ended += 1;
            first_end.get_or_insert(e.clone());
        }
        let arrived: HashMap<u64, Instant> = o.arrivals.iter().rev().copied().collect();
        let mut matched = 0u64;
        for (seq, t0, t1) in &by_user[o.user_idx] {
            match arrived.get(seq) {
                Some(at) => {
                    matched += 1;
                    let l = micros(at.saturating_duration_since(*t0));
                    lat.push(l);
                    if p.dump_latencies.is_some() {
                        dump.push_str(&format!(
                            "{:.3},{},{sock},{seq},{:.3},{:.3}\n",
                            t0.saturating_duration_since(start).as_secs_f64() * 1000.0,
                            o.user_idx,
                            (*t1 - *t0).as_secs_f64() * 1000.0,
                            l as f64 / 1000.0
                        ));
                    }
                }
                None => lost += 1,
            }
        }
        extra += arrived.len() as u64 - matched;
    }
    lat.sort_unstable();
    if let Some(path) = &p.dump_latencies {
        std::fs::write(path, dump).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "bench: fanout: per-frame latencies written to {}",
            path.display()
        );
    }
    if let Some(e) = first_error {
        notes.push(format!("first write error: {e}"));
    }
    if let Some(e) = first_end {
        notes.push(format!("{ended} socket(s) ended early; first: {e}"));
    }
    if late > 0 {
        notes.push(format!(
            "{late} writes waited for one of {MAX_INFLIGHT_WRITES} in-flight slots (server slower than the rate)"
        ));
    }
    let budgets = p.budgets && sockets >= 1000 && p.rate >= 1000.0;
    Ok([
        Metric::new("sockets", "sockets", sockets as f64),
        Metric::new(
            "connect_per_sec",
            "connects/s",
            sockets as f64 / connect_secs,
        ),
        Metric::new(
            "writes_per_sec",
            "writes/s achieved",
            ok as f64 / write_secs,
        ),
        Metric::new("p50_ms", "delivery p50 ms", percentile_ms(&lat, 50.0))
            .budget(Goal::AtMost(1.0), budgets),
        Metric::new("p99_ms", "delivery p99 ms", percentile_ms(&lat, 99.0))
            .budget(Goal::AtMost(5.0), budgets),
        Metric::new("max_ms", "delivery max ms", percentile_ms(&lat, 100.0)).agg(Agg::Max),
        Metric::new("delivered", "frames delivered", lat.len() as f64).agg(Agg::Sum),
        Metric::new("lost", "events lost", lost as f64).must_be_zero(),
        Metric::new("seq_errors", "seq holes/reorders", order_errors as f64).must_be_zero(),
        Metric::new("extra_frames", "unexpected frames", extra as f64).must_be_zero(),
        Metric::new("resync", "RESYNC_REQUIRED", resync as f64).must_be_zero(),
        Metric::new("ended_early", "sockets ended early", ended as f64).must_be_zero(),
        Metric::new("errors", "write errors", errors as f64).must_be_zero(),
    ]
    .into_iter()
    .chain(cpu)
    .collect())
}

// ---------------------------------------------------------------------------------------
// idle-sockets
// ---------------------------------------------------------------------------------------

pub async fn idle_sockets(
    ctx: &Arc<Ctx>,
    p: &Params,
    notes: &mut Vec<String>,
) -> Result<Vec<Metric>> {
    let pid = ctx
        .pid
        .ok_or_else(|| anyhow!("idle-sockets needs the server's pid: let the bench start the server, or pass --server-pid"))?;
    let devices = p.devices.max(1);
    let n_users = p.sockets.div_ceil(devices);
    let users: Vec<u64> = (0..n_users).map(|_| new_user()).collect();

    // Warm up the server's lazily built parts (hub, pools, one socket's worth of state).
    let warm_user = new_user();
    let auth = ctx.bearer(warm_user);
    ctx.post_orders(&auth, batch_body(&[order("warm", "bench", 1)]))
        .await?;
    for d in 0..4 {
        let (mut ws, _) = ws_connect(ctx, warm_user, &format!("warm-{d}"), None, 4096).await?;
        let _ = ws.close(None).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::server::vm_rss_kib(pid)?;

    eprintln!(
        "bench: idle-sockets: connecting {} sockets ({n_users} users)",
        p.sockets
    );
    let specs = (0..p.sockets)
        .map(|i| ConnSpec {
            idx: i,
            user: users[i / devices],
            device: format!("idle-{}", i % devices),
        })
        .collect();
    let t0 = Instant::now();
    let conns = connect_many(ctx, "idle-sockets", specs, p.connect_concurrency, 1024).await?;
    let connect_secs = t0.elapsed().as_secs_f64();

    // Every socket keeps being read (so protocol pings are answered) but stays idle.
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(idx, ws, head)| {
            tokio::spawn(event_reader(
                ws,
                idx,
                head,
                stop_rx.clone(),
                received.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = crate::server::vm_rss_kib(pid)?;
    let _ = stop_tx.send(true);
    let mut ended = 0u64;
    for r in readers {
        let o = r.await?;
        if let Some(e) = o.ended {
            if ended == 0 {
                notes.push(format!("socket ended while idle: {e}"));
            }
            ended += 1;
        }
    }
    let per_socket = (after as f64 - before as f64) / p.sockets as f64;
    Ok(vec![
        Metric::new("sockets", "sockets", p.sockets as f64),
        Metric::new(
            "connect_per_sec",
            "connects/s",
            p.sockets as f64 / connect_secs,
        ),
        Metric::new(
            "rss_before_mib",
            "server RSS before MiB",
            before as f64 / 1024.0,
        ),
        Metric::new(
            "rss_after_mib",
            "server RSS after MiB",
            after as f64 / 1024.0,
        ),
        Metric::new("kib_per_socket", "KiB per socket", per_socket)
            .budget(Goal::AtMost(16.0), p.budgets && p.sockets >= 10_000),
        Metric::new("ended_early", "sockets ended early", ended as f64).must_be_zero(),
    ])
}

// ---------------------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------------------

/// The stored stream a replay round reads.
pub struct ReplayData {
    user: u64,
    head: u64,
}

/// Appends about `p.events` events to one user's stream. Each request creates one new
/// order and updates the client's "hot" order, so it appends two events
/// (PENDING_CREATED + PENDING_UPDATED); requests run concurrently.
pub async fn replay_fill(ctx: &Arc<Ctx>, p: &Params) -> Result<(ReplayData, Vec<Metric>)> {
    let user = new_user();
    let auth = Arc::new(ctx.bearer(user));
    let target = p.events.max(1);
    let head = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(p.fill_timeout_secs);
    eprintln!(
        "bench: replay: storing {target} events for one user ({} concurrent writers)",
        p.fill_clients
    );
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for c in 0..p.fill_clients.max(1) {
        let (ctx, auth, head) = (ctx.clone(), auth.clone(), head.clone());
        handles.push(tokio::spawn(async move {
            let hot = format!("hot-{c}");
            let mut n: u64 = 0;
            while head.load(Ordering::Relaxed) < target && Instant::now() < deadline {
                n += 1;
                let id = format!("f-{c}-{n}");
                let body = batch_body(&[order(&id, "bench-fill", 1), order(&hot, "bench-fill", n)]);
                let seq = ctx.post_orders(&auth, body).await?.seq()?;
                head.fetch_max(seq, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let progress = {
        let head = head.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let h = head.load(Ordering::Relaxed);
                eprintln!(
                    "bench: replay: {h}/{target} events stored ({:.0} events/s)",
                    h as f64 / t0.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut result = Ok(());
    for h in handles {
        if let Err(e) = h.await? {
            result = Err(e);
        }
    }
    progress.abort();
    result.context("storing events")?;
    let stored = head.load(Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    if stored < target {
        eprintln!("bench: replay: only {stored} of {target} events stored within the fill timeout");
    }
    Ok((
        ReplayData { user, head: stored },
        vec![
            Metric::new("events_stored", "events stored", stored as f64),
            Metric::new("fill_events_per_sec", "fill events/s", stored as f64 / secs),
        ],
    ))
}

/// Connects with since=0 and times until the last stored seq arrives.
pub async fn replay_round(ctx: &Arc<Ctx>, data: &ReplayData, budgets: bool) -> Result<Vec<Metric>> {
    eprintln!("bench: replay: reading {} events with since=0", data.head);
    let cpu = CpuMeter::start(ctx.pid);
    let t0 = Instant::now();
    let (mut ws, head) = ws_connect(ctx, data.user, "replay", Some(0), 256 * 1024).await?;
    if head < data.head {
        bail!("CONNECTED headSeq {head} < {} events stored", data.head);
    }
    let mut next = 1u64;
    let (mut count, mut order_errors, mut resync) = (0u64, 0u64, 0u64);
    let deadline = t0 + Duration::from_secs(300);
    let mut first_at = None;
    while next <= head {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .map_err(|_| anyhow!("replay stalled at seq {} of {head}", next - 1))?;
        match msg {
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Frame>(t.as_str()) {
                Ok(Frame { seq: Some(seq), .. }) => {
                    first_at.get_or_insert_with(Instant::now);
                    if seq != next {
                        order_errors += 1;
                    }
                    next = seq + 1;
                    count += 1;
                }
                Ok(f) if f.kind == "RESYNC_REQUIRED" => {
                    resync += 1;
                    break;
                }
                Ok(_) => {}
                Err(e) => bail!("bad frame: {e}: {}", snippet(t.as_bytes())),
            },
            Some(Ok(Message::Close(f))) => bail!("server closed the replay socket: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("replay socket"),
            None => bail!("replay socket ended at seq {}", next - 1),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu.finish();
    let first_ms = first_at
        .map(|f| (f - t0).as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN);
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    Ok(vec![
        Metric::new("events_per_sec", "events/s", count as f64 / secs)
            .budget(Goal::AtLeast(200_000.0), budgets),
        Metric::new("events", "events replayed", count as f64),
        Metric::new("first_event_ms", "first event ms", first_ms),
        Metric::new("seq_errors", "seq holes/reorders", order_errors as f64).must_be_zero(),
        Metric::new("resync", "RESYNC_REQUIRED", resync as f64).must_be_zero(),
    ]
    .into_iter()
    .chain(cpu)
    .collect())
}
