//! Command line and environment: every limit is a flag with a default, and every
//! flag of `serve` can also be set with an `ORDERSYNC_*` environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub const DEFAULT_DB: &str = "ordersync.db";

#[derive(Debug, Parser)]
#[command(
    name = "ordersync",
    version,
    about = "Pending orders in a local SQLite file, pushed live to every device over WebSocket.",
    long_about = "Pending orders in a local SQLite file, pushed live to every device over WebSocket.\n\n\
        Without a subcommand, `ordersync` runs `serve`. Every serve flag can also be set with \
        the environment variable shown next to it.",
    after_help = "Quick start:\n  ordersync demo                       # seeded users, open the printed URL\n  \
        printf 'pw\\n' | ordersync user add alice --password-stdin\n  ordersync token create alice\n  \
        ordersync serve --listen 127.0.0.1:8080"
)]
pub struct Cli {
    /// SQLite database file [default: ./ordersync.db; `demo`: a fresh temporary file]
    #[arg(long, env = "ORDERSYNC_DB", global = true)]
    pub db: Option<PathBuf>,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(
        long,
        env = "ORDERSYNC_LOG_LEVEL",
        default_value = "info",
        global = true
    )]
    pub log_level: String,

    /// Log line format
    #[arg(long, env = "ORDERSYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

impl Cli {
    pub fn db_path(&self) -> PathBuf {
        self.db.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DB))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default when no subcommand is given)
    Serve(ServeArgs),
    /// Run a demo: fresh database, users alice and bob, a few orders, the demo page
    Demo(ServeArgs),
    /// Manage user accounts
    #[command(subcommand)]
    User(UserCommand),
    /// Manage built-in bearer tokens
    #[command(subcommand)]
    Token(TokenCommand),
    /// Write an online, consistent copy of the database to PATH (safe while serving)
    Backup {
        /// Destination file; must not exist unless --force
        path: PathBuf,
        /// Overwrite PATH if it exists
        #[arg(long)]
        force: bool,
    },
    /// Check integrity, schema version and event-log consistency; exit 1 on a problem
    Check,
    /// Replace the database (--db) with a backup; stop the server first.
    /// Every device gets RESYNC_REQUIRED on its next connect.
    Restore {
        /// A file written by `ordersync backup`
        backup: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password comes from stdin (--password-stdin) or a prompt
    Add {
        username: String,
        /// Read the password from the first line of stdin
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users
    List,
    /// Change a user's password
    Passwd {
        username: String,
        /// Read the password from the first line of stdin
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a user: logins and tokens stop working, open sockets close with 4001
    Disable { username: String },
    /// Re-enable a disabled user
    Enable { username: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for USERNAME; the token is the last line of stdout (shown once)
    Create {
        username: String,
        /// A label to recognise the token by (e.g. "warehouse tablet")
        #[arg(long)]
        label: Option<String>,
        /// Device id bound to the token (used when a request names none)
        #[arg(long)]
        device_id: Option<String>,
        /// Lifetime, e.g. 90d or 12h [default: never expires]
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List a user's tokens (id prefix, label, dates; never the token)
    List { username: String },
    /// Revoke a token by the id shown by `token list`, or all of a user's tokens with --all
    Revoke {
        /// Token id (a prefix of at least 8 characters is enough)
        id: Option<String>,
        /// Revoke every token of this user
        #[arg(long, value_name = "USERNAME", conflicts_with = "id")]
        all: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// Every acknowledged write survives power loss (fsync per commit)
    Full,
    /// Faster; an OS crash or power loss may lose the last commits (never corrupts)
    Normal,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "ORDERSYNC_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Accept HS256 JWTs signed with this secret (user id from claim userId, else sub; exp required)
    #[arg(long, env = "ORDERSYNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Durability of each commit
    #[arg(long, env = "ORDERSYNC_SYNC", value_enum, default_value_t = SyncMode::Full)]
    pub sync: SyncMode,

    /// Largest accepted request body in bytes (larger: 413)
    #[arg(long, env = "ORDERSYNC_MAX_BODY", default_value_t = 2 * 1024 * 1024)]
    pub max_body: usize,

    /// Most orders in one POST batch
    #[arg(long, env = "ORDERSYNC_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Most items in one order
    #[arg(long, env = "ORDERSYNC_MAX_ITEMS", default_value_t = 500)]
    pub max_items: usize,

    /// Interval of server WebSocket pings; a socket that misses two is closed
    #[arg(long, env = "ORDERSYNC_WS_PING_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub ws_ping_interval: Duration,

    /// Largest accepted incoming WebSocket frame/message in bytes
    #[arg(long, env = "ORDERSYNC_WS_MAX_FRAME", default_value_t = 4096)]
    pub ws_max_frame: usize,

    /// Live events buffered per user before a slow socket falls back to reading the log
    #[arg(long, env = "ORDERSYNC_WS_BUFFER", default_value_t = 128)]
    pub ws_buffer: usize,

    /// Keep events this long (then RESYNC_REQUIRED for older `since`), e.g. 30d, 12h
    #[arg(long, env = "ORDERSYNC_EVENT_RETENTION", value_parser = parse_duration, default_value = "30d")]
    pub event_retention: Duration,

    /// Lifetime of tokens issued by POST /api/auth/login
    #[arg(long, env = "ORDERSYNC_TOKEN_TTL", value_parser = parse_duration, default_value = "30d")]
    pub token_ttl: Duration,

    /// Failed logins allowed per username (and 4x per client address) within --login-window
    #[arg(long, env = "ORDERSYNC_LOGIN_MAX_FAILURES", default_value_t = 5)]
    pub login_max_failures: u32,

    /// Window of the failed-login rate limit
    #[arg(long, env = "ORDERSYNC_LOGIN_WINDOW", value_parser = parse_duration, default_value = "1m")]
    pub login_window: Duration,

    /// Read-only SQLite connections in the pool
    #[arg(long, env = "ORDERSYNC_READ_POOL", default_value_t = 8)]
    pub read_pool: u32,

    /// Most write requests committed together in one transaction (group commit)
    #[arg(long, env = "ORDERSYNC_MAX_GROUP", default_value_t = 256)]
    pub max_group: usize,

    /// How long SQLite waits for a lock held by another process before a write fails (503)
    #[arg(long, env = "ORDERSYNC_BUSY_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub busy_timeout: Duration,

    /// On shutdown, wait this long for in-flight requests and sockets
    #[arg(long, env = "ORDERSYNC_SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// Allow browser front-ends from this origin (CORS and WebSocket Origin check); repeatable, `*` for any
    #[arg(long, env = "ORDERSYNC_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// Serve Prometheus metrics at GET /metrics
    #[arg(long, env = "ORDERSYNC_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,

    /// Also serve /healthz and /readyz, and serve /metrics only, on this separate address
    /// (e.g. 127.0.0.1:9464); it keeps answering until shutdown completes
    #[arg(long, env = "ORDERSYNC_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Address of a reverse proxy whose X-Forwarded-For names the real client (for the
    /// failed-login limit per address); repeatable or comma-separated
    #[arg(
        long,
        env = "ORDERSYNC_TRUSTED_PROXY",
        value_delimiter = ',',
        value_name = "IP"
    )]
    pub trusted_proxy: Vec<IpAddr>,
}

impl Default for ServeArgs {
    fn default() -> Self {
        // Parse an empty command line so defaults live in one place (the attributes above).
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: ServeArgs,
        }
        Only::parse_from(["ordersync"]).args
    }
}

/// Parses `500ms`, `30s`, `5m`, `12h`, `30d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; use e.g. 500ms, 30s, 5m, 12h, 30d"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}`; use ms, s, m, h or d"
            ))
        }
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn no_subcommand_means_serve_with_defaults() {
        let cli = Cli::try_parse_from(["ordersync"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cli.serve.max_batch, 500);
        assert_eq!(cli.serve.sync, SyncMode::Full);
        assert_eq!(cli.db_path(), PathBuf::from("ordersync.db"));
    }

    #[test]
    fn global_db_flag_before_or_after_subcommand() {
        let cli = Cli::try_parse_from(["ordersync", "--db", "a.db", "check"]).unwrap();
        assert_eq!(cli.db_path(), PathBuf::from("a.db"));
        let cli = Cli::try_parse_from(["ordersync", "user", "list", "--db", "b.db"]).unwrap();
        assert_eq!(cli.db_path(), PathBuf::from("b.db"));
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
