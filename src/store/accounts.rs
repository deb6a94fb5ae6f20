//! SQL for users and built-in tokens. Functions take a plain `&Connection` so the
//! CLI (a separate process, possibly while the server runs) and the server's
//! writer share them.

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::error::AppError;

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub password_hash: String,
    pub disabled: bool,
    pub created_at: i64,
}

fn user_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get::<_, i64>(0)?.to_string(),
        username: r.get(1)?,
        password_hash: r.get(2)?,
        disabled: r.get(3)?,
        created_at: r.get(4)?,
    })
}

const USER_COLUMNS: &str = "id, username, password_hash, disabled, created_at";

pub fn create_user(
    conn: &Connection,
    username: &str,
    hash: &str,
    now: i64,
) -> Result<String, AppError> {
    if find_user(conn, username)?.is_some() {
        return Err(AppError::bad_request(
            "USERNAME_TAKEN",
            format!("a user named `{username}` already exists"),
        ));
    }
    conn.execute(
        "INSERT INTO users (username, password_hash, created_at) VALUES (?1, ?2, ?3)",
        params![username, hash, now],
    )?;
    Ok(conn.last_insert_rowid().to_string())
}

pub fn find_user(conn: &Connection, username: &str) -> Result<Option<User>, AppError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE username = ?1"
        ))?
        .query_row([username], user_from_row)
        .optional()?)
}

/// `(username, disabled)` of a user, the per-request check of a JWT's account.
pub fn user_status(conn: &Connection, id: &str) -> Result<Option<(String, bool)>, AppError> {
    let Ok(n) = id.parse::<i64>() else {
        return Ok(None);
    };
    Ok(conn
        .prepare_cached("SELECT username, disabled FROM users WHERE id = ?1")?
        .query_row([n], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

pub fn user_by_id(conn: &Connection, id: &str) -> Result<Option<User>, AppError> {
    let Ok(n) = id.parse::<i64>() else {
        return Ok(None);
    };
    Ok(conn
        .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))?
        .query_row([n], user_from_row)
        .optional()?)
}

pub fn list_users(conn: &Connection) -> Result<Vec<User>, AppError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {USER_COLUMNS} FROM users ORDER BY username"
    ))?;
    let rows = stmt.query_map([], user_from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Returns false when no such user exists.
pub fn set_password(conn: &Connection, username: &str, hash: &str) -> Result<bool, AppError> {
    Ok(conn.execute(
        "UPDATE users SET password_hash = ?2 WHERE username = ?1",
        params![username, hash],
    )? == 1)
}

/// Returns the user's id, or None when no such user exists.
pub fn set_disabled(
    conn: &Connection,
    username: &str,
    disabled: bool,
    now: i64,
) -> Result<Option<String>, AppError> {
    let n = conn.execute(
        "UPDATE users SET disabled = ?2, disabled_at = CASE WHEN ?2 THEN ?3 ELSE NULL END
         WHERE username = ?1",
        params![username, disabled, now],
    )?;
    if n == 0 {
        return Ok(None);
    }
    Ok(find_user(conn, username)?.map(|u| u.id))
}

pub struct NewToken<'a> {
    pub hash: &'a str,
    pub user_id: &'a str,
    pub label: Option<&'a str>,
    pub device_id: Option<&'a str>,
    pub expires_at: Option<i64>,
}

pub fn insert_token(conn: &Connection, t: &NewToken<'_>, now: i64) -> Result<(), AppError> {
    conn.prepare_cached(
        "INSERT INTO tokens (hash, user_id, label, device_id, created_at, last_used_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
    )?
    .execute(params![
        t.hash,
        t.user_id,
        t.label,
        t.device_id,
        now,
        t.expires_at
    ])?;
    Ok(())
}

/// A token row joined with its user.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub hash: String,
    pub user_id: String,
    pub username: Option<String>,
    pub device_id: Option<String>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub user_disabled: bool,
}

pub fn lookup_token(conn: &Connection, hash: &str) -> Result<Option<TokenRecord>, AppError> {
    Ok(conn
        .prepare_cached(
            "SELECT t.hash, t.user_id, u.username, t.device_id, t.expires_at, t.revoked_at,
                    coalesce(u.disabled, 0)
             FROM tokens t LEFT JOIN users u ON u.id = CAST(t.user_id AS INTEGER)
             WHERE t.hash = ?1",
        )?
        .query_row([hash], |r| {
            Ok(TokenRecord {
                hash: r.get(0)?,
                user_id: r.get(1)?,
                username: r.get(2)?,
                device_id: r.get(3)?,
                expires_at: r.get(4)?,
                revoked_at: r.get(5)?,
                user_disabled: r.get(6)?,
            })
        })
        .optional()?)
}

/// What `token list` shows: never the token, only a prefix of its hash as its id.
#[derive(Debug, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub label: Option<String>,
    pub device_id: Option<String>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

pub fn list_tokens(conn: &Connection, user_id: &str) -> Result<Vec<TokenInfo>, AppError> {
    let mut stmt = conn.prepare(
        "SELECT substr(hash, 1, 16), label, device_id, created_at, last_used_at, expires_at,
                revoked_at
         FROM tokens WHERE user_id = ?1 ORDER BY created_at",
    )?;
    let rows = stmt.query_map([user_id], |r| {
        Ok(TokenInfo {
            id: r.get(0)?,
            label: r.get(1)?,
            device_id: r.get(2)?,
            created_at: r.get(3)?,
            last_used_at: r.get(4)?,
            expires_at: r.get(5)?,
            revoked_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revokes the one token whose hash starts with `prefix`; returns its full hash.
pub fn revoke_by_prefix(conn: &Connection, prefix: &str, now: i64) -> Result<String, AppError> {
    if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(AppError::bad_request(
            "BAD_TOKEN_ID",
            "a token id is at least 8 hex characters, as shown by `ordersync token list`",
        ));
    }
    let mut stmt = conn.prepare("SELECT hash FROM tokens WHERE hash LIKE ?1 || '%' LIMIT 2")?;
    let hashes: Vec<String> = stmt
        .query_map([prefix.to_ascii_lowercase()], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    match hashes.as_slice() {
        [hash] => {
            revoke_hash(conn, hash, now)?;
            Ok(hash.clone())
        }
        [] => Err(AppError::NotFound(format!("no token with id `{prefix}`"))),
        _ => Err(AppError::bad_request(
            "AMBIGUOUS_TOKEN_ID",
            format!("`{prefix}` matches several tokens; give more characters"),
        )),
    }
}

pub fn revoke_hash(conn: &Connection, hash: &str, now: i64) -> Result<bool, AppError> {
    Ok(conn
        .prepare_cached("UPDATE tokens SET revoked_at = ?2 WHERE hash = ?1 AND revoked_at IS NULL")?
        .execute(params![hash, now])?
        == 1)
}

/// Revokes every live token of a user; returns their hashes.
pub fn revoke_all(conn: &Connection, user_id: &str, now: i64) -> Result<Vec<String>, AppError> {
    let mut stmt = conn.prepare(
        "UPDATE tokens SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL RETURNING hash",
    )?;
    let rows = stmt.query_map(params![user_id, now], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Token hashes revoked, and user ids disabled, at or after `since_ms` (the
/// server polls this to close sockets when the CLI revokes or disables).
pub fn revocations_since(
    conn: &Connection,
    since_ms: i64,
) -> Result<(Vec<String>, Vec<String>), AppError> {
    let mut stmt = conn.prepare_cached("SELECT hash FROM tokens WHERE revoked_at >= ?1")?;
    let tokens = stmt
        .query_map([since_ms], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut stmt =
        conn.prepare_cached("SELECT id FROM users WHERE disabled = 1 AND disabled_at >= ?1")?;
    let users = stmt
        .query_map([since_ms], |r| Ok(r.get::<_, i64>(0)?.to_string()))?
        .collect::<Result<_, _>>()?;
    Ok((tokens, users))
}
