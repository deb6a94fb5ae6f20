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
//! group. While the syncer is busy the writer keeps the group's transaction open
//! and adds every job that arrives, committing when the syncer is free: the
//! commit could not be synced earlier anyway, and fewer, larger commits write far
//! fewer WAL pages. An acknowledged write is exactly as durable as with
//! `synchronous=FULL`.
//!
//! Checkpoints (copying the WAL into the database file, with their fsyncs) run
//! on a third thread with its own connection, so they do not stall the writer;
//! the writer only tops them up between two groups so the WAL can start over
//! (see `run_checkpointer`).

use std::collections::HashMap;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension};
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
    /// From the syncer: it has nothing left to sync, so commit the open group now.
    SyncerIdle,
}

/// What a write job sees: the connection (inside a transaction) and the event log.
pub struct WriteTx<'a> {
    conn: &'a Connection,
    events: &'a mut Vec<Event>,
    seqs: &'a mut SeqCache,
    now: i64,
}

/// The writer's copy of `streams.last_seq` per user, so appending an event needs
/// no read of it. Only the writer changes `last_seq` while the server runs. The
/// copy is dropped whenever a job or a group is rolled back, and refilled from
/// the table on next use.
type SeqCache = HashMap<String, i64>;

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
        let last = match self.seqs.get(user_id) {
            Some(&last) => last,
            None => self
                .conn
                .prepare_cached("SELECT last_seq FROM streams WHERE user_id = ?1")?
                .query_row([user_id], |r| r.get(0))
                .optional()?
                .unwrap_or(0),
        };
        let seq = last + 1;
        self.conn
            .prepare_cached(
                "INSERT INTO streams (user_id, last_seq) VALUES (?1, ?2)
                 ON CONFLICT (user_id) DO UPDATE SET last_seq = excluded.last_seq",
            )?
            .execute(rusqlite::params![user_id, seq])?;
        let payload = crate::orders::json_text(payload);
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
        match self.seqs.get_mut(user_id) {
            Some(last) => *last = seq,
            None => {
                self.seqs.insert(user_id.to_string(), seq);
            }
        }
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

/// Starts the writer, syncer and checkpointer threads. `wal` is the open WAL
/// file to `fdatasync` after each commit (`None` with `--sync normal`).
pub fn spawn(
    conn: Connection,
    jobs: &mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    hub: Arc<Hub>,
    max_group: usize,
    wal: Option<File>,
    db: PathBuf,
) -> std::io::Result<()> {
    let (sync_tx, sync_rx) = std_mpsc::channel();
    let (stop_checkpoints, stopped) = std_mpsc::channel::<()>();
    let top_up = Arc::new(AtomicBool::new(false));
    let wanted = top_up.clone();
    let busy = Arc::new(AtomicBool::new(false));
    let pipelined = wal.is_some();
    let syncer = Syncer {
        rx: sync_rx,
        hub,
        wal,
        busy: busy.clone(),
        writer: jobs.downgrade(),
    };
    std::thread::Builder::new()
        .name("ordersync-syncer".into())
        .spawn(move || syncer.run())?;
    std::thread::Builder::new()
        .name("ordersync-ckpt".into())
        .spawn(move || run_checkpointer(db, stopped, wanted))?;
    let writer = Writer {
        conn,
        rx,
        sync: sync_tx,
        busy: pipelined.then_some(busy),
        max_group,
        seqs: SeqCache::new(),
        top_up,
        _stop_checkpoints: stop_checkpoints,
    };
    std::thread::Builder::new()
        .name("ordersync-writer".into())
        .spawn(move || writer.run())?;
    Ok(())
}

struct Syncer {
    rx: std_mpsc::Receiver<SyncMsg>,
    hub: Arc<Hub>,
    wal: Option<File>,
    /// Set by the writer when it hands over a group, cleared here when idle.
    busy: Arc<AtomicBool>,
    /// To wake the writer when idle; weak so it never keeps the writer alive.
    writer: mpsc::WeakSender<Msg>,
}

impl Syncer {
    /// Makes committed groups durable, then publishes their events and answers
    /// their callers, strictly in commit order.
    fn run(self) {
        while let Ok(first) = self.rx.recv() {
            let mut batch = vec![first];
            batch.extend(self.rx.try_iter());
            self.settle(batch);
            // Always report idle after settling: if another group is already
            // queued, the next recv takes it, and an early wake-up only makes the
            // writer commit its open group sooner. Skipping the report left the
            // writer waiting for a wake-up that never came.
            self.busy.store(false, Ordering::SeqCst);
            if let Some(w) = self.writer.upgrade() {
                // A full queue means the writer is busy anyway.
                let _ = w.try_send(Msg::SyncerIdle);
            }
        }
    }

    fn settle(&self, batch: Vec<SyncMsg>) {
        let has_groups = batch.iter().any(|m| matches!(m, SyncMsg::Group(_)));
        let synced = match (&self.wal, has_groups) {
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
                    // Counted before the acks, so a scrape right after an
                    // acknowledged write already includes its events.
                    metrics::counter!("ordersync_events_appended_total")
                        .increment(g.events.len() as u64);
                    metrics::histogram!("ordersync_write_transaction_seconds")
                        .record(g.started.elapsed().as_secs_f64());
                    metrics::histogram!("ordersync_write_group_size").record(g.size as f64);
                    // Committed and visible either way: publish so streams stay gapless.
                    self.hub.publish(&g.events);
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

/// How often the checkpointer runs, and the WAL size (in frames) above which it
/// asks the writer for a top-up.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
const TOP_UP_FRAMES: i64 = 1000;

/// PASSIVE checkpoints from a separate connection: they copy the WAL into the
/// database without ever blocking the writer. Under continuous writes they never
/// quite catch up, though, and the WAL only starts over from its beginning once
/// a checkpoint has copied all of it. So when the WAL has grown past
/// [`TOP_UP_FRAMES`], this thread sets `top_up` and the writer, between two
/// groups, checkpoints the few frames committed since (see `Writer::top_up`).
/// Without that the writer's own `wal_autocheckpoint` would copy 10,000 frames
/// in one go, a stall of several milliseconds that showed up as p99 latency.
fn run_checkpointer(db: PathBuf, stop: std_mpsc::Receiver<()>, top_up: Arc<AtomicBool>) {
    let conn = match Connection::open(&db) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "checkpointer cannot open the database; the writer checkpoints instead");
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    let _ = conn.execute_batch("PRAGMA synchronous = NORMAL;");
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        // (busy, frames in the WAL, frames checkpointed)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) if frames >= TOP_UP_FRAMES => top_up.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "checkpoint skipped"),
        }
    }
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Msg>,
    sync: std_mpsc::Sender<SyncMsg>,
    /// With `--sync full`: whether the syncer is busy (then keep the group open).
    busy: Option<Arc<AtomicBool>>,
    max_group: usize,
    seqs: SeqCache,
    /// Set by the checkpointer: checkpoint between two groups (see run_checkpointer).
    top_up: Arc<AtomicBool>,
    /// Dropped when the writer stops, which stops the checkpointer.
    _stop_checkpoints: std_mpsc::Sender<()>,
}

impl Writer {
    fn run(mut self) {
        // Checkpoints are the checkpointer thread's job; this is only a backstop
        // in case it cannot keep up (40 MB of WAL).
        let _ = self
            .conn
            .execute_batch("PRAGMA wal_autocheckpoint = 10000;");
        let mut close_reply = None;
        while close_reply.is_none() {
            let first = match self.rx.blocking_recv() {
                Some(Msg::Job(job)) => job,
                Some(Msg::Close(reply)) => {
                    close_reply = Some(reply);
                    break;
                }
                Some(Msg::SyncerIdle) => continue,
                None => break,
            };
            let mut group = match Group::begin(&self.conn, &mut self.seqs) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot begin a write transaction");
                    let (_, done) = first(None);
                    done(Err(e));
                    continue;
                }
            };
            group.run(first);
            // Jobs already waiting join the group. While the syncer is busy the
            // group stays open and takes every job that arrives (it could not be
            // synced earlier anyway); the moment the syncer is free, it commits,
            // and jobs still queued start the next group.
            let mut held = false;
            loop {
                if close_reply.is_some() || group.size >= self.max_group || group.lost.is_some() {
                    break;
                }
                let syncer_busy = self.busy.as_ref().is_some_and(|b| b.load(Ordering::SeqCst));
                if syncer_busy {
                    held = true;
                } else if held {
                    break;
                }
                let msg = match self.rx.try_recv() {
                    Ok(msg) => msg,
                    Err(mpsc::error::TryRecvError::Empty) if syncer_busy => {
                        match self.rx.blocking_recv() {
                            Some(msg) => msg,
                            None => break,
                        }
                    }
                    Err(_) => break,
                };
                match msg {
                    Msg::Job(job) => group.run(job),
                    Msg::Close(reply) => close_reply = Some(reply),
                    Msg::SyncerIdle => {}
                }
            }
            if let Some(committed) = group.finish() {
                if let Some(b) = &self.busy {
                    b.store(true, Ordering::SeqCst);
                }
                let _ = self.sync.send(SyncMsg::Group(committed));
            }
            if self.top_up.swap(false, Ordering::Relaxed) {
                self.top_up();
            }
        }
        // Jobs queued after Close are dropped: their callers get "shutting down" (503).
        self.rx.close();
        let (tx, settled) = oneshot::channel();
        if self.sync.send(SyncMsg::Barrier(tx)).is_ok() {
            let _ = settled.blocking_recv();
        }
        drop(self._stop_checkpoints);
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
            tracing::warn!(error = %e, "final WAL checkpoint failed; the WAL will be replayed on next open");
        }
        drop(self.conn);
        tracing::debug!("writer stopped");
        if let Some(reply) = close_reply {
            let _ = reply.send(());
        }
    }

    /// Checkpoints between two groups. The checkpointer has just copied almost
    /// all of the WAL, so this copies only what was committed since, and as no
    /// commit can happen meanwhile it completes, which lets the next commit start
    /// the WAL over. The WAL is synced before any page is copied (SQLite does
    /// that in every checkpoint), so groups the syncer has not synced yet are safe.
    fn top_up(&self) {
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::debug!(error = %e, "top-up checkpoint skipped");
        }
    }
}

/// One open write transaction and the jobs run in it so far.
struct Group<'c> {
    conn: &'c Connection,
    seqs: &'c mut SeqCache,
    events: Vec<Event>,
    completions: Vec<Completion>,
    started: Instant,
    size: usize,
    /// Set when the transaction can no longer commit; later jobs fail at once.
    lost: Option<AppError>,
}

impl<'c> Group<'c> {
    fn begin(conn: &'c Connection, seqs: &'c mut SeqCache) -> Result<Self, AppError> {
        exec_cached(conn, "BEGIN IMMEDIATE")?;
        Ok(Group {
            conn,
            seqs,
            events: Vec::new(),
            completions: Vec::new(),
            started: Instant::now(),
            size: 0,
            lost: None,
        })
    }

    /// Runs one job inside its own savepoint.
    fn run(&mut self, job: Job) {
        self.size += 1;
        if let Some(e) = &self.lost {
            let (_, done) = job(None);
            done(Err(clone_err(e)));
            return;
        }
        if let Err(e) = exec_cached(self.conn, "SAVEPOINT job") {
            let (_, done) = job(None);
            done(Err(AppError::from(e)));
            return;
        }
        let mark = self.events.len();
        let mut wtx = WriteTx {
            conn: self.conn,
            events: &mut self.events,
            seqs: self.seqs,
            now: now_ms(),
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| job(Some(&mut wtx))));
        let ok = matches!(outcome, Ok((true, _)));
        match outcome {
            Ok((_, done)) => self.completions.push(done),
            // The job's reply channel is gone with it: its caller gets a 503.
            Err(_) => tracing::error!("a write job panicked; its savepoint is rolled back"),
        }
        if self.conn.is_autocommit() {
            // SQLite rolled the whole transaction back (disk full, I/O error …):
            // nothing of this group is committed; every job of it fails.
            self.lost = Some(AppError::Unavailable(
                "the database rejected the write (disk full or I/O error); nothing was saved; retry later"
                    .into(),
            ));
            return;
        }
        let settle = if ok {
            exec_cached(self.conn, "RELEASE job")
        } else {
            self.events.truncate(mark);
            // The job may have appended events before failing.
            self.seqs.clear();
            exec_cached(self.conn, "ROLLBACK TO job")
                .and_then(|()| exec_cached(self.conn, "RELEASE job"))
        };
        if let Err(e) = settle {
            self.lost = Some(e.into());
        }
    }

    /// Commits. Returns the committed group, or `None` after answering every
    /// job with the error if the transaction could not commit.
    fn finish(mut self) -> Option<Committed> {
        if self.lost.is_none() {
            if let Err(e) = exec_cached(self.conn, "COMMIT") {
                self.lost = Some(e.into());
            }
        }
        if let Some(err) = self.lost {
            self.seqs.clear();
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            tracing::warn!(error = %err, jobs = self.size, "write transaction failed; nothing committed");
            for done in self.completions {
                done(Err(clone_err(&err)));
            }
            metrics::counter!("ordersync_write_failures_total").increment(self.size as u64);
            return None;
        }
        Some(Committed {
            events: self.events,
            completions: self.completions,
            started: self.started,
            size: self.size,
        })
    }
}

/// Transaction-control statements run per job: prepared once, not parsed each time.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn clone_err(e: &AppError) -> AppError {
    match e {
        AppError::Unavailable(m) => AppError::Unavailable(m.clone()),
        other => AppError::Unavailable(format!("the write could not be saved ({other}); retry")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::error::AppError;
    use crate::store::{events, Store, StoreOptions};

    /// Appends one event for `user` in its own write; `fail` makes the job fail
    /// after appending, so its savepoint is rolled back.
    async fn append(store: &Store, user: &'static str, fail: bool) -> Result<i64, AppError> {
        store
            .write(move |tx| {
                let seq = tx.append_event(user, "PENDING_UPDATED", &json!({}), None)?;
                if fail {
                    return Err(AppError::Internal("fails after appending".into()));
                }
                Ok(seq)
            })
            .await
    }

    #[tokio::test]
    async fn seqs_stay_gapless_when_a_job_fails_after_appending() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let store = Store::open(&db, &StoreOptions::default()).unwrap();
        assert_eq!(append(&store, "u1", false).await.unwrap(), 1);
        assert!(append(&store, "u1", true).await.is_err());
        // The failed job's seq 2 was rolled back with it, so 2 is next, not 3.
        assert_eq!(append(&store, "u1", false).await.unwrap(), 2);
        assert_eq!(append(&store, "u2", false).await.unwrap(), 1);
        let head = store.read(|c| events::head_seq(c, "u1")).await.unwrap();
        assert_eq!(head, 2);
        store.close().await;
    }
}
