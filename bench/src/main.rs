//! `ordersync-bench`: the load generator of issue 5.
//!
//! Starts its own `ordersync serve` (fresh database in a temporary directory, loopback,
//! random JWT secret) unless `--url` is given, runs the scenarios, and prints a table of
//! medians over rounds (or JSON with `--json`). It only ever targets loopback addresses.

mod report;
mod scenarios;
mod server;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

use report::ScenarioReport;
use scenarios::{Ctx, Params};
use server::Server;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// C clients POSTing one-order batches (2 items) back to back: requests/s, latency.
    UpsertSingle,
    /// Clients POSTing batches of --batch-size orders: orders/s.
    UpsertBatch,
    /// U users × D devices on WebSockets, writes at a fixed rate: delivery latency, losses.
    Fanout,
    /// N idle authenticated sockets: server resident memory per socket.
    IdleSockets,
    /// E stored events replayed to one socket with since=0: events/s.
    Replay,
    /// All of the above (the default).
    All,
}

impl Scenario {
    const EACH: [Scenario; 5] = [
        Scenario::UpsertSingle,
        Scenario::UpsertBatch,
        Scenario::Fanout,
        Scenario::IdleSockets,
        Scenario::Replay,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::UpsertSingle => "upsert-single",
            Scenario::UpsertBatch => "upsert-batch",
            Scenario::Fanout => "fanout",
            Scenario::IdleSockets => "idle-sockets",
            Scenario::Replay => "replay",
            Scenario::All => "all",
        }
    }
}

/// Load generator for ordersync: throughput, latency, fan-out, memory and replay figures.
///
/// Without --url it starts `ordersync serve --db <tmp>/bench.db --listen 127.0.0.1:0
/// --jwt-secret <random>` afresh for every round (replay: once per scenario) and stops it
/// afterwards (SIGTERM, SIGKILL after 5 s). Only loopback targets are accepted.
#[derive(Parser, Debug)]
#[command(name = "ordersync-bench", version)]
struct Cli {
    /// Scenarios to run, in order (default: all).
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,

    /// Target an already running server (loopback only) instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// The server's --jwt-secret, with --url (default: $ORDERSYNC_JWT_SECRET).
    #[arg(long)]
    jwt_secret: Option<String>,
    /// The server's pid, with --url: lets idle-sockets read its VmRSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Server binary to start [default: `ordersync` next to this executable].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument for `ordersync serve` (repeatable; a value with spaces is split),
    /// e.g. --server-arg '--sync normal'.
    #[arg(long = "server-arg", allow_hyphen_values = true, value_name = "ARG")]
    server_args: Vec<String>,

    /// Rounds per scenario; the table shows the median [default: 3, --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per timed round [default: 5, --quick: 1].
    #[arg(long)]
    duration: Option<f64>,
    /// Smoke-test mode: 1 round of 1 s with tiny sizes, no budgets.
    #[arg(long)]
    quick: bool,
    /// Print machine-readable results on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,

    /// upsert-single: concurrent clients, one user each [default: 32, --quick: 4].
    #[arg(long)]
    clients: Option<usize>,
    /// upsert-batch: orders per batch [default: 100, --quick: 20].
    #[arg(long)]
    batch_size: Option<usize>,
    /// upsert-batch: concurrent clients [default: 4, --quick: 2].
    #[arg(long)]
    batch_clients: Option<usize>,
    /// fanout: users [default: 500, --quick: 10].
    #[arg(long)]
    users: Option<usize>,
    /// fanout / idle-sockets: devices (sockets) per user [default: 2].
    #[arg(long)]
    devices: Option<usize>,
    /// fanout: total writes per second, spread over the users [default: 1000, --quick: 100].
    #[arg(long)]
    rate: Option<f64>,
    /// fanout: how long to wait for outstanding frames after the last write (ms).
    #[arg(long, default_value_t = 2000)]
    grace_ms: u64,
    /// idle-sockets: sockets to hold open [default: 10000, --quick: 200].
    #[arg(long)]
    sockets: Option<usize>,
    /// replay: events to store and replay [default: 100000, --quick: 2000].
    #[arg(long)]
    events: Option<u64>,
    /// replay: concurrent writers while storing events [default: 32, --quick: 8].
    #[arg(long)]
    fill_clients: Option<usize>,
    /// replay: give up storing events after this many seconds (replays what is stored).
    #[arg(long, default_value_t = 600)]
    fill_timeout: u64,
    /// fanout: write a CSV line per delivered frame (sent_ms, user, socket, seq, reply_ms,
    /// delivery_ms) to this file; with several rounds the last round's wins.
    #[arg(long, value_name = "CSV")]
    dump_latencies: Option<PathBuf>,
    /// WebSocket connects in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

impl Cli {
    fn params(&self) -> Result<Params> {
        let q = self.quick;
        let pick = |v: Option<usize>, normal: usize, quick: usize| {
            v.unwrap_or(if q { quick } else { normal })
        };
        let duration_secs = self.duration.unwrap_or(if q { 1.0 } else { 5.0 });
        if !(duration_secs > 0.0 && duration_secs <= 3600.0) {
            bail!("--duration must be in (0, 3600] seconds");
        }
        let rate = self.rate.unwrap_or(if q { 100.0 } else { 1000.0 });
        if !(rate > 0.0 && rate <= 1_000_000.0) {
            bail!("--rate must be in (0, 1000000]");
        }
        let p = Params {
            duration: Duration::from_secs_f64(duration_secs),
            duration_secs,
            clients: pick(self.clients, 32, 4).clamp(1, 4096),
            batch_size: pick(self.batch_size, 100, 20).clamp(1, 10_000),
            batch_clients: pick(self.batch_clients, 4, 2).clamp(1, 4096),
            users: pick(self.users, 500, 10).clamp(1, 100_000),
            devices: pick(self.devices, 2, 2).clamp(1, 1000),
            rate,
            grace_ms: self.grace_ms.min(600_000),
            sockets: pick(self.sockets, 10_000, 200).clamp(1, 1_000_000),
            events: self
                .events
                .unwrap_or(if q { 2_000 } else { 100_000 })
                .clamp(1, 100_000_000),
            fill_clients: pick(self.fill_clients, 32, 8).clamp(1, 4096),
            fill_timeout_secs: self.fill_timeout.min(36_000),
            connect_concurrency: self.connect_concurrency.clamp(1, 4096),
            budgets: !q,
            dump_latencies: self.dump_latencies.clone(),
        };
        Ok(p)
    }

    fn scenarios(&self) -> Vec<Scenario> {
        if self.scenarios.is_empty() || self.scenarios.contains(&Scenario::All) {
            return Scenario::EACH.to_vec();
        }
        let mut out = Vec::new();
        for s in &self.scenarios {
            if !out.contains(s) {
                out.push(*s);
            }
        }
        out
    }
}

/// What the scenarios run against.
enum Target {
    Spawn {
        bin: PathBuf,
        secret: String,
        args: Vec<String>,
    },
    External {
        url: String,
        secret: String,
        pid: Option<u32>,
    },
}

impl Target {
    /// Starts a fresh server (or reuses the external one) and checks it answers.
    async fn open(&self, pool: usize) -> Result<(Option<Server>, Arc<Ctx>)> {
        match self {
            Target::Spawn { bin, secret, args } => {
                let server = Server::start(bin, secret, args).await?;
                let ctx = Ctx::new(&server.url, secret, Some(server.pid), pool)?;
                if let Err(e) = ctx.preflight().await {
                    let tail = server.log_tail(20);
                    return Err(e.context(format!("server log tail:\n{tail}")));
                }
                Ok((Some(server), Arc::new(ctx)))
            }
            Target::External { url, secret, pid } => {
                let ctx = Ctx::new(url, secret, *pid, pool)?;
                ctx.preflight().await?;
                Ok((None, Arc::new(ctx)))
            }
        }
    }
}

fn note(notes: &mut Vec<String>, n: String) {
    if !notes.contains(&n) {
        notes.push(n);
    }
}

/// Stops a server we started, noting anything unusual about its exit.
async fn close(server: Option<Server>, notes: &mut Vec<String>) {
    let Some(mut server) = server else { return };
    if !server.alive() {
        note(
            notes,
            format!(
                "server died during the round; log tail:\n{}",
                server.log_tail(15)
            ),
        );
    }
    let tail = server.log_tail(10);
    match server.stop().await {
        Ok(status) if status.success() => {}
        Ok(status) => {
            let mut n = format!("server exited with {status} after SIGTERM (expected 0)");
            if !tail.trim().is_empty() {
                n.push_str(&format!("; log tail:\n{tail}"));
            }
            note(notes, n)
        }
        Err(e) => note(notes, format!("{e:#}")),
    }
}

fn round_limit(sc: Scenario, p: &Params) -> Duration {
    let base = Duration::from_secs(120) + p.duration;
    match sc {
        Scenario::Fanout => {
            base + Duration::from_millis(p.grace_ms)
                + Duration::from_secs((p.users * p.devices) as u64 / 20)
        }
        Scenario::IdleSockets => base + Duration::from_secs(p.sockets as u64 / 20),
        _ => base,
    }
}

fn params_json(sc: Scenario, p: &Params) -> Value {
    match sc {
        Scenario::UpsertSingle => {
            json!({"clients": p.clients, "ordersPerRequest": 1, "itemsPerOrder": 2, "durationSecs": p.duration_secs})
        }
        Scenario::UpsertBatch => {
            json!({"clients": p.batch_clients, "batchSize": p.batch_size, "itemsPerOrder": 2, "durationSecs": p.duration_secs})
        }
        Scenario::Fanout => {
            json!({"users": p.users, "devices": p.devices, "sockets": p.users * p.devices, "writesPerSec": p.rate, "durationSecs": p.duration_secs, "graceMs": p.grace_ms})
        }
        Scenario::IdleSockets => json!({"sockets": p.sockets, "devicesPerUser": p.devices}),
        Scenario::Replay => json!({"events": p.events, "fillClients": p.fill_clients}),
        Scenario::All => json!({}),
    }
}

async fn run_scenario(sc: Scenario, target: &Target, p: &Params, rounds: usize) -> ScenarioReport {
    let mut rep = ScenarioReport::new(sc.name(), params_json(sc, p));
    let result = if sc == Scenario::Replay {
        run_replay(target, p, rounds, &mut rep).await
    } else {
        run_rounds(sc, target, p, rounds, &mut rep).await
    };
    if let Err(e) = result {
        eprintln!("bench: {}: ERROR: {e:#}", sc.name());
        rep.error = Some(format!("{e:#}"));
    }
    rep
}

async fn run_rounds(
    sc: Scenario,
    target: &Target,
    p: &Params,
    rounds: usize,
    rep: &mut ScenarioReport,
) -> Result<()> {
    let limit = round_limit(sc, p);
    for round in 1..=rounds {
        eprintln!("bench: {}: round {round}/{rounds}", sc.name());
        let (server, ctx) = target.open(p.clients.max(p.batch_clients)).await?;
        let mut notes = Vec::new();
        let work = async {
            match sc {
                Scenario::UpsertSingle => scenarios::upsert_single(&ctx, p, &mut notes).await,
                Scenario::UpsertBatch => scenarios::upsert_batch(&ctx, p, &mut notes).await,
                Scenario::Fanout => scenarios::fanout(&ctx, p, &mut notes).await,
                Scenario::IdleSockets => scenarios::idle_sockets(&ctx, p, &mut notes).await,
                Scenario::Replay | Scenario::All => unreachable!("handled elsewhere"),
            }
        };
        let result = match tokio::time::timeout(limit, work).await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("round did not finish within {limit:?}")),
        };
        let tail = server.as_ref().map(|s| s.log_tail(15)).unwrap_or_default();
        drop(ctx);
        for n in notes {
            note(&mut rep.notes, n);
        }
        close(server, &mut rep.notes).await;
        match result {
            Ok(metrics) => rep.rounds.push(metrics),
            Err(e) if tail.is_empty() => return Err(e),
            Err(e) => return Err(e.context(format!("server log tail:\n{tail}"))),
        }
    }
    Ok(())
}

async fn run_replay(
    target: &Target,
    p: &Params,
    rounds: usize,
    rep: &mut ScenarioReport,
) -> Result<()> {
    let (server, ctx) = target.open(p.fill_clients).await?;
    let result = async {
        let (data, fill) = tokio::time::timeout(
            Duration::from_secs(p.fill_timeout_secs + 60),
            scenarios::replay_fill(&ctx, p),
        )
        .await
        .map_err(|_| anyhow!("storing events did not finish in time"))??;
        for round in 1..=rounds {
            eprintln!("bench: replay: round {round}/{rounds}");
            let mut metrics = tokio::time::timeout(
                Duration::from_secs(330),
                scenarios::replay_round(&ctx, &data, p.budgets),
            )
            .await
            .map_err(|_| anyhow!("replay round did not finish in time"))??;
            metrics.extend(fill.iter().cloned());
            rep.rounds.push(metrics);
        }
        anyhow::Ok(())
    }
    .await;
    drop(ctx);
    close(server, &mut rep.notes).await;
    result
}

async fn run(cli: Cli) -> Result<bool> {
    let p = cli.params()?;
    let rounds = cli
        .rounds
        .unwrap_or(if cli.quick { 1 } else { 3 })
        .clamp(1, 100);
    let list = cli.scenarios();

    // Sockets need file descriptors, on our side and the server's (it inherits the limit).
    let mut want_fds = p.users * p.devices + 4096;
    if list.contains(&Scenario::IdleSockets) {
        want_fds = want_fds.max(p.sockets + 4096);
    }
    let got = server::raise_nofile(want_fds as u64)?;
    if got < want_fds as u64 {
        eprintln!("bench: warning: RLIMIT_NOFILE is {got}, wanted {want_fds}");
    }

    let target = match &cli.url {
        Some(url) => {
            util::check_loopback(url)?;
            let secret = match &cli.jwt_secret {
                Some(s) => s.clone(),
                None => std::env::var("ORDERSYNC_JWT_SECRET")
                    .context("--url needs --jwt-secret (or ORDERSYNC_JWT_SECRET) to mint tokens")?,
            };
            Target::External {
                url: url.trim_end_matches('/').to_string(),
                secret,
                pid: cli.server_pid,
            }
        }
        None => {
            let bin = match &cli.server_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()
                    .context("locating this executable")?
                    .parent()
                    .ok_or_else(|| anyhow!("executable has no directory"))?
                    .join("ordersync"),
            };
            let args = cli
                .server_args
                .iter()
                .flat_map(|a| a.split_whitespace().map(str::to_string))
                .collect();
            Target::Spawn {
                bin,
                secret: util::random_hex(32)?,
                args,
            }
        }
    };
    // Random user-id base: runs against one server never share streams.
    scenarios::init_users(1_000_000 + util::random_u64()? % 1_000_000_000);

    let started = chrono::Utc::now();
    let load_at_start = util::loadavg();
    if let Some(l) = load_at_start.filter(|l| *l >= 1.0) {
        eprintln!(
            "bench: warning: load average is {l:.2} before starting: other work on this machine \
             will lower the figures (see \"other processes CPU\" in the results)"
        );
    }
    let mut reports = Vec::new();
    for sc in &list {
        reports.push(run_scenario(*sc, &target, &p, rounds).await);
    }

    let table = report::table(&reports);
    let config = json!({
        "startedAt": started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "target": match &target {
            Target::Spawn { bin, args, .. } => json!({"started": bin.display().to_string(), "serverArgs": args}),
            Target::External { url, .. } => json!({"url": url}),
        },
        "rounds": rounds,
        "quick": cli.quick,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadAverageAtStart": load_at_start,
        "params": p,
    });
    if cli.json {
        eprint!("{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report::to_json(&reports, config))?
        );
    } else {
        print!("{table}");
    }
    Ok(reports.iter().all(|r| r.ok()))
}

async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Dropping `run` on a signal drops any running Server, which stops it (SIGTERM first).
    let result = rt.block_on(async {
        tokio::select! {
            r = run(cli) => r,
            _ = interrupted() => Err(anyhow!("interrupted; the server was stopped")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("bench: a correctness check failed or a scenario errored (see above)");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(1)
        }
    }
}
