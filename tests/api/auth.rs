//! Authentication: built-in tokens, JWTs, login/logout, rate limiting, the CLI.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::*;

async fn login(app: &TestApp, user: &str, password: &str) -> Resp {
    app.request(
        Method::POST,
        "/api/auth/login",
        None,
        Some(json!({"username": user, "password": password, "deviceId": "laptop"})),
    )
    .await
}

#[tokio::test]
async fn login_me_logout_cycle() {
    let app = spawn_app().await;
    let id = app.create_user("alice", "s3cret-pass").await;
    let r = login(&app, "alice", "s3cret-pass").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["user"], json!({"id": id, "username": "alice"}));
    assert!(r.body["expiresAt"].as_i64().unwrap() > chrono::Utc::now().timestamp_millis());
    let token = r.body["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("os_") && token.len() == 67);

    let me = app.get("/api/auth/me", &token).await;
    assert_eq!(me.status, 200);
    assert_eq!(me.body["user"]["username"], "alice");

    let out = app
        .request(Method::POST, "/api/auth/logout", Some(&token), None)
        .await;
    assert_eq!(out.status, 200);
    let me = app.get("/api/auth/me", &token).await;
    assert_eq!(me.status, 401);
    assert_eq!(me.body["code"], "UNAUTHORIZED");
    assert!(me.body["error"].as_str().unwrap().contains("revoked"));
}

#[tokio::test]
async fn tokens_are_stored_only_as_hashes() {
    let app = spawn_app().await;
    app.create_user("alice", "s3cret-pass").await;
    let token = login(&app, "alice", "s3cret-pass").await.body["token"]
        .as_str()
        .unwrap()
        .to_string();
    let raw = std::fs::read(app.db_path()).unwrap();
    let wal = std::fs::read(app.db_path().with_extension("db-wal")).unwrap_or_default();
    for bytes in [raw, wal] {
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "token found in the database"
        );
    }
}

#[tokio::test]
async fn bad_credentials_are_401_and_bad_bodies_400() {
    let app = spawn_app().await;
    app.create_user("alice", "s3cret-pass").await;
    let r = login(&app, "alice", "wrong-pass").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "invalid username or password");
    let r = login(&app, "nobody", "whatever1").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["error"], "invalid username or password");
    let r = app
        .request(
            Method::POST,
            "/api/auth/login",
            None,
            Some(json!({"username": "alice"})),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["success"], false);
}

#[tokio::test]
async fn missing_malformed_and_unknown_tokens_are_401() {
    let app = spawn_app().await;
    let r = app
        .request(Method::GET, "/api/pending-orders", None, None)
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.body["code"], "UNAUTHORIZED");
    let r = app
        .client
        .get(app.url("/api/pending-orders"))
        .header("authorization", "Basic YWxpY2U6eA==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for t in ["os_deadbeef", "garbage", "a.b.c"] {
        assert_eq!(app.get("/api/pending-orders", t).await.status, 401, "{t}");
    }
}

#[tokio::test]
async fn failed_logins_are_rate_limited_with_retry_after() {
    let mut args = test_args();
    args.login_max_failures = 3;
    let app = spawn_with(args).await;
    app.create_user("alice", "s3cret-pass").await;
    for _ in 0..3 {
        assert_eq!(login(&app, "alice", "nope-nope").await.status, 401);
    }
    let r = login(&app, "alice", "s3cret-pass").await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "even the right password waits"
    );
    assert_eq!(r.body["code"], "RATE_LIMITED");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=61).contains(&retry), "retry-after {retry}");
}

#[tokio::test]
async fn jwt_with_user_id_or_sub_is_accepted_and_bad_ones_are_401() {
    let app = spawn_app().await;
    let t = jwt(json!({"userId": "ext-7", "exp": in_an_hour()}), JWT_SECRET);
    let r = app.post_orders(&t, json!([order("j1", "d")])).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let me = app.get("/api/auth/me", &t).await;
    assert_eq!(me.body["user"]["id"], "ext-7");
    // Numeric userId and sub fallback name the same kind of stream.
    let t2 = jwt(json!({"sub": "ext-7", "exp": in_an_hour()}), JWT_SECRET);
    assert_eq!(
        app.get("/api/pending-orders", &t2).await.body["orders"][0]["id"],
        "j1"
    );
    let t3 = jwt(json!({"userId": 99, "exp": in_an_hour()}), JWT_SECRET);
    assert_eq!(app.get("/api/auth/me", &t3).await.body["user"]["id"], "99");

    let expired = jwt(
        json!({"userId": "ext-7", "exp": chrono::Utc::now().timestamp() - 60}),
        JWT_SECRET,
    );
    let wrong_secret = jwt(
        json!({"userId": "ext-7", "exp": in_an_hour()}),
        "another-secret",
    );
    let no_exp = jwt(json!({"userId": "ext-7"}), JWT_SECRET);
    let no_subject = jwt(json!({"exp": in_an_hour()}), JWT_SECRET);
    use base64_url as b64;
    let none_alg = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(format!(r#"{{"userId":"ext-7","exp":{}}}"#, in_an_hour()).as_bytes())
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"userId": "ext-7", "exp": in_an_hour()}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    for (name, bad) in [
        ("expired", expired),
        ("wrong secret", wrong_secret),
        ("no exp", no_exp),
        ("no subject", no_subject),
        ("alg none", none_alg),
        ("HS512", hs512),
    ] {
        let r = app.get("/api/pending-orders", &bad).await;
        assert_eq!(r.status, 401, "{name}");
        assert_eq!(r.body["success"], false);
    }
}

#[tokio::test]
async fn jwts_are_refused_without_a_configured_secret() {
    let mut args = test_args();
    args.jwt_secret = None;
    let app = spawn_with(args).await;
    let t = jwt(json!({"userId": "u", "exp": in_an_hour()}), JWT_SECRET);
    assert_eq!(app.get("/api/pending-orders", &t).await.status, 401);
}

#[tokio::test]
async fn cli_manages_users_and_tokens_against_a_running_server() {
    let app = spawn_app().await;
    let db = app.db_path();
    let (ok, out, err) = cli(
        &db,
        &["user", "add", "carol", "--password-stdin"],
        "carol-pass-1\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("created user carol"));
    let (ok, _, err) = cli(
        &db,
        &["user", "add", "carol", "--password-stdin"],
        "carol-pass-1\n",
    );
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = cli(&db, &["user", "add", "dave", "--password-stdin"], "short\n");
    assert!(!ok && err.contains("at least 8"), "{err}");
    let (ok, _, err) = cli(&db, &["user", "add", "erin"], "");
    assert!(!ok && err.contains("--password-stdin"), "{err}");

    let (_, out, _) = cli(&db, &["user", "list"], "");
    assert!(out.contains("carol") && out.contains("active"));

    // The new password works over HTTP; the old one does not.
    let (ok, _, _) = cli(
        &db,
        &["user", "passwd", "carol", "--password-stdin"],
        "carol-pass-2\n",
    );
    assert!(ok);
    assert_eq!(login(&app, "carol", "carol-pass-1").await.status, 401);
    assert_eq!(login(&app, "carol", "carol-pass-2").await.status, 200);

    // token create prints the token as the last line of stdout.
    let (ok, out, _) = cli(&db, &["token", "create", "carol", "--label", "tablet"], "");
    assert!(ok);
    let token = out.lines().last().unwrap().trim().to_string();
    assert_eq!(app.get("/api/auth/me", &token).await.status, 200);
    let (_, out, _) = cli(&db, &["token", "list", "carol"], "");
    assert!(out.contains("tablet") && out.contains("active"), "{out}");
    assert!(!out.contains(&token));
    let id = ordersync::auth::token_hash(&token)[..12].to_string();
    let (ok, out, err) = cli(&db, &["token", "revoke", &id], "");
    assert!(ok, "{err}");
    assert!(out.contains("revoked"));
    assert_eq!(app.get("/api/auth/me", &token).await.status, 401);

    // Disabling refuses logins and existing tokens.
    let (_, out, _) = cli(&db, &["token", "create", "carol"], "");
    let token = out.lines().last().unwrap().trim().to_string();
    // A JWT naming carol's account, used once so the server has verified it.
    let carol_id = app.get("/api/auth/me", &token).await.body["user"]["id"].clone();
    let carol_jwt = jwt(json!({"userId": carol_id, "exp": in_an_hour()}), JWT_SECRET);
    assert_eq!(app.get("/api/auth/me", &carol_jwt).await.status, 200);
    let (ok, _, _) = cli(&db, &["user", "disable", "carol"], "");
    assert!(ok);
    assert_eq!(login(&app, "carol", "carol-pass-2").await.status, 401);
    assert_eq!(app.get("/api/auth/me", &token).await.status, 401);
    // The account is checked on every request, also for an already verified JWT.
    assert_eq!(app.get("/api/auth/me", &carol_jwt).await.status, 401);
    let (ok, _, _) = cli(&db, &["user", "enable", "carol"], "");
    assert!(ok);
    assert_eq!(app.get("/api/auth/me", &token).await.status, 200);
    assert_eq!(app.get("/api/auth/me", &carol_jwt).await.status, 200);
    let (ok, out, _) = cli(&db, &["token", "revoke", "--all", "carol"], "");
    assert!(ok && out.contains("revoked 2"), "{out}");
}
