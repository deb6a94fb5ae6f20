//! Starting, watching and stopping the `ordersync serve` process under test.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// How long the server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running `ordersync serve` with a fresh database in its own temporary directory.
///
/// Dropping it stops the server (SIGTERM, then SIGKILL after 5 s), so the server never
/// outlives the bench, whether a scenario returns, fails, panics or is cancelled.
pub struct Server {
    child: Option<Child>,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start(bin: &Path, secret: &str, extra_args: &[String]) -> Result<Server> {
        if !bin.exists() {
            bail!(
                "server binary {} not found (build it with `cargo build --release`, \
                 or pass --server-bin PATH or --url URL)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("ordersync-bench-")
            .tempdir()
            .context("creating a temporary directory for the database")?;
        let db = dir.path().join("bench.db");
        let log_path = dir.path().join("server.log");
        let log = File::create(&log_path).context("creating the server log file")?;

        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--db")
            .arg(&db)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--jwt-secret")
            .arg(secret)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        // Own process group: a ctrl-c in the terminal reaches only the bench, which then
        // stops the server itself, in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");

        // A thread reads stdout: it reports the listening URL once, then keeps draining so
        // the server never blocks on a full pipe.
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
        std::thread::Builder::new()
            .name("server-stdout".into())
            .spawn(move || {
                let mut tx = Some(tx);
                let mut seen = Vec::new();
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.is_some() {
                        if let Some(rest) = line.split("listening on ").nth(1) {
                            let url = rest.split_whitespace().next().unwrap_or("").to_string();
                            let _ = tx.take().unwrap().send(Ok(url));
                        } else if seen.len() < 20 {
                            seen.push(line);
                        }
                    }
                }
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err(seen.join("\n")));
                }
            })
            .context("spawning the stdout reader")?;

        let mut server = Server {
            child: Some(child),
            pid,
            url: String::new(),
            log_path,
            _dir: dir,
        };
        let url = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(Ok(url))) => url,
            Ok(early_exit) => {
                let stdout = match early_exit {
                    Ok(Err(stdout)) => stdout,
                    _ => String::new(),
                };
                let status = server.stop_blocking();
                bail!(
                    "the server exited before listening ({})\n--- stdout ---\n{}\n--- log ---\n{}",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string()),
                    stdout,
                    server.log_tail(40)
                );
            }
            _ => {
                let _ = server.stop_blocking();
                bail!(
                    "the server did not print `ordersync listening on http://…` within {:?}\n--- log ---\n{}",
                    START_TIMEOUT,
                    server.log_tail(40)
                );
            }
        };
        crate::util::check_loopback(&url)
            .with_context(|| format!("the server's listening line named {url}"))?;
        server.url = url.trim_end_matches('/').to_string();
        Ok(server)
    }

    /// The last `lines` lines of the server's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let Ok(mut f) = File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after 5 s. Returns its exit status.
    pub async fn stop(mut self) -> Result<ExitStatus> {
        tokio::task::block_in_place(|| self.stop_blocking())
    }

    fn stop_blocking(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("already stopped");
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        // SAFETY: plain kill(2) on the pid of our own child, which has not been reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        eprintln!(
            "bench: server pid {} did not exit within {:?} of SIGTERM; sending SIGKILL",
            child.id(),
            STOP_GRACE
        );
        let _ = child.kill();
        let status = child.wait()?;
        Err(anyhow!(
            "server needed SIGKILL (did not stop within {STOP_GRACE:?} of SIGTERM), {status}"
        ))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop_blocking();
        }
    }
}

/// Resident set size of a process, in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest
                .split_whitespace()
                .next()
                .ok_or_else(|| anyhow!("empty VmRSS line"))?;
            return Ok(kib.parse()?);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// Raises this process's RLIMIT_NOFILE soft limit to at least `want` (and its hard limit
/// when that is too low and we may). Children inherit it, so call before starting the server.
pub fn raise_nofile(want: u64) -> Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let want = want as libc::rlim_t;
        if lim.rlim_cur >= want {
            return Ok(lim.rlim_cur);
        }
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Ok(want);
            }
        }
        lim.rlim_cur = lim.rlim_max.min(want.max(lim.rlim_cur));
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
        Ok(lim.rlim_cur)
    }
}
