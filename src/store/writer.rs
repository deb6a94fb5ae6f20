//! The single writer thread, its group commit, and the durability pipeline.
//!
//! One OS thread owns the read-write connection. It takes the first waiting job,
//! drains up to `max_group - 1` more without waiting, and runs them all in one
//! `BEGIN IMMEDIATE … COMMIT`, each inside `SAVEPOINT job`. Events appended by a
//! job that failed are discarded with its savepoint.
//!
//! Durability is pipelined: SQLite runs with `synchronous=NORMAL` (the WAL is
//! synced before every checkpoint, so the file is never corrupted), and with
//! `--sync full` a second thread, the *syncer*, `fdatasync`s the WAL after each
//! commit. Only then are the group's events published to the hub (in seq order)
//! and its requests acknowledged. Meanwhile the writer already executes the next
//! group, so one fsync covers every group committed while the previous one ran.
//! An acknowledged write is thus exactly as durable as with `synchronous=FULL`.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::error::AppError;
use crate::hub::{now_ms, Event, Hub};

/// Called once the group's fate is known: `Ok` after COMMIT, `Err` if it failed.
pub type Completion = Box<dyn FnOnce(Result<(), AppError>) + Send>;
/// A write: runs against the open transaction, says whether it succeeded. Called
/// with `None` when it cannot run (the transaction could not start): it must then
/// return a completion that reports the error it is given.
pub type Job = Box<dyn FnOnce(Option<&mut WriteTx<'_>>) -> (bool, Completion) + Send>;

pub enum Msg {
    Job(Job),
    /// Finish queued jobs, checkpoint, stop; reply when done.
    Close(oneshot::Sender<()>),
}

/// What a write job sees: the connection (inside a transaction) and the event log.
pub struct WriteTx<'a> {
    conn: &'a Connection,
    events: &'a mut Vec<Event>,
    now: i64,
}

impl WriteTx<'_> {
    pub fn conn(&self) -> &Connection {
        self.conn
    }

    /// Wall-clock time of this write, epoch ms.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Appends an event to `user_id`'s stream in this transaction; returns its seq.
    pub fn append_event(
        &mut self,
        user_id: &str,
        kind: &str,
        payload: &serde_json::Value,
        device_id: Option<&str>,
    ) -> Result<i64, AppError> {
        let seq: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO streams (user_id, last_seq) VALUES (?1, 1)
                 ON CONFLICT (user_id) DO UPDATE SET last_seq = last_seq + 1
                 RETURNING last_seq",
            )?
            .query_row([user_id], |r| r.get(0))?;
        let payload = payload.to_string();
        self.conn
            .prepare_cached(
                "INSERT INTO events (user_id, seq, type, payload, device_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(rusqlite::params![
                user_id, seq, kind, payload, device_id, self.now
            ])?;
        self.events.push(Event {
            user_id: user_id.to_string(),
            seq,
            kind: kind.to_string(),
            payload,
            device_id: device_id.map(str::to_string),
            created_at: self.now,
        });
        Ok(seq)
    }
}

/// A committed group on its way to being durable and acknowledged.
struct Committed {
    events: Vec<Event>,
    completions: Vec<Completion>,
    started: Instant,
    size: usize,
}

enum SyncMsg {
    Group(Committed),
    /// All earlier groups are settled when this is answered.
    Barrier(oneshot::Sender<()>),
}

/// Starts the writer and syncer threads. `wal` is the open WAL file to
/// `fdatasync` after each commit (`None` with `--sync normal`).
pub fn spawn(
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    hub: Arc<Hub>,
    max_group: usize,
    wal: Option<File>,
) -> std::io::Result<()> {
    let (sync_tx, sync_rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("ordersync-syncer".into())
        .spawn(move || run_syncer(sync_rx, hub, wal))?;
    std::thread::Builder::new()
        .name("ordersync-writer".into())
        .spawn(move || run(conn, rx, sync_tx, max_group))?;
    Ok(())
}

/// Makes committed groups durable, then publishes their events and answers
/// their callers, strictly in commit order.
fn run_syncer(rx: std_mpsc::Receiver<SyncMsg>, hub: Arc<Hub>, wal: Option<File>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let has_groups = batch.iter().any(|m| matches!(m, SyncMsg::Group(_)));
        let synced = match (&wal, has_groups) {
            (Some(f), true) => f.sync_data().map_err(|e| {
                tracing::error!(error = %e, "fdatasync of the WAL failed");
                AppError::Unavailable(format!(
                    "the write could not be made durable ({e}); check the disk, then reload and retry"
                ))
            }),
            _ => Ok(()),
        };
        for msg in batch {
            match msg {
                SyncMsg::Group(g) => {
                    // Counted before anyone can see the events or the acks, so a
                    // scrape after an acknowledged write includes it.
                    metrics::histogram!("ordersync_write_transaction_seconds")
                        .record(g.started.elapsed().as_secs_f64());
                    metrics::histogram!("ordersync_write_group_size").record(g.size as f64);
                    metrics::counter!("ordersync_events_appended_total")
                        .increment(g.events.len() as u64);
                    // Committed and visible either way: publish so streams stay gapless.
                    hub.publish(&g.events);
                    for done in g.completions {
                        done(match &synced {
                            Ok(()) => Ok(()),
                            Err(e) => Err(clone_err(e)),
                        });
                    }
                }
                SyncMsg::Barrier(reply) => {
                    let _ = reply.send(());
                }
            }
        }
    }
}

fn run(
    conn: Connection,
    mut rx: mpsc::Receiver<Msg>,
    sync: std_mpsc::Sender<SyncMsg>,
    max_group: usize,
) {
    let mut close_reply = None;
    let mut group: Vec<Job> = Vec::with_capacity(max_group);
    while close_reply.is_none() {
        match rx.blocking_recv() {
            Some(Msg::Job(job)) => group.push(job),
            Some(Msg::Close(reply)) => close_reply = Some(reply),
            None => break,
        }
        while close_reply.is_none() && group.len() < max_group {
            match rx.try_recv() {
                Ok(Msg::Job(job)) => group.push(job),
                Ok(Msg::Close(reply)) => close_reply = Some(reply),
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            if let Some(committed) = commit_group(&conn, std::mem::take(&mut group)) {
                let _ = sync.send(SyncMsg::Group(committed));
            }
        }
    }
    // Jobs queued after Close are dropped: their callers get "shutting down" (503).
    rx.close();
    let (tx, settled) = oneshot::channel();
    if sync.send(SyncMsg::Barrier(tx)).is_ok() {
        let _ = settled.blocking_recv();
    }
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(error = %e, "final WAL checkpoint failed; the WAL will be replayed on next open");
    }
    drop(conn);
    tracing::debug!("writer stopped");
    if let Some(reply) = close_reply {
        let _ = reply.send(());
    }
}

/// Runs a group in one transaction. Returns it committed (not yet durable), or
/// `None` after answering every job of a group that could not commit.
fn commit_group(conn: &Connection, group: Vec<Job>) -> Option<Committed> {
    let started = Instant::now();
    let size = group.len();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = AppError::from(e);
        tracing::warn!(error = %e, jobs = size, "cannot begin a write transaction");
        fail_all(group, &e);
        return None;
    }
    let mut events = Vec::new();
    let mut completions: Vec<Completion> = Vec::with_capacity(size);
    let mut jobs = group.into_iter();
    let mut lost: Option<AppError> = None;
    for job in jobs.by_ref() {
        if let Err(e) = conn.execute_batch("SAVEPOINT job") {
            lost = Some(e.into());
            completions.push(job(None).1);
            break;
        }
        let mark = events.len();
        let mut wtx = WriteTx {
            conn,
            events: &mut events,
            now: now_ms(),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| job(Some(&mut wtx))));
        let ok = matches!(outcome, Ok((true, _)));
        match outcome {
            Ok((_, done)) => completions.push(done),
            // The job's reply channel is gone with it: its caller gets a 503.
            Err(_) => tracing::error!("a write job panicked; its savepoint is rolled back"),
        }
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O error …):
            // nothing of this group is committed; fail every job of it.
            lost = Some(AppError::Unavailable(
                "the database rejected the write (disk full or I/O error); nothing was saved; retry later".into(),
            ));
            break;
        }
        let settle = if ok {
            conn.execute_batch("RELEASE job")
        } else {
            events.truncate(mark);
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = settle {
            lost = Some(e.into());
            break;
        }
    }
    if lost.is_none() {
        if let Err(e) = conn.execute_batch("COMMIT") {
            lost = Some(e.into());
        }
    }
    if let Some(err) = lost {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        tracing::warn!(error = %err, jobs = size, "write transaction failed; nothing committed");
        for done in completions {
            done(Err(clone_err(&err)));
        }
        fail_all(jobs.collect(), &err);
        metrics::counter!("ordersync_write_failures_total").increment(size as u64);
        return None;
    }
    Some(Committed {
        events,
        completions,
        started,
        size,
    })
}

/// Answers jobs that never ran with `err`, without running them.
fn fail_all(jobs: Vec<Job>, err: &AppError) {
    for job in jobs {
        let (_, done) = job(None);
        done(Err(clone_err(err)));
    }
}

fn clone_err(e: &AppError) -> AppError {
    match e {
        AppError::Unavailable(m) => AppError::Unavailable(m.clone()),
        other => AppError::Unavailable(format!("the write could not be saved ({other}); retry")),
    }
}
