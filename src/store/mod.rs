//! SQLite storage: one writer, a pool of read-only readers, the schema.
//!
//! * Every write is a closure sent to the single writer thread ([`Store::write`]).
//!   The writer drains the waiting closures into ONE transaction (group commit),
//!   runs each inside its own SAVEPOINT so a failing request never affects another,
//!   commits once, and only then publishes the group's events to the hub (in seq
//!   order) and answers each caller. An acknowledged write is therefore durable
//!   (with `--sync full`) and every published event is committed.
//! * Reads run on a pool of read-only connections (`query_only`), in WAL mode, so
//!   they never block the writer and see a consistent snapshot inside a transaction.
//! * The writer's connection opens through a thin VFS (`walbuf`) that writes each
//!   commit's WAL frames with one `pwrite` instead of two per frame.

pub mod accounts;
pub mod events;
pub mod orders;
mod walbuf;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::config::SyncMode;
use crate::error::AppError;
use crate::hub::Hub;

pub use writer::WriteTx;

/// The schema, applied when `user_version` is 0.
pub const SCHEMA: &str = include_str!("../../schema.sql");
/// Current schema version (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

/// Options of [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub sync: SyncMode,
    pub busy_timeout: Duration,
    pub read_pool: u32,
    pub max_group: usize,
    pub hub_capacity: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: SyncMode::Full,
            busy_timeout: Duration::from_secs(5),
            read_pool: 4,
            max_group: 256,
            hub_capacity: 1024,
        }
    }
}

/// A cheap, clonable handle to the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Unique per opened store in this process (keys the per-thread readers).
    id: u64,
    path: PathBuf,
    /// Jobs for the writer thread. Bounded: when the writer is saturated, callers wait.
    jobs: mpsc::Sender<writer::Msg>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    hub: Arc<Hub>,
}

impl Store {
    /// Opens (creating if missing) and migrates the database, starts the writer thread.
    /// A file that is not an ordersync database is refused without being modified.
    pub fn open(path: &Path, opts: &StoreOptions) -> anyhow::Result<Store> {
        let conn = open_writer_connection(path, opts)?;
        let hub = Arc::new(Hub::new(opts.hub_capacity));
        let busy_ms = opts.busy_timeout.as_millis() as u64;
        let manager = SqliteConnectionManager::file(path)
            .with_flags(
                OpenFlags::SQLITE_OPEN_READ_ONLY
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .with_init(move |c| {
                // query_only: a write cannot slip in through a reader.
                c.execute_batch(&format!(
                    "PRAGMA query_only = 1; PRAGMA busy_timeout = {busy_ms};"
                ))
            });
        let readers = r2d2::Pool::builder()
            .max_size(opts.read_pool.max(1))
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(10))
            .build(manager)
            .with_context(|| format!("opening read connections to {}", path.display()))?;
        let wal = match opts.sync {
            SyncMode::Full => Some(open_wal(path)?),
            SyncMode::Normal => None,
        };
        let (jobs, rx) = mpsc::channel(4096);
        writer::spawn(
            conn,
            &jobs,
            rx,
            hub.clone(),
            opts.max_group.max(1),
            wal,
            path.to_path_buf(),
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                id: {
                    static NEXT: std::sync::atomic::AtomicU64 =
                        std::sync::atomic::AtomicU64::new(1);
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                },
                path: path.to_path_buf(),
                jobs,
                readers,
                hub,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.inner.hub
    }

    /// Runs `f` in the writer's transaction (inside its own savepoint). The result is
    /// returned only after the transaction committed; if `f` fails, its changes and
    /// events are rolled back and nothing else in the group is affected.
    pub async fn write<T, F>(&self, f: F) -> Result<T, AppError>
    where
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, AppError> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: writer::Job = Box::new(move |wtx: Option<&mut WriteTx<'_>>| {
            let result = match wtx {
                Some(wtx) => f(wtx),
                // Not run: the completion's error (always Err here) is what the caller sees.
                None => Err(AppError::Unavailable("the write did not run".into())),
            };
            let ok = result.is_ok();
            let done: writer::Completion = Box::new(move |commit: Result<(), AppError>| {
                let _ = tx.send(commit.and(result));
            });
            (ok, done)
        });
        self.inner
            .jobs
            .send(writer::Msg::Job(job))
            .await
            .map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())?
    }

    /// Runs `f` on a read-only connection from the pool, off the async threads.
    pub async fn read<T, F>(&self, f: F) -> Result<T, AppError>
    where
        F: FnOnce(&Connection) -> Result<T, AppError> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.get()?;
            f(&conn)
        })
        .await
        .map_err(|e| AppError::Internal(format!("read task failed: {e}")))?
    }

    /// Runs a *short* read (a primary-key lookup, e.g. a token on every request)
    /// right on the calling thread, on a read-only connection kept per thread and
    /// store. It saves the blocking-pool round trip of [`Store::read`]; never use it
    /// for scans.
    pub fn read_now<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, AppError>,
    ) -> Result<T, AppError> {
        thread_local! {
            /// (store id, connection); a handful at most (one per store in this process).
            static READERS: std::cell::RefCell<Vec<(u64, Connection)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        READERS.with(|cell| {
            let mut readers = cell.borrow_mut();
            let i = match readers.iter().position(|(id, _)| *id == self.inner.id) {
                Some(i) => i,
                None => {
                    let conn = Connection::open_with_flags(
                        &self.inner.path,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    conn.execute_batch("PRAGMA query_only = 1; PRAGMA busy_timeout = 5000;")?;
                    if readers.len() >= 8 {
                        readers.remove(0);
                    }
                    readers.push((self.inner.id, conn));
                    readers.len() - 1
                }
            };
            f(&readers[i].1)
        })
    }

    /// Writes waiting in the writer's queue.
    pub fn queue_depth(&self) -> usize {
        self.inner.jobs.max_capacity() - self.inner.jobs.capacity()
    }

    /// Stops the writer after the queued writes, checkpoints the WAL into the main file.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.jobs.send(writer::Msg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The WAL file, for the syncer's `fdatasync`. It exists once the writer
/// connection has read the database in WAL mode, and it is never deleted while
/// that connection is open. Its directory entry is made durable once here.
fn open_wal(db: &Path) -> anyhow::Result<std::fs::File> {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    let wal = std::fs::File::open(&name)
        .with_context(|| format!("opening the write-ahead log {}", Path::new(&name).display()))?;
    wal.sync_all()?;
    let dir = match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(wal)
}

fn shutting_down() -> AppError {
    AppError::Unavailable("the server is shutting down; retry in a moment".into())
}

/// Opens the read-write connection: refuses foreign or corrupt files before
/// changing anything, then sets the pragmas and migrates.
pub fn open_writer_connection(path: &Path, opts: &StoreOptions) -> anyhow::Result<Connection> {
    let existed = path.exists();
    // The writer's own VFS gathers each commit's WAL frames into one write (see walbuf).
    let vfs = walbuf::register().map_err(|e| anyhow::anyhow!(e))?;
    let conn = Connection::open_with_flags_and_vfs(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
        vfs,
    )
    .with_context(|| format!("cannot open database {}", path.display()))?;
    conn.busy_timeout(opts.busy_timeout)?;
    if existed {
        inspect_existing(&conn, path)?;
    }
    set_pragmas(&conn)?;
    migrate(&conn, path)?;
    Ok(conn)
}

/// Read-only look at a file before anything writes to it.
fn inspect_existing(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| {
            anyhow::anyhow!(
                "{} is not a usable SQLite database ({e}); it was not modified. \
                 Point --db at another file, or restore it from a backup.",
                path.display()
            )
        })?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 && tables > 0 {
        bail!(
            "{} is a SQLite database but not an ordersync one (it has tables and no ordersync \
             schema version); it was not modified. Point --db at another file.",
            path.display()
        );
    }
    if version > SCHEMA_VERSION {
        bail!(
            "{} has schema version {version}, newer than this ordersync ({SCHEMA_VERSION}); \
             upgrade ordersync. The file was not modified.",
            path.display()
        );
    }
    Ok(())
}

/// Every pragma in one place, each with its reason.
fn set_pragmas(conn: &Connection) -> anyhow::Result<()> {
    // WAL: readers never block the writer and see snapshots.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("could not switch the database to WAL mode (got {mode})");
    }
    // NORMAL in WAL mode: the WAL is synced before each checkpoint, so a crash
    // never corrupts the file. With --sync full the writer's syncer thread also
    // fdatasyncs the WAL after every commit before acknowledging it (see
    // writer.rs), which makes every acknowledged write survive power loss.
    // temp_store stays SQLite's default (a file only when needed): a request's
    // SAVEPOINT journal then lives in one 64 KiB buffer, and only a larger one
    // (a big batch) spills to a temporary file. With MEMORY it was built of
    // 1 KiB pieces, a dozen allocations per request; dropping it measured ~3%
    // more upsert-single requests/s. Temporary files go to $SQLITE_TMPDIR, else
    // $TMPDIR, /var/tmp, /usr/tmp or /tmp.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;",
    )?;
    // Make sure the WAL file exists now (the syncer opens it).
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(())
}

/// Applies the schema / migrations, stepping `user_version`. Before migrating a
/// database that already holds data, a copy is written next to it.
fn migrate(conn: &Connection, path: &Path) -> anyhow::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version > 0 {
        let backup = path.with_extension(format!("pre-v{}.bak", version + 1));
        tracing::info!(from = version, to = SCHEMA_VERSION, backup = %backup.display(), "migrating; backing up first");
        conn.execute("VACUUM INTO ?1", [backup.to_string_lossy()])
            .context("backing up before migration")?;
    }
    if version == 0 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        ))
        .context("creating the schema")?;
        return Ok(());
    }
    if version < 2 {
        migrate_to_v2(conn).context("migrating to schema version 2")?;
    }
    Ok(())
}

/// Version 2: `pending_orders` and `events` become rowid tables (same columns,
/// same primary keys), see schema.sql. Copies both tables in one transaction.
fn migrate_to_v2(conn: &Connection) -> anyhow::Result<()> {
    let count = |t: &str| -> rusqlite::Result<i64> {
        conn.query_row(&format!("SELECT count(*) FROM {t}"), [], |r| r.get(0))
    };
    tracing::info!(
        orders = count("pending_orders")?,
        events = count("events")?,
        "migrating to schema version 2: copying orders and events (one transaction)"
    );
    let mut sql = String::from("BEGIN IMMEDIATE;");
    for table in ["pending_orders", "events"] {
        let ddl = table_ddl(table)?;
        sql.push_str(&format!(
            "ALTER TABLE {table} RENAME TO {table}_v1; {ddl};
             INSERT INTO {table} SELECT * FROM {table}_v1; DROP TABLE {table}_v1;"
        ));
    }
    sql.push_str("PRAGMA user_version = 2; COMMIT;");
    if let Err(e) = conn.execute_batch(&sql) {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        return Err(e.into());
    }
    tracing::info!("migrated to schema version 2");
    Ok(())
}

/// The `CREATE TABLE <name> (…)` statement of schema.sql (without its `;`).
fn table_ddl(name: &str) -> anyhow::Result<&'static str> {
    let start = SCHEMA
        .find(&format!("CREATE TABLE {name} ("))
        .with_context(|| format!("schema.sql has no table {name}"))?;
    let len = SCHEMA[start..]
        .find("\n);")
        .with_context(|| format!("schema.sql: table {name} does not end with `\\n);`"))?;
    Ok(&SCHEMA[start..start + len + 2])
}

/// Runs `f` inside a read transaction so all its queries see one snapshot.
pub fn snapshot<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, AppError>,
) -> Result<T, AppError> {
    conn.execute_batch("BEGIN")?;
    let r = f(conn);
    let _ = conn.execute_batch("COMMIT");
    r
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    fn built_with(option: &CStr) -> bool {
        unsafe { rusqlite::ffi::sqlite3_compileoption_used(option.as_ptr()) == 1 }
    }

    /// The flags in .cargo/config.toml reached the bundled SQLite build.
    #[test]
    fn sqlite_is_built_with_the_options_in_cargo_config() {
        assert!(
            !built_with(c"ENABLE_MEMORY_MANAGEMENT"),
            "SQLite was built with ENABLE_MEMORY_MANAGEMENT: build from the repository \
             so .cargo/config.toml applies"
        );
        assert!(built_with(c"DEFAULT_MEMSTATUS=0"));
    }
}
