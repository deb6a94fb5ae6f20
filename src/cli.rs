//! The subcommands: `serve`, `demo`, `user …`, `token …`, `backup`, `check`.
//! Admin commands work on the database file directly (safe while a server runs:
//! WAL + busy_timeout); the server notices revocations within a second.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use rusqlite::{Connection, OpenFlags};
use serde_json::json;

use crate::auth;
use crate::config::{Cli, Command, ServeArgs, TokenCommand, UserCommand};
use crate::hub::{iso_millis, now_ms};
use crate::orders::{self, Limits};
use crate::store::{self, accounts, StoreOptions};

/// Runs the parsed command line; the returned error is printed by `main`.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let db = cli.db_path();
    match cli.command {
        None => serve(&db, cli.serve, false),
        Some(Command::Serve(args)) => serve(&db, args, false),
        Some(Command::Demo(args)) => match cli.db {
            Some(db) => serve(&db, args, true),
            None => {
                // A fresh database, removed again when the demo stops.
                let db = demo_db_path()?;
                let result = serve(&db, args, true);
                if let Some(dir) = db.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                result
            }
        },
        Some(Command::User(cmd)) => user(&db, cmd),
        Some(Command::Token(cmd)) => token(&db, cmd),
        Some(Command::Backup { path, force }) => backup(&db, &path, force),
        Some(Command::Restore { backup }) => restore(&db, &backup),
        Some(Command::Check) => {
            let report = check(&db)?;
            print!("{}", report.text);
            if report.ok {
                Ok(())
            } else {
                bail!("check found problems in {}", db.display())
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `serve` and `demo`: bind, print the address, run until SIGINT/SIGTERM.
fn serve(db: &Path, args: ServeArgs, demo: bool) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let listen = args.listen;
        let app = crate::build(db, args)?;
        if demo {
            seed_demo(&app).await?;
        }
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            anyhow!("cannot listen on {listen}: {e}; pick another address with --listen (e.g. --listen 127.0.0.1:8081)")
        })?;
        let addr = listener.local_addr()?;
        // Scripts (tests, the benchmark) wait for this exact line.
        println!("ordersync listening on http://{addr}");
        if demo {
            println!();
            println!("  Demo database: {}", db.display());
            println!("  Open http://{addr}/ in two browser windows and sign in:");
            println!("    alice / alice-demo      bob / bob-demo");
            println!("  Changes made in one window appear in the other. Ctrl-C to stop.");
        }
        let _ = std::io::stdout().flush();
        crate::run(listener, app, shutdown_signal()).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn demo_db_path() -> anyhow::Result<PathBuf> {
    let mut rnd = [0u8; 6];
    rand::fill(&mut rnd);
    let dir = std::env::temp_dir().join(format!("ordersync-demo-{}", hex::encode(rnd)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join("demo.db"))
}

pub const DEMO_USERS: [(&str, &str); 2] = [("alice", "alice-demo"), ("bob", "bob-demo")];

/// Creates alice and bob (if missing) and a few orders each (if they have none).
async fn seed_demo(app: &Arc<crate::App>) -> anyhow::Result<()> {
    for (i, (name, password)) in DEMO_USERS.iter().enumerate() {
        let hash = auth::hash_password(password)?;
        let name_s = name.to_string();
        let user_id = app
            .store
            .write(move |tx| match accounts::find_user(tx.conn(), &name_s)? {
                Some(u) => Ok(u.id),
                None => accounts::create_user(tx.conn(), &name_s, &hash, tx.now()),
            })
            .await?;
        let uid = user_id.clone();
        let (existing, _) = app
            .store
            .read(move |c| store::orders::list(c, &uid, None))
            .await?;
        if !existing.is_empty() {
            continue;
        }
        let customers = [
            ("C-100", "Trattoria Da Mario"),
            ("C-200", "Panificio Bianchi"),
            ("C-300", "Bar Centrale"),
        ];
        let orders: Vec<_> = customers
            .iter()
            .take(3 - i)
            .enumerate()
            .map(|(n, (cid, cname))| {
                let mut o = orders::sample_order(
                    &format!("{name}-order-{}", n + 1),
                    "demo-seed",
                    (n + 2) as u32,
                );
                o.insert("customerId".into(), json!(cid));
                o.insert("customerName".into(), json!(cname));
                serde_json::Value::Object(o)
            })
            .collect();
        let batch = orders::parse_batch(
            &json!({ "orders": orders }),
            Limits {
                max_batch: 10,
                max_items: 10,
            },
        )
        .map_err(|e| anyhow!("demo seed is invalid: {e:?}"))?;
        app.store
            .write(move |tx| store::orders::upsert(tx, &user_id, &batch))
            .await?;
    }
    Ok(())
}

/// Opens the database read-write for an admin command (creating it if needed).
fn admin_connection(db: &Path) -> anyhow::Result<Connection> {
    store::open_writer_connection(db, &StoreOptions::default())
}

fn read_password(from_stdin: bool, confirm: bool) -> anyhow::Result<String> {
    let password = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    } else if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password("Password: ")?;
        if confirm && rpassword::prompt_password("Again: ")? != p {
            bail!("the passwords do not match");
        }
        p
    } else {
        bail!("stdin is not a terminal: pass --password-stdin and write the password to stdin");
    };
    auth::check_new_password(&password).map_err(|e| anyhow!(e))?;
    Ok(password)
}

fn user(db: &Path, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add {
            username,
            password_stdin,
        } => {
            check_username(&username)?;
            let password = read_password(password_stdin, true)?;
            let hash = auth::hash_password(&password)?;
            let conn = admin_connection(db)?;
            let id = accounts::create_user(&conn, &username, &hash, now_ms())?;
            println!("created user {username} (id {id})");
        }
        UserCommand::List => {
            let conn = admin_connection(db)?;
            let users = accounts::list_users(&conn)?;
            println!("{:<6} {:<24} {:<9} created", "id", "username", "status");
            for u in users {
                let status = if u.disabled { "disabled" } else { "active" };
                println!(
                    "{:<6} {:<24} {:<9} {}",
                    u.id,
                    u.username,
                    status,
                    iso_millis(u.created_at)
                );
            }
        }
        UserCommand::Passwd {
            username,
            password_stdin,
        } => {
            let password = read_password(password_stdin, true)?;
            let hash = auth::hash_password(&password)?;
            let conn = admin_connection(db)?;
            if !accounts::set_password(&conn, &username, &hash)? {
                bail!("no user named `{username}` (see `ordersync user list`)");
            }
            println!("password of {username} changed");
        }
        UserCommand::Disable { username } | UserCommand::Enable { username }
            if username.is_empty() =>
        {
            bail!("give a username")
        }
        UserCommand::Disable { username } => {
            let conn = admin_connection(db)?;
            if accounts::set_disabled(&conn, &username, true, now_ms())?.is_none() {
                bail!("no user named `{username}` (see `ordersync user list`)");
            }
            println!("disabled {username}: sign-ins refused, open sockets closed");
        }
        UserCommand::Enable { username } => {
            let conn = admin_connection(db)?;
            if accounts::set_disabled(&conn, &username, false, now_ms())?.is_none() {
                bail!("no user named `{username}` (see `ordersync user list`)");
            }
            println!("enabled {username}");
        }
    }
    Ok(())
}

fn check_username(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || "._-@".contains(c));
    if !ok {
        bail!("a username is 1 to 64 letters, digits or . _ - @");
    }
    Ok(())
}

fn find_user_or_fail(conn: &Connection, username: &str) -> anyhow::Result<accounts::User> {
    accounts::find_user(conn, username)?
        .ok_or_else(|| anyhow!("no user named `{username}` (see `ordersync user list`)"))
}

fn token(db: &Path, cmd: TokenCommand) -> anyhow::Result<()> {
    let conn = admin_connection(db)?;
    match cmd {
        TokenCommand::Create {
            username,
            label,
            device_id,
            expires_in,
        } => {
            let user = find_user_or_fail(&conn, &username)?;
            if user.disabled {
                bail!("{username} is disabled; `ordersync user enable {username}` first");
            }
            let token = auth::new_token();
            let hash = auth::token_hash(&token);
            let expires_at = expires_in.map(|d| now_ms() + d.as_millis() as i64);
            accounts::insert_token(
                &conn,
                &accounts::NewToken {
                    hash: &hash,
                    user_id: &user.id,
                    label: label.as_deref(),
                    device_id: device_id.as_deref(),
                    expires_at,
                },
                now_ms(),
            )?;
            eprintln!(
                "token {} for {username}{}; it is shown only once:",
                &hash[..16],
                expires_at
                    .map(|e| format!(", expires {}", iso_millis(e)))
                    .unwrap_or_default()
            );
            println!("{token}");
        }
        TokenCommand::List { username } => {
            let user = find_user_or_fail(&conn, &username)?;
            println!(
                "{:<17} {:<20} {:<25} {:<25} status",
                "id", "label", "created", "expires"
            );
            for t in accounts::list_tokens(&conn, &user.id)? {
                let status = match (t.revoked_at, t.expires_at) {
                    (Some(_), _) => "revoked",
                    (None, Some(e)) if e <= now_ms() => "expired",
                    _ => "active",
                };
                println!(
                    "{:<17} {:<20} {:<25} {:<25} {status}",
                    t.id,
                    t.label.unwrap_or_default(),
                    iso_millis(t.created_at),
                    t.expires_at
                        .map(iso_millis)
                        .unwrap_or_else(|| "never".into()),
                );
            }
        }
        TokenCommand::Revoke { id, all } => match (id, all) {
            (Some(id), None) => {
                let hash = accounts::revoke_by_prefix(&conn, &id, now_ms())?;
                println!("revoked token {}", &hash[..16]);
            }
            (None, Some(username)) => {
                let user = find_user_or_fail(&conn, &username)?;
                let n = accounts::revoke_all(&conn, &user.id, now_ms())?.len();
                println!("revoked {n} token(s) of {username}");
            }
            _ => bail!("give a token id (see `ordersync token list USER`) or --all USER"),
        },
    }
    Ok(())
}

/// `backup PATH`: `VACUUM INTO` a temporary file next to PATH (one read
/// transaction: a consistent snapshot that does not block writers), check it,
/// then rename it into place.
pub fn backup(db: &Path, dest: &Path, force: bool) -> anyhow::Result<()> {
    if !db.exists() {
        bail!("no database at {}; give the right --db", db.display());
    }
    if dest.exists() && !force {
        bail!(
            "{} exists; choose another path or pass --force",
            dest.display()
        );
    }
    if dest.exists() && same_file(db, dest) {
        bail!(
            "{} is the database itself; write the backup somewhere else",
            dest.display()
        );
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let total: i64 = conn.query_row(
        "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        [],
        |r| r.get(0),
    )?;
    let mut partial = dest.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    // Progress: the copy's size against the source's, on stderr, every half
    // second once the copy has taken that long (so only for big files).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let progress = {
        let partial = partial.clone();
        std::thread::spawn(move || {
            let mut shown = false;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(Duration::from_millis(500))
            {
                if let Ok(m) = std::fs::metadata(&partial) {
                    let pct = (m.len() as f64 / total.max(1) as f64 * 100.0).min(100.0);
                    eprint!("\rbackup: {:.0}% ({} of ~{} bytes)", pct, m.len(), total);
                    shown = true;
                }
            }
            if shown {
                eprintln!();
            }
        })
    };
    // One read transaction: a snapshot of the last commit before it started.
    // In WAL mode writers go on meanwhile; only checkpoints wait for it.
    let result = conn.execute("VACUUM INTO ?1", [partial.to_string_lossy()]);
    drop(done_tx);
    let _ = progress.join();
    drop(conn);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("writing the backup to {}", partial.display()));
    }
    let report = check(&partial)?;
    if !report.ok {
        let _ = std::fs::remove_file(&partial);
        bail!("the backup failed its check:\n{}", report.text);
    }
    // Durable before it is visible under its name: fsync the file, rename, fsync the directory.
    std::fs::File::open(&partial)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", partial.display()))?;
    std::fs::rename(&partial, dest)
        .with_context(|| format!("moving the backup to {}", dest.display()))?;
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    let size = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    println!(
        "backup written to {} ({size} bytes); it passed `ordersync check`",
        dest.display()
    );
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Every stream's seq jumps by this much on restore: far beyond anything a device
/// could have seen after the backup was taken.
pub const RESTORE_SEQ_JUMP: i64 = 1_000_000_000;

/// `restore BACKUP`: checks the backup, moves the current database (and its WAL
/// and shared-memory files: a WAL left next to another database would be replayed
/// into it) aside, installs a copy of the backup, and moves every user's stream
/// forward by [`RESTORE_SEQ_JUMP`] with the retention floor at the new head. A
/// device that saw events written after the backup resumes with a `since` below
/// that floor and so gets `RESYNC_REQUIRED` (refetch) instead of events that
/// reuse seqs it has already seen with other meanings.
pub fn restore(db: &Path, backup: &Path) -> anyhow::Result<()> {
    let report = check(backup)?;
    if !report.ok {
        bail!(
            "{} failed its check; not restoring:\n{}",
            backup.display(),
            report.text
        );
    }
    let sibling = |suffix: &str| {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let staged = sibling(".restoring");
    let _ = std::fs::remove_file(&staged);
    std::fs::copy(backup, &staged)
        .with_context(|| format!("copying {} to {}", backup.display(), staged.display()))?;
    {
        let conn = Connection::open(&staged)?;
        conn.execute_batch(&format!(
            "BEGIN;
             DELETE FROM events;
             UPDATE streams SET last_seq = last_seq + {RESTORE_SEQ_JUMP},
                                pruned_through = last_seq + {RESTORE_SEQ_JUMP};
             COMMIT;"
        ))?;
    }
    if db.exists() {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let aside = sibling(&format!(".replaced-{stamp}"));
        std::fs::rename(db, &aside)
            .with_context(|| format!("moving the current database aside to {}", aside.display()))?;
        for suffix in ["-wal", "-shm"] {
            let from = sibling(suffix);
            if from.exists() {
                let mut to = aside.as_os_str().to_owned();
                to.push(suffix);
                std::fs::rename(&from, &to)?;
            }
        }
        eprintln!("the previous database is kept at {}", aside.display());
    }
    std::fs::rename(&staged, db).with_context(|| format!("installing {}", db.display()))?;
    println!(
        "restored {} from {}; devices will refetch (RESYNC_REQUIRED) when they reconnect",
        db.display(),
        backup.display()
    );
    Ok(())
}

/// What `check` found.
pub struct CheckReport {
    pub ok: bool,
    pub text: String,
}

/// `check`: integrity, schema version, row counts, event-log contiguity. Opens
/// the file read-only.
pub fn check(db: &Path) -> anyhow::Result<CheckReport> {
    if !db.exists() {
        bail!("no database at {}; give the right --db", db.display());
    }
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mut text = String::new();
    let mut ok = true;
    let mut line = |good: bool, s: String| {
        text.push_str(if good { "ok    " } else { "FAIL  " });
        text.push_str(&s);
        text.push('\n');
    };
    let integrity: Vec<String> = match conn.prepare("PRAGMA integrity_check") {
        Ok(mut stmt) => stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| vec![e.to_string()]),
        Err(e) => vec![format!("{e} (not a SQLite database?)")],
    };
    let good = integrity == ["ok"];
    ok &= good;
    line(good, format!("integrity: {}", integrity.join("; ")));
    if !good {
        return Ok(CheckReport { ok, text });
    }
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let good = version == store::SCHEMA_VERSION;
    ok &= good;
    line(
        good,
        format!(
            "schema version: {version} (this ordersync: {})",
            store::SCHEMA_VERSION
        ),
    );
    if !good {
        return Ok(CheckReport { ok, text });
    }
    let count = |table: &str| -> rusqlite::Result<i64> {
        conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
    };
    line(
        true,
        format!(
            "rows: {} users, {} tokens, {} pending orders, {} events, {} streams",
            count("users")?,
            count("tokens")?,
            count("pending_orders")?,
            count("events")?,
            count("streams")?
        ),
    );
    let mut stmt = conn.prepare(
        "SELECT s.user_id, s.last_seq, s.pruned_through, count(e.seq), min(e.seq), max(e.seq),
                (SELECT u.username FROM users u WHERE CAST(u.id AS TEXT) = s.user_id)
         FROM streams s LEFT JOIN events e ON e.user_id = s.user_id AND e.seq > s.pruned_through
         GROUP BY s.user_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, Option<i64>>(4)?,
            r.get::<_, Option<i64>>(5)?,
            r.get::<_, Option<String>>(6)?,
        ))
    })?;
    let mut streams = 0;
    let mut broken = Vec::new();
    for row in rows {
        let (user, last, floor, n, min, max, name) = row?;
        streams += 1;
        let contiguous =
            n == last - floor && (n == 0 || (min == Some(floor + 1) && max == Some(last)));
        if !contiguous {
            let name = name.map(|n| format!(" ({n})")).unwrap_or_default();
            let found = match (min, max) {
                (Some(lo), Some(hi)) => format!("{n} events, seqs {lo}..={hi}"),
                _ => "no events".to_string(),
            };
            broken.push(format!(
                "user {user}{name}: expected seqs {}..={last} without holes, found {found}",
                floor + 1,
            ));
        }
    }
    let orphans: i64 = conn.query_row(
        "SELECT count(*) FROM events e LEFT JOIN streams s ON s.user_id = e.user_id
         WHERE s.user_id IS NULL OR e.seq > s.last_seq",
        [],
        |r| r.get(0),
    )?;
    if orphans > 0 {
        broken.push(format!("{orphans} events beyond their stream's last_seq"));
    }
    let good = broken.is_empty();
    ok &= good;
    line(
        good,
        if good {
            format!("event log: {streams} streams, contiguous above their retention floor")
        } else {
            format!("event log: {}", broken.join("; "))
        },
    );
    Ok(CheckReport { ok, text })
}
