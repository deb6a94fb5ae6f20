//! SQL for pending orders. Every function takes the user id: an order is only ever
//! addressed as (user_id, id), so one user cannot see or touch another's orders.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use serde_json::{json, value::RawValue, Value};

use super::events::head_seq;
use super::WriteTx;
use crate::error::AppError;
use crate::hub::{PENDING_CREATED, PENDING_DELETED, PENDING_UPDATED};
use crate::orders::{Order, OrderContent, UpsertBatch};

const ORDER_COLUMNS: &str = "id, customer_id, customer_name, device_id, status, items, \
    discount_percent, target_total_with_vat, shipping_cost, shipping_tax, no_shipping, notes, \
    origin_draft_id, sub_client_codice, sub_client_name, sub_client_data, delivery_address_id, \
    idempotency_key, is_locked, version, created_at, updated_at";

fn raw(text: String) -> rusqlite::Result<Box<RawValue>> {
    RawValue::from_string(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn order_from_row(r: &Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: r.get(0)?,
        customer_id: r.get(1)?,
        customer_name: r.get(2)?,
        device_id: r.get(3)?,
        status: r.get(4)?,
        items: raw(r.get(5)?)?,
        discount_percent: r.get(6)?,
        target_total_with_vat: r.get(7)?,
        shipping_cost: r.get(8)?,
        shipping_tax: r.get(9)?,
        no_shipping: r.get(10)?,
        notes: r.get(11)?,
        origin_draft_id: r.get(12)?,
        sub_client_codice: r.get(13)?,
        sub_client_name: r.get(14)?,
        sub_client_data: r.get::<_, Option<String>>(15)?.map(raw).transpose()?,
        delivery_address_id: r.get::<_, Option<String>>(16)?.map(raw).transpose()?,
        idempotency_key: r.get(17)?,
        is_locked: r.get(18)?,
        version: r.get(19)?,
        created_at: r.get(20)?,
        updated_at: r.get(21)?,
    })
}

/// What upsert needs of an existing order: its content, version and update time
/// (read without re-validating the stored JSON, which `get` does).
fn existing(
    conn: &Connection,
    user_id: &str,
    id: &str,
) -> Result<Option<(OrderContent, i64, i64)>, AppError> {
    Ok(conn
        .prepare_cached(
            "SELECT customer_id, customer_name, device_id, status, items, discount_percent,
                    target_total_with_vat, shipping_cost, shipping_tax, no_shipping, notes,
                    origin_draft_id, sub_client_codice, sub_client_name, sub_client_data,
                    delivery_address_id, idempotency_key, version, updated_at
             FROM pending_orders WHERE user_id = ?1 AND id = ?2",
        )?
        .query_row(params![user_id, id], |r| {
            Ok((
                OrderContent {
                    customer_id: r.get(0)?,
                    customer_name: r.get(1)?,
                    device_id: r.get(2)?,
                    status: r.get(3)?,
                    items: r.get(4)?,
                    discount_percent: r.get(5)?,
                    target_total_with_vat: r.get(6)?,
                    shipping_cost: r.get(7)?,
                    shipping_tax: r.get(8)?,
                    no_shipping: r.get(9)?,
                    notes: r.get(10)?,
                    origin_draft_id: r.get(11)?,
                    sub_client_codice: r.get(12)?,
                    sub_client_name: r.get(13)?,
                    sub_client_data: r.get(14)?,
                    delivery_address_id: r.get(15)?,
                    idempotency_key: r.get(16)?,
                },
                r.get(17)?,
                r.get(18)?,
            ))
        })
        .optional()?)
}

pub fn get(conn: &Connection, user_id: &str, id: &str) -> Result<Option<Order>, AppError> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM pending_orders WHERE user_id = ?1 AND id = ?2");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![user_id, id], order_from_row)
        .optional()?)
}

/// The user's orders (all, or those in `ids`), newest `updatedAt` first, and the
/// stream's last seq, read in one snapshot.
pub fn list(
    conn: &Connection,
    user_id: &str,
    ids: Option<&[String]>,
) -> Result<(Vec<Order>, i64), AppError> {
    super::snapshot(conn, |conn| {
        let mut orders = match ids {
            None => {
                let sql = format!(
                    "SELECT {ORDER_COLUMNS} FROM pending_orders WHERE user_id = ?1
                     ORDER BY updated_at DESC, id"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt.query_map([user_id], order_from_row)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
            Some(ids) => {
                let mut found = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(o) = get(conn, user_id, id)? {
                        found.push(o);
                    }
                }
                found.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
                found
            }
        };
        orders.dedup_by(|a, b| a.id == b.id);
        let seq = head_seq(conn, user_id)?;
        Ok((orders, seq))
    })
}

/// Both statements bind the same parameters: ?1 user, ?2 id, ?3..?19 content, ?20 now.
const UPDATE_ORDER: &str = "UPDATE pending_orders SET customer_id = ?3, customer_name = ?4,
      device_id = ?5, status = ?6, items = ?7, discount_percent = ?8,
      target_total_with_vat = ?9, shipping_cost = ?10, shipping_tax = ?11, no_shipping = ?12,
      notes = ?13, origin_draft_id = ?14, sub_client_codice = ?15, sub_client_name = ?16,
      sub_client_data = ?17, delivery_address_id = ?18, idempotency_key = ?19,
      version = version + 1, updated_at = ?20
    WHERE user_id = ?1 AND id = ?2";
/// Inserts unless the id exists (then changes nothing and reports 0 rows).
const INSERT_ORDER: &str = "INSERT INTO pending_orders (user_id, id, customer_id, customer_name,
      device_id, status, items, discount_percent, target_total_with_vat, shipping_cost,
      shipping_tax, no_shipping, notes, origin_draft_id, sub_client_codice, sub_client_name,
      sub_client_data, delivery_address_id, idempotency_key, is_locked, version, created_at,
      updated_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
      0, 1, ?20, ?20)
    ON CONFLICT (user_id, id) DO NOTHING";

/// Runs INSERT_ORDER or UPDATE_ORDER; returns the number of rows written.
fn store_order(
    stmt: &mut rusqlite::CachedStatement<'_>,
    user_id: &str,
    id: &str,
    c: &OrderContent,
    now: i64,
) -> Result<usize, AppError> {
    Ok(stmt.execute(params![
        user_id,
        id,
        c.customer_id,
        c.customer_name,
        c.device_id,
        c.status,
        c.items,
        c.discount_percent,
        c.target_total_with_vat,
        c.shipping_cost,
        c.shipping_tax,
        c.no_shipping,
        c.notes,
        c.origin_draft_id,
        c.sub_client_codice,
        c.sub_client_name,
        c.sub_client_data,
        c.delivery_address_id,
        c.idempotency_key,
        now,
    ])?)
}

/// One item of the batch reply.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpsertResult {
    pub id: String,
    /// created | updated | unchanged | conflict
    pub action: &'static str,
    pub version: i64,
    pub server_updated_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current: Option<Value>,
}

impl UpsertResult {
    /// A result without `current` (created, updated, unchanged).
    fn written(id: &str, action: &'static str, version: i64, server_updated_at: i64) -> Self {
        UpsertResult {
            id: id.to_string(),
            action,
            version,
            server_updated_at,
            current: None,
        }
    }
}

/// Applies a batch; appends at most one PENDING_CREATED and one PENDING_UPDATED.
/// Returns the per-order results and the last seq appended (or the current one).
pub fn upsert(
    tx: &mut WriteTx<'_>,
    user_id: &str,
    batch: &UpsertBatch,
) -> Result<(Vec<UpsertResult>, i64), AppError> {
    let now = tx.now();
    let mut results = Vec::with_capacity(batch.orders.len());
    let mut created = Vec::new();
    let mut updated = Vec::new();
    {
        let conn = tx.conn();
        // Prepared once per batch (a cache lookup hashes the whole SQL text).
        let mut insert = conn.prepare_cached(INSERT_ORDER)?;
        let mut update = conn.prepare_cached(UPDATE_ORDER)?;
        for input in &batch.orders {
            let c = &input.content;
            let id = &input.id;
            // A new order, the common case, takes one statement: the insert
            // writes nothing when the id exists, and then the order is compared.
            if matches!(input.base_version, None | Some(0))
                && store_order(&mut insert, user_id, id, c, now)? == 1
            {
                created.push(id.clone());
                results.push(UpsertResult::written(id, "created", 1, now));
                continue;
            }
            let existing = existing(conn, user_id, id)?;
            let conflict = match (&existing, input.base_version) {
                (_, None) => false,
                (None, Some(base)) => base != 0,
                (Some((_, version, _)), Some(base)) => *version != base,
            };
            if conflict {
                let current = get(conn, user_id, id)?;
                results.push(UpsertResult {
                    id: id.clone(),
                    action: "conflict",
                    version: current.as_ref().map_or(0, |o| o.version),
                    server_updated_at: current.as_ref().map_or(0, |o| o.updated_at),
                    current: Some(current.map(|o| json!(o)).unwrap_or(Value::Null)),
                });
                continue;
            }
            match existing {
                Some((stored, version, updated_at)) if stored == *c => {
                    results.push(UpsertResult::written(id, "unchanged", version, updated_at))
                }
                Some((_, version, _)) => {
                    store_order(&mut update, user_id, id, c, now)?;
                    updated.push(id.clone());
                    results.push(UpsertResult::written(id, "updated", version + 1, now));
                }
                // Only reachable without a baseVersion or with 0, where the
                // insert above already ran and found the id taken.
                None => {
                    return Err(AppError::Internal(format!(
                        "order `{id}` neither inserted nor found"
                    )))
                }
            }
        }
    }
    let device = batch.device_id.as_str();
    let mut seq = None;
    for (kind, ids) in [(PENDING_CREATED, created), (PENDING_UPDATED, updated)] {
        if !ids.is_empty() {
            let payload = json!({"orderIds": ids, "count": ids.len(), "deviceId": device});
            seq = Some(tx.append_event(user_id, kind, &payload, Some(device))?);
        }
    }
    let seq = match seq {
        Some(s) => s,
        None => head_seq(tx.conn(), user_id)?,
    };
    Ok((results, seq))
}

/// Deletes an order. 404 (no event) if absent; 409 with `current` if `base_version`
/// does not match. Returns the seq of the PENDING_DELETED event.
pub fn delete(
    tx: &mut WriteTx<'_>,
    user_id: &str,
    id: &str,
    base_version: Option<i64>,
    device_id: Option<&str>,
) -> Result<i64, AppError> {
    let Some(existing) = get(tx.conn(), user_id, id)? else {
        return Err(not_found(id));
    };
    if let Some(base) = base_version {
        if base != existing.version {
            return Err(AppError::Conflict {
                message: format!(
                    "order `{id}` is at version {}, not {base}; reload it and retry",
                    existing.version
                ),
                current: json!(existing),
            });
        }
    }
    tx.conn()
        .prepare_cached("DELETE FROM pending_orders WHERE user_id = ?1 AND id = ?2")?
        .execute(params![user_id, id])?;
    let payload = json!({"orderId": id, "deviceId": device_id});
    tx.append_event(user_id, PENDING_DELETED, &payload, device_id)
}

/// Result of a lock change.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockResult {
    pub id: String,
    pub is_locked: bool,
    pub version: i64,
    pub updated_at: i64,
    pub seq: i64,
}

/// Locks or unlocks an order; a change bumps the version and appends PENDING_UPDATED,
/// setting the state it already has is a no-op (no event).
pub fn set_locked(
    tx: &mut WriteTx<'_>,
    user_id: &str,
    id: &str,
    locked: bool,
    device_id: Option<&str>,
) -> Result<LockResult, AppError> {
    let Some(existing) = get(tx.conn(), user_id, id)? else {
        return Err(not_found(id));
    };
    if existing.is_locked == locked {
        return Ok(LockResult {
            id: id.to_string(),
            is_locked: locked,
            version: existing.version,
            updated_at: existing.updated_at,
            seq: head_seq(tx.conn(), user_id)?,
        });
    }
    let now = tx.now();
    tx.conn()
        .prepare_cached(
            "UPDATE pending_orders SET is_locked = ?3, version = version + 1, updated_at = ?4
             WHERE user_id = ?1 AND id = ?2",
        )?
        .execute(params![user_id, id, locked, now])?;
    let payload = json!({"orderIds": [id], "count": 1, "deviceId": device_id});
    let seq = tx.append_event(user_id, PENDING_UPDATED, &payload, device_id)?;
    Ok(LockResult {
        id: id.to_string(),
        is_locked: locked,
        version: existing.version + 1,
        updated_at: now,
        seq,
    })
}

pub fn not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no pending order with id `{id}`"))
}
