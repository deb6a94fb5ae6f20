//! Small helpers: loopback checks, randomness, tokens, percentiles.

use std::io::Read;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Refuses any target that is not this machine's loopback interface: the bench only ever
/// loads a server running here.
pub fn check_loopback(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("invalid URL {url:?}"))?;
    match parsed.scheme() {
        "http" | "ws" => {}
        s => bail!("unsupported scheme {s:?} in {url} (plain http:// on loopback only)"),
    }
    let host = parsed.host_str().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ok = match bare.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    };
    if !ok {
        bail!("refusing to load {url}: only 127.0.0.0/8, localhost and [::1] may be targeted");
    }
    Ok(())
}

/// `n` bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf)
}

pub fn random_hex(n: usize) -> Result<String> {
    Ok(random_bytes(n)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub fn random_u64() -> Result<u64> {
    let b = random_bytes(8)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

#[derive(Serialize)]
struct Claims {
    #[serde(rename = "userId")]
    user_id: String,
    exp: u64,
}

/// Mints an HS256 JWT for `user`, valid for an hour, as the server's `--jwt-secret` expects.
pub fn mint_jwt(secret: &str, user: u64) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        + 3600;
    let claims = Claims {
        user_id: user.to_string(),
        exp,
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// Nearest-rank percentile of sorted microsecond samples, in milliseconds.
pub fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    sorted_us[idx] as f64 / 1000.0
}

pub fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Median of values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Human formatting: thousands separators for big numbers, 3 significant-ish decimals
/// for small ones.
pub fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        return "-".into();
    }
    if v.abs() >= 999.5 || (v.fract() == 0.0 && v.abs() < 1e15) {
        let n = v.round() as i128;
        let s = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// CPU time (user + system) a process has used, in seconds, from /proc/PID/stat.
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Busy CPU time of the whole machine (all cores), in seconds, from /proc/stat.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy / if hz > 0 { hz as f64 } else { 100.0 })
}

/// 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) this process has used, in seconds.
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Measures how busy the server and the bench were over a stretch of time
/// (100 % = one core busy the whole time).
pub struct CpuMeter {
    pid: Option<u32>,
    t0: std::time::Instant,
    server0: Option<f64>,
    self0: f64,
    machine0: Option<f64>,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            pid,
            t0: std::time::Instant::now(),
            server0: pid.and_then(proc_cpu_secs),
            self0: self_cpu_secs(),
            machine0: machine_busy_secs(),
        }
    }

    pub fn finish(&self) -> Vec<crate::report::Metric> {
        use crate::report::Metric;
        let wall = self.t0.elapsed().as_secs_f64();
        let mut out = Vec::new();
        if wall < 0.25 {
            // CPU times tick every 10 ms: too coarse to say anything over a short stretch.
            return out;
        }
        let server = match (self.pid, self.server0) {
            (Some(pid), Some(s0)) => proc_cpu_secs(pid).map(|s1| s1 - s0),
            _ => None,
        };
        let bench = self_cpu_secs() - self.self0;
        if let Some(server) = server {
            out.push(Metric::new(
                "server_cpu_pct",
                "server CPU % (of 1 core)",
                server / wall * 100.0,
            ));
        }
        out.push(Metric::new(
            "bench_cpu_pct",
            "bench CPU % (of 1 core)",
            bench / wall * 100.0,
        ));
        // Everything else on the machine: a busy neighbour (a compiler, say) skews figures.
        if let (Some(server), Some(m0), Some(m1)) = (server, self.machine0, machine_busy_secs()) {
            out.push(Metric::new(
                "other_cpu_pct",
                "other processes CPU % (of 1 core)",
                ((m1 - m0) - server - bench).max(0.0) / wall * 100.0,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        assert!(check_loopback("http://127.0.0.1:8080").is_ok());
        assert!(check_loopback("http://127.3.2.1:8080/").is_ok());
        assert!(check_loopback("http://localhost:1").is_ok());
        assert!(check_loopback("http://[::1]:1").is_ok());
        assert!(check_loopback("http://10.0.0.1:8080").is_err());
        assert!(check_loopback("http://192.168.1.2").is_err());
        assert!(check_loopback("http://example.com").is_err());
        assert!(check_loopback("http://localhost.example.com").is_err());
        assert!(check_loopback("https://127.0.0.1").is_err());
    }

    #[test]
    fn percentiles_and_median() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 100.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_num(25_000.4), "25,000");
        assert_eq!(fmt_num(0.1234), "0.123");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1_234_567.0), "1,234,567");
        assert_eq!(fmt_num(999.7), "1,000");
    }

    #[test]
    fn cpu_time_is_readable() {
        assert!(proc_cpu_secs(std::process::id()).is_some());
        assert!(self_cpu_secs() >= 0.0);
        assert!(machine_busy_secs().is_some());
        assert!(loadavg().is_some());
    }

    #[test]
    fn jwt_has_three_parts() {
        assert_eq!(mint_jwt("s", 7).split('.').count(), 3);
    }
}
