//! The pending-order domain: what an order is, and parsing untrusted JSON into
//! [`OrderInput`]s. Parse, don't validate: an `OrderInput` that exists is valid, so
//! the store never sees bad data. Every problem is reported with its field path
//! (`orders[2].items[0].quantity`) so a client can point at the right input.

use std::collections::HashSet;
use std::fmt;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Limits applied while parsing (the `--max-batch` / `--max-items` flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch: usize,
    pub max_items: usize,
}

pub const MAX_ID_CHARS: usize = 128;
pub const MAX_NOTES_CHARS: usize = 500;
/// Upper bound for free-text fields other than notes, so one order cannot be a megabyte of name.
pub const MAX_TEXT_CHARS: usize = 1000;
pub const STATUSES: [&str; 4] = ["pending", "syncing", "error", "completed-warehouse"];

/// One problem in a request body, located by a JSON path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl fmt::Display, message: impl Into<String>) -> Self {
        FieldError {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// A field path rendered only when an error is reported (parsing valid input
/// allocates no path strings): `base.name`.
struct Field<'a> {
    base: &'a dyn fmt::Display,
    name: &'a str,
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.base, self.name)
    }
}

/// `base[index]`, rendered lazily like [`Field`].
struct Index<'a> {
    base: &'a dyn fmt::Display,
    index: usize,
}

impl fmt::Display for Index<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.base, self.index)
    }
}

/// The stored content of an order: everything a client sends except the id and
/// `baseVersion`. Two equal contents mean an upsert is `unchanged`.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderContent {
    pub customer_id: String,
    pub customer_name: String,
    pub device_id: String,
    pub status: String,
    /// Canonical JSON text of the items array (object keys sorted), stored verbatim.
    pub items: String,
    pub discount_percent: Option<f64>,
    pub target_total_with_vat: Option<f64>,
    pub shipping_cost: Option<f64>,
    pub shipping_tax: Option<f64>,
    pub no_shipping: Option<bool>,
    pub notes: Option<String>,
    pub origin_draft_id: Option<String>,
    pub sub_client_codice: Option<String>,
    pub sub_client_name: Option<String>,
    /// Canonical JSON text.
    pub sub_client_data: Option<String>,
    /// Canonical JSON text of a string or a number.
    pub delivery_address_id: Option<String>,
    pub idempotency_key: Option<String>,
}

/// A valid order sent by a client for upsert.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderInput {
    pub id: String,
    pub content: OrderContent,
    /// Optimistic concurrency: the version the client last saw.
    pub base_version: Option<i64>,
}

/// A valid `POST /api/pending-orders` body.
#[derive(Debug, Clone, PartialEq)]
pub struct UpsertBatch {
    pub orders: Vec<OrderInput>,
    /// The device the request comes from (body `deviceId`, else the first order's).
    pub device_id: String,
}

/// An order as returned by the API (times in epoch milliseconds).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub id: String,
    pub customer_id: String,
    pub customer_name: String,
    pub device_id: String,
    pub status: String,
    pub items: Box<RawValue>,
    pub discount_percent: Option<f64>,
    pub target_total_with_vat: Option<f64>,
    pub shipping_cost: Option<f64>,
    pub shipping_tax: Option<f64>,
    pub no_shipping: Option<bool>,
    pub notes: Option<String>,
    pub origin_draft_id: Option<String>,
    pub sub_client_codice: Option<String>,
    pub sub_client_name: Option<String>,
    pub sub_client_data: Option<Box<RawValue>>,
    pub delivery_address_id: Option<Box<RawValue>>,
    pub idempotency_key: Option<String>,
    pub is_locked: bool,
    pub version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Fields a client may send in an order. `version`, `isLocked`, `createdAt` and
/// `updatedAt` are server-managed: accepted (a client may send back what it read)
/// and ignored.
pub const ORDER_FIELDS: &[&str] = &[
    "id",
    "customerId",
    "customerName",
    "deviceId",
    "status",
    "items",
    "itemsJson",
    "discountPercent",
    "targetTotalWithVat",
    "shippingCost",
    "shippingTax",
    "noShipping",
    "notes",
    "originDraftId",
    "subClientCodice",
    "subClientName",
    "subClientData",
    "subClientDataJson",
    "deliveryAddressId",
    "idempotencyKey",
    "baseVersion",
    "version",
    "isLocked",
    "createdAt",
    "updatedAt",
];

/// Parses a whole batch body. On any error nothing is returned, so nothing is written.
pub fn parse_batch(body: &Value, limits: Limits) -> Result<UpsertBatch, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(obj) = body.as_object() else {
        return Err(vec![FieldError::new(
            "",
            "body must be a JSON object like {\"orders\": [...]}",
        )]);
    };
    for key in obj.keys() {
        if key != "orders" && key != "deviceId" {
            errors.push(FieldError::new(key.as_str(), "unknown field"));
        }
    }
    let body_device = match obj.get("deviceId") {
        None | Some(Value::Null) => None,
        Some(v) => required_string(v, &"deviceId", MAX_ID_CHARS, &mut errors),
    };
    let orders = match obj.get("orders") {
        Some(Value::Array(a)) => a,
        Some(_) => {
            errors.push(FieldError::new("orders", "must be an array"));
            return Err(errors);
        }
        None => {
            errors.push(FieldError::new("orders", "is required"));
            return Err(errors);
        }
    };
    if orders.is_empty() {
        errors.push(FieldError::new("orders", "must contain at least one order"));
    }
    if orders.len() > limits.max_batch {
        errors.push(FieldError::new(
            "orders",
            format!("at most {} orders per request", limits.max_batch),
        ));
        return Err(errors);
    }
    let mut parsed = Vec::with_capacity(orders.len());
    let mut seen = HashSet::with_capacity(orders.len());
    for (i, o) in orders.iter().enumerate() {
        let path = Index {
            base: &"orders",
            index: i,
        };
        if let Some(input) = parse_order(o, &path, limits, &mut errors) {
            if !seen.insert(input.id.clone()) {
                errors.push(FieldError::new(
                    format!("{path}.id"),
                    format!("duplicate id `{}` in this batch", input.id),
                ));
            }
            parsed.push(input);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let device_id = body_device.unwrap_or_else(|| parsed[0].content.device_id.clone());
    Ok(UpsertBatch {
        orders: parsed,
        device_id,
    })
}

/// Parses one order at `path`; pushes every problem found into `errors`.
pub fn parse_order(
    v: &Value,
    path: &dyn fmt::Display,
    limits: Limits,
    errors: &mut Vec<FieldError>,
) -> Option<OrderInput> {
    let before = errors.len();
    let Some(obj) = v.as_object() else {
        errors.push(FieldError::new(path, "must be an object"));
        return None;
    };
    for key in obj.keys() {
        if !ORDER_FIELDS.contains(&key.as_str()) {
            errors.push(FieldError::new(format!("{path}.{key}"), "unknown field"));
        }
    }
    let p = |name: &'static str| Field { base: path, name };
    let field = |name: &str| -> Option<&Value> { obj.get(name).filter(|v| !v.is_null()) };

    let id = match field("id") {
        Some(v) => parse_id(v, &p("id"), errors),
        None => {
            errors.push(FieldError::new(p("id"), "is required"));
            None
        }
    };
    let required = |name: &'static str, errors: &mut Vec<FieldError>| match obj
        .get(name)
        .filter(|v| !v.is_null())
    {
        Some(v) => required_string(v, &p(name), MAX_TEXT_CHARS, errors),
        None => {
            errors.push(FieldError::new(p(name), "is required"));
            None
        }
    };
    let customer_id = required("customerId", errors);
    let customer_name = required("customerName", errors);
    let device_id = required("deviceId", errors);

    let status = match field("status") {
        None => Some("pending".to_string()),
        Some(Value::String(s)) if STATUSES.contains(&s.as_str()) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(
                p("status"),
                format!("must be one of {}", STATUSES.join(", ")),
            ));
            None
        }
    };

    let items = match (obj.get("items"), obj.get("itemsJson")) {
        (Some(a), Some(b)) if !a.is_null() && !b.is_null() => {
            errors.push(FieldError::new(
                p("itemsJson"),
                "give either items or itemsJson, not both",
            ));
            None
        }
        (Some(v), _) if !v.is_null() => parse_items(v, &p("items"), limits, errors),
        (_, Some(v)) if !v.is_null() => match decode_json_alias(v, &p("itemsJson"), errors) {
            Some(inner) => parse_items(&inner, &p("itemsJson"), limits, errors),
            None => None,
        },
        _ => Some("[]".to_string()),
    };

    let discount_percent = opt_number(
        field("discountPercent"),
        &p("discountPercent"),
        errors,
        |n| {
            (0.0..=100.0)
                .contains(&n)
                .then_some(())
                .ok_or("must be between 0 and 100")
        },
    );
    let non_negative = |n: f64| (n >= 0.0).then_some(()).ok_or("must be 0 or more");
    let target_total_with_vat = opt_number(
        field("targetTotalWithVat"),
        &p("targetTotalWithVat"),
        errors,
        non_negative,
    );
    let shipping_cost = opt_number(
        field("shippingCost"),
        &p("shippingCost"),
        errors,
        non_negative,
    );
    let shipping_tax = opt_number(
        field("shippingTax"),
        &p("shippingTax"),
        errors,
        non_negative,
    );
    let no_shipping = match field("noShipping") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            errors.push(FieldError::new(p("noShipping"), "must be true or false"));
            None
        }
    };
    let notes = opt_string(field("notes"), &p("notes"), MAX_NOTES_CHARS, errors);
    let origin_draft_id = opt_string(
        field("originDraftId"),
        &p("originDraftId"),
        MAX_ID_CHARS,
        errors,
    );
    let sub_client_codice = opt_string(
        field("subClientCodice"),
        &p("subClientCodice"),
        MAX_TEXT_CHARS,
        errors,
    );
    let sub_client_name = opt_string(
        field("subClientName"),
        &p("subClientName"),
        MAX_TEXT_CHARS,
        errors,
    );
    let sub_client_data = match (field("subClientData"), field("subClientDataJson")) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                p("subClientDataJson"),
                "give either subClientData or subClientDataJson, not both",
            ));
            None
        }
        (Some(v), None) => parse_sub_client_data(v, &p("subClientData"), errors),
        (None, Some(v)) => decode_json_alias(v, &p("subClientDataJson"), errors)
            .and_then(|inner| parse_sub_client_data(&inner, &p("subClientDataJson"), errors)),
        (None, None) => None,
    };
    let delivery_address_id = match field("deliveryAddressId") {
        None => None,
        Some(v @ Value::String(s)) if s.chars().count() <= MAX_ID_CHARS => Some(json_text(v)),
        Some(v @ Value::Number(_)) => Some(json_text(v)),
        Some(_) => {
            errors.push(FieldError::new(
                p("deliveryAddressId"),
                format!("must be a string of at most {MAX_ID_CHARS} characters or a number"),
            ));
            None
        }
    };
    let idempotency_key = opt_string(
        field("idempotencyKey"),
        &p("idempotencyKey"),
        MAX_ID_CHARS,
        errors,
    );
    let base_version = match field("baseVersion") {
        None => None,
        Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v >= 0) => n.as_i64(),
        Some(_) => {
            errors.push(FieldError::new(
                p("baseVersion"),
                "must be a whole number, 0 or more",
            ));
            None
        }
    };
    for server_managed in ["version", "createdAt", "updatedAt"] {
        if let Some(v) = field(server_managed) {
            if !v.is_number() {
                errors.push(FieldError::new(p(server_managed), "must be a number"));
            }
        }
    }
    if let Some(v) = field("isLocked") {
        if !v.is_boolean() {
            errors.push(FieldError::new(p("isLocked"), "must be true or false"));
        }
    }

    if errors.len() != before {
        return None;
    }
    Some(OrderInput {
        id: id?,
        base_version,
        content: OrderContent {
            customer_id: customer_id?,
            customer_name: customer_name?,
            device_id: device_id?,
            status: status?,
            items: items?,
            discount_percent,
            target_total_with_vat,
            shipping_cost,
            shipping_tax,
            no_shipping,
            notes,
            origin_draft_id,
            sub_client_codice,
            sub_client_name,
            sub_client_data,
            delivery_address_id,
            idempotency_key,
        },
    })
}

/// Order ids: 1..=128 visible characters (no whitespace or control characters),
/// and no `,` because `GET ?ids=a,b` separates ids with commas.
pub fn parse_id(
    v: &Value,
    path: &dyn fmt::Display,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let Value::String(s) = v else {
        errors.push(FieldError::new(path, "must be a string"));
        return None;
    };
    match check_id(s) {
        Ok(()) => Some(s.clone()),
        Err(msg) => {
            errors.push(FieldError::new(path, msg));
            None
        }
    }
}

/// The rule for order ids, shared by bodies and URL paths.
pub fn check_id(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 || n > MAX_ID_CHARS {
        return Err(format!("must be 1 to {MAX_ID_CHARS} characters"));
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err("must not contain spaces, control characters or commas".into());
    }
    Ok(())
}

fn required_string(
    v: &Value,
    path: &dyn fmt::Display,
    max: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match v {
        Value::String(s) if s.trim().is_empty() => {
            errors.push(FieldError::new(path, "must not be empty"));
            None
        }
        Value::String(s) if s.chars().count() > max => {
            errors.push(FieldError::new(
                path,
                format!("must be at most {max} characters"),
            ));
            None
        }
        Value::String(s) => Some(s.clone()),
        _ => {
            errors.push(FieldError::new(path, "must be a string"));
            None
        }
    }
}

fn opt_string(
    v: Option<&Value>,
    path: &dyn fmt::Display,
    max: usize,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match v {
        None => None,
        Some(Value::String(s)) if s.chars().count() > max => {
            errors.push(FieldError::new(
                path,
                format!("must be at most {max} characters"),
            ));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(path, "must be a string"));
            None
        }
    }
}

fn opt_number(
    v: Option<&Value>,
    path: &dyn fmt::Display,
    errors: &mut Vec<FieldError>,
    check: impl Fn(f64) -> Result<(), &'static str>,
) -> Option<f64> {
    let v = v?;
    match v.as_f64().filter(|n| n.is_finite()) {
        Some(n) => match check(n) {
            Ok(()) => Some(n),
            Err(msg) => {
                errors.push(FieldError::new(path, msg));
                None
            }
        },
        None => {
            errors.push(FieldError::new(path, "must be a number"));
            None
        }
    }
}

/// `itemsJson` / `subClientDataJson` (compat) may hold the value itself or a JSON string of it.
fn decode_json_alias(
    v: &Value,
    path: &dyn fmt::Display,
    errors: &mut Vec<FieldError>,
) -> Option<Value> {
    match v {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(inner) => Some(inner),
            Err(e) => {
                errors.push(FieldError::new(
                    path,
                    format!("is not valid JSON text: {e}"),
                ));
                None
            }
        },
        other => Some(other.clone()),
    }
}

/// Compact JSON text of a value. `serde_json::to_string` writes to a byte
/// buffer directly; `Value`'s `Display` goes through `fmt::Write` and took ~45%
/// of batch parsing in a profile.
pub(crate) fn json_text(v: &Value) -> String {
    serde_json::to_string(v).expect("a serde_json::Value always serializes")
}

fn parse_sub_client_data(
    v: &Value,
    path: &dyn fmt::Display,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Object(_) => Some(json_text(v)),
        _ => {
            errors.push(FieldError::new(path, "must be an object"));
            None
        }
    }
}

/// Items: an array of objects with the known fields type-checked; every field,
/// known or not, is kept verbatim. Returns the canonical JSON text.
fn parse_items(
    v: &Value,
    path: &dyn fmt::Display,
    limits: Limits,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    let Value::Array(items) = v else {
        errors.push(FieldError::new(path, "must be an array"));
        return None;
    };
    if items.len() > limits.max_items {
        errors.push(FieldError::new(
            path,
            format!("at most {} items per order", limits.max_items),
        ));
        return None;
    }
    let before = errors.len();
    for (i, item) in items.iter().enumerate() {
        check_item(
            item,
            &Index {
                base: path,
                index: i,
            },
            errors,
        );
    }
    (errors.len() == before).then(|| json_text(v))
}

fn check_item(item: &Value, path: &dyn fmt::Display, errors: &mut Vec<FieldError>) {
    let Some(obj) = item.as_object() else {
        errors.push(FieldError::new(path, "must be an object"));
        return;
    };
    let p = |name: &'static str| Field { base: path, name };
    match obj.get("articleCode") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= MAX_ID_CHARS => {}
        Some(Value::String(_)) => errors.push(FieldError::new(
            p("articleCode"),
            format!("must be 1 to {MAX_ID_CHARS} characters"),
        )),
        Some(_) => errors.push(FieldError::new(p("articleCode"), "must be a string")),
        None => errors.push(FieldError::new(p("articleCode"), "is required")),
    }
    let mut number =
        |name: &'static str, required: bool, ok: &dyn Fn(f64) -> bool, rule: &str| match obj
            .get(name)
        {
            None | Some(Value::Null) if !required => {}
            None | Some(Value::Null) => errors.push(FieldError::new(p(name), "is required")),
            Some(v) => match v.as_f64().filter(|n| n.is_finite()) {
                Some(n) if ok(n) => {}
                Some(_) => errors.push(FieldError::new(p(name), rule)),
                None => errors.push(FieldError::new(p(name), "must be a number")),
            },
        };
    number("quantity", true, &|n| n > 0.0, "must be greater than 0");
    number("price", true, &|n| n >= 0.0, "must be 0 or more");
    number(
        "vat",
        true,
        &|n| (0.0..=100.0).contains(&n),
        "must be between 0 and 100",
    );
    number(
        "discount",
        false,
        &|n| (0.0..=100.0).contains(&n),
        "must be between 0 and 100",
    );
    for name in ["description", "productName", "articleName", "unit"] {
        match obj.get(name) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => errors.push(FieldError::new(p(name), "must be a string")),
        }
    }
}

/// Builds a JSON object body for tests and the demo seed.
pub fn sample_order(id: &str, device: &str, qty: u32) -> Map<String, Value> {
    let v = serde_json::json!({
        "id": id,
        "customerId": "C-001",
        "customerName": "Rossi S.r.l.",
        "deviceId": device,
        "items": [
            {"articleCode": "ART-1", "quantity": qty, "price": 12.5, "vat": 22, "description": "Pasta 1kg"},
            {"articleCode": "ART-2", "quantity": 1, "price": 3.0, "vat": 10}
        ]
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits {
        max_batch: 3,
        max_items: 2,
    };

    fn batch(orders: Value) -> Result<UpsertBatch, Vec<FieldError>> {
        parse_batch(&json!({ "orders": orders }), LIMITS)
    }

    fn paths(r: Result<UpsertBatch, Vec<FieldError>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|e| e.path).collect()
    }

    #[test]
    fn minimal_order_parses_with_defaults() {
        let b =
            batch(json!([{"id": "o1", "customerId": "c", "customerName": "n", "deviceId": "d"}]))
                .unwrap();
        assert_eq!(b.orders[0].content.status, "pending");
        assert_eq!(b.orders[0].content.items, "[]");
        assert_eq!(b.device_id, "d");
        assert_eq!(b.orders[0].base_version, None);
    }

    #[test]
    fn bad_item_quantity_is_reported_with_its_path() {
        let mut o = sample_order("o1", "d", 1);
        o["items"][0]["quantity"] = json!(0);
        let errs = batch(json!([sample_order("o0", "d", 1), o])).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, "orders[1].items[0].quantity");
        assert_eq!(errs[0].message, "must be greater than 0");
    }

    #[test]
    fn item_rules() {
        let mut o = sample_order("o1", "d", 1);
        o["items"] = json!([{"articleCode": "", "quantity": "2", "price": -1, "vat": 101}]);
        assert_eq!(
            paths(batch(json!([o]))),
            vec![
                "orders[0].items[0].articleCode",
                "orders[0].items[0].quantity",
                "orders[0].items[0].price",
                "orders[0].items[0].vat"
            ]
        );
        let mut o = sample_order("o1", "d", 1);
        o["items"] = json!([1]);
        assert_eq!(paths(batch(json!([o]))), vec!["orders[0].items[0]"]);
        let mut o = sample_order("o1", "d", 1);
        o["items"] =
            json!([{"articleCode": "a", "quantity": 1, "price": 1, "vat": 1, "description": 5}]);
        assert_eq!(
            paths(batch(json!([o]))),
            vec!["orders[0].items[0].description"]
        );
    }

    #[test]
    fn unknown_item_fields_are_kept_verbatim() {
        let mut o = sample_order("o1", "d", 1);
        o["items"][0]["lotNumber"] = json!({"n": [1, 2]});
        let b = batch(json!([o])).unwrap();
        let items: Value = serde_json::from_str(&b.orders[0].content.items).unwrap();
        assert_eq!(items[0]["lotNumber"], json!({"n": [1, 2]}));
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let mut o = sample_order("o1", "d", 1);
        o.insert("colour".into(), json!("red"));
        assert_eq!(paths(batch(json!([o]))), vec!["orders[0].colour"]);
        let errs = parse_batch(
            &json!({"orders": [sample_order("a", "d", 1)], "x": 1}),
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(errs[0].path, "x");
    }

    #[test]
    fn required_fields_and_types() {
        assert_eq!(
            paths(batch(
                json!([{"id": 5, "customerName": "", "deviceId": ["d"]}])
            )),
            vec![
                "orders[0].id",
                "orders[0].customerId",
                "orders[0].customerName",
                "orders[0].deviceId"
            ]
        );
    }

    #[test]
    fn id_rules() {
        for bad in ["", "a b", "a,b", "x\u{7}", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in ["o-1", "ü/ß", &"x".repeat(128)] {
            assert!(check_id(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn duplicate_id_in_batch_is_rejected() {
        let errs = batch(json!([
            sample_order("a", "d", 1),
            sample_order("a", "d", 2)
        ]))
        .unwrap_err();
        assert_eq!(errs[0].path, "orders[1].id");
        assert!(errs[0].message.contains("duplicate"));
    }

    #[test]
    fn batch_size_limits() {
        assert_eq!(paths(batch(json!([]))), vec!["orders"]);
        let four: Vec<_> = (0..4)
            .map(|i| sample_order(&i.to_string(), "d", 1))
            .collect();
        assert_eq!(paths(batch(json!(four))), vec!["orders"]);
        let mut o = sample_order("a", "d", 1);
        o["items"] = json!([o["items"][0], o["items"][0], o["items"][0]]);
        assert_eq!(paths(batch(json!([o]))), vec!["orders[0].items"]);
        assert_eq!(paths(parse_batch(&json!([]), LIMITS)), vec![""]);
        assert_eq!(paths(parse_batch(&json!({}), LIMITS)), vec!["orders"]);
    }

    #[test]
    fn status_notes_and_numbers() {
        let mut o = sample_order("a", "d", 1);
        o.insert("status".into(), json!("shipped"));
        o.insert("notes".into(), json!("n".repeat(501)));
        o.insert("discountPercent".into(), json!(120));
        o.insert("noShipping".into(), json!("yes"));
        o.insert("baseVersion".into(), json!(-1));
        assert_eq!(
            paths(batch(json!([o]))),
            vec![
                "orders[0].status",
                "orders[0].discountPercent",
                "orders[0].noShipping",
                "orders[0].notes",
                "orders[0].baseVersion"
            ]
        );
    }

    #[test]
    fn compat_aliases_accept_json_text() {
        let mut o = sample_order("a", "d", 1);
        let items = o.remove("items").unwrap();
        o.insert("itemsJson".into(), json!(items.to_string()));
        o.insert("subClientDataJson".into(), json!("{\"code\":\"X\"}"));
        let b = batch(json!([o])).unwrap();
        let c = &b.orders[0].content;
        assert_eq!(serde_json::from_str::<Value>(&c.items).unwrap(), items);
        assert_eq!(c.sub_client_data.as_deref(), Some("{\"code\":\"X\"}"));

        let mut o = sample_order("a", "d", 1);
        o.insert("itemsJson".into(), json!("[not json"));
        assert_eq!(paths(batch(json!([o]))), vec!["orders[0].itemsJson"]);
    }

    #[test]
    fn server_managed_fields_are_accepted_and_ignored() {
        let mut o = sample_order("a", "d", 1);
        o.insert("version".into(), json!(7));
        o.insert("isLocked".into(), json!(true));
        o.insert("createdAt".into(), json!(1));
        o.insert("updatedAt".into(), json!(2));
        assert!(batch(json!([o])).is_ok());
    }

    #[test]
    fn body_device_id_overrides_first_order() {
        let b = parse_batch(
            &json!({"orders": [sample_order("a", "d1", 1)], "deviceId": "tab"}),
            LIMITS,
        )
        .unwrap();
        assert_eq!(b.device_id, "tab");
    }
}
