//! Test harness: a real ordersync on an ephemeral loopback port with a fresh
//! temporary database, a real HTTP client and a real WebSocket client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ordersync::config::ServeArgs;
use ordersync::store::accounts;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const JWT_SECRET: &str = "test-secret-for-jwt";

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub app: Arc<ordersync::App>,
    pub client: reqwest::Client,
    /// Keeps the temporary directory (and database) alive.
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

pub fn test_args() -> ServeArgs {
    ServeArgs {
        jwt_secret: Some(JWT_SECRET.into()),
        shutdown_grace: Duration::from_secs(5),
        ..Default::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_with(test_args()).await
}

pub async fn spawn_with(args: ServeArgs) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    spawn_at(dir, args).await
}

/// Starts a server on the database inside `dir` (reused across restarts).
pub async fn spawn_at(dir: Arc<tempfile::TempDir>, args: ServeArgs) -> TestApp {
    let db = dir.path().join("test.db");
    let app = ordersync::build(&db, args).expect("server builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(ordersync::run(listener, app.clone(), async move {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        app,
        client: reqwest::Client::new(),
        dir,
        stop: Some(stop),
        task: Some(task),
    }
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("test.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws/realtime?{}", self.addr, query)
    }

    /// Stops the server gracefully and waits until it has fully stopped.
    pub async fn stop(mut self) -> Arc<tempfile::TempDir> {
        self.stop.take().unwrap().send(()).ok();
        self.task.take().unwrap().await.unwrap().unwrap();
        self.dir.clone()
    }

    pub fn stop_signal(&mut self) -> oneshot::Sender<()> {
        self.stop.take().unwrap()
    }

    pub async fn join(mut self) {
        self.task.take().unwrap().await.unwrap().unwrap();
    }

    /// Creates a user directly in the database; returns its id.
    pub async fn create_user(&self, name: &str, password: &str) -> String {
        let hash = ordersync::auth::hash_password(password).unwrap();
        let name = name.to_string();
        self.app
            .store
            .write(move |tx| accounts::create_user(tx.conn(), &name, &hash, tx.now()))
            .await
            .unwrap()
    }

    /// Creates a user and a built-in token for it; returns (user id, token).
    pub async fn user_with_token(&self, name: &str) -> (String, String) {
        let id = self.create_user(name, "password123").await;
        let token = self.token_for(&id, None).await;
        (id, token)
    }

    pub async fn token_for(&self, user_id: &str, device: Option<&str>) -> String {
        let token = ordersync::auth::new_token();
        let hash = ordersync::auth::token_hash(&token);
        let user_id = user_id.to_string();
        let device = device.map(str::to_string);
        self.app
            .store
            .write(move |tx| {
                let t = accounts::NewToken {
                    hash: &hash,
                    user_id: &user_id,
                    label: Some("test"),
                    device_id: device.as_deref(),
                    expires_at: None,
                };
                accounts::insert_token(tx.conn(), &t, tx.now())
            })
            .await
            .unwrap();
        token
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request sent");
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Resp {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Resp {
        self.request(Method::GET, path, Some(token), None).await
    }

    pub async fn post_orders(&self, token: &str, orders: Value) -> Resp {
        self.request(
            Method::POST,
            "/api/pending-orders",
            Some(token),
            Some(json!({ "orders": orders })),
        )
        .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Resp {
        self.request(Method::DELETE, path, Some(token), None).await
    }

    pub async fn lock(&self, id: &str, token: &str, locked: bool) -> Resp {
        self.request(
            Method::PATCH,
            &format!("/api/pending-orders/{id}/lock"),
            Some(token),
            Some(json!({ "locked": locked })),
        )
        .await
    }

    /// The user's event log straight from the database: (seq, type, payload).
    pub async fn events_of(&self, user_id: &str) -> Vec<(i64, String, Value)> {
        let user = user_id.to_string();
        self.app
            .store
            .read(move |c| {
                Ok(
                    ordersync::store::events::read_after(c, &user, 0, 1_000_000)?
                        .into_iter()
                        .map(|e| (e.seq, e.kind, serde_json::from_str(&e.payload).unwrap()))
                        .collect(),
                )
            })
            .await
            .unwrap()
    }

    pub async fn connect(&self, query: &str) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url(query))
            .await
            .expect("websocket connects");
        Ws { ws }
    }

    /// Connects and returns the socket after its CONNECTED frame.
    pub async fn connect_ok(&self, query: &str) -> (Ws, Value) {
        let mut ws = self.connect(query).await;
        let first = ws.next_json().await;
        assert_eq!(first["type"], "CONNECTED", "first frame: {first}");
        (ws, first)
    }
}

/// An order body with the required fields and two items.
pub fn order(id: &str, device: &str) -> Value {
    Value::Object(ordersync::orders::sample_order(id, device, 2))
}

pub fn order_with_qty(id: &str, device: &str, qty: u32) -> Value {
    Value::Object(ordersync::orders::sample_order(id, device, qty))
}

pub struct Ws {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

#[derive(Debug)]
pub enum Next {
    Text(String),
    Closed(Option<u16>, #[allow(dead_code)] String),
    Timeout,
}

impl Ws {
    pub async fn next_within(&mut self, wait: Duration) -> Next {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) => return Next::Closed(None, String::new()),
                Ok(Some(Err(e))) => return Next::Closed(None, e.to_string()),
                Ok(Some(Ok(Message::Text(t)))) => return Next::Text(t.to_string()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Next::Closed(
                        f.as_ref().map(|f| u16::from(f.code)),
                        f.map(|f| f.reason.to_string()).unwrap_or_default(),
                    )
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next text frame as JSON (fails the test after 5 s).
    pub async fn next_json(&mut self) -> Value {
        match self.next_within(Duration::from_secs(5)).await {
            Next::Text(t) => serde_json::from_str(&t).unwrap_or_else(|_| panic!("not JSON: {t}")),
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Asserts no text frame arrives within `wait`.
    pub async fn assert_silent(&mut self, wait: Duration) {
        match self.next_within(wait).await {
            Next::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn close_code(&mut self, wait: Duration) -> Option<u16> {
        loop {
            match self.next_within(wait).await {
                Next::Closed(code, _) => return code,
                Next::Text(_) => continue,
                Next::Timeout => panic!("socket not closed within {wait:?}"),
            }
        }
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t.to_string())).await.unwrap();
    }
}

/// Mints an HS256 JWT with the given claims.
pub fn jwt(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn in_an_hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

/// Runs the real binary with `args`, feeding `stdin`; returns (exit ok, stdout, stderr).
pub fn cli(db: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ordersync"))
        .args(args)
        .arg("--db")
        .arg(db)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// base64url without padding (to hand-craft JWTs the encoder would refuse).
pub fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
