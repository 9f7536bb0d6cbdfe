//! JWT (HS256) identity at connect time: the token's `sub` is the user, a bad or missing token
//! gets an `error` (UNAUTHORIZED) and close 4001, and `user_id` in the query is ignored.

mod common;
use common::*;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret";

fn token(sub: &str, secret: &str, exp_offset_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    encode(
        &Header::default(),
        &json!({"sub": sub, "exp": now + exp_offset_secs}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

/// Connects, and expects an UNAUTHORIZED `error` followed by close 4001; returns the message.
async fn refused(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = connect_raw(addr, path).await;
    let (code, _reason, seen) = c.expect_close().await;
    assert_eq!(code, 4001, "close code; messages {seen:?}");
    assert_eq!(seen[0]["type"], "error", "{seen:?}");
    assert_eq!(seen[0]["data"]["code"], "UNAUTHORIZED", "{seen:?}");
    assert!(
        !seen.iter().any(|m| m["type"] == "connection"),
        "a refused client never gets a connection message: {seen:?}"
    );
    seen[0]["data"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn valid_token_sets_the_user_and_query_user_is_ignored() {
    let node = start_node(|s| s.jwt_secret = Some(SECRET.into())).await;
    let t = token("alice", SECRET, 600);
    let (_c, hello) = connect(node.local_addr, &format!("/ws?token={t}&user_id=mallory")).await;
    assert_eq!(hello["data"]["userId"], "alice");

    // The same token in an Authorization header.
    let mut req = format!("ws://{}/ws", node.local_addr)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {t}").parse().expect("header"),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let hello = Client { ws }.expect_type("connection").await;
    assert_eq!(hello["data"]["userId"], "alice");
}

#[tokio::test]
async fn missing_expired_or_forged_tokens_are_refused_with_4001() {
    let node = start_node(|s| s.jwt_secret = Some(SECRET.into())).await;
    let addr = node.local_addr;
    let why = refused(addr, "/ws?user_id=alice").await;
    assert!(why.contains("token is required"), "{why}");
    let expired = token("alice", SECRET, -3600);
    let why = refused(addr, &format!("/ws?token={expired}")).await;
    assert!(why.contains("xpired"), "{why}");
    let forged = token("alice", "other-secret", 600);
    refused(addr, &format!("/ws?token={forged}")).await;
    refused(addr, "/ws?token=not-a-jwt").await;
    assert_eq!(node.context().hub.connection_count(), 0);
}

#[tokio::test]
async fn without_a_secret_the_query_user_is_taken() {
    let node = start_node(|_| {}).await;
    let (_c, hello) = connect(node.local_addr, "/ws?user_id=bob").await;
    assert_eq!(hello["data"]["userId"], "bob");
}
