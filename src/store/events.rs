//! SQL for the event log: head, retention floor, replay pages, pruning.

use rusqlite::{params, Connection, OptionalExtension};

use super::WriteTx;
use crate::error::AppError;
use crate::hub::Event;

/// The user's last seq (0 when the user has no events yet).
pub fn head_seq(conn: &Connection, user_id: &str) -> Result<i64, AppError> {
    Ok(conn
        .prepare_cached("SELECT last_seq FROM streams WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// `(last_seq, pruned_through)` of the user's stream.
pub fn stream_bounds(conn: &Connection, user_id: &str) -> Result<(i64, i64), AppError> {
    Ok(conn
        .prepare_cached("SELECT last_seq, pruned_through FROM streams WHERE user_id = ?1")?
        .query_row([user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, 0)))
}

/// Up to `limit` events of the user with seq > `after`, in seq order.
pub fn read_after(
    conn: &Connection,
    user_id: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<Event>, AppError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, type, payload, device_id, created_at FROM events
         WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![user_id, after, limit as i64], |r| {
        Ok(Event {
            user_id: user_id.to_string(),
            seq: r.get(0)?,
            kind: r.get(1)?,
            payload: r.get(2)?,
            device_id: r.get(3)?,
            created_at: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// For `lastEventTs` resume (compat): the seq a client that saw every event up to
/// `ts_ms` has reached. `None` when events after that time may have been pruned.
pub fn seq_at_time(conn: &Connection, user_id: &str, ts_ms: i64) -> Result<Option<i64>, AppError> {
    let (_, floor) = stream_bounds(conn, user_id)?;
    let seq: Option<i64> = conn
        .prepare_cached("SELECT max(seq) FROM events WHERE user_id = ?1 AND created_at <= ?2")?
        .query_row(params![user_id, ts_ms], |r| r.get(0))?;
    Ok(match seq {
        Some(s) => Some(s.max(floor)),
        None if floor == 0 => Some(0),
        None => None,
    })
}

/// Removes events created before `cutoff_ms`, per user up to the highest such seq,
/// so the log stays contiguous above `pruned_through`. Returns events removed.
pub fn prune(tx: &mut WriteTx<'_>, cutoff_ms: i64) -> Result<usize, AppError> {
    let conn = tx.conn();
    let floors: Vec<(String, i64)> = {
        let mut stmt = conn.prepare(
            "SELECT user_id, max(seq) FROM events WHERE created_at < ?1 GROUP BY user_id",
        )?;
        let rows = stmt.query_map([cutoff_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut removed = 0;
    for (user, floor) in floors {
        removed += conn
            .prepare_cached("DELETE FROM events WHERE user_id = ?1 AND seq <= ?2")?
            .execute(params![user, floor])?;
        conn.prepare_cached(
            "UPDATE streams SET pruned_through = max(pruned_through, ?2) WHERE user_id = ?1",
        )?
        .execute(params![user, floor])?;
    }
    Ok(removed)
}
