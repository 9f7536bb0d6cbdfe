//! Authentication and permissions, as a client sees them: every way a token can be refused
//! (each with `UNAUTHORIZED` and close 4001), every key type, topic grants and namespace rules
//! on subscribe and publish (`PERMISSION_DENIED`), token refresh and expiry (close 4004), the
//! server-set `from` of direct messages, a forbidden Origin (403), and tokens kept out of logs.
//!
//! The keys under `tests/fixtures/jwt/` were made for these tests only.

mod common;
mod interop;
use common::*;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wsgate::config::{Access, NamespaceSettings, PublicKeySource, Settings};

const SECRET: &str = "test-secret";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// A token for `sub` expiring `exp_in` seconds from now, with extra claims merged in.
fn claims(sub: &str, exp_in: i64, extra: Value) -> Value {
    let mut c = json!({"sub": sub, "exp": now() + exp_in});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn signed(alg: Algorithm, kid: Option<&str>, private_pem: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private_pem)).expect("fixture key");
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no fixture for {other:?}"),
    }
    .expect("private key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &key).expect("encode")
}

/// base64url without padding (RFC 7515), for hand-made tokens.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn with_secret(s: &mut Settings) {
    s.auth.jwt_secret = Some(SECRET.into());
}

fn public_key(path: &str, kid: Option<&str>) -> PublicKeySource {
    PublicKeySource {
        path: fixture(path),
        kid: kid.map(str::to_string),
    }
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

async fn user_of(addr: std::net::SocketAddr, token: &str) -> Value {
    let (_c, hello) = connect(addr, &format!("/ws?token={token}")).await;
    hello["data"]["userId"].clone()
}

#[tokio::test]
async fn valid_token_sets_the_user_and_query_user_is_ignored() {
    let node = start_node(with_secret).await;
    let t = hs256(SECRET, &claims("alice", 600, json!({})));
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
async fn missing_expired_early_and_forged_tokens_are_refused_with_4001() {
    let node = start_node(|s| {
        with_secret(s);
        s.auth.leeway = Duration::from_secs(30);
    })
    .await;
    let addr = node.local_addr;
    let why = refused(addr, "/ws?user_id=alice").await;
    assert!(why.contains("token is required"), "{why}");

    // Expiry and nbf at the edges of the 30 s leeway.
    let expired = hs256(SECRET, &claims("alice", -3600, json!({})));
    let why = refused(addr, &format!("/ws?token={expired}")).await;
    assert!(why.contains("expired"), "{why}");
    let within_leeway = hs256(SECRET, &claims("alice", -10, json!({})));
    assert_eq!(user_of(addr, &within_leeway).await, "alice");
    let early = hs256(SECRET, &claims("alice", 600, json!({"nbf": now() + 600})));
    let why = refused(addr, &format!("/ws?token={early}")).await;
    assert!(why.contains("not valid yet"), "{why}");
    let nbf_within_leeway = hs256(SECRET, &claims("alice", 600, json!({"nbf": now() + 10})));
    assert_eq!(user_of(addr, &nbf_within_leeway).await, "alice");

    let forged = hs256("other-secret", &claims("alice", 600, json!({})));
    let why = refused(addr, &format!("/ws?token={forged}")).await;
    assert!(why.contains("signature"), "{why}");
    let why = refused(addr, "/ws?token=not-a-jwt").await;
    assert!(why.contains("not a JWT"), "{why}");
    let no_sub = hs256(SECRET, &json!({"exp": now() + 600}));
    let why = refused(addr, &format!("/ws?token={no_sub}")).await;
    assert!(why.contains("sub"), "{why}");

    assert_eq!(node.context().hub.connection_count(), 0);
}

/// At the expiry edge with no leeway: a token whose `exp` is this very second would be closed for
/// expiry as soon as it connected (and its client would reconnect in a loop), so it is refused.
#[tokio::test]
async fn a_token_expiring_now_is_refused_at_connect() {
    let node = start_node(|s| {
        with_secret(s);
        s.auth.leeway = Duration::ZERO;
    })
    .await;
    let now_token = hs256(SECRET, &claims("alice", 0, json!({})));
    let why = refused(node.local_addr, &format!("/ws?token={now_token}")).await;
    assert!(why.contains("expired"), "{why}");
    let later = hs256(SECRET, &claims("alice", 3, json!({})));
    assert_eq!(user_of(node.local_addr, &later).await, "alice");
}

#[tokio::test]
async fn token_size_limit_at_its_edge() {
    let token = hs256(
        SECRET,
        &claims("alice", 600, json!({"pad": "x".repeat(900)})),
    );
    let limit = token.len();
    let node = start_node(|s| {
        with_secret(s);
        s.auth.max_token_bytes = limit;
    })
    .await;
    // Exactly the limit is read and verified; one byte more is refused before any parsing.
    assert_eq!(user_of(node.local_addr, &token).await, "alice");
    let why = refused(node.local_addr, &format!("/ws?token={token}x")).await;
    assert!(
        why.contains(&format!("over the {limit}-byte limit")),
        "{why}"
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let node = start_node(with_secret).await;
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64(claims("alice", 600, json!({})).to_string().as_bytes());
    for token in [format!("{header}.{body}."), format!("{header}.{body}.c2ln")] {
        refused(node.local_addr, &format!("/ws?token={token}")).await;
    }
}

#[tokio::test]
async fn every_key_type_verifies_its_own_tokens() {
    let node = start_node(|s| {
        with_secret(s);
        s.auth.public_keys = vec![
            public_key("rsa_public.pem", None),
            public_key("ec_public.pem", None),
            public_key("ed25519_public.pem", Some("ed-1")),
        ];
        s.auth.jwks_file = Some(fixture("jwks.json"));
    })
    .await;
    let addr = node.local_addr;
    let c = |sub: &str| claims(sub, 600, json!({}));
    assert_eq!(user_of(addr, &hs256(SECRET, &c("hs"))).await, "hs");
    let rs = signed(Algorithm::RS256, None, "rsa_private.pem", &c("rs"));
    assert_eq!(user_of(addr, &rs).await, "rs");
    let ps = signed(Algorithm::PS256, None, "rsa_private.pem", &c("ps"));
    assert_eq!(user_of(addr, &ps).await, "ps");
    let es = signed(Algorithm::ES256, None, "ec_private.pem", &c("es"));
    assert_eq!(user_of(addr, &es).await, "es");
    let ed = signed(
        Algorithm::EdDSA,
        Some("ed-1"),
        "ed25519_private.pem",
        &c("ed"),
    );
    assert_eq!(user_of(addr, &ed).await, "ed");
    let jwks = signed(
        Algorithm::RS256,
        Some("jwks-rsa-1"),
        "rsa2_private.pem",
        &c("jwks"),
    );
    assert_eq!(user_of(addr, &jwks).await, "jwks");

    // The JWKS key pins RS256: the same key under PS256 is refused.
    let pinned = signed(
        Algorithm::PS256,
        Some("jwks-rsa-1"),
        "rsa2_private.pem",
        &c("x"),
    );
    refused(addr, &format!("/ws?token={pinned}")).await;
    // A kid nobody has.
    let unknown = signed(Algorithm::RS256, Some("nope"), "rsa2_private.pem", &c("x"));
    let why = refused(addr, &format!("/ws?token={unknown}")).await;
    assert!(why.contains("kid"), "{why}");
    // A key named by kid is not used for tokens without one (and vice versa).
    let ed_without_kid = signed(Algorithm::EdDSA, None, "ed25519_private.pem", &c("x"));
    refused(addr, &format!("/ws?token={ed_without_kid}")).await;
    // Signed by a key that is not configured (the JWKS key's private half, no kid).
    let stranger = signed(Algorithm::RS256, None, "rsa2_private.pem", &c("x"));
    let why = refused(addr, &format!("/ws?token={stranger}")).await;
    assert!(why.contains("signature"), "{why}");
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    // The classic attack: the server holds an RSA public key; the attacker signs HS256 with
    // that public key's PEM text as the HMAC secret.
    let public_pem = std::fs::read_to_string(fixture("rsa_public.pem")).expect("pem");
    let forged = hs256(&public_pem, &claims("root", 600, json!({})));

    // Only an RSA key: HS256 is not on the (derived) allow-list.
    let node = start_node(|s| s.auth.public_keys = vec![public_key("rsa_public.pem", None)]).await;
    let why = refused(node.local_addr, &format!("/ws?token={forged}")).await;
    assert!(why.contains("not accepted"), "{why}");
    let genuine = signed(
        Algorithm::RS256,
        None,
        "rsa_private.pem",
        &claims("rs", 600, json!({})),
    );
    assert_eq!(user_of(node.local_addr, &genuine).await, "rs");

    // HS256 allowed too, with its own secret: the public key is never used as an HMAC secret.
    let node = start_node(|s| {
        with_secret(s);
        s.auth.public_keys = vec![public_key("rsa_public.pem", None)];
        s.auth.algorithms = vec!["HS256".into(), "RS256".into()];
    })
    .await;
    let why = refused(node.local_addr, &format!("/ws?token={forged}")).await;
    assert!(why.contains("signature"), "{why}");

    // The allow-list comes from config: RS256 configured, an RS512 token is refused.
    let node = start_node(|s| {
        s.auth.public_keys = vec![public_key("rsa_public.pem", None)];
        s.auth.algorithms = vec!["RS256".into()];
    })
    .await;
    let pem = std::fs::read(fixture("rsa_private.pem")).expect("pem");
    let rs512 = encode(
        &Header::new(Algorithm::RS512),
        &claims("x", 600, json!({})),
        &EncodingKey::from_rsa_pem(&pem).expect("key"),
    )
    .expect("encode");
    let why = refused(node.local_addr, &format!("/ws?token={rs512}")).await;
    assert!(why.contains("RS512"), "{why}");
}

/// Namespaces: `private` is subscribe-by-grant, `chat` publish-by-grant, `members` for
/// authenticated users, `system` publish by nobody.
fn namespaced(s: &mut Settings) {
    with_secret(s);
    let ns = |subscribe, publish| NamespaceSettings {
        subscribe,
        publish,
        ..NamespaceSettings::default()
    };
    s.namespaces
        .insert("private".into(), ns(Access::Granted, Access::Nobody));
    s.namespaces
        .insert("chat".into(), ns(Access::Anyone, Access::Granted));
    s.namespaces.insert(
        "members".into(),
        ns(Access::Authenticated, Access::Authenticated),
    );
}

#[tokio::test]
async fn forbidden_topics_are_refused_on_subscribe_and_publish() {
    let node = start_node(namespaced).await;
    let addr = node.local_addr;
    let grants = json!({"topics": ["chat:room1", "private:{sub}"]});
    let t = hs256(SECRET, &claims("alice", 600, grants));
    let (mut c, _) = connect(addr, &format!("/ws?token={t}")).await;

    let ack = c
        .request(
            json!({"type":"subscribe","id":"s1","data":{"topics":["private:alice","chat:room2"]}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let err = c
        .request(
            json!({"type":"subscribe","id":"s2","data":{"topics":["chat:room3","private:bob"]}}),
        )
        .await;
    assert_eq!(err["data"]["code"], "PERMISSION_DENIED", "{err}");
    assert_eq!(
        err["data"]["details"]["topics"],
        json!(["private:bob"]),
        "{err}"
    );
    assert!(
        err["data"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("topics claim"),
        "{err}"
    );
    // All or nothing: chat:room3 was not subscribed either.
    let (status, presence) = get(addr, "/api/presence?topic=chat:room3").await;
    assert_eq!(status, 200);
    assert_eq!(presence["count"], 0, "{presence}");

    let ok = c
        .request(json!({"type":"publish","id":"p1","topic":"chat:room1","data":{"t":1}}))
        .await;
    assert_eq!(ok["type"], "ack", "{ok}");
    let denied = c
        .request(json!({"type":"publish","id":"p2","topic":"chat:room2","data":{"t":1}}))
        .await;
    assert_eq!(denied["data"]["code"], "PERMISSION_DENIED", "{denied}");
    let denied = c
        .request(json!({"type":"publish","id":"p3","topic":"private:alice","data":{}}))
        .await;
    assert_eq!(denied["data"]["code"], "PERMISSION_DENIED", "{denied}");
    assert!(
        denied["data"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("does not allow"),
        "{denied}"
    );
    let ok = c
        .request(json!({"type":"publish","id":"p4","topic":"members:x","data":{}}))
        .await;
    assert_eq!(ok["type"], "ack", "{ok}");

    // Connect-time subscriptions go through the same check.
    let (mut c2, hello) = connect(
        addr,
        &format!("/ws?token={t}&subscriptions=chat:a,private:bob"),
    )
    .await;
    assert_eq!(hello["data"]["subscriptions"], json!([]), "{hello}");
    let err = c2.expect_type("error").await;
    assert_eq!(err["data"]["code"], "PERMISSION_DENIED", "{err}");
}

#[tokio::test]
async fn authenticated_namespaces_need_a_user_even_with_auth_off() {
    let node = start_node(|s| {
        namespaced(s);
        s.auth.jwt_secret = None;
    })
    .await;
    let (mut anon, _) = connect(node.local_addr, "/ws").await;
    let err = anon
        .request(json!({"type":"subscribe","id":1,"data":{"topic":"members:x"}}))
        .await;
    assert_eq!(err["data"]["code"], "PERMISSION_DENIED", "{err}");
    // Granted namespaces need a token, so with auth off nobody gets in.
    let (mut bob, _) = connect(node.local_addr, "/ws?user_id=bob").await;
    let ack = bob
        .request(json!({"type":"subscribe","id":2,"data":{"topic":"members:x"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let err = bob
        .request(json!({"type":"subscribe","id":3,"data":{"topic":"private:bob"}}))
        .await;
    assert_eq!(err["data"]["code"], "PERMISSION_DENIED", "{err}");
}

#[tokio::test]
async fn presence_off_keeps_a_namespace_out_of_presence() {
    let node = start_node(|s| {
        s.namespaces.insert(
            "quiet".into(),
            NamespaceSettings {
                presence: false,
                ..NamespaceSettings::default()
            },
        );
    })
    .await;
    let (mut c, _) = connect(node.local_addr, "/ws?user_id=u1").await;
    for topic in ["quiet:a", "loud:a"] {
        let ack = c
            .request(json!({"type":"subscribe","id":topic,"data":{"topic":topic}}))
            .await;
        assert_eq!(ack["type"], "ack");
    }
    let (status, quiet) = get(node.local_addr, "/api/presence?topic=quiet:a").await;
    assert_eq!(status, 400, "{quiet}");
    assert_eq!(quiet["error"]["code"], "INVALID_OPERATION", "{quiet}");
    let (status, loud) = get(node.local_addr, "/api/presence?topic=loud:a").await;
    assert_eq!(status, 200, "{loud}");
    assert_eq!(loud["count"], 1, "{loud}");
}

#[tokio::test]
async fn a_spoofed_from_on_a_direct_message_is_replaced() {
    let node = start_node(with_secret).await;
    let addr = node.local_addr;
    let alice = hs256(SECRET, &claims("alice", 600, json!({})));
    let bob = hs256(SECRET, &claims("bob", 600, json!({})));
    let (mut a, _) = connect(addr, &format!("/ws?token={alice}")).await;
    let (mut b, _) = connect(addr, &format!("/ws?token={bob}")).await;
    a.send_json(
        json!({"type":"chat","to":"bob","from":"admin","data":{"from":"admin","text":"hi"}}),
    )
    .await;
    let msg = b.expect_type("chat").await;
    assert_eq!(msg["from"], "alice", "{msg}");
    assert_eq!(msg["to"], "bob", "{msg}");
    // The payload is the sender's own business and arrives untouched.
    assert_eq!(msg["data"]["from"], "admin", "{msg}");
}

#[tokio::test]
async fn refresh_before_expiry_keeps_the_connection() {
    let node = start_node(|s| {
        with_secret(s);
        s.auth.leeway = Duration::ZERO;
    })
    .await;
    let short = hs256(SECRET, &claims("alice", 2, json!({})));
    let (mut c, _) = connect(node.local_addr, &format!("/ws?token={short}")).await;

    // Refusals leave the connection as it was.
    let expired = hs256(SECRET, &claims("alice", -60, json!({})));
    let err = c
        .request(json!({"type":"refresh","id":"r0","data":{"token": expired}}))
        .await;
    assert_eq!(err["data"]["code"], "UNAUTHORIZED", "{err}");
    let other = hs256(SECRET, &claims("mallory", 600, json!({})));
    let err = c
        .request(json!({"type":"refresh","id":"r1","data":{"token": other}}))
        .await;
    assert_eq!(err["data"]["code"], "PERMISSION_DENIED", "{err}");

    let long = hs256(SECRET, &claims("alice", 600, json!({"topics": ["x"]})));
    let ack = c
        .request(json!({"type":"refresh","id":"r2","data":{"token": long}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["data"]["action"], "refresh");
    assert!(ack["data"]["expiresAt"].as_u64().unwrap_or(0) > (now() as u64 + 500) * 1000);
    // Past the first token's expiry the connection still answers.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let pong = c.request(json!({"type":"ping","id":"p"})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

#[tokio::test]
async fn without_refresh_an_expired_token_ends_the_connection_with_4004() {
    let node = start_node(|s| {
        with_secret(s);
        s.auth.leeway = Duration::ZERO;
    })
    .await;
    let short = hs256(SECRET, &claims("alice", 2, json!({})));
    let mut c = connect_raw(node.local_addr, &format!("/ws?token={short}")).await;
    let started = std::time::Instant::now();
    let (code, _reason, seen) = c.expect_close().await;
    assert_eq!(code, 4004, "{seen:?}");
    let notice = find_disconnect(&seen, 4004, true);
    assert!(
        notice["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{notice}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // A refresh after the deadline is too late: the connection is gone.
    assert_eq!(node.context().hub.connection_count(), 0);
}

#[tokio::test]
async fn a_forbidden_origin_gets_403_before_the_upgrade() {
    let node = start_node(|s| {
        s.ws.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://*.partner.org".into(),
        ]
    })
    .await;
    let addr = node.local_addr;
    let upgrade = |origin: &'static str| async move {
        let mut req = format!("ws://{addr}/ws")
            .into_client_request()
            .expect("request");
        req.headers_mut()
            .insert("origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(req).await
    };
    match upgrade("https://evil.example.com").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body: Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("json");
            assert_eq!(body["error"]["code"], "PERMISSION_DENIED", "{body}");
        }
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    assert!(upgrade("https://app.example.com").await.is_ok());
    assert!(upgrade("https://eu.partner.org").await.is_ok());
    assert!(upgrade("https://partner.org.evil.com").await.is_err());
}

/// Secrets never reach the log, even at trace level: the JWT secret, tokens (query and header,
/// valid and invalid), and API keys.
#[tokio::test]
async fn tokens_and_keys_stay_out_of_the_logs() {
    let secret = "jwt-secret-5f2a9c";
    let api_key = "api-key-8d1e7b";
    let gw =
        interop::Gateway::start_logging("trace", &["--jwt-secret", secret, "--api-key", api_key]);
    let good = hs256(secret, &claims("alice", 600, json!({})));
    let bad = hs256("wrong", &claims("alice", 600, json!({})));
    let (mut c, _) = connect(gw.addr, &format!("/ws?token={good}")).await;
    let pong = c.request(json!({"type":"ping","id":1})).await;
    assert_eq!(pong["type"], "pong");
    refused(gw.addr, &format!("/ws?token={bad}")).await;
    let with_key = |key| [("X-API-Key", key)];
    let (status, _) = http(gw.addr, "GET", "/api/ws/status", None, &with_key(api_key)).await;
    assert_eq!(status, 200);
    let (status, _) = http(
        gw.addr,
        "GET",
        "/api/ws/status",
        None,
        &with_key("api-key-wrong-1"),
    )
    .await;
    assert_eq!(status, 401);
    c.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = gw.output();
    // The log did record these connections, so its silence about secrets means something.
    assert!(log.contains("connection opened"), "{log}");
    assert!(log.contains("connection refused"), "{log}");
    for needle in [secret, api_key, "api-key-wrong-1", &good, &bad] {
        assert!(
            !log.contains(needle),
            "{needle:?} appears in the log:\n{log}"
        );
    }
    // Not even a signature fragment of a token.
    for token in [&good, &bad] {
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(
            !log.contains(signature),
            "a token signature appears in the log:\n{log}"
        );
    }
}

/// Keys rotated into the JWKS file are taken without a restart: a token naming a `kid` the
/// node does not have makes it read the file again (at most once per KEY_RELOAD_INTERVAL), so
/// a kid added meanwhile verifies; a kid that is still unknown is refused.
#[tokio::test]
async fn a_kid_rotated_into_the_jwks_file_is_taken_without_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let jwks_path = dir.path().join("jwks.json");
    let original = std::fs::read_to_string(fixture("jwks.json")).expect("fixture");
    std::fs::write(&jwks_path, original.replace("jwks-rsa-1", "retired-1")).expect("write");
    let path = jwks_path.clone();
    let node = start_node(move |s| s.auth.jwks_file = Some(path)).await;
    let addr = node.local_addr;
    let c = |sub: &str| claims(sub, 600, json!({}));
    let old = signed(
        Algorithm::RS256,
        Some("retired-1"),
        "rsa2_private.pem",
        &c("old"),
    );
    assert_eq!(user_of(addr, &old).await, "old");

    // The key is rotated in under a new kid (and the old one dropped).
    std::fs::write(&jwks_path, &original).expect("rewrite");
    let new = signed(
        Algorithm::RS256,
        Some("jwks-rsa-1"),
        "rsa2_private.pem",
        &c("new"),
    );
    assert_eq!(user_of(addr, &new).await, "new");
    let why = refused(addr, &format!("/ws?token={old}")).await;
    assert!(why.contains("kid"), "{why}");
}
