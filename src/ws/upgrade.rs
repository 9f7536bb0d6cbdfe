//! The WebSocket handshake: who is connecting, whether they may, and the hand-over to a session.
//!
//! Refusals about the request itself are HTTP answers (403 for a forbidden Origin, 400 for a
//! request that is not a WebSocket upgrade, 503 while shutting down, 429 for a client address
//! over its connect rate or connection limit, which must stay cheap under a flood). Refusals of
//! the client (bad or missing token: 4001; full node: 1013; user at its connection limit: 4029)
//! complete the upgrade and say why in an `error` message and a close code, because a browser
//! cannot read the body of a failed upgrade.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, ORIGIN, RETRY_AFTER, SEC_WEBSOCKET_EXTENSIONS};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::deflate;
use super::session::{self, Identity, Refused, SessionKind, SessionStart};
use crate::auth::{self, Credentials};
use crate::http::{json_error, json_error_status, Body};
use crate::hub::DeflateParams;
use crate::limits::peer::{IpPermit, IpRefused, PeerPermits};
use crate::limits::Slot;
use crate::node::NodeContext;
use crate::protocol::codes::{CloseCode, ErrorCode};
use crate::protocol::envelope::ErrorBody;

/// Longest accepted client label.
const MAX_CLIENT_ID_LEN: usize = 128;

/// Answers an upgrade request on one of the WebSocket paths (`kind`: the protocol paths, or the
/// echo path), from TCP peer `peer`. Both go through the same checks: origin, per-address
/// limits, authentication, admission, per-user limit.
pub fn handle(
    ctx: Arc<NodeContext>,
    mut req: Request<Incoming>,
    kind: SessionKind,
    peer: SocketAddr,
) -> Response<Body> {
    if ctx.is_shutting_down() {
        crate::metrics::connection_refused("shutting_down");
        return json_error(ErrorCode::Unavailable, "the node is shutting down");
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        crate::metrics::connection_refused("bad_request");
        return json_error(
            ErrorCode::InvalidOperation,
            "this path takes a WebSocket upgrade (GET with Upgrade: websocket)",
        );
    }
    let origin = req.headers().get(ORIGIN).map(HeaderValue::as_bytes);
    if !auth::origin::allowed(&ctx.settings.ws.allowed_origins, origin) {
        let shown = String::from_utf8_lossy(origin.unwrap_or_default());
        crate::metrics::connection_refused("origin");
        return json_error(
            ErrorCode::PermissionDenied,
            format!("origin {shown:?} is not allowed"),
        );
    }
    let ip_permit = match admit_address(&ctx, peer, &req) {
        Ok(permit) => permit,
        Err(refused) => return address_refusal(peer, &refused),
    };
    let params = ConnectParams::from_request(&req);
    if params
        .client_id
        .as_ref()
        .is_some_and(|c| c.len() > MAX_CLIENT_ID_LEN)
    {
        crate::metrics::connection_refused("bad_request");
        return json_error(
            ErrorCode::InvalidMessageFormat,
            format!("clientId is longer than {MAX_CLIENT_ID_LEN} bytes"),
        );
    }
    let (credentials, auth_error) =
        match ctx.auth.connecting(params.token.as_deref(), params.user_id) {
            Ok(credentials) => (credentials, None),
            Err(e) => (Credentials::default(), Some(e)),
        };
    let identity = Identity {
        client_id: params.client_id.unwrap_or_else(generated_client_id),
        credentials,
    };
    let deflate = negotiate_deflate(&ctx, &req);
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            crate::metrics::connection_refused("bad_request");
            return json_error(ErrorCode::InvalidOperation, format!("bad upgrade: {e}"));
        }
    };
    let deflate = match deflate {
        Some((params, agreement)) => match HeaderValue::from_str(&agreement.response()) {
            Ok(value) => {
                response
                    .headers_mut()
                    .insert(SEC_WEBSOCKET_EXTENSIONS, value);
                Some(params)
            }
            Err(_) => None,
        },
        None => None,
    };

    let initial_topics = params.subscriptions;
    tokio::spawn(async move {
        let admission = match auth_error {
            Some(e) => Err(Refused {
                error: ErrorCode::Unauthorized,
                close: CloseCode::Unauthorized,
                message: e.to_string(),
            }),
            None => admit(&ctx).await,
        };
        let mut peer_permits = PeerPermits {
            ip: ip_permit,
            ..PeerPermits::default()
        };
        let admission = admit_user(
            &ctx,
            admission,
            identity.credentials.user_id.as_deref(),
            &mut peer_permits,
        );
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let upgraded = ws.into_inner().into_inner();
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => parts,
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                return;
            }
        };
        // `read_buf` is hyper's whole read buffer (8 KiB) frozen, even when nothing or a few
        // bytes came after the request. Kept in the session it would cost every connection
        // those 8 KiB for its whole life: copy what is there and let the buffer go now (a
        // field left in `parts` would live until this task ends).
        let read_ahead = if parts.read_buf.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&parts.read_buf)
        };
        drop(parts.read_buf);
        session::run(
            ctx,
            SessionStart {
                kind,
                stream: parts.io.into_inner(),
                read_ahead,
                identity,
                initial_topics,
                deflate,
                admission,
                peer_permits,
            },
        )
        .await;
    });
    response.map(|_| Body::new(Bytes::new()))
}

/// A connection slot: from this node's current limit, or after the broker raised it (cluster
/// admission reserves room block by block, so most connects never wait on Redis).
async fn admit(ctx: &NodeContext) -> Result<Slot, Refused> {
    if let Some(slot) = ctx
        .slots
        .acquire_or_grow(|| ctx.broker.grow_admission())
        .await
    {
        return Ok(slot);
    }
    Err(Refused {
        error: ErrorCode::TooManyConnections,
        close: CloseCode::TryAgainLater,
        message: "the server is at its connection limit; retry later".into(),
    })
}

/// Per-address limits (`websocket.per_ip`), checked before anything costlier.
fn admit_address<B>(
    ctx: &NodeContext,
    peer: SocketAddr,
    req: &Request<B>,
) -> Result<IpPermit, IpRefused> {
    if !ctx.peers.per_ip_enabled() {
        return Ok(IpPermit::default());
    }
    ctx.peers.admit_ip(ctx.peers.client_ip(peer, req.headers()))
}

/// A per-address refusal: a plain HTTP 429 (`Retry-After` for the connect rate) that also
/// closes the TCP connection, so a flood costs one small answer per attempt.
fn address_refusal(peer: SocketAddr, refused: &IpRefused) -> Response<Body> {
    let (reason, code) = match refused {
        IpRefused::ConnectRate { .. } => ("per_ip_rate", ErrorCode::RateLimitExceeded),
        IpRefused::TooManyConnections { .. } => ("per_ip", ErrorCode::TooManyConnections),
    };
    crate::metrics::connection_refused(reason);
    tracing::debug!(%peer, %refused, "connection refused before the upgrade");
    let mut body = ErrorBody::new(code, refused.to_string());
    if let Some(ms) = refused.retry_after_ms() {
        body = body.retry_after_ms(ms);
    }
    let mut resp = json_error_status(StatusCode::TOO_MANY_REQUESTS, body);
    if let Some(secs) = refused.retry_after_secs() {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The per-user limit (`websocket.per_user`), once the node has admitted the connection and the
/// user is known. A refusal gives the node slot back and completes the upgrade like the node's
/// own refusals: an `error` message `TOO_MANY_CONNECTIONS`, then close 4029.
fn admit_user(
    ctx: &NodeContext,
    admission: Result<Slot, Refused>,
    user_id: Option<&str>,
    permits: &mut PeerPermits,
) -> Result<Slot, Refused> {
    let slot = admission?;
    let Some(user) = user_id else {
        return Ok(slot);
    };
    match ctx.peers.admit_user(user) {
        Ok(permit) => {
            permits.user = permit;
            Ok(slot)
        }
        Err(refused) => Err(Refused {
            error: ErrorCode::TooManyConnections,
            close: CloseCode::UserConnectionLimit,
            message: refused.to_string(),
        }),
    }
}

/// permessage-deflate parameters (and the accepted offer) when the config allows it and the
/// client offered it in a form the server can honour.
fn negotiate_deflate<B>(
    ctx: &NodeContext,
    req: &Request<B>,
) -> Option<(DeflateParams, deflate::Agreement)> {
    let compression = &ctx.settings.compression;
    if !compression.enabled {
        return None;
    }
    let offers = req
        .headers()
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok());
    deflate::negotiate(offers).map(|agreement| {
        let params = DeflateParams {
            level: compression.level,
            threshold: compression.threshold,
            window_bits: agreement.server_window_bits,
        };
        (params, agreement)
    })
}

fn generated_client_id() -> String {
    format!("c-{:016x}", rand::random::<u64>())
}

/// What a client may say in the upgrade request (SPEC section 2).
#[derive(Debug, Default)]
struct ConnectParams {
    token: Option<String>,
    client_id: Option<String>,
    user_id: Option<String>,
    subscriptions: Vec<String>,
}

impl ConnectParams {
    fn from_request<B>(req: &Request<B>) -> Self {
        let mut p = ConnectParams::default();
        let query = req.uri().query().unwrap_or_default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "token" => p.token = Some(value.into_owned()),
                "clientId" | "client_id" => p.client_id = Some(value.into_owned()),
                "user_id" | "userId" => p.user_id = Some(value.into_owned()),
                "subscriptions" => p.subscriptions.extend(parse_topic_list(&value)),
                _ => {}
            }
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if p.client_id.is_none() {
            p.client_id = header("x-client-id");
        }
        if p.token.is_none() {
            p.token = header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ").map(|t| t.trim().to_string()));
        }
        p.client_id = p.client_id.filter(|c| !c.is_empty());
        p.user_id = p.user_id.filter(|u| !u.is_empty());
        p
    }
}

/// `["a","b"]` (JSON) or `a,b` (comma list). A malformed JSON list is kept whole so that topic
/// validation refuses it with a message, rather than it being silently dropped.
fn parse_topic_list(value: &str) -> Vec<String> {
    let value = value.trim();
    if value.starts_with('[') {
        if let Ok(list) = serde_json::from_str::<Vec<String>>(value) {
            return list;
        }
        return vec![value.to_string()];
    }
    value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_lists_in_both_forms() {
        assert_eq!(
            parse_topic_list(r#"["routes","metrics"]"#),
            ["routes", "metrics"]
        );
        assert_eq!(parse_topic_list("routes, metrics,"), ["routes", "metrics"]);
        assert_eq!(parse_topic_list("[oops"), ["[oops"]);
    }

    #[test]
    fn params_from_query_and_headers() {
        let req = Request::builder()
            .uri("/ws?client_id=c1&user_id=u1&token=t&subscriptions=a,b")
            .body(())
            .expect("request");
        let p = ConnectParams::from_request(&req);
        assert_eq!(p.client_id.as_deref(), Some("c1"));
        assert_eq!(p.user_id.as_deref(), Some("u1"));
        assert_eq!(p.token.as_deref(), Some("t"));
        assert_eq!(p.subscriptions, ["a", "b"]);
        let req = Request::builder()
            .uri("/ws")
            .header("X-Client-ID", "h1")
            .header("Authorization", "Bearer abc")
            .body(())
            .expect("request");
        let p = ConnectParams::from_request(&req);
        assert_eq!(
            (p.client_id.as_deref(), p.token.as_deref()),
            (Some("h1"), Some("abc"))
        );
    }
}
