//! Authentication: Argon2id passwords, built-in bearer tokens (random 256-bit,
//! stored as SHA-256), external HS256 JWTs, and the failed-login rate limiter.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::AppError;
use crate::hub::now_ms;
use crate::store::{accounts, Store};

/// Prefix of built-in tokens, so they are recognisable in config files and leaks.
pub const TOKEN_PREFIX: &str = "os_";

/// Who is making a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub username: String,
    /// SHA-256 hex of a built-in token (None for JWTs): revoking it closes sockets.
    pub token_hash: Option<String>,
    /// Device bound to the token, if any.
    pub device_id: Option<String>,
}

pub fn hash_password(password: &str) -> Result<String, AppError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| AppError::Internal(format!("hashing a password: {e}")))
}

/// Verifies in constant time with respect to the password (Argon2 does the work).
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so the response time
/// does not tell whether a username exists.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("not-a-real-password").expect("argon2 works"))
}

/// A new random token: `os_` + 64 hex characters (256 bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Validates passwords typed by administrators (CLI) and users (login).
pub fn check_new_password(password: &str) -> Result<(), String> {
    if password.chars().count() < 8 {
        return Err("a password needs at least 8 characters".into());
    }
    if password.len() > 1024 {
        return Err("a password can have at most 1024 bytes".into());
    }
    Ok(())
}

/// Seconds of clock skew allowed on a JWT's `exp`.
const JWT_LEEWAY_SECS: u64 = 5;
/// Verified JWTs remembered at most; the memory is cleared when full.
const JWT_CACHE_MAX: usize = 4096;

/// Checks bearer tokens against the database and, if configured, a JWT secret.
pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
    /// Verified JWTs by their full text, so a client that sends the same token
    /// on every request pays for the signature check and claim parsing once.
    /// Only tokens that passed verification get in; `exp` is checked on every
    /// use. The account itself (exists, not disabled) is still read every time.
    verified: Mutex<HashMap<String, Arc<JwtClaims>>>,
}

/// What a request needs of a verified JWT.
struct JwtClaims {
    user_id: String,
    username: Option<String>,
    /// `exp`, seconds since the epoch.
    exp: u64,
}

impl Authenticator {
    pub fn new(jwt_secret: Option<&str>) -> Self {
        let jwt = jwt_secret.map(|secret| {
            let mut v = Validation::new(Algorithm::HS256);
            v.algorithms = vec![Algorithm::HS256];
            v.required_spec_claims = ["exp".to_string()].into();
            v.validate_exp = true;
            v.leeway = JWT_LEEWAY_SECS;
            (DecodingKey::from_secret(secret.as_bytes()), v)
        });
        Authenticator {
            jwt,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// Resolves a bearer token to a principal, or 401.
    pub async fn authenticate(&self, store: &Store, token: &str) -> Result<Principal, AppError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(unauthorized("missing token"));
        }
        if token.starts_with(TOKEN_PREFIX) {
            let hash = token_hash(token);
            let record = store
                .read_now(|c| accounts::lookup_token(c, &hash))?
                .ok_or_else(|| unauthorized("invalid token"))?;
            // The lookup was by hash; compare again in constant time anyway so no
            // code path compares secrets with an early-exit comparison.
            if !bool::from(record.hash.as_bytes().ct_eq(hash.as_bytes())) {
                return Err(unauthorized("invalid token"));
            }
            if record.revoked_at.is_some() {
                return Err(unauthorized("token revoked; sign in again"));
            }
            if record.expires_at.is_some_and(|e| e <= now_ms()) {
                return Err(unauthorized("token expired; sign in again"));
            }
            if record.user_disabled {
                return Err(unauthorized("account disabled"));
            }
            return Ok(Principal {
                username: record.username.unwrap_or_else(|| record.user_id.clone()),
                user_id: record.user_id,
                token_hash: Some(record.hash),
                device_id: record.device_id,
            });
        }
        let claims = self.verify_jwt(token)?;
        // A primary-key lookup: inline, like the token lookup above.
        let account = store.read_now(|c| accounts::user_status(c, &claims.user_id))?;
        if account.as_ref().is_some_and(|(_, disabled)| *disabled) {
            return Err(unauthorized("account disabled"));
        }
        let username = account
            .map(|(name, _)| name)
            .or_else(|| claims.username.clone())
            .unwrap_or_else(|| claims.user_id.clone());
        Ok(Principal {
            user_id: claims.user_id.clone(),
            username,
            token_hash: None,
            device_id: None,
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<JwtClaims>>> {
        self.verified.lock().expect("jwt cache lock poisoned")
    }

    /// Checks a JWT's signature and claims, or finds it among those already checked.
    fn verify_jwt(&self, token: &str) -> Result<Arc<JwtClaims>, AppError> {
        let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let known = self.cache().get(token).cloned();
        if let Some(claims) = known.filter(|c| c.exp + JWT_LEEWAY_SECS >= now) {
            return Ok(claims);
        }
        let Some((key, validation)) = &self.jwt else {
            return Err(unauthorized("invalid token"));
        };
        let data = jsonwebtoken::decode::<Value>(token, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => unauthorized("token expired; sign in again"),
                _ => unauthorized("invalid token"),
            }
        })?;
        let claims = data.claims;
        let user_id = claim_id(claims.get("userId"))
            .or_else(|| claim_id(claims.get("sub")))
            .ok_or_else(|| unauthorized("token has no userId or sub claim"))?;
        let verified = Arc::new(JwtClaims {
            user_id,
            username: claims
                .get("username")
                .and_then(Value::as_str)
                .map(str::to_string),
            // Required and checked by the validation above.
            exp: claims.get("exp").and_then(Value::as_f64).unwrap_or(0.0) as u64,
        });
        let mut cache = self.cache();
        if cache.len() >= JWT_CACHE_MAX {
            cache.clear();
        }
        cache.insert(token.to_string(), verified.clone());
        Ok(verified)
    }
}

/// A user id claim: a non-empty string, or an integer (as its decimal text).
fn claim_id(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() && s.len() <= 128 => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

pub fn unauthorized(msg: &str) -> AppError {
    AppError::Unauthorized(msg.to_string())
}

/// Counts failed logins per username and per client address in a sliding window.
pub struct LoginLimiter {
    max_per_user: u32,
    max_per_addr: u32,
    window: Duration,
    /// key ("u:name" / "a:addr") → times of recent failures. Short critical sections only.
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        LoginLimiter {
            max_per_user: max_failures.max(1),
            max_per_addr: max_failures.max(1).saturating_mul(4),
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn keys(username: &str, addr: Option<IpAddr>) -> [(String, bool); 2] {
        [
            (format!("u:{}", username.to_lowercase()), true),
            (
                format!("a:{}", addr.map(|a| a.to_string()).unwrap_or_default()),
                false,
            ),
        ]
    }

    /// Err(429) when either the username or the address is over its limit.
    pub fn check(&self, username: &str, addr: Option<IpAddr>) -> Result<(), AppError> {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("limiter lock poisoned");
        for (key, is_user) in Self::keys(username, addr) {
            let max = if is_user {
                self.max_per_user
            } else {
                self.max_per_addr
            };
            if let Some(q) = map.get_mut(&key) {
                while q
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    q.pop_front();
                }
                if q.len() >= max as usize {
                    let oldest = *q.front().expect("non-empty");
                    let wait = self.window.saturating_sub(now.duration_since(oldest));
                    return Err(AppError::TooManyRequests(wait + Duration::from_millis(999)));
                }
            }
        }
        Ok(())
    }

    pub fn record_failure(&self, username: &str, addr: Option<IpAddr>) {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("limiter lock poisoned");
        if map.len() > 100_000 {
            // Bound memory under a flood of distinct usernames.
            map.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        for (key, _) in Self::keys(username, addr) {
            map.entry(key).or_default().push_back(now);
        }
    }

    pub fn record_success(&self, username: &str) {
        let key = format!("u:{}", username.to_lowercase());
        self.failures
            .lock()
            .expect("limiter lock poisoned")
            .remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers `token` as verified, expiring at `exp` (seconds).
    fn remember(auth: &Authenticator, token: &str, exp: u64) {
        let claims = JwtClaims {
            user_id: "u1".into(),
            username: None,
            exp,
        };
        auth.cache().insert(token.into(), Arc::new(claims));
    }

    #[test]
    fn a_remembered_jwt_is_used_only_until_it_expires() {
        let auth = Authenticator::new(Some("a-secret-of-thirty-two-bytes-or-more"));
        let now = (now_ms() / 1000) as u64;
        // Not a valid JWT: only the memory of it can make it pass.
        remember(&auth, "remembered", now + 60);
        assert_eq!(auth.verify_jwt("remembered").unwrap().user_id, "u1");
        // Past its exp (and the leeway), it is verified afresh, which fails.
        remember(&auth, "remembered", now - JWT_LEEWAY_SECS - 1);
        assert!(auth.verify_jwt("remembered").is_err());
        // The memory is bounded: a full one starts over.
        for i in 0..JWT_CACHE_MAX {
            remember(&auth, &format!("t{i}"), now + 60);
        }
        let real = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"userId": "u2", "exp": now + 60}),
            &jsonwebtoken::EncodingKey::from_secret(b"a-secret-of-thirty-two-bytes-or-more"),
        )
        .unwrap();
        assert_eq!(auth.verify_jwt(&real).unwrap().user_id, "u2");
        assert_eq!(auth.cache().len(), 1);
    }

    #[test]
    fn tokens_are_256_bit_hex_and_unique() {
        let a = new_token();
        assert!(a.starts_with("os_"));
        assert_eq!(a.len(), 3 + 64);
        assert_ne!(a, new_token());
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a[3..]);
    }

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn limiter_blocks_after_max_failures_then_success_clears_user() {
        let l = LoginLimiter::new(2, Duration::from_secs(60));
        let ip = Some("127.0.0.1".parse().unwrap());
        l.check("bob", ip).unwrap();
        l.record_failure("bob", ip);
        l.record_failure("Bob", ip);
        let err = l.check("bob", ip).unwrap_err();
        assert!(matches!(err, AppError::TooManyRequests(d) if d.as_secs() >= 59));
        l.record_success("bob");
        l.check("bob", ip).unwrap();
    }

    #[test]
    fn limiter_counts_per_address_across_usernames() {
        let l = LoginLimiter::new(1, Duration::from_secs(60));
        let ip = Some("10.0.0.1".parse().unwrap());
        for i in 0..4 {
            l.record_failure(&format!("user{i}"), ip);
        }
        assert!(l.check("someone-else", ip).is_err());
        assert!(l
            .check("someone-else", Some("10.0.0.2".parse().unwrap()))
            .is_ok());
    }

    #[test]
    fn claim_ids_accept_strings_and_integers() {
        assert_eq!(
            claim_id(Some(&serde_json::json!("u1"))).as_deref(),
            Some("u1")
        );
        assert_eq!(
            claim_id(Some(&serde_json::json!(42))).as_deref(),
            Some("42")
        );
        assert_eq!(claim_id(Some(&serde_json::json!(1.5))), None);
        assert_eq!(claim_id(Some(&serde_json::json!(""))), None);
    }
}
